/* y = x W^T where W is stored as the GGUF's Q4_1 blocks: per 32 inputs of an output, 4-bit levels q
   and fp16 d, m with w = d q + m. A weight costs 5 bits to read rather than bf16's 16, and a
   batch-1 step, which reads every weight once, is bound by those reads (``csrc/matmul.c``). The
   inputs are multiplied as integers by the VNNI instruction (64 products an instruction where the
   bf16 one takes 32; 4 levels a byte unpack in 3 ops). Each row's 32 inputs of a block are rounded
   to integers a of a scale s (a = x / s to the nearest, ties to even):
   - ``avx512q4`` (the Q4_1 route): s = max |x| / 32512, a in 16 bits kept as two int8 planes,
     a = 256 h + l (h = (a + 128) >> 8 in -127..127, l in -128..127), each plane multiplied by the
     instruction: the products come within 4e-5 of the exact ones, where the bf16 inputs this route
     took before (its own kernel, expanding each level to bf16 128 + q) came within 2e-3 (the
     default model's logits' mean distance from fp32's 0.058 -> 0.033, its top token fp32's at
     99.04% -> 99.74% of positions), AR 6-11% faster at batch 1 and 8-10% slower at batch 8
     (``docs/engine.md``);
   - ``avx512q4i8`` (only where asked for): s = max |x| / 127 and a int8, as llama.cpp multiplies a
     Q4_1 file's weights (its Q8_1): half the instructions, and logits 4x as far from fp32's.
   Every output is then one fixed chain, whatever the row count: per block of 32 inputs in order,
   c = sum q a in exact integers (two planes: 256 sum q h + sum q l, at most 32 x 15 x 32640 < 2^24,
   so exact in fp32 too), y = fma(c, d s, y), then y = fma(s sum a, m, y). A row's inputs are
   rounded by its own blocks alone, so its bits never depend on the rows beside it.

   Packed layout (``pack_q4`` in kernels.py), per block of 16 outputs and 32 inputs, 320 bytes:
   4 x 64 bytes of levels (group h: byte 4 o + k of output o holds input 8h + k in its low half and
   input 8h + 4 + k in its high half, k = 0..3), then d and m for the 16 outputs (fp16 each). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "vec.h"

#define Q4_BLOCK 320 /* bytes per 16 outputs x 32 inputs: 256 of levels, then 16 d and 16 m (fp16) */
#define Q4_CHUNK 8   /* output blocks a thread takes at a time */
#define EIGHT(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define FOUR(X) X(0) X(1) X(2) X(3)

/* A pool task's work: output blocks Q4_CHUNK at a time, every group of up to ``group`` rows over them,
   a row alone over a whole chunk at once (``row``), two rows four blocks at a time (``two``), other
   groups two blocks at a time (``rest``: from block nb, 1-2 blocks, rows r0 .. r0 + rows). Inlined
   into each kernel's task, so that the calls are direct. */
