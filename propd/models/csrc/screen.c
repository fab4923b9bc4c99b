/* The vocabulary argmax of a greedy step, exact, reading int8 copies of the weights instead of bf16
   (half the bytes of the largest product in a step): an int8 screen with a proven error bound
   picks the columns that can still be the largest, and only their blocks are computed again by the
   very instruction chain of bf16_argmax (``matmul.c``, AVX512-BF16), so the answer is its answer.

   Screen. Per column i, weights w_i (bf16) = s_i q_i + e_i with q_i int8 and |e_i| known; the input
   row x~ (x in bf16, as the product takes it) = t p + f with p int16. The integer dot p.q_i is exact
   (VNNI), and u_i = t s_i (p.q_i) differs from the bf16 product's value v_i by at most
       B_i = |f| |w_i| + |t p| |e_i| + g |x~| |w_i|   (Cauchy-Schwarz; g: fp32 summation over K terms)
   plus float roundings, covered by a slack. With L = max_j (u_j - B_j), every column whose value
   can reach the row's largest has u_i + B_i >= L, so the largest (and every one equal to it) is
   among them. On the default model's decode states: 1-2 columns a row, at most 203 seen.

   Inputs are kept where nothing overflows: weights with |w_i| <= 2^40 (``Int8Screen``) and rows with
   |x~| <= 2^64, so every sum stays far inside fp32's range, and the instruction's flushing of
   denormal inputs and results moves a sum by far less than the bound's absolute 1e-6.

   Only for the bf16 products of AVX512-BF16 (kernel 2 of ``matmul.c``; AMX tiles' sums may round in
   another order), where the CPU has AVX512-VNNI; bf16_screen_ready() says so. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "pool.h"
#include "vec.h"

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#define SCREEN 1
#include <immintrin.h>

#define GROUP 4 /* output blocks screened together (the int8 copy is padded to whole groups: SCREEN_GROUP in kernels.py) */
#define CHUNK 8 /* output blocks a thread takes at a time */
#define SLACK 0x1p-20f

typedef struct {
    const int16_t *p;        /* [M, K] each row's int16 input */
    const int8_t *q;         /* packed int8 weights: per block of 16 columns and 32 inputs, 16 input pairs x 16 columns */
    const float *s, *wn, *en; /* [blocks * 16] per column: scale, |w_i|, |e_i| */
    const float *t, *a, *b;  /* [M] per row: t, |f| + g |x~|, |t p| */
    float *upper;            /* [M, blocks * 16] u_i + B_i */
    float *lower;            /* [chunks, M] each chunk's largest u_i - B_i */
    int64_t M, N, K, blocks;
} Screen;

#define WEIGHTS8(b) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(j->q + ((nb + (b)) * (j->K / 32) + kb) * 512 + pair * 32)))
#define PAIR16(r) _mm512_set1_epi32(pair_of(j->p + (r0 + (r)) * j->K + kb * 32 + 2 * pair))
#define DOT4(r) { __m512i x##r = PAIR16(r); c##r##0 = _mm512_dpwssd_epi32(c##r##0, x##r, w0); c##r##1 = _mm512_dpwssd_epi32(c##r##1, x##r, w1); \
                  c##r##2 = _mm512_dpwssd_epi32(c##r##2, x##r, w2); c##r##3 = _mm512_dpwssd_epi32(c##r##3, x##r, w3); }

