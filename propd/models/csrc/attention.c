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
   bytes to read); bf16 entries of heads of 32k features are read by the CPU's bf16 dot products
   where it has them (``chunk_dp``), others widened exactly to the fp32 the same kernel would read. */
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

/* Query i's score with entry j (e: its features, as the chunk's ``PRODUCTS`` reads them): their
   products, a chain per lane, folded; kept as the query's largest so far where it is. */
#define SCORE(i, j, e)                        \
    do {                                      \
        vf s;                                 \
        PRODUCTS(s, i, e);                    \
        float x = fold(s);                    \
        scores[(i) * padded + (j)] = x;       \
        top[i] = x > top[i] ? x : top[i];     \
    } while (0)

/* Query p of row b's K/V head kvh (token p / g's head p % g of the group): its output row, its
   entries in place and the length of its sequence (those, then its path up to the first -1). */
typedef struct {
    int64_t row, inplace, length;
    const int64_t *path;
} Query;

static inline Query query(const Job *a, int64_t b, int64_t kvh, int64_t p) {
    int64_t g = a->H / a->KV, bt = a->starts[b] + p / g;
    Query q = {bt * a->H + kvh * g + p % g, a->n_in[bt], a->n_in[bt], a->path + bt * a->D};
    while (q.length - q.inplace < a->D && q.path[q.length - q.inplace] >= 0) ++q.length;
    return q;
}

/* Queries [p0, p0 + nq) of row b's K/V head kvh, query p being token p / g's head p % g of that
   group: each key and value they all see is read once for all of them; every query's sums run in
   the same order as if it were alone (keys in position order). ``lanes`` and ``nq`` are constants
   where this is inlined, so queries and accumulators stay in registers; so is ``bf16`` (the
   entries' type). */
