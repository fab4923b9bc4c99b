/* The per-token steps of a layer besides products and attention: RMSNorm, RoPE, SiLU(gate) * up.

   Each token is computed on its own, in one fixed order, on the calling thread: its result depends
   on its own values alone, never on how many tokens share the call (torch's vector loops and their
   scalar tails round differently, and where a tensor is cut between them depends on its size). A
   call is one C function where torch runs 3-8 small ops (measured on the Intel Xeon with AMX, 1-32
   tokens: 6-10 us where torch takes 18-45 for RMSNorm and RoPE). Built with attention.c
   (-ffp-contract=off, no fast-math). */
#include "vec.h"

/* out = x / sqrt(mean(x^2) + eps) * w, per row of x [rows, dim]. */
void rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        vf acc = splat(0.0f);
        int64_t i = 0;
        for (; i + W <= dim; i += W) acc += load(xr + i) * load(xr + i);
        float squares = fold(acc);
        for (; i < dim; ++i) squares += xr[i] * xr[i];
        float scale = 1.0f / sqrtf(squares / (float)dim + eps);
        for (i = 0; i + W <= dim; i += W) store(o + i, load(xr + i) * splat(scale) * load(w + i));
        for (; i < dim; ++i) o[i] = xr[i] * scale * w[i];
    }
}

/* RoPE in place on heads [0, heads) of every token of x (a token every ``stride`` floats, heads of
   ``hd`` floats, features as (even, odd) pairs): each pair times its token's (cos, sin) in
   cs [tokens, hd / 2, 2], as a complex product. */
void rope(float *x, const float *cs, int64_t tokens, int64_t heads, int64_t stride, int64_t hd) {
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t h = 0; h < heads; ++h) {
            float *p = x + t * stride + h * hd;
            const float *c = cs + t * hd;
            for (int64_t j = 0; j < hd; j += 2) {
                float re = p[j], im = p[j + 1];
                p[j] = re * c[j] - im * c[j + 1];
                p[j + 1] = re * c[j + 1] + im * c[j];
            }
        }
}

/* out [rows, inter] = silu(gate) * up from gu [rows, 2 inter] = gate | up, in fp32 (``bf16`` 0) or
   bf16 (1: computed in fp32, rounded once). */
void silu_mul(const void *gu, void *result, int64_t rows, int64_t inter, int bf16) {
    size_t size = bf16 ? sizeof(uint16_t) : sizeof(float);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < inter; i += W) {
            int64_t n = inter - i < W ? inter - i : W, g = r * 2 * inter + i, o = r * inter + i;
            float in[2][W] = {{0}}, tail[W]; /* the tail runs the same vector code on zero-padded lanes */
            const char *gate = (const char *)gu + g * size, *up = gate + inter * size;
            if (n < W) memcpy(in[0], gate, n * size), memcpy(in[1], up, n * size), gate = (const char *)in[0], up = (const char *)in[1];
            vf x = bf16 ? load_bf16((const uint16_t *)gate) : load((const float *)gate);
            vf y = bf16 ? load_bf16((const uint16_t *)up) : load((const float *)up);
            vf act = x / (splat(1.0f) + vexp(-x)) * y;
            char *dst = n < W ? (char *)tail : (char *)result + o * size;
            if (bf16) store_bf16((uint16_t *)dst, act);
            else store((float *)dst, act);
            if (n < W) memcpy((char *)result + o * size, tail, n * size);
        }
}