static inline int32_t pair_of(const int16_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Block nb's bounds for row r from its integer sums: upper into j->upper, the largest lower into *lowest. */
static inline void bound_block(const Screen *j, int64_t nb, int64_t r, __m512i sums, vf *lowest) {
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    int64_t n0 = nb * 16;
    vf u = (vf)_mm512_cvtepi32_ps(sums) * (splat(j->t[r]) * load(j->s + n0));
    vf bound = splat(j->a[r]) * load(j->wn + n0) + splat(j->b[r]) * load(j->en + n0);
    vf magnitude = (vf)_mm512_abs_ps((__m512)u);
    bound = bound * splat(1.0f + SLACK) + magnitude * splat(SLACK) + splat(1e-6f);
    vi real = lane < (vi){0} + (int32_t)(j->N - n0);
    store(j->upper + r * j->blocks * 16 + n0, pick(real, u + bound, splat(-INFINITY)));
    vf lower = pick(real, u - bound, splat(-INFINITY));
    *lowest = pick(lower > *lowest, lower, *lowest);
}

/* Rows r0 .. r0 + rows (1-4) of the GROUP blocks from nb. */
static void screen_group(const Screen *j, int64_t nb, int64_t r0, int rows, vf *lowest) {
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    __m512i c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
    for (int64_t kb = 0; kb < j->K / 32; ++kb)
        for (int pair = 0; pair < 16; ++pair) {
            __m512i w0 = WEIGHTS8(0), w1 = WEIGHTS8(1), w2 = WEIGHTS8(2), w3 = WEIGHTS8(3);
            DOT4(0)
            if (rows > 1) DOT4(1)
            if (rows > 2) DOT4(2)
            if (rows > 3) DOT4(3)
        }
    const __m512i sums[4][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < GROUP; ++b) bound_block(j, nb + b, r0 + r, sums[r][b], &lowest[r0 + r]);
}

static void screen_blocks(void *arg) {
    const Screen *j = arg;
    vf lowest[32];
    for (int64_t first; (first = pool_take(CHUNK)) < j->blocks;) {
        int64_t last = first + CHUNK < j->blocks ? first + CHUNK : j->blocks;
        for (int64_t r = 0; r < j->M; ++r) lowest[r] = splat(-INFINITY);
        for (int64_t r0 = 0; r0 < j->M; r0 += 4)
            for (int64_t nb = first; nb < last; nb += GROUP) screen_group(j, nb, r0, j->M - r0 < 4 ? (int)(j->M - r0) : 4, lowest);
        for (int64_t r = 0; r < j->M; ++r) {
            float most = -INFINITY;
            for (int l = 0; l < 16; ++l) most = lowest[r][l] > most ? lowest[r][l] : most;
            j->lower[first / CHUNK * j->M + r] = most;
        }
    }
}

/* Block nb of the bf16 product for one row (x as bf16 [K]): bf16_argmax's chain for each column. */
static vf exact_block(const uint16_t *x, const uint16_t *w, int64_t nb, int64_t K) {
    __m512 c = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < K / 32; ++kb)
        for (int pair = 0; pair < 16; ++pair) {
            int32_t xy;
            memcpy(&xy, x + kb * 32 + 2 * pair, sizeof xy);
            c = _mm512_dpbf16_ps(c, (__m512bh)_mm512_set1_epi32(xy), (__m512bh)_mm512_loadu_si512(w + nb * (K / 32 * 512) + kb * 512 + pair * 32));
        }
    return (vf)c;
}

static inline double bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Row r's quantized input and bounds' factors; 0 where the row is not finite or is all zero. */
static int quantize_row(const float *x, uint16_t *xb, int16_t *p, float *t, float *a, float *b, int64_t K) {
    for (int64_t k = 0; k < K; k += W) store_bf16(xb + k, load(x + k)); /* as bf16_argmax rounds it */
    double most = 0.0, norm = 0.0;
    for (int64_t k = 0; k < K; ++k) {
        double v = bf16_value(xb[k]);
        if (!isfinite(v)) return 0;
        most = fabs(v) > most ? fabs(v) : most;
        norm += v * v;
    }
    int64_t limit = (INT32_MAX / 127) / K; /* |p.q| < 2^31: the integer sums cannot wrap */
    limit = limit > 16383 ? 16383 : limit;
    if (most == 0.0 || limit < 127 || sqrt(norm) > 0x1p64) return 0; /* (and |x~||w_i| < 2^104: no sum nears fp32's range) */
    *t = (float)(most / (double)limit);
    double rest = 0.0, kept = 0.0;
    for (int64_t k = 0; k < K; ++k) {
        double v = bf16_value(xb[k]), level = nearbyint(v / *t);
        level = level > limit ? limit : (level < -limit ? -limit : level);
        p[k] = (int16_t)level;
        rest += (v - level * *t) * (v - level * *t);
        kept += (level * *t) * (level * *t);
    }
    *a = (float)((sqrt(rest) + K * 0x1p-23 * sqrt(norm)) * (1 + 1e-6));
    *b = (float)(sqrt(kept) * (1 + 1e-6));
    return 1;
}

