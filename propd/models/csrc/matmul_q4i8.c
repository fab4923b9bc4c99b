/* y = x W^T as ``matmul_q4.c`` computes it from the GGUF's Q4_1 blocks (w = d q + m per 32 inputs of an
   output), but with the inputs multiplied as int8, as llama.cpp multiplies a Q4_1 file's weights (its
   Q8_1): the ``avx512q4i8`` route. Each row's 32 inputs of a block are rounded to levels a of a scale
   s = max |x| / 127 (a = x / s to the nearest, ties to even). Every output is then one fixed chain,
   whatever the row count: per block of 32 inputs in order, c = sum q a (exact integers, the VNNI
   instruction), y = fma(c, d s, y), then y = fma(s sum a, m, y).

   Why: the instruction takes 64 products where the bf16 one takes 32, and 4 levels a byte unpack in
   3 ops where 2 levels a word took 2. The default model's 30 layers' products (weights cold, AMD
   EPYC, medians, against ``matmul_q4.c`` in the same process): 1 row 3.19 -> 3.00 ms, 2 rows 4.10 ->
   3.73, 4 rows 5.60 -> 4.62, 8 rows 9.09 -> 7.0, 64 rows 44.2 -> 27.6. The price: int8 levels of a
   block's largest input round the others far more than bf16 does (outlier channels), and the
   logits stray 4x as far from fp32's (``docs/engine.md``), so the route runs only where asked for.

   Packed layout (``pack_q4i8`` in kernels.py), per block of 16 outputs and 32 inputs, 320 bytes:
   4 x 64 bytes of levels (group h: byte 4 o + k of output o holds input 8h + k in its low half and
   input 8h + 4 + k in its high half, k = 0..3), then d and m for the 16 outputs (fp16 each). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "q4.h"

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__) && !(defined(__AMX_TILE__) && defined(__AMX_BF16__))
#include <immintrin.h>

#define Q4_GROUP 4 /* rows that share a level load */

