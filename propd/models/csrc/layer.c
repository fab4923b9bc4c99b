/* A run of decoder layers in one call, for our bf16 products (AMX or AVX512-BF16): the same kernels the tensor code calls
   one by one (rms_norm, bf16_linear, rope, attend or attend_amx, silu_mul), in the same order on the same values,
   with the glue between them (bias and residual adds, K/V writes) in plain loops. A step then
   costs its products and attention and nothing else: on the Intel Xeon with AMX, a batch-1 step
   of SmolLM2 spent a third of its time between kernels, in ~15 Python-level ops per layer. Every
   value is what the tensor code gives, bitwise (IEEE adds and copies; the kernels are shared). */
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "vec.h"

void rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t dim, float eps);
void rope(float *x, const float *cs, int64_t tokens, int64_t heads, int64_t stride, int64_t hd);
void silu_mul(const void *gu, void *result, int64_t rows, int64_t inter, int bf16);

typedef struct {
    const float *gu;
    float *act;
    int64_t rows, inter;
} SiluJob;

/* SiLU(gate) * up a row at a time on the pool: each row is computed alone, so who takes it changes no
   value (32 rows: 1.5 ms of a 27 ms step on one thread). */
static void silu_rows(void *arg) {
    const SiluJob *j = arg;
    for (int64_t r; (r = pool_take(1)) < j->rows;) silu_mul(j->gu + r * 2 * j->inter, j->act + r * j->inter, 1, j->inter, 0);
}
int bf16_linear_into(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t room, int64_t threads, int64_t kernel);
int q4_linear(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads);
int q4i8_linear(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads);

/* The product the tensor code's ``Linear`` makes of these weights: bf16 by kernel ``bf16``, or Q4_1
   blocks (``q4`` 1: times 16-bit inputs as two int8 planes; 2: times int8 inputs). */
static int product(const float *x, const void *w, int64_t q4, int64_t bf16, float *y, int64_t M, int64_t N, int64_t K, int64_t room, int64_t threads) {
    if (q4 == 2) return q4i8_linear(x, w, y, M, N, K, threads);
    return q4 ? q4_linear(x, w, y, M, N, K, threads) : bf16_linear_into(x, w, y, M, N, K, room, threads, bf16);
}
int attend(const float *q, const void *k, const void *v, float *out, const int64_t *n_in, const int64_t *path, const int64_t *starts,
           int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D, int64_t hd, int64_t sb, int64_t sh, int64_t ss,
           float scale, int64_t max_keys, int64_t threads, int64_t bf16);
int attend_amx(const float *q, const float *k, const float *v, float *out, const int64_t *n_in, const int64_t *path, const int64_t *starts,
               int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D, int64_t hd, int64_t sb, int64_t sh, int64_t ss,
               float scale, int64_t max_keys, int64_t threads, uint32_t *packed, int64_t pb, int64_t ph, int64_t *ready,
               const int64_t *committed);

typedef struct {
    const float *attn_norm, *bqkv, *mlp_norm; /* bqkv NULL: no bias */
    const void *qkv, *wo, *gate_up, *down;    /* packed for bf16_linear, or for q4_linear (q4i8_linear) where q4[i] is 1 (2) */
    int64_t q4[4];
    int64_t bf16; /* the kernel of its bf16 products (bf16_linear_into's: 1 AMX tiles, 2 AVX512-BF16) */
} Weights;

typedef struct {
    int64_t dim, heads, kv_heads, hd, inter, threads;
    float eps, scale; /* scale: attention's, hd^-0.5 as the tensor code rounds it */
    /* the cache: [layers, 2, B, kv_heads, slots, hd + 1], fp32 or (kv_bf16 1) bf16, strides in elements */
    void *kv;
    int64_t kv_bf16, s_layer, s_kv, s_row, s_head, s_slot;
    /* this call's tokens: row b's at [starts[b], starts[b + 1]), at most T of them; per token its slot, RoPE
       (cos, sin) [hd / 2, 2] and attention's plan */
    int64_t B, T, D, max_keys, attend_threads;
    const int64_t *starts, *slots, *n_in, *path;
    const float *cs;
    /* the cache's committed blocks for the AMX attention (``attend_amx``), or packed NULL: ``attend`` */
    uint32_t *packed;
    int64_t p_layer, p_row, p_head;
    int64_t *ready; /* [layers, B] */
    const int64_t *committed;
} Step;