static inline __attribute__((always_inline)) void q4_take(const void *job, int64_t M, int64_t blocks, int group,
                                                           void (*row)(const void *, int64_t, int64_t), void (*two)(const void *, int64_t, int64_t),
                                                           void (*rest)(const void *, int64_t, int64_t, int64_t, int64_t)) {
    for (int64_t first; (first = pool_take(Q4_CHUNK)) < blocks;) {
        int64_t count = first + Q4_CHUNK < blocks ? Q4_CHUNK : blocks - first;
        for (int64_t r0 = 0, rows; r0 < M; r0 += rows) {
            rows = group_rows(M - r0, group);
            if (rows == 1 && count == Q4_CHUNK)
                row(job, first, r0);
            else if (rows == 2 && count == Q4_CHUNK)
                for (int64_t b = 0; b < count; b += 4) two(job, first + b, r0);
            else
                for (int64_t b = 0; b < count; b += 2) rest(job, first + b, count - b < 2 ? count - b : 2, r0, rows);
        }
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__) && !(defined(__AMX_TILE__) && defined(__AMX_BF16__))
#include <immintrin.h>

typedef struct {
    const int8_t *a;  /* [M, K] each row's levels (two planes: their high bytes h) */
    const int8_t *b;  /* [M, K] two planes: the low bytes l */
    const float *s;   /* [M, K / 32] their scales */
    const float *sum; /* [M, K / 32] s times the block's sum of levels */
    const uint8_t *w;
    float *y; /* [M, N] */
    int64_t M, N, K, blocks;
} Q4Job;

/* Groups of 3-4 rows fetch their blocks' bytes Q4_AHEAD bytes ahead: their arithmetic between reads
   had left memory idle (4 rows 4.82 -> 4.62 ms, 8 rows 7.2 -> 7.0 with 2560 bytes; 1280 and 5120
   gained less). A row alone lost 0.2-0.5 ms by it, and two rows about 0.2. */
#define Q4_AHEAD 2560
#define BYTES(b) (j->w + ((nb + (b)) * KB + kb) * Q4_BLOCK)
#define FETCH(b)                                                                          \
    if (ahead) {                                                                          \
        _mm_prefetch((const char *)BYTES(b) + 64 * h + Q4_AHEAD, _MM_HINT_T0);            \
        if (h == 0) _mm_prefetch((const char *)BYTES(b) + 256 + Q4_AHEAD, _MM_HINT_T0); \
    }
/* Group h's levels of output block b: inputs 8h .. 8h + 3 (lo) and 8h + 4 .. 8h + 7 (hi), 4 a lane. */
#define LEVELS(b)                                                                  \
    const __m512i v##b = _mm512_loadu_si512((const void *)(BYTES(b) + 64 * h));    \
    const __m512i lo##b = _mm512_and_si512(v##b, low), hi##b = _mm512_and_si512(_mm512_srli_epi16(v##b, 4), low);
/* Row r's input levels of group h, as the two 4-byte broadcasts LEVELS pairs with (zeros past ``rows``). */
#define BROADCAST(plane, name, r, used)                                                                \
    int32_t name##r##lo = 0, name##r##hi = 0;                                                          \
    if ((r) < rows && (used)) {                                                                        \
        memcpy(&name##r##lo, j->plane + (r0 + (r)) * j->K + kb * 32 + 8 * h, sizeof name##r##lo);     \
        memcpy(&name##r##hi, j->plane + (r0 + (r)) * j->K + kb * 32 + 8 * h + 4, sizeof name##r##hi); \
    }
#define INPUTS(r)                                                                                     \
    BROADCAST(a, in, r, 1)                                                                            \
    const __m512i a##r##lo = _mm512_set1_epi32(in##r##lo), a##r##hi = _mm512_set1_epi32(in##r##hi); \
    BROADCAST(b, low, r, planes > 1)                                                                  \
    const __m512i p##r##lo = _mm512_set1_epi32(low##r##lo), p##r##hi = _mm512_set1_epi32(low##r##hi);
/* (the second plane's sums e are dropped unused where there is one plane: ``planes`` is a constant) */
#define DOT(r, b)                                                                                              \
    {                                                                                                          \
        c##r##b = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c##r##b, lo##b, a##r##lo), hi##b, a##r##hi);          \
        if (planes > 1) e##r##b = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(e##r##b, lo##b, p##r##lo), hi##b, p##r##hi); \
    }
#define SCALES(b)                                                                  \
    const __m512 d##b = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(BYTES(b) + 256))), \
                 m##b = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(BYTES(b) + 288)));
#define SCALE(r, b)                                                                                                \
    y##r##b = _mm512_fmadd_ps(_mm512_set1_ps(j->sum[(r0 + (r)) * KB + kb]), m##b,                                  \
                              _mm512_fmadd_ps(_mm512_cvtepi32_ps(planes > 1 ? _mm512_add_epi32(_mm512_slli_epi32(c##r##b, 8), e##r##b) : c##r##b), _mm512_mul_ps(d##b, _mm512_set1_ps(j->s[(r0 + (r)) * KB + kb])), y##r##b));

/* Row r0 alone over Q4_CHUNK (8) output blocks from nb: eight chains side by side. */
static inline __attribute__((always_inline)) void dot_q4_row(const void *job, int64_t nb, int64_t r0, const int planes) {
    const Q4Job *j = job;
    const int rows = 1;
    const int64_t KB = j->K / 32;
    const __m512i low = _mm512_set1_epi8(0x0f);
#define ZERO(b) __m512 y0##b = _mm512_setzero_ps();
    EIGHT(ZERO)
    for (int64_t kb = 0; kb < KB; ++kb) {
#define CHAIN(b) __m512i c0##b = _mm512_setzero_si512(), e0##b = c0##b;
        EIGHT(CHAIN)
        for (int h = 0; h < 4; ++h) {
            INPUTS(0)
#define ROW_DOT(b) { LEVELS(b) DOT(0, b) }
            EIGHT(ROW_DOT)
        }
        EIGHT(SCALES)
#define ROW_SCALE(b) SCALE(0, b)
        EIGHT(ROW_SCALE)
    }
#define STORE(b) store_block(j->y + r0 * j->N, j->N, nb + (b), y0##b);
    EIGHT(STORE)
}

/* Rows r0 and r0 + 1 over 4 output blocks from nb (a 2-token tree at batch 1). */
static inline __attribute__((always_inline)) void dot_q4_two(const void *job, int64_t nb, int64_t r0, const int planes) {
    const Q4Job *j = job;
    const int rows = 2;
    const int64_t KB = j->K / 32;
    const __m512i low = _mm512_set1_epi8(0x0f);
#define ZERO2(b) __m512 y0##b = _mm512_setzero_ps(), y1##b = y0##b;
    FOUR(ZERO2)
    for (int64_t kb = 0; kb < KB; ++kb) {
#define CHAIN2(b) __m512i c0##b = _mm512_setzero_si512(), c1##b = c0##b, e0##b = c0##b, e1##b = c0##b;
        FOUR(CHAIN2)
        for (int h = 0; h < 4; ++h) {
            INPUTS(0)
            INPUTS(1)
#define TWO_DOT(b) { LEVELS(b) DOT(0, b) DOT(1, b) }
            FOUR(TWO_DOT)
        }
        FOUR(SCALES)
#define TWO_SCALE(b) SCALE(0, b) SCALE(1, b)
        FOUR(TWO_SCALE)
    }
#define STORE2(b) store_block(j->y + r0 * j->N, j->N, nb + (b), y0##b), store_block(j->y + (r0 + 1) * j->N, j->N, nb + (b), y1##b);
    FOUR(STORE2)
}

/* Rows r0 .. r0 + rows (1-4) of ``count`` (1-2) output blocks from nb: 8 chains and 8 sums. Inlined
   for each constant rows and count (``dot_group``): as one function deciding them as it ran, 4 and 8
   rows took 4.54 and 6.54 ms where this takes 4.19 and 5.72. */
static inline __attribute__((always_inline)) void dot_q4(const Q4Job *j, int64_t nb, const int count, int64_t r0, const int rows, const int planes) {
    const int64_t KB = j->K / 32;
    const __m512i low = _mm512_set1_epi8(0x0f);
    const int ahead = rows > 2;
    __m512 y00 = _mm512_setzero_ps(), y01 = y00, y10 = y00, y11 = y00, y20 = y00, y21 = y00, y30 = y00, y31 = y00;
    for (int64_t kb = 0; kb < KB; ++kb) {
        __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
        __m512i e00 = c00, e01 = c00, e10 = c00, e11 = c00, e20 = c00, e21 = c00, e30 = c00, e31 = c00;
        for (int h = 0; h < 4; ++h) {
            INPUTS(0) INPUTS(1) INPUTS(2) INPUTS(3)
#define GROUP_DOTS(b) { FETCH(b) LEVELS(b) DOT(0, b) if (rows > 1) DOT(1, b) if (rows > 2) DOT(2, b) if (rows > 3) DOT(3, b) }
            GROUP_DOTS(0)
            if (count > 1) GROUP_DOTS(1)
        }
        SCALES(0)
        const __m512 d1 = count > 1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(BYTES(1) + 256))) : d0;
        const __m512 m1 = count > 1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(BYTES(1) + 288))) : m0;
#define GROUP_SCALE(r) if ((r) < rows) { SCALE(r, 0) if (count > 1) SCALE(r, 1) }
        GROUP_SCALE(0) GROUP_SCALE(1) GROUP_SCALE(2) GROUP_SCALE(3)
    }
    const __m512 sums[4][2] = {{y00, y01}, {y10, y11}, {y20, y21}, {y30, y31}};
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < count; ++b) store_block(j->y + (r0 + r) * j->N, j->N, nb + b, sums[r][b]);
}

/* ``dot_q4`` for rows (1-4) and count (1-2) given as constants. */
static inline __attribute__((always_inline)) void dot_group(const void *job, int64_t nb, int64_t count, int64_t r0, int64_t rows, const int planes) {
    const Q4Job *j = job;
#define COUNTS(r) count > 1 ? dot_q4(j, nb, 2, r0, r, planes) : dot_q4(j, nb, 1, r0, r, planes)
    if (rows == 1) COUNTS(1);
    else if (rows == 2) COUNTS(2);
    else if (rows == 3) COUNTS(3);
    else COUNTS(4);
}

/* The pool's task for one plane of inputs or two, its functions made for that count. Groups of
   rows share a level load: 4 rows with one plane, 3 with two (4 rows' 16 integer sums, 8 outputs'
   and their inputs spilled out of the registers: 8 rows took 8.4 ms against 7.4 in groups of 3). */
#define TAKE(planes, rows_per_group)                                                                                                   \
    static void row##planes(const void *job, int64_t nb, int64_t r0) { dot_q4_row(job, nb, r0, planes); }                    \
    static void two##planes(const void *job, int64_t nb, int64_t r0) { dot_q4_two(job, nb, r0, planes); }                    \
    static void group##planes(const void *job, int64_t nb, int64_t count, int64_t r0, int64_t rows) {                        \
        dot_group(job, nb, count, r0, rows, planes);                                                                          \
    }                                                                                                                         \
    static void take##planes(void *arg) { q4_take(arg, ((const Q4Job *)arg)->M, ((const Q4Job *)arg)->blocks, rows_per_group, row##planes, two##planes, group##planes); }
TAKE(1, 4)
TAKE(2, 3)

/* Row block i's 32 inputs as levels a [32] (``planes`` 2: their high bytes h in a, low bytes l in b),
   their scale s and s times their sum (the scale NaN where an input is not finite, so that the
   outputs are too). */
static inline __attribute__((always_inline)) void quantize_block(const float *x, int8_t *a, int8_t *b, float *s, float *sum, const int planes) {
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    const float most = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float scale = isfinite(most) && isfinite(_mm512_reduce_add_ps(_mm512_add_ps(x0, x1))) ? most / (planes > 1 ? 32512.0f : 127.0f) : NAN;
    const __m512 inverse = _mm512_set1_ps(scale > 0x1p-100f ? 1.0f / scale : 0.0f); /* (inputs below 2^-93: zero levels) */
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inverse)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inverse));
    const __m512i half = _mm512_set1_epi32(128);
    const __m512i h0 = planes > 1 ? _mm512_srai_epi32(_mm512_add_epi32(q0, half), 8) : q0, h1 = planes > 1 ? _mm512_srai_epi32(_mm512_add_epi32(q1, half), 8) : q1;
    _mm_storeu_si128((__m128i *)a, _mm512_cvtsepi32_epi8(h0));
    _mm_storeu_si128((__m128i *)(a + 16), _mm512_cvtsepi32_epi8(h1));
    if (planes > 1) {
        _mm_storeu_si128((__m128i *)b, _mm512_cvtsepi32_epi8(_mm512_sub_epi32(q0, _mm512_slli_epi32(h0, 8))));
        _mm_storeu_si128((__m128i *)(b + 16), _mm512_cvtsepi32_epi8(_mm512_sub_epi32(q1, _mm512_slli_epi32(h1, 8))));
    }
    *s = scale;
    *sum = scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
}

