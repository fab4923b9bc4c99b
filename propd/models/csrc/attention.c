/* Attention whose result for a query depends only on that query and its own keys in position order.

   Every query (row b, token t, head h) reads its sequence of cache entries: the first n_in[b, t]
   slots in place (slot == position there), then the slots path[b, t, :] up to the first -1. A few
   queries of one row and K/V head share each read of the entries they all see (the committed cache
   is most of what a step reads, and it is read from memory); each runs on one thread, in one fixed
   order: scores, their maximum, weights exp(score - max), weighted values and the weights' sum
   added up by position. Nothing depends on how many queries share the call, how tasks are split
   between threads or where a query's siblings sit in the cache, so a token gets bitwise the same
   output alone (AR), inside a tree or inside a batch. Vectors run across features (or, for exp,
   across positions with the same code in every lane); built with -ffp-contract=off and without
   fast-math, so no sum is reordered and the only fused multiply-adds are the explicit ``fmadd``
   (18% off a compute-bound call). The entries are fp32, or bf16 (a cache kept in bf16: half the
   bytes to read, each entry widened exactly to the fp32 the same kernel would read). */
#include <stdatomic.h>
#include <stdlib.h>

#include "pool.h"
#include "vec.h"

typedef struct {
    const float *q;
    const void *k, *v; /* fp32 or, with bf16, bf16 entries */
    float *out;
    const int64_t *n_in, *path, *starts; /* row b's tokens: [starts[b], starts[b + 1]) */
    int64_t B, T, H, KV, D, hd, sb, sh, ss, max_keys, chunks, group; /* chunks: query chunks per K/V head of the longest row */
    float scale;
    int64_t bf16;
    atomic_int status;
} Job;

#define CHUNK 4 /* queries (token, head) sharing one read of each key and value */
#define AHEAD 8 /* entries read ahead: a row's K/V stream from memory (measured: 15% off a batch-8 AR step's attention) */

/* Queries [p0, p0 + nq) of row b's K/V head kvh, query p being token p / g's head p % g of that
   group: each key and value they all see is read once for all of them; every query's sums run in
   the same order as if it were alone (keys in position order). ``lanes`` and ``nq`` are constants
   where this is inlined, so queries and accumulators stay in registers; so is ``bf16`` (the
   entries' type). */
