/* Vector helpers shared by propd's C kernels: fixed-order folds and one exp polynomial for every
   lane, so that a value never depends on which lane or loop computed it. */
#ifndef PROPD_VEC_H
#define PROPD_VEC_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#define W 16
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

static inline vf load(const float *p) { vf x; memcpy(&x, p, sizeof x); return x; }
static inline void store(float *p, vf x) { memcpy(p, &x, sizeof x); }
static inline vf splat(float x) { return (vf){0} + x; }
static inline vf pick(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); } /* mask lanes: -1 or 0 */

/* a * b + c: one FMA (one rounding) where the CPU has AVX-512, else a product and a sum. One way
   per build, spelled out, so that no code path is contracted differently from another. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vf fmadd(vf a, vf b, vf c) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }

/* Output block nb's 16 sums of a row of N outputs into ``row`` (those of its outputs that exist). */
static inline void store_block(float *row, int64_t N, int64_t nb, __m512 sums) {
    int64_t n0 = nb * 16, cols = N - n0 < 16 ? N - n0 : 16;
    float out[16];
    _mm512_storeu_ps(out, sums);
    memcpy(row + n0, out, sizeof(float) * cols);
}
#else
static inline vf fmadd(vf a, vf b, vf c) { return a * b + c; }
#endif

/* ROW(0) .. ROW(rows - 1) for up to 6 rows (``rows`` in scope), each spelled out: the products'
   accumulators are named one by one, which GCC keeps in registers where an array went to memory. */
#define UP_TO_6_ROWS(ROW) ROW(0) if (rows > 1) ROW(1) if (rows > 2) ROW(2) if (rows > 3) ROW(3) if (rows > 4) ROW(4) if (rows > 5) ROW(5)

/* The products' next group of rows, ``left`` rows to go: ``group``, but where a group of 1-2 rows
   would be left after this one, the two share them (7 rows as 4 + 3, 8 as 4 + 4, 14 as 6 + 4 + 4 with
   groups of 6): a last group of 1-2 rows read a chunk's weights once more for little arithmetic (30
   layers' products on the AMD EPYC, weights cold, interleaved in one process, four runs: 8 rows
   0.1-0.5 ms faster, 13 rows 0.1-0.4, 20 rows 0.6-0.7 in three of them). */
static inline int group_rows(int64_t left, int group) {
    if (left > group && left <= group + 2) return (int)((left + 1) / 2);
    return left < group ? (int)left : group;
}

/* Sum of the lanes in a fixed pairwise order: lane l + lane l + 8, then + 4, + 2, + 1. */
static inline float fold(vf x) {
    x += __builtin_shuffle(x, (vi){8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15});
    x += __builtin_shuffle(x, (vi){4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7});
    x += __builtin_shuffle(x, (vi){2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3});
    x += __builtin_shuffle(x, (vi){1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1});
    return x[0];
}

/* fold() of 16 vectors at once, [fold(s[0]), ..., fold(s[15])]: every lane's sum is made of the same
   pairs as fold's (lane l + lane l + 8, then + 4, + 2, + 1), so each is bitwise what fold gives,
   with lanes swapped across vectors (30 shuffles and 15 adds for 16 sums, where fold takes 4 and 4 each). */
static inline vf fold16(const vf s[W]) {
    const vi p1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}, p2 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
    const vi p3 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}, p4 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
    const vi in_order = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15}; /* lane l holds the sum of s[in_order[l]], and back */
    vf u[8], w[4], t[2];
    for (int k = 0; k < 8; ++k) u[k] = __builtin_shuffle(s[2 * k], s[2 * k + 1], p1) + __builtin_shuffle(s[2 * k], s[2 * k + 1], p1 + 8);
    for (int k = 0; k < 4; ++k) w[k] = __builtin_shuffle(u[2 * k], u[2 * k + 1], p2) + __builtin_shuffle(u[2 * k], u[2 * k + 1], p2 + 4);
    for (int k = 0; k < 2; ++k) t[k] = __builtin_shuffle(w[2 * k], w[2 * k + 1], p3) + __builtin_shuffle(w[2 * k], w[2 * k + 1], p3 + 2);
    return __builtin_shuffle(__builtin_shuffle(t[0], t[1], p4) + __builtin_shuffle(t[0], t[1], p4 + 1), in_order);
}

/* exp(x) for every lane by one polynomial (Cephes' expf): the same operations in every lane. */
static inline vf vexp(vf x) {
    x = pick(x < splat(-87.0f), splat(-87.0f), x);
    x = pick(x > splat(88.0f), splat(88.0f), x);
    vf n = x * splat(1.44269504088896341f) + splat(0.5f);
    vf t = __builtin_convertvector(__builtin_convertvector(n, vi), vf);  /* toward zero */
    n = pick(t > n, t - splat(1.0f), t);                                 /* floor */
    x = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    vf y = splat(1.9875691500e-4f);
    y = y * x + splat(1.3981999507e-3f);
    y = y * x + splat(8.3334519073e-3f);
    y = y * x + splat(4.1665795894e-2f);
    y = y * x + splat(1.6666665459e-1f);
    y = y * x + splat(5.0000001201e-1f);
    y = y * (x * x) + x + splat(1.0f);
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    memcpy(&scale, &e, sizeof scale);
    return y * scale;
}

typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));

static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline void store_bf16(uint16_t *p, vf f) { /* round to nearest even, as torch does; NaN stays NaN */
    vu u;
    memcpy(&u, &f, sizeof u);
    vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet = (u >> 16) | 0x40u;
    vu nan = (vu)((u & 0x7fffffffu) > 0x7f800000u);
    vh h = __builtin_convertvector((rounded & ~nan) | (quiet & nan), vh);
    memcpy(p, &h, sizeof h);
}

#endif
