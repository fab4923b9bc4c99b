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
#define Q4_GROUP 8   /* rows that share each weight vector as it is unpacked */
#define EIGHT(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
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

/* From ``fetch_from`` rows (2 unless q4_fetch_from says otherwise) each block's bytes are fetched
   Q4_AHEAD bytes ahead: their arithmetic between reads had left memory idle (AMD EPYC, in ``dot_q4``,
   weights cold, two runs: 4 rows 6.43 -> 5.55 ms, 8 rows 10.95 -> 9.04, 2 rows 3.74 -> 3.78 and 4.31 ->
   3.86), where a row alone lost by it there (3.23 -> 3.64 and 3.54 -> 3.72 ms) and gained on the Intel
   Xeon with AMX (a batch-1 AR step 4.84 -> 3.92 ms): which, the first load measures (``q4_fetch`` in
   engine.py). No output changes with it. 2560 bytes: 1280 and 5120 gained less. */
#define Q4_AHEAD 2560
static int fetch_from = 2;
void q4_fetch_from(int64_t rows) { fetch_from = (int)rows; }

static inline int32_t load32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Rows r0 .. r0 + rows (1-8, a constant) of output block nb: each weight vector, as it is unpacked
   (byte 4 o + k of group h's 64 holds levels of inputs 8h + k and 8h + 4 + k of output o), against
   every row's inputs, broadcast from memory, 4 at a time; per row 1-2 integer sums (``planes``) and
   an output vector. One block and up to 8 rows at a time, where the kernels before took one row 8
   blocks at a time, two rows 4 and groups of 3 rows 2: the 30 layers' products on the AMD EPYC
   (weights cold, interleaved in one process, medians), two planes, 2 / 4 / 8 rows 3.69 / 4.92 /
   7.58 -> 2.96 / 3.76 / 6.62 ms (``docs/engine.md``). */
static inline __attribute__((always_inline)) void dot_q4(const Q4Job *j, int64_t nb, int64_t r0, const int rows, const int planes) {
    const int64_t KB = j->K / 32;
    const __m512i low = _mm512_set1_epi8(0x0f);
#define ZERO(r) __m512 y##r = _mm512_setzero_ps();
    EIGHT(ZERO)
    for (int64_t kb = 0; kb < KB; ++kb) {
        const uint8_t *w = j->w + ((nb * KB) + kb) * Q4_BLOCK;
        for (int line = 0; rows >= fetch_from && line < Q4_BLOCK; line += 64) _mm_prefetch((const char *)w + line + Q4_AHEAD, _MM_HINT_T0);
        /* row r's inputs of this block: levels a (two planes: high bytes) and b (low bytes) */
#define CHAIN(r)                                                                   \
    __m512i c##r = _mm512_setzero_si512(), e##r = c##r;                            \
    const int8_t *a##r = j->a + (r0 + ((r) < rows ? (r) : 0)) * j->K + kb * 32;    \
    const int8_t *b##r = planes > 1 ? j->b + (a##r - j->a) : a##r;
        EIGHT(CHAIN)
#define DOT(r, h)                                                                                                                               \
    if ((r) < rows) {                                                                                                                           \
        c##r = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c##r, lo, _mm512_set1_epi32(load32(a##r + 8 * (h)))), hi, _mm512_set1_epi32(load32(a##r + 8 * (h) + 4))); \
        if (planes > 1)                                                                                                                         \
            e##r = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(e##r, lo, _mm512_set1_epi32(load32(b##r + 8 * (h)))), hi, _mm512_set1_epi32(load32(b##r + 8 * (h) + 4))); \
    }
#define GROUP(h)                                                                                           \
    {                                                                                                      \
        const __m512i v = _mm512_loadu_si512((const void *)(w + 64 * (h)));                               \
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low); \
        DOT(0, h) DOT(1, h) DOT(2, h) DOT(3, h) DOT(4, h) DOT(5, h) DOT(6, h) DOT(7, h)                    \
    }
        GROUP(0) GROUP(1) GROUP(2) GROUP(3)
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 256))), m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 288)));
#define SCALE(r)                                                                                                                                      \
    if ((r) < rows)                                                                                                                                   \
        y##r = _mm512_fmadd_ps(_mm512_set1_ps(j->sum[(r0 + (r)) * KB + kb]), m,                                                                       \
                               _mm512_fmadd_ps(_mm512_cvtepi32_ps(planes > 1 ? _mm512_add_epi32(_mm512_slli_epi32(c##r, 8), e##r) : c##r),          \
                                               _mm512_mul_ps(d, _mm512_set1_ps(j->s[(r0 + (r)) * KB + kb])), y##r));
        EIGHT(SCALE)
    }
#define STORE(r) if ((r) < rows) store_block(j->y + (r0 + (r)) * j->N, j->N, nb, y##r);
    EIGHT(STORE)
}

/* The pool's task for one plane of inputs or two: output blocks Q4_CHUNK at a time, each against
   every group of up to Q4_GROUP rows (``dot_q4`` made for each row count). */
#define TAKE(planes)                                                                                                  \
    static void take##planes(void *arg) {                                                                             \
        const Q4Job *j = arg;                                                                                         \
        for (int64_t first; (first = pool_take(Q4_CHUNK)) < j->blocks;) {                                             \
            int64_t end = first + Q4_CHUNK < j->blocks ? first + Q4_CHUNK : j->blocks;                                \
            for (int64_t r0 = 0, rows; r0 < j->M; r0 += rows) {                                                       \
                rows = group_rows(j->M - r0, Q4_GROUP);                                                               \
                for (int64_t nb = first; nb < end; ++nb) switch (rows) {                                             \
                        case 1: dot_q4(j, nb, r0, 1, planes); break;                                                  \
                        case 2: dot_q4(j, nb, r0, 2, planes); break;                                                  \
                        case 3: dot_q4(j, nb, r0, 3, planes); break;                                                  \
                        case 4: dot_q4(j, nb, r0, 4, planes); break;                                                  \
                        case 5: dot_q4(j, nb, r0, 5, planes); break;                                                  \
                        case 6: dot_q4(j, nb, r0, 6, planes); break;                                                  \
                        case 7: dot_q4(j, nb, r0, 7, planes); break;                                                  \
                        default: dot_q4(j, nb, r0, 8, planes); break;                                                 \
                    }                                                                                                 \
            }                                                                                                         \
        }                                                                                                             \
    }
TAKE(1)
TAKE(2)

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

int q4_products(void) { return 1; } /* (this build multiplies Q4_1 blocks: AVX512-BF16 and -VNNI) */

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
void q4_fetch_from(int64_t rows) { (void)rows; }
int q4_linear(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads) {
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)threads;
    return -1;
}
int q4i8_linear(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads) {
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)threads;
    return -1;
}
#endif
