/* y = x W^T where W is stored as the GGUF's Q4_1 blocks: per 32 inputs of an output, 4-bit levels q
   and fp16 d, m with w = d q + m. A weight costs 5 bits to read rather than bf16's 16, and a
   batch-1 step, which reads every weight once, is bound by those reads (``csrc/matmul.c``).

   Every output is one fixed chain, whatever the row count: x rounded to bf16 (as the bf16 route
   rounds it), then per block of 32 inputs in order, s = the dot-product instruction's chain over
   the 16 input pairs of the levels as bf16 128 + q (exact) from zero, and y = fma(s, d, y), then
   y = fma(the block's sum of inputs, m - 128 d, y). The weights are the model's own Q4_1 values,
   not rounded to bf16. Each group of rows expands the levels from the packed bytes as it reads them.

   Packed layout (``pack_q4`` in kernels.py), per block of 16 outputs and 32 inputs, 320 bytes:
   4 x 16 32-bit words of levels (word o of group g: output o's input pairs p = 4g + k, k = 0..3,
   input 2p at bit 4k and input 2p + 1 at bit 16 + 4k), then d and m for the 16 outputs (fp16 each). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "q4.h"

#if defined(__AVX512BF16__) && !(defined(__AMX_TILE__) && defined(__AMX_BF16__))
#include <immintrin.h>

#define Q4_GROUP 6 /* rows that share a level load */

typedef struct {
    const uint16_t *a; /* [M, K] bf16 */
    const float *sums; /* [M, K / 32]: each row's sum of its bf16 inputs per block of 32 */
    const uint8_t *w;
    float *y; /* [M, N] */
    int64_t M, N, K, blocks;
} Q4Job;

/* Pair k of a group's 16 words (word o: output o's 4 pairs of levels) as 16 bf16 pairs of 128 + q:
   shifted down and OR-ed into the mantissa of 128 (bf16 0x4300, whose last mantissa bit is 1), each
   is its exact value, with no table; one shift and one logic op a pair (widening 16 bytes a pair
   instead took five ops, and a one-row product waited on them rather than on memory). The 128 comes
   out of the block's sum again (``dot_q4``). */
#define LEVELS(quad, k) \
    ((__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(quad, 4 * (k)), _mm512_set1_epi32(0x000f000f), _mm512_set1_epi32(0x43004300), 0xea))
#define QUAD(b) _mm512_loadu_si512((const void *)(j->w + ((nb + (b)) * KB + kb) * Q4_BLOCK + 64 * g))
/* A group of 3-6 rows fetches its blocks' bytes Q4_AHEAD input blocks ahead: its arithmetic between
   reads had left memory idle (the 30 layers' products at 3 / 4 / 8 rows 4.43 / 5.44 / 7.53 -> 3.79 /
   4.68 / 7.12 ms; 8 blocks ahead gained less). One or two rows read fast enough without it. */
#define Q4_AHEAD 4
#define FETCH(b)                                                                                          \
    {                                                                                                     \
        const char *ahead = (const char *)(j->w + ((nb + (b)) * KB + kb + Q4_AHEAD) * Q4_BLOCK);          \
        _mm_prefetch(ahead + 64 * g, _MM_HINT_T0);                                                        \
        if (g == 0) _mm_prefetch(ahead + 256, _MM_HINT_T0);                                               \
    }