__attribute__((always_inline)) static inline void chunk(const Job *a, int bf16, int64_t lanes, int64_t nq, int64_t b, int64_t kvh, int64_t p0,
                                                        float *scores) {
    int64_t g = a->H / a->KV, hd = a->hd, padded = (a->max_keys + W - 1) / W * W, shared = INT64_MAX, size = bf16 ? 2 : 4;
    const char *kh = (const char *)a->k + (b * a->sb + kvh * a->sh) * size, *vh = (const char *)a->v + (b * a->sb + kvh * a->sh) * size;
    vf qs[CHUNK][8], acc[CHUNK][8];
    float top[CHUNK], total[CHUNK];
    int64_t inplace[CHUNK], L[CHUNK], row[CHUNK];
    const int64_t *path[CHUNK];
    for (int64_t i = 0; i < nq; ++i) {
        int64_t bt = a->starts[b] + (p0 + i) / g;
        row[i] = bt * a->H + kvh * g + (p0 + i) % g;
        inplace[i] = L[i] = a->n_in[bt], path[i] = a->path + bt * a->D;
        while (L[i] - inplace[i] < a->D && path[i][L[i] - inplace[i]] >= 0) ++L[i];
        shared = inplace[i] < shared ? inplace[i] : shared;
        const float *qh = a->q + row[i] * hd;
        for (int64_t c = 0; c < lanes; ++c) qs[i][c] = load(qh + c * W) * splat(a->scale), acc[i][c] = splat(0.0f);
        top[i] = -INFINITY, total[i] = 0.0f;
    }
#define SLOT(i, j) ((j) < inplace[i] ? (j) : path[i][(j) - inplace[i]])
#define ENTRY(base, slot) ((base) + (slot) * a->ss * size)
#define FEATURES(e, c) (bf16 ? load_bf16((const uint16_t *)(e) + (c) * W) : load((const float *)(e) + (c) * W))
/* x = query i's products with features f, a chain per lane; its score is their fold. */
#define PRODUCTS(x, i, f)                                                          \
    do {                                                                           \
        (x) = qs[i][0] * (f)[0];                                                   \
        for (int64_t c = 1; c < lanes; ++c) (x) = fmadd(qs[i][c], (f)[c], (x));    \
    } while (0)
#define SCORE(i, j, f)                                                        \
    do {                                                                      \
        vf s;                                                                 \
        PRODUCTS(s, i, f);                                                    \
        float x = fold(s);                                                    \
        scores[(i) * padded + (j)] = x;                                       \
        top[i] = x > top[i] ? x : top[i];                                     \
    } while (0)
#define ADD_VALUE(i, j, f)                                                                                 \
    do {                                                                                                   \
        for (int64_t c = 0; c < lanes; ++c) acc[i][c] = fmadd(splat(scores[(i) * padded + (j)]), (f)[c], acc[i][c]); \
        total[i] += scores[(i) * padded + (j)];                                                            \
    } while (0)
/* OP for every query and entry from ``from`` on, given the entry's features as fp32 vectors: entries
   [from, shared) read (and widened) once for all queries (fetched AHEAD entries early; widened per
   query, a 16-token step's attention over 1,500 bf16 entries took 26.8 ms, once 21.8), then each
   query's own [shared, L), in position order for each query. */
#define WIDEN(f, e) for (int64_t c = 0; c < lanes; ++c) (f)[c] = FEATURES(e, c)
#define FETCH_AHEAD(e) for (int64_t at = 0; at <= lanes * W * size; at += 64) __builtin_prefetch(ENTRY(e, AHEAD) + at)
#define EACH_ENTRY(base, OP, from)                                                                  \
    do {                                                                                            \
        vf f[8];                                                                                    \
        for (int64_t j = (from); j < shared; ++j) {                                                 \
            const char *e = ENTRY(base, j);                                                         \
            FETCH_AHEAD(e);                                                                         \
            WIDEN(f, e);                                                                            \
            for (int64_t i = 0; i < nq; ++i) OP(i, j, f);                                           \
        }                                                                                           \
        for (int64_t i = 0; i < nq; ++i)                                                            \
            for (int64_t j = shared; j < L[i]; ++j) {                                               \
                WIDEN(f, ENTRY(base, SLOT(i, j)));                                                  \
                OP(i, j, f);                                                                        \
            }                                                                                       \
    } while (0)
    /* With bf16 entries, the shared entries' scores 16 keys at a time, folded together (``fold16``:
       the same bits as ``fold``), the rest one by one: with the entries widened once for all queries,
       attention 21.8 -> 17.6 ms (30 layers, a 16-token step over 1,500 entries) and 4.5 -> 4.0 (batch-8
       AR over 400), AMD EPYC; over fp32 entries it gained nothing there. */
    int64_t blocked = bf16 ? shared / W * W : 0;
    for (int64_t j0 = 0; j0 < blocked; j0 += W) {
        vf part[CHUNK][W], f[8];
        for (int64_t n = 0; n < W; ++n) {
            const char *e = ENTRY(kh, j0 + n);
            FETCH_AHEAD(e);
            WIDEN(f, e);
            for (int64_t i = 0; i < nq; ++i) PRODUCTS(part[i][n], i, f);
        }
        for (int64_t i = 0; i < nq; ++i) {
            vf x = fold16(part[i]);
            store(scores + i * padded + j0, x);
            for (int n = 0; n < W; ++n) top[i] = x[n] > top[i] ? x[n] : top[i];
        }
    }
    EACH_ENTRY(kh, SCORE, blocked);
    for (int64_t i = 0; i < nq; ++i) {
        float *r = scores + i * padded;
        for (int64_t j = L[i]; j < (L[i] + W - 1) / W * W; ++j) r[j] = top[i];
        for (int64_t j = 0; j < L[i]; j += W) store(r + j, vexp(load(r + j) - splat(top[i])));
    }
    EACH_ENTRY(vh, ADD_VALUE, 0);
    for (int64_t i = 0; i < nq; ++i)
        for (int64_t c = 0; c < lanes; ++c) store(a->out + row[i] * hd + c * W, acc[i][c] / splat(total[i]));
#undef SLOT
#undef ENTRY
#undef FEATURES
#undef WIDEN
#undef FETCH_AHEAD
#undef EACH_ENTRY
#undef PRODUCTS
#undef SCORE
#undef ADD_VALUE
}