__attribute__((always_inline)) static inline void chunk(const Job *a, int bf16, int64_t lanes, int64_t nq, int64_t b, int64_t kvh, int64_t p0,
                                                        float *scores) {
    int64_t hd = a->hd, padded = (a->max_keys + W - 1) / W * W, shared = INT64_MAX, size = bf16 ? 2 : 4;
    const char *kh = (const char *)a->k + (b * a->sb + kvh * a->sh) * size, *vh = (const char *)a->v + (b * a->sb + kvh * a->sh) * size;
    vf qs[CHUNK][8], acc[CHUNK][8];
    float top[CHUNK], total[CHUNK];
    Query seq[CHUNK]; /* each query's output row and sequence of entries */
    for (int64_t i = 0; i < nq; ++i) {
        seq[i] = query(a, b, kvh, p0 + i);
        shared = seq[i].inplace < shared ? seq[i].inplace : shared;
        const float *qh = a->q + seq[i].row * hd;
        for (int64_t c = 0; c < lanes; ++c) qs[i][c] = load(qh + c * W) * splat(a->scale), acc[i][c] = splat(0.0f);
        top[i] = -INFINITY, total[i] = 0.0f;
    }
#define SLOT(i, j) ((j) < seq[i].inplace ? (j) : seq[i].path[(j) - seq[i].inplace])
#define ENTRY(base, slot) ((base) + (slot) * a->ss * size)
#define FEATURES(e, c) (bf16 ? load_bf16((const uint16_t *)(e) + (c) * W) : load((const float *)(e) + (c) * W))
/* x = query i's products with features f, a chain per lane; its score is their fold. */
#define PRODUCTS(x, i, f)                                                          \
    do {                                                                           \
        (x) = qs[i][0] * (f)[0];                                                   \
        for (int64_t c = 1; c < lanes; ++c) (x) = fmadd(qs[i][c], (f)[c], (x));    \
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
            for (int64_t j = shared; j < seq[i].length; ++j) {                                               \
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
        for (int64_t j = seq[i].length; j < (seq[i].length + W - 1) / W * W; ++j) r[j] = top[i];
        for (int64_t j = 0; j < seq[i].length; j += W) store(r + j, vexp(load(r + j) - splat(top[i])));
    }
    EACH_ENTRY(vh, ADD_VALUE, 0);
    for (int64_t i = 0; i < nq; ++i)
        for (int64_t c = 0; c < lanes; ++c) store(a->out + seq[i].row * hd + c * W, acc[i][c] / splat(total[i]));
#undef SLOT
#undef ENTRY
#undef FEATURES
#undef WIDEN
#undef FETCH_AHEAD
#undef EACH_ENTRY
#undef PRODUCTS
#undef ADD_VALUE
}

#if defined(__AVX512BF16__)
#include <immintrin.h>

/* ``chunk`` over bf16 entries by the CPU's bf16 dot-product instruction, as a bf16 model's attention
   runs elsewhere (bf16 queries, bf16 weights, fp32 sums): a query's score with a key is one chain of
   instructions over the feature pairs in order (each lane two pairs, then folded as ``fold``), and its
   weighted values take the entries two at a time, positions (0, 1), (2, 3) ... of its own sequence
   (the last alone, beside a zero entry, where it has an odd count), the weights rounded to bf16 and
   summed 16 lanes apart and folded. What a query computes still depends on its own query and entries
   alone. Over fp32 arithmetic on widened entries, with the scores' maximum and the weights' sum
   kept in vectors (as one scalar chain each, they were most of what the arithmetic saved), 30
   layers' attention on the AMD EPYC, each layer's entries its own: 8 tokens over 300 entries 2.4-3.1
   -> 1.8-2.5 ms, over 2,000 12.3-14.8 -> 9.8-11.5; batch-8 AR the same (bound by memory there).
   ``pairs``: the head's features / 32. */
__attribute__((always_inline)) static inline void chunk_dp(const Job *a, int64_t pairs, int64_t nq, int64_t b, int64_t kvh, int64_t p0, float *scores) {
    static const uint16_t zero[128] = {0};
    int64_t hd = a->hd, padded = (a->max_keys + W - 1) / W * W, shared = INT64_MAX;
    const uint16_t *kh = (const uint16_t *)a->k + b * a->sb + kvh * a->sh, *vh = (const uint16_t *)a->v + b * a->sb + kvh * a->sh;
    __m512bh qs[CHUNK][4];
    __m512 acc[CHUNK][8];
    float top[CHUNK], total[CHUNK];
    Query seq[CHUNK]; /* each query's output row and sequence of entries */
    for (int64_t i = 0; i < nq; ++i) {
        seq[i] = query(a, b, kvh, p0 + i);
        shared = seq[i].inplace < shared ? seq[i].inplace : shared;
        uint16_t q[128];
        for (int64_t c = 0; c < 2 * pairs; ++c) store_bf16(q + c * W, load(a->q + seq[i].row * hd + c * W) * splat(a->scale));
        for (int64_t c = 0; c < pairs; ++c) qs[i][c] = (__m512bh)_mm512_loadu_si512(q + 32 * c);
        for (int64_t c = 0; c < 2 * pairs; ++c) acc[i][c] = _mm512_setzero_ps();
        top[i] = -INFINITY;
    }
#define SLOT(i, j) ((j) < seq[i].inplace ? (j) : seq[i].path[(j) - seq[i].inplace])
#define ENTRY(base, slot) ((base) + (slot) * a->ss)
/* the cache lines of ``count`` entries AHEAD entries after e (an entry: hd + 1 features, not line-aligned) */
#define FETCH_AHEAD(e, count) for (int64_t at = 0; at <= (count) * (hd + 1) * 2; at += 64) __builtin_prefetch((const char *)ENTRY(e, AHEAD) + at)
#define PRODUCTS(x, i, e)                                                                                    \
    do {                                                                                                     \
        __m512 s_ = _mm512_setzero_ps();                                                                     \
        for (int64_t c = 0; c < pairs; ++c) s_ = _mm512_dpbf16_ps(s_, qs[i][c], (__m512bh)_mm512_loadu_si512((e) + 32 * c)); \
        (x) = (vf)s_;                                                                                        \
    } while (0)
    int64_t blocked = shared / W * W;
    vf tops[CHUNK]; /* the largest score so far per lane (a maximum is the same in any order) */
    for (int64_t i = 0; i < nq; ++i) tops[i] = splat(-INFINITY);
    for (int64_t j0 = 0; j0 < blocked; j0 += W) {
        vf part[CHUNK][W];
        for (int64_t n = 0; n < W; ++n) {
            const uint16_t *e = ENTRY(kh, j0 + n);
            FETCH_AHEAD(e, 1);
            for (int64_t i = 0; i < nq; ++i) PRODUCTS(part[i][n], i, e);
        }
        for (int64_t i = 0; i < nq; ++i) {
            vf x = fold16(part[i]);
            store(scores + i * padded + j0, x);
            tops[i] = pick(x > tops[i], x, tops[i]);
        }
    }
    for (int64_t i = 0; i < nq; ++i)
        for (int n = 0; n < W; ++n) top[i] = tops[i][n] > top[i] ? tops[i][n] : top[i];
    for (int64_t j = blocked; j < shared; ++j)
        for (int64_t i = 0; i < nq; ++i) SCORE(i, j, ENTRY(kh, j));
    for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = shared; j < seq[i].length; ++j) SCORE(i, j, ENTRY(kh, SLOT(i, j)));
    uint16_t *weights = (uint16_t *)(scores + nq * padded); /* per query, its weights in bf16, a zero after an odd count */
    for (int64_t i = 0; i < nq; ++i) {
        float *r = scores + i * padded;
        uint16_t *w = weights + i * (padded + W);
        const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        vf sums = splat(0.0f); /* lane l: the weights at positions l, l + 16, ... in order, then folded */
        for (int64_t j = seq[i].length; j < (seq[i].length + W - 1) / W * W; ++j) r[j] = top[i];
        for (int64_t j = 0; j < seq[i].length; j += W) {
            store_bf16(w + j, pick(lane < (vi){0} + (int32_t)(seq[i].length - j), vexp(load(r + j) - splat(top[i])), splat(0.0f)));
            sums += load_bf16(w + j);
        }
        w[seq[i].length] = 0;
        total[i] = fold(sums);
    }
/* The values of entries e0 and e1 (e1 after e0 in position), weighted by query i's pair of weights at j. */
#define ADD_PAIR(i, j, lo, hi)                                                                      \
    do {                                                                                            \
        uint32_t w_;                                                                                \
        memcpy(&w_, weights + (i) * (padded + W) + (j), sizeof w_);                                 \
        __m512bh ws_ = (__m512bh)_mm512_set1_epi32((int32_t)w_);                                    \
        for (int64_t c = 0; c < pairs; ++c) {                                                       \
            acc[i][2 * c] = _mm512_dpbf16_ps(acc[i][2 * c], ws_, lo[c]);                            \
            acc[i][2 * c + 1] = _mm512_dpbf16_ps(acc[i][2 * c + 1], ws_, hi[c]);                    \
        }                                                                                           \
    } while (0)
#define INTERLEAVE(lo, hi, e0, e1)                                                                  \
    for (int64_t c = 0; c < pairs; ++c) {                                                           \
        __m512i x_ = _mm512_loadu_si512((e0) + 32 * c), y_ = _mm512_loadu_si512((e1) + 32 * c);    \
        lo[c] = (__m512bh)_mm512_unpacklo_epi16(x_, y_), hi[c] = (__m512bh)_mm512_unpackhi_epi16(x_, y_); \
    }
    __m512bh lo[4], hi[4];
    int64_t even = shared & ~(int64_t)1;
    for (int64_t j = 0; j < even; j += 2) {
        const uint16_t *e = ENTRY(vh, j);
        FETCH_AHEAD(e, 2);
        INTERLEAVE(lo, hi, e, ENTRY(vh, j + 1));
        for (int64_t i = 0; i < nq; ++i) ADD_PAIR(i, j, lo, hi);
    }
    for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = even; j < seq[i].length; j += 2) {
            INTERLEAVE(lo, hi, ENTRY(vh, SLOT(i, j)), j + 1 < seq[i].length ? ENTRY(vh, SLOT(i, j + 1)) : zero);
            ADD_PAIR(i, j, lo, hi);
        }
    /* lane 4m + l of the unpacked low half holds feature 8m + l of its 32, of the high half 8m + 4 + l */
    for (int64_t i = 0; i < nq; ++i)
        for (int64_t c = 0; c < pairs; ++c) {
            vf x = (vf)acc[i][2 * c] / splat(total[i]), y = (vf)acc[i][2 * c + 1] / splat(total[i]);
            float *o = a->out + seq[i].row * hd + 32 * c;
            for (int m = 0; m < 4; ++m)
                for (int l = 0; l < 4; ++l) o[8 * m + l] = x[4 * m + l], o[8 * m + 4 + l] = y[4 * m + l];
        }