#define PAIR(r)                                                                   \
    int32_t pair##r;                                                              \
    memcpy(&pair##r, j->a + (r0 + (r)) * j->K + kb * 32 + 2 * p, sizeof pair##r); \
    __m512bh a##r = (__m512bh)_mm512_set1_epi32(pair##r);
#define DOT(r, b) c##r##b = _mm512_dpbf16_ps(c##r##b, a##r, l##b)
#define ROW(r) { PAIR(r) DOT(r, 0); DOT(r, 1); }
#define SCALE(r)                                                                        \
    if ((r) < rows) {                                                                  \
        __m512 sum = _mm512_set1_ps(j->sums[(r0 + (r)) * KB + kb]);                    \
        y##r##0 = _mm512_fmadd_ps(sum, m0, _mm512_fmadd_ps(c##r##0, d0, y##r##0));      \
        y##r##1 = _mm512_fmadd_ps(sum, m1, _mm512_fmadd_ps(c##r##1, d1, y##r##1));      \
    }

/* Rows r0 .. r0 + rows (1-6) of ``count`` (1-2) output blocks from nb: 12 chains and 12 sums in
   registers. The levels are expanded from the packed bytes as they are read (expanded once into a
   scratch buffer for every group of rows instead, 8 rows took 13.1 ms where this takes 9.4). */
static void dot_q4(const void *job, int64_t nb, int64_t count, int64_t r0, int64_t rows) {
    const Q4Job *j = job;
    const int64_t KB = j->K / 32;
    __m512 y00 = _mm512_setzero_ps(), y01 = y00, y10 = y00, y11 = y00, y20 = y00, y21 = y00;
    __m512 y30 = y00, y31 = y00, y40 = y00, y41 = y00, y50 = y00, y51 = y00;
    for (int64_t kb = 0; kb < KB; ++kb) {
        __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
        __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
        for (int g = 0; g < 4; ++g) {
            FETCH(0)
            if (count > 1) FETCH(1)
            const __m512i q0 = QUAD(0), q1 = count > 1 ? QUAD(1) : q0;
#pragma GCC unroll 4
            for (int k = 0; k < 4; ++k) {
                const int p = 4 * g + k;
                __m512bh l0 = LEVELS(q0, k), l1 = LEVELS(q1, k);
                UP_TO_6_ROWS(ROW)
            }
        }
        const uint8_t *scales0 = j->w + (nb * KB + kb) * Q4_BLOCK + 256, *scales1 = count > 1 ? scales0 + KB * Q4_BLOCK : scales0;
        __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales0)), d1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales1));
        __m512 m0 = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), d0, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales0 + 32))));
        __m512 m1 = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), d1, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales1 + 32))));
        SCALE(0) SCALE(1) SCALE(2) SCALE(3) SCALE(4) SCALE(5)
    }
    const __m512 sums[6][2] = {{y00, y01}, {y10, y11}, {y20, y21}, {y30, y31}, {y40, y41}, {y50, y51}};
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < count; ++b) store_block(j->y + (r0 + r) * j->N, j->N, nb + b, sums[r][b]);
}

#define BLOCK_SUM(b) y##b = _mm512_fmadd_ps(sum, m##b, _mm512_fmadd_ps(c##b, d##b, y##b));

/* Row r0 alone over Q4_CHUNK (8) output blocks from nb: the same chain per output as ``dot_q4``,
   eight chains side by side. With one row, ``dot_q4``'s two chains wait on the dot-product
   instruction's latency (each sum on the one before it) more than on memory. */
static void dot_q4_row(const void *job, int64_t nb, int64_t r0) {
    const Q4Job *j = job;
    const int64_t KB = j->K / 32;
#define ZERO(b) __m512 y##b = _mm512_setzero_ps();
    EIGHT(ZERO)
    for (int64_t kb = 0; kb < KB; ++kb) {
#define CHAIN(b) __m512 c##b = _mm512_setzero_ps();
        EIGHT(CHAIN)
        for (int g = 0; g < 4; ++g) {
#define LOAD(b) const __m512i q##b = QUAD(b);
            EIGHT(LOAD)
#pragma GCC unroll 4
            for (int k = 0; k < 4; ++k) {
                const int p = 4 * g + k;
                PAIR(0)
#define DOT1(b) c##b = _mm512_dpbf16_ps(c##b, a0, LEVELS(q##b, k));
                EIGHT(DOT1)
            }
        }
        const __m512 sum = _mm512_set1_ps(j->sums[r0 * KB + kb]);
#define SCALES(b)                                                                                                      \
    const uint8_t *scales##b = j->w + ((nb + (b)) * KB + kb) * Q4_BLOCK + 256;                                         \
    const __m512 d##b = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales##b));                              \
    const __m512 m##b = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), d##b, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales##b + 32))));
        EIGHT(SCALES)
        EIGHT(BLOCK_SUM)
    }
#define STORE(b) store_block(j->y + r0 * j->N, j->N, nb + (b), y##b);
    EIGHT(STORE)
}