typedef struct {
    const int8_t *a;  /* [M, K] each row's levels */
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
#define INPUTS(r)                                                                                     \
    int32_t in##r##lo = 0, in##r##hi = 0;                                                             \
    if ((r) < rows) {                                                                                 \
        memcpy(&in##r##lo, j->a + (r0 + (r)) * j->K + kb * 32 + 8 * h, sizeof in##r##lo);            \
        memcpy(&in##r##hi, j->a + (r0 + (r)) * j->K + kb * 32 + 8 * h + 4, sizeof in##r##hi);        \
    }                                                                                                 \
    const __m512i a##r##lo = _mm512_set1_epi32(in##r##lo), a##r##hi = _mm512_set1_epi32(in##r##hi);
#define DOT(r, b) c##r##b = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c##r##b, lo##b, a##r##lo), hi##b, a##r##hi);
#define SCALES(b)                                                                  \
    const __m512 d##b = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(BYTES(b) + 256))), \
                 m##b = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(BYTES(b) + 288)));
#define SCALE(r, b)                                                                                                \
    y##r##b = _mm512_fmadd_ps(_mm512_set1_ps(j->sum[(r0 + (r)) * KB + kb]), m##b,                                  \
                              _mm512_fmadd_ps(_mm512_cvtepi32_ps(c##r##b), _mm512_mul_ps(d##b, _mm512_set1_ps(j->s[(r0 + (r)) * KB + kb])), y##r##b));

/* Row r0 alone over Q4_CHUNK (8) output blocks from nb: eight chains side by side. */
static void dot_q4_row(const void *job, int64_t nb, int64_t r0) {
    const Q4Job *j = job;
    const int rows = 1;
    const int64_t KB = j->K / 32;
    const __m512i low = _mm512_set1_epi8(0x0f);
#define ZERO(b) __m512 y0##b = _mm512_setzero_ps();
    EIGHT(ZERO)
    for (int64_t kb = 0; kb < KB; ++kb) {
#define CHAIN(b) __m512i c0##b = _mm512_setzero_si512();
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
static void dot_q4_two(const void *job, int64_t nb, int64_t r0) {
    const Q4Job *j = job;
    const int rows = 2;
    const int64_t KB = j->K / 32;
    const __m512i low = _mm512_set1_epi8(0x0f);
#define ZERO2(b) __m512 y0##b = _mm512_setzero_ps(), y1##b = y0##b;
    FOUR(ZERO2)
    for (int64_t kb = 0; kb < KB; ++kb) {
#define CHAIN2(b) __m512i c0##b = _mm512_setzero_si512(), c1##b = c0##b;
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
static inline __attribute__((always_inline)) void dot_q4(const Q4Job *j, int64_t nb, const int count, int64_t r0, const int rows) {
    const int64_t KB = j->K / 32;
    const __m512i low = _mm512_set1_epi8(0x0f);
    const int ahead = rows > 2;
    __m512 y00 = _mm512_setzero_ps(), y01 = y00, y10 = y00, y11 = y00, y20 = y00, y21 = y00, y30 = y00, y31 = y00;
    for (int64_t kb = 0; kb < KB; ++kb) {
        __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
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
static void dot_group(const void *job, int64_t nb, int64_t count, int64_t r0, int64_t rows) {
    const Q4Job *j = job;
#define COUNTS(r) count > 1 ? dot_q4(j, nb, 2, r0, r) : dot_q4(j, nb, 1, r0, r)
    if (rows == 1) COUNTS(1);
    else if (rows == 2) COUNTS(2);
    else if (rows == 3) COUNTS(3);
    else COUNTS(4);
}

static void take_q4(void *arg) {
    const Q4Job *j = arg;
    q4_take(arg, j->M, j->blocks, Q4_GROUP, dot_q4_row, dot_q4_two, dot_group);
}

/* Row block i's 32 inputs as levels a [32], their scale s and s times their sum (the scale NaN where
   an input is not finite, so that the outputs are too). */
static void quantize_block(const float *x, int8_t *a, float *s, float *sum) {
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    const float most = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float scale = isfinite(most) && isfinite(_mm512_reduce_add_ps(_mm512_add_ps(x0, x1))) ? most / 127.0f : NAN;
    const __m512 inverse = _mm512_set1_ps(scale > 0x1p-100f ? 1.0f / scale : 0.0f); /* (inputs below 2^-93: zero levels) */
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inverse)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inverse));
    _mm_storeu_si128((__m128i *)a, _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128((__m128i *)(a + 16), _mm512_cvtsepi32_epi8(q1));
    *s = scale;
    *sum = scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
}

int q4i8_products(void) { return 1; }

/* y [M, N] (fp32) = x [M, K] (fp32; K a multiple of 32) times the Q4_1 weights' transpose (packed:
   ``pack_q4i8``), on the calling thread and up to ``threads`` - 1 workers. Returns 0, or -1 without memory. */
int q4i8_linear(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads) {
    static _Thread_local void *buffer;
    static _Thread_local size_t held;
    const int64_t KB = K / 32;
    if (K % 32 || M < 1) return -1;
    float *s = scratch(&buffer, &held, 2 * sizeof(float) * (size_t)(M * KB) + (size_t)(M * K));
    if (!s) return -1;
    float *sums = s + M * KB;
    int8_t *a = (int8_t *)(sums + M * KB);
    for (int64_t i = 0; i < M * KB; ++i) quantize_block(x + 32 * i, a + 32 * i, s + i, sums + i);
    Q4Job job = {a, s, sums, w, y, M, N, K, (N + 15) / 16};
    pool_run(take_q4, &job, threads);
    return 0;
}
#else
int q4i8_products(void) { return 0; }
int q4i8_linear(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads) {
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)threads;
    return -1;
}
#endif
