/* y = x W^T where W is stored as the GGUF's Q4_1 blocks: per 32 inputs of an output, 4-bit levels q
   and fp16 d, m with w = d q + m. A weight costs 5 bits to read rather than bf16's 16, and a
   batch-1 step, which reads every weight once, is bound by those reads (``csrc/matmul.c``).

   Every output is one fixed chain, whatever the row count: x rounded to bf16 (as the bf16 route
   rounds it), then per block of 32 inputs in order, s = the dot-product instruction's chain over
   the 16 input pairs of the levels as bf16 128 + q (exact) from zero, and y = fma(s, d, y), then
   y = fma(the block's sum of inputs, m - 128 d, y). The weights are the model's own Q4_1 values,
   not rounded to bf16. Each group of rows expands the levels from the packed bytes as it reads them.

   Packed layout (``pack_q4`` in kernels.py), per block of 16 outputs and 32 inputs, 320 bytes:
   16 x 16 bytes of levels (byte o of row p: output o's inputs 2p | 2p + 1 << 4), then d and m for
   the 16 outputs (fp16 each). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "vec.h"

#define Q4_BLOCK 320 /* bytes per 16 outputs x 32 inputs */

#if defined(__AVX512BF16__) && !(defined(__AMX_TILE__) && defined(__AMX_BF16__))
#include <immintrin.h>

#define Q4_CHUNK 4 /* output blocks a thread takes at a time */
#define Q4_GROUP 6 /* rows that share a level load */

typedef struct {
    const uint16_t *a; /* [M, K] bf16 */
    const float *sums; /* [M, K / 32]: each row's sum of its bf16 inputs per block of 32 */
    const uint8_t *w;
    float *y; /* [M, N] */
    int64_t M, N, K, blocks;
} Q4Job;

/* 16 bytes of levels (byte o: output o's pair of inputs, low nibble first) as 16 bf16 pairs of
   128 + q: OR-ed into the mantissa of 128 (bf16 0x4300, whose last mantissa bit is 1), each is its
   exact value, with no table. The 128 comes out of the block's sum again (``dot_q4``). */
static inline __m512i levels_of(const uint8_t *bytes) {
    __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
    __m512i pairs = _mm512_ternarylogic_epi32(x, _mm512_slli_epi32(x, 12), _mm512_set1_epi32(0x000f000f), 0xa8); /* (x | x << 12) & mask */
    return _mm512_or_si512(pairs, _mm512_set1_epi32(0x43004300));
}

#define LEVELS(b) ((__m512bh)levels_of(j->w + ((nb + (b)) * KB + kb) * Q4_BLOCK + 16 * p))
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
static void dot_q4(const Q4Job *j, int64_t nb, int64_t count, int64_t r0, int rows) {
    const int64_t KB = j->K / 32;
    __m512 y00 = _mm512_setzero_ps(), y01 = y00, y10 = y00, y11 = y00, y20 = y00, y21 = y00;
    __m512 y30 = y00, y31 = y00, y40 = y00, y41 = y00, y50 = y00, y51 = y00;
    for (int64_t kb = 0; kb < KB; ++kb) {
        __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
        __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
        for (int p = 0; p < 16; ++p) {
            __m512bh l0 = LEVELS(0), l1 = count > 1 ? LEVELS(1) : l0;
            UP_TO_6_ROWS(ROW)
        }
        const uint8_t *scales0 = j->w + (nb * KB + kb) * Q4_BLOCK + 256, *scales1 = count > 1 ? scales0 + KB * Q4_BLOCK : scales0;
        __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales0)), d1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales1));
        __m512 m0 = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), d0, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales0 + 32))));
        __m512 m1 = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), d1, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales1 + 32))));
        SCALE(0) SCALE(1) SCALE(2) SCALE(3) SCALE(4) SCALE(5)
    }
    const __m512 sums[6][2] = {{y00, y01}, {y10, y11}, {y20, y21}, {y30, y31}, {y40, y41}, {y50, y51}};
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < count; ++b) {
            int64_t n0 = (nb + b) * 16, cols = j->N - n0 < 16 ? j->N - n0 : 16;
            float out[16];
            _mm512_storeu_ps(out, sums[r][b]);
            memcpy(j->y + (r0 + r) * j->N + n0, out, sizeof(float) * cols);
        }
}

/* Output blocks Q4_CHUNK at a time, every group of up to Q4_GROUP rows over them two blocks at a time. */
static void take_q4(void *arg) {
    const Q4Job *j = arg;
    for (int64_t first; (first = pool_take(Q4_CHUNK)) < j->blocks;) {
        int64_t count = first + Q4_CHUNK < j->blocks ? Q4_CHUNK : j->blocks - first;
        for (int64_t r0 = 0, rows; r0 < j->M; r0 += rows) {
            rows = group_rows(j->M - r0, Q4_GROUP);
            for (int64_t b = 0; b < count; b += 2) dot_q4(j, first + b, count - b < 2 ? count - b : 2, r0, (int)rows);
        }
    }
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