static void add(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

/* A key or value of hd features into the cache: as it is, or rounded to bf16 as torch rounds finite
   values and infinities (a NaN stays a NaN, with its own payload where torch writes 0xffff). */
static void put(char *entry, const float *features, int64_t hd, int64_t bf16) {
    if (!bf16) {
        memcpy(entry, features, sizeof(float) * hd);
        return;
    }
    for (int64_t i = 0; i < hd; i += W) store_bf16((uint16_t *)entry + i, load(features + i)); /* hd % 16 == 0 */
}

/* Layers [0, n) of ``weights`` over x [M, dim] (fp32, updated in place), their K/V written at
   the tokens' slots of cache layers first, first + 1, ... Returns 0, or -1 out of memory. */
int forward_layers(float *x, const Weights *weights, int64_t first, int64_t n, const Step *s) {
    int64_t M = s->starts[s->B], dim = s->dim, hd = s->hd, H = s->heads, KV = s->kv_heads, width = (H + 2 * KV) * hd;
    int64_t room = (M + 31) / 32 * 32; /* the products' outputs hold whole tiles of rows: stored straight from the tiles */
    float *normed = malloc(sizeof(float) * M * dim), *h = malloc(sizeof(float) * room * width), *q = malloc(sizeof(float) * M * H * hd);
    float *att = malloc(sizeof(float) * M * H * hd), *out = malloc(sizeof(float) * room * dim), *gu = malloc(sizeof(float) * room * 2 * s->inter);
    float *act = malloc(sizeof(float) * M * s->inter);
    int status = normed && h && q && att && out && gu && act ? 0 : -1;
    for (int64_t i = 0; i < n && !status; ++i) {
        const Weights *w = weights + i;
        int64_t size = s->kv_bf16 ? 2 : 4;
        char *keys = (char *)s->kv + (first + i) * s->s_layer * size, *values = keys + s->s_kv * size;
        rms_norm(x, w->attn_norm, normed, M, dim, s->eps);
        status |= product(normed, w->qkv, w->q4[0], w->bf16, h, M, width, dim, room, s->threads);
        for (int64_t m = 0; w->bqkv && m < M; ++m) add(h + m * width, w->bqkv, width);
        rope(h, s->cs, M, H + KV, width, hd);
        for (int64_t b = 0, m = 0; m < M; ++m) {
            const float *row = h + m * width;
            while (m >= s->starts[b + 1]) ++b;
            int64_t at = b * s->s_row + s->slots[m] * s->s_slot;
            memcpy(q + m * H * hd, row, sizeof(float) * H * hd);
            for (int64_t k = 0; k < KV; ++k) {
                put(keys + (at + k * s->s_head) * size, row + (H + k) * hd, hd, s->kv_bf16);
                put(values + (at + k * s->s_head) * size, row + (H + KV + k) * hd, hd, s->kv_bf16);
            }
        }
        if (s->packed)
            status |= attend_amx(q, (const float *)keys, (const float *)values, att, s->n_in, s->path, s->starts, s->B, s->T, H, KV, s->D, hd, s->s_row, s->s_head, s->s_slot, s->scale,
                                 s->max_keys, s->attend_threads, s->packed + (first + i) * s->p_layer, s->p_row, s->p_head,
                                 s->ready + (first + i) * s->B, s->committed);
        else
            status |= attend(q, keys, values, att, s->n_in, s->path, s->starts, s->B, s->T, H, KV, s->D, hd, s->s_row, s->s_head, s->s_slot,
                             s->scale, s->max_keys, s->attend_threads, s->kv_bf16);
        status |= product(att, w->wo, w->q4[1], w->bf16, out, M, dim, H * hd, room, s->threads);
        add(x, out, M * dim);
        rms_norm(x, w->mlp_norm, normed, M, dim, s->eps);
        status |= product(normed, w->gate_up, w->q4[2], w->bf16, gu, M, 2 * s->inter, dim, room, s->threads);
        SiluJob silu = {gu, act, M, s->inter};
        pool_run(silu_rows, &silu, M >= 4 ? s->threads : 1);
        status |= product(act, w->down, w->q4[3], w->bf16, out, M, dim, s->inter, room, s->threads);
        add(x, out, M * dim);
    }
    free(normed), free(h), free(q), free(att), free(out), free(gu), free(act);
    return status ? -1 : 0;
}
