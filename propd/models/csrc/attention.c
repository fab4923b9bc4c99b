/* Attention whose result for a query depends only on that query and its own keys in position order.

   Every query (row b, token t, head h) reads its sequence of cache entries: the first n_in[b, t]
   slots in place (slot == position there), then the slots path[b, t, :] up to the first -1. One
   task per query token and K/V head, on one thread, in one fixed order: scores, their maximum,
   weights exp(score - max), weighted values and the weights' sum added up by position. Nothing
   depends on how many queries share the call, how tasks are split between threads or where a
   query's siblings sit in the cache, so a token gets bitwise the same output alone (AR), inside a
   tree or inside a batch. Vectors run across features (or, for exp, across positions with the
   same code in every lane); built with -ffp-contract=off and without fast-math, so no sum is
   reordered. */
#include <pthread.h>
#include <stdlib.h>

#include "vec.h"

typedef struct {
    const float *q, *k, *v;
    float *out;
    const int64_t *n_in, *path;
    int64_t T, H, KV, D, hd, sb, sh, ss, max_keys, first, last; /* tasks [first, last): (b * T + t) * KV + kv head */
    float scale;
    int status;
} Job;

#define CHUNK 4 /* query heads sharing one read of each key and value */

/* Query heads [h0, h0 + nh) of one task: each key and value is read once for all of them; every
   head's sums run in the same order as if it were alone. ``lanes`` and ``nh`` are constants where
   this is inlined, so queries and accumulators stay in registers. */
__attribute__((always_inline)) static inline void chunk(const Job *a, int64_t lanes, int64_t nh, int64_t bt, int64_t kvh, int64_t h0, float *scores) {
    int64_t g = a->H / a->KV, hd = a->hd, b = bt / a->T, inplace = a->n_in[bt], L = inplace, padded = (a->max_keys + W - 1) / W * W;
    const int64_t *p = a->path + bt * a->D;
    while (L - inplace < a->D && p[L - inplace] >= 0) ++L;
    const float *kh = a->k + b * a->sb + kvh * a->sh, *vh = a->v + b * a->sb + kvh * a->sh;
    vf qs[CHUNK][8], acc[CHUNK][8];
    float top[CHUNK], total[CHUNK];
    for (int64_t h = 0; h < nh; ++h) {
        const float *qh = a->q + ((bt * a->H + kvh * g + h0 + h) * hd);
        for (int64_t c = 0; c < lanes; ++c) qs[h][c] = load(qh + c * W) * splat(a->scale), acc[h][c] = splat(0.0f);
        top[h] = -INFINITY, total[h] = 0.0f;
    }
    for (int64_t j = 0; j < L; ++j) {
        const float *kj = kh + (j < inplace ? j : p[j - inplace]) * a->ss;
        for (int64_t h = 0; h < nh; ++h) {
            vf s = qs[h][0] * load(kj);
            for (int64_t c = 1; c < lanes; ++c) s += qs[h][c] * load(kj + c * W);
            float x = fold(s);
            scores[h * padded + j] = x;
            top[h] = x > top[h] ? x : top[h];
        }
    }
    for (int64_t h = 0; h < nh; ++h) {
        float *row = scores + h * padded;
        for (int64_t j = L; j < (L + W - 1) / W * W; ++j) row[j] = top[h];
        for (int64_t j = 0; j < L; j += W) store(row + j, vexp(load(row + j) - splat(top[h])));
    }
    for (int64_t j = 0; j < L; ++j) {
        const float *vj = vh + (j < inplace ? j : p[j - inplace]) * a->ss;
        for (int64_t c = 0; c < lanes; ++c) {
            vf x = load(vj + c * W);
            for (int64_t h = 0; h < nh; ++h) acc[h][c] += splat(scores[h * padded + j]) * x;
        }
        for (int64_t h = 0; h < nh; ++h) total[h] += scores[h * padded + j];
    }
    for (int64_t h = 0; h < nh; ++h) {
        float *o = a->out + (bt * a->H + kvh * g + h0 + h) * hd;
        for (int64_t c = 0; c < lanes; ++c) store(o + c * W, acc[h][c] / splat(total[h]));
    }
}

/* A chunk with its sizes as constants for the common head dims (64, 128) and chunk sizes. */
static void chunk_any(const Job *a, int64_t nh, int64_t bt, int64_t kvh, int64_t h0, float *scores) {
#define CASE(LANES, NH) if (a->hd == (LANES) * W && nh == (NH)) { chunk(a, LANES, NH, bt, kvh, h0, scores); return; }
    CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4) CASE(8, 1) CASE(8, 2) CASE(8, 3) CASE(8, 4)
#undef CASE
    chunk(a, a->hd / W, nh, bt, kvh, h0, scores);
}

static void *run(void *arg) {
    Job *a = arg;
    int64_t g = a->H / a->KV;
    float *scores = malloc(sizeof(float) * (size_t)(CHUNK * ((a->max_keys + W - 1) / W * W)));
    if (!scores) {
        a->status = -1;
        return NULL;
    }
    for (int64_t task = a->first; task < a->last; ++task)
        for (int64_t h0 = 0; h0 < g; h0 += CHUNK)
            chunk_any(a, g - h0 < CHUNK ? g - h0 : CHUNK, task / a->KV, task % a->KV, h0, scores);
    free(scores);
    return NULL;
}

/* q [B, T, H, hd] contiguous (hd a multiple of 16, at most 128); k, v one layer's keys / values with strides
   (batch, K/V head, slot) in floats; out [B, T, H, hd] contiguous; n_in [B, T]; path [B, T, D];
   max_keys: no query reads more entries. The tasks are cut into ``threads`` runs. Returns 0, or
   -1 when out of memory or threads. */
int attend(const float *q, const float *k, const float *v, float *out, const int64_t *n_in, const int64_t *path,
           int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D, int64_t hd, int64_t sb, int64_t sh, int64_t ss,
           float scale, int64_t max_keys, int64_t threads) {
    enum { MAX_THREADS = 64 };
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int64_t tasks = B * T * KV, n = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (n > tasks) n = tasks;
    for (int64_t i = 0; i < n; ++i)
        jobs[i] = (Job){q, k, v, out, n_in, path, T, H, KV, D, hd, sb, sh, ss, max_keys, tasks * i / n, tasks * (i + 1) / n, scale, 0};
    int64_t started = 1;
    for (; started < n; ++started)
        if (pthread_create(&ids[started], NULL, run, &jobs[started])) break;
    for (int64_t i = started; i < n; ++i) run(&jobs[i]);
    run(&jobs[0]);
    int status = 0;
    for (int64_t i = 1; i < started; ++i) pthread_join(ids[i], NULL);
    for (int64_t i = 0; i < n; ++i) status |= jobs[i].status;
    return status;
}