/* A chunk with its sizes and entry type as constants for the common head dims (64, 128) and chunk sizes. */
static void chunk_any(const Job *a, int64_t nq, int64_t b, int64_t kvh, int64_t p0, float *scores) {
#define CASE(BF16, LANES, NQ) if (a->bf16 == (BF16) && a->hd == (LANES) * W && nq == (NQ)) { chunk(a, BF16, LANES, NQ, b, kvh, p0, scores); return; }
    CASE(0, 4, 1) CASE(0, 4, 2) CASE(0, 4, 3) CASE(0, 4, 4) CASE(0, 8, 1) CASE(0, 8, 2) CASE(0, 8, 3) CASE(0, 8, 4)
    CASE(1, 4, 1) CASE(1, 4, 2) CASE(1, 4, 3) CASE(1, 4, 4) CASE(1, 8, 1) CASE(1, 8, 2) CASE(1, 8, 3) CASE(1, 8, 4)
#undef CASE
    if (a->bf16) chunk(a, 1, a->hd / W, nq, b, kvh, p0, scores);
    else chunk(a, 0, a->hd / W, nq, b, kvh, p0, scores);
}

/* Tasks taken one at a time until none is left: a task is ``group`` consecutive query chunks of
   one row and K/V head (all of them where there are rows and heads enough to share out: its
   entries then come from memory once, and from the core's cache for the next chunks). */
static void run(void *arg) {
    Job *a = arg;
    int64_t tasks = a->B * a->KV * ((a->chunks + a->group - 1) / a->group);
    float *scores = malloc(sizeof(float) * (size_t)(CHUNK * ((a->max_keys + W - 1) / W * W)));
    if (!scores) {
        atomic_store(&a->status, -1);
        return;
    }
    for (int64_t task; (task = pool_take(1)) < tasks;) {
        int64_t per_head = (a->chunks + a->group - 1) / a->group, bk = task / per_head, first = task % per_head * a->group;
        int64_t queries = (a->starts[bk / a->KV + 1] - a->starts[bk / a->KV]) * (a->H / a->KV);
        for (int64_t c = first; c < first + a->group && c * CHUNK < queries; ++c) {
            int64_t p0 = c * CHUNK;
            chunk_any(a, queries - p0 < CHUNK ? queries - p0 : CHUNK, bk / a->KV, bk % a->KV, p0, scores);
        }
    }
    free(scores);
}

/* q [M, H, hd] contiguous (hd a multiple of 16, at most 128), row b's tokens at [starts[b], starts[b + 1]), at most T
   of them; k, v one layer's keys / values, fp32 or (bf16 1) bf16, with strides (batch, K/V head, slot) in
   entries' elements; out [M, H, hd] contiguous; n_in [M]; path [M, D];
   max_keys: no query reads more entries. Up to ``threads`` threads take the tasks (``pool.h``).
   Returns 0, or -1 when out of memory. */
int attend(const float *q, const void *k, const void *v, float *out, const int64_t *n_in, const int64_t *path, const int64_t *starts,
           int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D, int64_t hd, int64_t sb, int64_t sh, int64_t ss,
           float scale, int64_t max_keys, int64_t threads, int64_t bf16) {
    int64_t chunks = (T * (H / KV) + CHUNK - 1) / CHUNK;
    Job job = {q, k, v, out, n_in, path, starts, B, T, H, KV, D, hd, sb, sh, ss, max_keys, chunks, B * KV >= 4 * threads ? chunks : 1, scale, bf16 != 0, 0};
    pool_run(run, &job, threads);
    return atomic_load(&job.status);
}