#undef SLOT
#undef ENTRY
#undef FETCH_AHEAD
#undef PRODUCTS
#undef ADD_PAIR
#undef INTERLEAVE
}
#define DOT_BF16 1
#else
#define DOT_BF16 0
#endif

/* Whether a bf16 cache's heads of 32k features are read by ``chunk_dp`` (else widened to fp32). */
int bf16_dot_attention(void) { return DOT_BF16; }

/* A chunk with its sizes and entry type as constants for the common head dims (64, 128) and chunk sizes. */
static void chunk_any(const Job *a, int64_t nq, int64_t b, int64_t kvh, int64_t p0, float *scores) {
#if DOT_BF16
#define CASE_DP(PAIRS, NQ) if (a->hd == 32 * (PAIRS) && nq == (NQ)) { chunk_dp(a, PAIRS, NQ, b, kvh, p0, scores); return; }
    if (a->bf16 && a->hd % 32 == 0) {
        CASE_DP(2, 1) CASE_DP(2, 2) CASE_DP(2, 3) CASE_DP(2, 4) CASE_DP(4, 1) CASE_DP(4, 2) CASE_DP(4, 3) CASE_DP(4, 4)
        chunk_dp(a, a->hd / 32, nq, b, kvh, p0, scores);
        return;
    }
#undef CASE_DP
#endif
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
    float *scores = malloc(sizeof(float) * (size_t)(2 * CHUNK * ((a->max_keys + W - 1) / W * W + W))); /* scores, then (bf16) weights */
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