int q4_products(void) { return 1; } /* (this build multiplies Q4_1 blocks: AVX512-BF16 and -VNNI, no AMX) */

/* y [M, N] (fp32) = x [M, K] (fp32; K a multiple of 32) times the Q4_1 weights' transpose (packed:
   ``pack_q4``), the inputs as ``planes`` (1-2) int8 planes, on the calling thread and up to
   ``threads`` - 1 workers. Returns 0, or -1 without memory. */
static int linear(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads, const int planes) {
    static _Thread_local void *buffer;
    static _Thread_local size_t held;
    const int64_t KB = K / 32;
    if (K % 32 || M < 1) return -1;
    float *s = scratch(&buffer, &held, 2 * sizeof(float) * (size_t)(M * KB) + (size_t)(planes * M * K));
    if (!s) return -1;
    float *sums = s + M * KB;
    int8_t *a = (int8_t *)(sums + M * KB), *b = planes > 1 ? a + M * K : NULL;
    for (int64_t i = 0; i < M * KB; ++i) quantize_block(x + 32 * i, a + 32 * i, b ? b + 32 * i : NULL, s + i, sums + i, planes);
    Q4Job job = {a, b, s, sums, w, y, M, N, K, (N + 15) / 16};
    pool_run(planes > 1 ? take2 : take1, &job, threads);
    return 0;
}

int q4_linear(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads) {
    return linear(x, w, y, M, N, K, threads, 2);
}

int q4i8_linear(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads) {
    return linear(x, w, y, M, N, K, threads, 1);
}
#else
int q4_products(void) { return 0; }
int q4_linear(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads) {
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)threads;
    return -1;
}
int q4i8_linear(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads) {
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)threads;
    return -1;
}
#endif