/* at [M] = what bf16_argmax gives for x [M, K] (fp32) and the packed bf16 weights w, found by the
   screen over q (int8, packed as w, ``GROUP``-padded ``blocks``) with per-column s, wn, en.
   Returns 0; 1 where the screen cannot answer (a row not finite or all zero, or more than
   ``most_blocks`` blocks of a row left to compute again: call bf16_argmax); -1 without memory. */
int bf16_argmax_screened(const float *x, const uint16_t *w, const int8_t *q, const float *s, const float *wn, const float *en, int64_t *at,
                         int64_t M, int64_t N, int64_t K, int64_t blocks, int64_t most_blocks, int64_t threads) {
    if (M < 1 || M > 32 || K % 32 || blocks % GROUP || blocks * 16 < N) return 1;
    static _Thread_local void *buffer;
    static _Thread_local size_t held;
    int64_t chunks = (blocks + CHUNK - 1) / CHUNK;
    /* one scratch buffer, parts 64-byte aligned: upper [M, blocks * 16], lower, todo, xb, p (a fresh
       mapping of upper's 196 KB a row per call cost its page faults) */
    size_t parts[5] = {sizeof(float) * M * blocks * 16, sizeof(float) * chunks * M, sizeof(int64_t) * (most_blocks + 1),
                       sizeof(uint16_t) * M * K, sizeof(int16_t) * M * K};
    size_t at_part[5], need = 0;
    for (int i = 0; i < 5; ++i) at_part[i] = need, need += (parts[i] + 63) / 64 * 64;
    char *base = scratch(&buffer, &held, need);
    if (!base) return -1;
    float *upper = (float *)(base + at_part[0]), *lower = (float *)(base + at_part[1]);
    int64_t *todo = (int64_t *)(base + at_part[2]);
    uint16_t *xb = (uint16_t *)(base + at_part[3]);
    int16_t *p = (int16_t *)(base + at_part[4]);
    float t[32], a[32], b[32];
    int status = 0;
    for (int64_t r = 0; r < M && !status; ++r) status = !quantize_row(x + r * K, xb + r * K, p + r * K, &t[r], &a[r], &b[r], K);
    if (!status) {
        Screen job = {p, q, s, wn, en, t, a, b, upper, lower, M, N, K, blocks};
        pool_run(screen_blocks, &job, threads);
    }
    for (int64_t r = 0; r < M && !status; ++r) {
        float floor = -INFINITY;
        for (int64_t c = 0; c < chunks; ++c) floor = lower[c * M + r] > floor ? lower[c * M + r] : floor;
        int64_t count = 0;
        for (int64_t nb = 0; nb < (N + 15) / 16 && count <= most_blocks; ++nb) { /* blocks past the weights' own: padding */
            vi reach = (vi)(load(upper + r * blocks * 16 + nb * 16) >= splat(floor));
            int any = 0;
            for (int l = 0; l < 16; ++l) any |= reach[l];
            if (any) todo[count++] = nb;
        }
        if (count > most_blocks || count == 0 || !isfinite(floor)) {
            status = 1;
            break;
        }
        float best = -INFINITY;
        at[r] = -1;
        for (int64_t i = 0; i < count; ++i) { /* blocks in column order: a later column wins only when larger */
            vf v = exact_block(xb + r * K, w, todo[i], K);
            for (int l = 0; l < 16 && todo[i] * 16 + l < N; ++l)
                if (at[r] < 0 || v[l] > best) best = v[l], at[r] = todo[i] * 16 + l;
        }
    }
    return status;
}

int bf16_screen_ready(void) { return 1; }
#else
int bf16_argmax_screened(const float *x, const uint16_t *w, const int8_t *q, const float *s, const float *wn, const float *en, int64_t *at,
                         int64_t M, int64_t N, int64_t K, int64_t blocks, int64_t most_blocks, int64_t threads) {
    (void)x, (void)w, (void)q, (void)s, (void)wn, (void)en, (void)at, (void)M, (void)N, (void)K, (void)blocks, (void)most_blocks, (void)threads;
    return 1;
}

int bf16_screen_ready(void) { return 0; }
#endif