/* Rows r0 and r0 + 1 over 4 output blocks from nb, eight chains as ``dot_q4_row`` (a 2-token tree
   at batch 1). */
static void dot_q4_two(const void *job, int64_t nb, int64_t r0) {
    const Q4Job *j = job;
    const int64_t KB = j->K / 32;
#define ZERO2(b) __m512 y0##b = _mm512_setzero_ps(), y1##b = y0##b;
    FOUR(ZERO2)
    for (int64_t kb = 0; kb < KB; ++kb) {
#define CHAIN2(b) __m512 c0##b = _mm512_setzero_ps(), c1##b = c0##b;
        FOUR(CHAIN2)
        for (int g = 0; g < 4; ++g) {
            FOUR(LOAD)
#pragma GCC unroll 4
            for (int k = 0; k < 4; ++k) {
                const int p = 4 * g + k;
                PAIR(0)
                PAIR(1)
#define DOT2(b)                              \
    {                                        \
        const __m512bh l = LEVELS(q##b, k);  \
        c0##b = _mm512_dpbf16_ps(c0##b, a0, l); \
        c1##b = _mm512_dpbf16_ps(c1##b, a1, l); \
    }
                FOUR(DOT2)
            }
        }
        const __m512 sum0 = _mm512_set1_ps(j->sums[r0 * KB + kb]), sum1 = _mm512_set1_ps(j->sums[(r0 + 1) * KB + kb]);
        FOUR(SCALES)
#define BLOCK_SUM2(b)                                                               \
    y0##b = _mm512_fmadd_ps(sum0, m##b, _mm512_fmadd_ps(c0##b, d##b, y0##b));      \
    y1##b = _mm512_fmadd_ps(sum1, m##b, _mm512_fmadd_ps(c1##b, d##b, y1##b));
        FOUR(BLOCK_SUM2)
    }
#define STORE2(b) store_block(j->y + r0 * j->N, j->N, nb + (b), y0##b), store_block(j->y + (r0 + 1) * j->N, j->N, nb + (b), y1##b);
    FOUR(STORE2)
}

static void take_q4(void *arg) {
    const Q4Job *j = arg;
    q4_take(arg, j->M, j->blocks, Q4_GROUP, dot_q4_row, dot_q4_two, dot_q4);
}

int q4_products(void) { return 1; }

/* y [M, N] (fp32) = x [M, K] (fp32; K a multiple of 32) times the Q4_1 weights' transpose (packed:
   ``pack_q4``), on the calling thread and up to ``threads`` - 1 workers. Returns 0, or -1 without memory. */
int q4_linear(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads) {
    static _Thread_local void *buffer;
    static _Thread_local size_t held;
    const int64_t KB = K / 32;
    if (K % 32 || M < 1) return -1;
    uint16_t *a = scratch(&buffer, &held, sizeof(uint16_t) * (size_t)(M * K) + sizeof(float) * (size_t)(M * KB));
    if (!a) return -1;
    float *sums = (float *)(a + M * K);
    for (int64_t i = 0; i < M * K; i += W) store_bf16(a + i, load(x + i));
    for (int64_t i = 0; i < M * KB; ++i) { /* each block's bf16 inputs, widened, summed in a fixed order */
        __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(a + 32 * i))), 16));
        __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(a + 32 * i + 16))), 16));
        sums[i] = fold((vf)_mm512_add_ps(lo, hi));
    }
    Q4Job job = {a, sums, w, y, M, N, K, (N + 15) / 16};
    pool_run(take_q4, &job, threads);
    return 0;
}
#else
int q4_products(void) { return 0; }
int q4_linear(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads) {
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)threads;
    return -1;
}
#endif
