/* Attention on AMX tiles for the AMX route, with a query's result independent of the queries beside it.

   ``attend`` (attention.c) reads every key and value once per four queries, in fp32 on vectors: a
   32-token tree step spent 5.8 of its 22.9 ms there, 7x what one token's step does. Here keys and
   values are cut into blocks of 32 positions aligned at position 0, converted to bf16 once per
   block and K/V head, and every query tile (16 queries: a token's heads, and the next tokens') takes
   a block in three tile products: scores (queries x 32 keys), and, after an online softmax row by
   row, the weighted values (queries x head dim). Both products sum in fp32, in the tiles' own order.

   Exactness by construction. A tile product's row depends only on that row's inputs (the products'
   test in ``tests/test_exact.py``), so a query's scores and weighted values for a block depend only
   on its query, the 32 keys / values at the block's positions and its weights. Every query reads
   its blocks in position order; a block is taken from the cache in place where all of the query's
   entries there are in place (slot == position), else gathered from its path (a tree token's
   ancestors sit at other slots), with zeros past its last position. Positions past a query's own
   get weight exactly 0 and score -inf, so what sits there (a sibling, a later token, an old entry)
   adds an exact zero: a sum changes only in the sign of an exactly zero total. The online softmax
   per row (running maximum, correction exp(old - new), weights exp(score - max), sums) is the same
   code on the same values whether the row is alone (AR), in a tree or in a batch; a row whose
   entries end before a block skips it. So a token's output is bitwise the same in every step shape.

   Queries are shared out as tasks: a row's K/V head and a run of its query tiles, which share each
   block's conversion. Built without AMX and AVX512-BF16, attend_amx returns -2. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "vec.h"

int amx_ready(void);

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include "tiles.h"

#define KEYS 32 /* positions per block */
#define ROWS 16 /* queries per tile */

typedef struct {
    const float *q, *k, *v;
    float *out;
    const int64_t *n_in, *path, *starts; /* row b's tokens: [starts[b], starts[b + 1]) */
    int64_t B, T, H, KV, D, hd, sb, sh, ss, tiles, splits; /* tiles: of the longest row */
    float scale;
    uint32_t *packed; /* committed blocks already packed: row b's first ready[b] at packed + b * pb + h * ph + j * 32 * hd */
    int64_t pb, ph;
    const int64_t *ready, *committed;
    atomic_int status;
} Job;

/* One tile of queries: query i is one head of token token[i], among the K/V head's group. */
typedef struct {
    int64_t n, token[ROWS], out[ROWS], inplace[ROWS], len[ROWS];
    const int64_t *path[ROWS];
    uint16_t *q;   /* [ROWS, hd] bf16, rows past n zero */
    float *acc;    /* [ROWS, hd] weighted values so far */
    float top[ROWS], total[ROWS], fix[ROWS]; /* running maximum, weights' sum, this block's correction */
} Tile;

/* A block's keys and values as the tile products read them: kt [2 halves][hd / 32 chunks][16 feature
   pairs][16 keys] and vp [hd / 16 groups][16 key pairs][16 features x 2], in dwords of two bf16. */
typedef struct {
    uint32_t *kt, *vp;
} Packed;

static inline __m512i bf16_pairs(const float *x) { /* 32 floats -> 16 dwords of two bf16 each */
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x));
}

/* r[i] lane j <- r[j] lane i: four rounds of swapping the off-diagonal halves of 2d x 2d blocks. */
static void transpose16(__m512i r[16]) {
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int d = 8; d >= 1; d /= 2) {
        vi high = (lane & d) != 0;
        __m512i lo = (__m512i)((high & (lane + 16 - d)) | (~high & lane)), hi = (__m512i)((high & (lane + 16)) | (~high & (lane + d)));
        for (int i = 0; i < 16; ++i)
            if (!(i & d)) {
                __m512i a = r[i], b = r[i + d];
                r[i] = _mm512_permutex2var_epi32(a, lo, b);
                r[i + d] = _mm512_permutex2var_epi32(a, hi, b);
            }
    }
}

/* exp(x) for x <= 0, to about 2e-7 relative (its weights are rounded to bf16 before they weigh
   values): 2^n by vscalef after a degree-6 polynomial on [-ln2/2, ln2/2]; below -87, exp(-87). */
static inline vf exp_nonpositive(vf x) {
    __m512 v = _mm512_max_ps((__m512)x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), v);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return (vf)_mm512_scalef_ps(y, n);
}

/* Packs the entries at key[n], value[n] (n < 32; NULL: zeros) as the products read them. */
static void pack(const float *const *key, const float *const *value, int64_t hd, Packed p) {
    int64_t chunks = hd / 32;
    for (int h = 0; h < 2; ++h)
        for (int64_t c = 0; c < chunks; ++c) {
            __m512i r[16];
            for (int n = 0; n < 16; ++n) r[n] = key[16 * h + n] ? bf16_pairs(key[16 * h + n] + 32 * c) : _mm512_setzero_si512();
            transpose16(r);
            for (int i = 0; i < 16; ++i) _mm512_storeu_si512(p.kt + ((h * chunks + c) * 16 + i) * 16, r[i]);
        }
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18,
                                                2, 17, 1, 16, 0);
    for (int r = 0; r < 16; ++r) {
        const float *a = value[2 * r], *b = value[2 * r + 1];
        for (int64_t e = 0; e < hd / 16; ++e) {
            __m512 lo = a ? _mm512_loadu_ps(a + 16 * e) : _mm512_setzero_ps(), hi = b ? _mm512_loadu_ps(b + 16 * e) : _mm512_setzero_ps();
            _mm512_storeu_si512(p.vp + (e * 16 + r) * 16, _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo)));
        }
    }
}

/* s [ROWS, 32] = the tile's queries . the block's keys (unscaled). */
static void scores(const Tile *t, int64_t hd, Packed p, float *s) {
    int64_t chunks = hd / 32;
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t c = 0; c < chunks; ++c) {
        _tile_loadd(2, t->q + 32 * c, hd * 2);
        _tile_loadd(3, p.kt + c * 256, 64);
        _tile_loadd(4, p.kt + (chunks + c) * 256, 64);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
    }
    _tile_stored(0, s, KEYS * 4);
    _tile_stored(1, s + 16, KEYS * 4);
}

/* o [ROWS, hd] = weights [ROWS, 32] (bf16) x the block's values. */
static void weigh(int64_t hd, const uint16_t *w, Packed p, float *o) {
    _tile_loadd(4, w, 64);
    for (int64_t e = 0; e < hd / 16; e += 4) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        _tile_loadd(5, p.vp + e * 256, 64); _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, p.vp + (e + 1) * 256, 64); _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, p.vp + (e + 2) * 256, 64); _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(6, p.vp + (e + 3) * 256, 64); _tile_dpbf16ps(3, 4, 6);
        _tile_stored(0, o + 16 * e, hd * 4); _tile_stored(1, o + 16 * (e + 1), hd * 4);
        _tile_stored(2, o + 16 * (e + 2), hd * 4); _tile_stored(3, o + 16 * (e + 3), hd * 4);
    }
}

/* The largest lane, in a fixed pairwise order (a maximum is exact in any order). */
static inline float fold_max(vf x) {
    x = pick(x < __builtin_shuffle(x, (vi){8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15}),
             __builtin_shuffle(x, (vi){8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15}), x);
    x = pick(x < __builtin_shuffle(x, (vi){4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7}), __builtin_shuffle(x, (vi){4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7}), x);
    x = pick(x < __builtin_shuffle(x, (vi){2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3}), __builtin_shuffle(x, (vi){2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3}), x);
    return x[0] > x[1] ? x[0] : x[1];
}

/* The online softmax over block j of queries rows[0..3] (scores s, bf16 weights w: rows of 32),
   four at once: each row is a long chain of dependent steps (a maximum, exponentials, sums), and four
   independent chains keep the core busy. A row listed twice gets the same values twice. */
static void soften(Tile *t, const int rows[4], int64_t j, const float *s, uint16_t *w, float scale) {
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vi seen0[4], seen1[4];
    vf a[4], b[4], wa[4], wb[4];
    float top[4], fix[4], total[4];
    for (int r = 0; r < 4; ++r) {
        int i = rows[r];
        seen0[r] = lane + (int32_t)(KEYS * j) < (int32_t)t->len[i], seen1[r] = lane + (int32_t)(KEYS * j + 16) < (int32_t)t->len[i];
        a[r] = pick(seen0[r], load(s + i * KEYS) * splat(scale), splat(-INFINITY));
        b[r] = pick(seen1[r], load(s + i * KEYS + 16) * splat(scale), splat(-INFINITY));
    }
    for (int r = 0; r < 4; ++r) {
        float block = fold_max(pick(a[r] < b[r], b[r], a[r]));
        top[r] = t->top[rows[r]] > block ? t->top[rows[r]] : block;
    }
    for (int r = 0; r < 4; ++r) {
        wa[r] = pick(seen0[r], exp_nonpositive(a[r] - splat(top[r])), splat(0.0f));
        wb[r] = pick(seen1[r], exp_nonpositive(b[r] - splat(top[r])), splat(0.0f));
        fix[r] = top[r] == t->top[rows[r]] ? 1.0f : exp_nonpositive(splat(t->top[rows[r]] - top[r]))[0]; /* exp(0) is 1 exactly */
        total[r] = t->total[rows[r]] * fix[r] + fold(wa[r] + wb[r]);
    }
    for (int r = 0; r < 4; ++r) {
        int i = rows[r];
        t->fix[i] = fix[r], t->total[i] = total[r], t->top[i] = top[r];
        _mm512_storeu_si512(w + i * KEYS, (__m512i)_mm512_cvtne2ps_pbh((__m512)wb[r], (__m512)wa[r]));
    }
}

/* Query i's weighted values so far, corrected and with block o's added. */
static void accumulate(Tile *t, int i, const float *o, int64_t hd) {
    float *acc = t->acc + i * hd;
    for (int64_t c = 0; c < hd; c += W) store(acc + c, fmadd(load(acc + c), splat(t->fix[i]), load(o + c)));
}

/* Whether query i reads block j (it has entries there), and whether all of them are in place. */
static int reads(const Tile *t, int i, int64_t j) { return KEYS * j < t->len[i]; }
static int in_place(const Tile *t, int i, int64_t j) { return t->len[i] == t->inplace[i] || KEYS * (j + 1) <= t->inplace[i]; }

/* Block j for the tile's queries i in [from, to) that read it, in place (in_place_rows) or from their paths: scores, softmax, weighted values. */
static void take(Tile *t, int64_t j, Packed p, int from, int to, int in_place_rows, int64_t hd, float scale, float *s, uint16_t *w, float *o) {
    int rows[ROWS + 3], n = 0;
    for (int i = from; i < to; ++i)
        if (reads(t, i, j) && in_place(t, i, j) == in_place_rows) rows[n++] = i;
    if (!n) return;
    for (int r = n; r < n + 3; ++r) rows[r] = rows[n - 1];
    scores(t, hd, p, s);
    for (int r = 0; r < n; r += 4) soften(t, rows + r, j, s, w, scale);
    weigh(hd, w, p, o);
    for (int r = 0; r < n; ++r) accumulate(t, rows[r], o + rows[r] * hd, hd);
}

static void run(void *arg) {
    Job *a = arg;
    int64_t hd = a->hd, g = a->H / a->KV, per = (a->tiles + a->splits - 1) / a->splits;
    Tile *tiles = malloc(sizeof(Tile) * per);
    uint16_t *qs = aligned_alloc(64, sizeof(uint16_t) * per * ROWS * hd), *w = aligned_alloc(64, sizeof(uint16_t) * ROWS * KEYS);
    float *accs = aligned_alloc(64, sizeof(float) * per * ROWS * hd), *s = aligned_alloc(64, sizeof(float) * ROWS * KEYS);
    float *o = aligned_alloc(64, sizeof(float) * ROWS * hd);
    uint32_t *buf = aligned_alloc(64, sizeof(uint32_t) * 2 * KEYS * hd);
    if (!tiles || !qs || !w || !accs || !s || !o || !buf) {
        atomic_store(&a->status, -1);
        free(tiles), free(qs), free(w), free(accs), free(s), free(o), free(buf);
        return;
    }
    Packed shared = {buf, buf + KEYS * hd / 2}, own = {buf + KEYS * hd, buf + KEYS * hd * 3 / 2};
    memset(w, 0, sizeof(uint16_t) * ROWS * KEYS);
    configure_tiles();
    for (int64_t task; (task = pool_take(1)) < a->B * a->KV * a->splits;) {
        int64_t b = task / (a->KV * a->splits), kvh = task / a->splits % a->KV, m0 = task % a->splits * per;
        int64_t queries = (a->starts[b + 1] - a->starts[b]) * g, tiles_b = (queries + ROWS - 1) / ROWS;
        int64_t m1 = m0 + per < tiles_b ? m0 + per : tiles_b, blocks = 0;
        const float *kh = a->k + b * a->sb + kvh * a->sh, *vh = a->v + b * a->sb + kvh * a->sh;
        for (int64_t m = m0; m < m1; ++m) {
            Tile *t = tiles + (m - m0);
            t->q = qs + (m - m0) * ROWS * hd, t->acc = accs + (m - m0) * ROWS * hd;
            t->n = queries - m * ROWS < ROWS ? queries - m * ROWS : ROWS;
            memset(t->q, 0, sizeof(uint16_t) * ROWS * hd);
            memset(t->acc, 0, sizeof(float) * ROWS * hd);
            for (int i = 0; i < t->n; ++i) {
                int64_t p = m * ROWS + i, bt = a->starts[b] + p / g;
                const float *q = a->q + (bt * a->H + kvh * g + p % g) * hd;
                t->token[i] = p / g, t->out[i] = (bt * a->H + kvh * g + p % g) * hd;
                t->inplace[i] = t->len[i] = a->n_in[bt], t->path[i] = a->path + bt * a->D;
                while (t->len[i] - t->inplace[i] < a->D && t->path[i][t->len[i] - t->inplace[i]] >= 0) ++t->len[i];
                for (int64_t c = 0; c < hd; c += 32) _mm512_storeu_si512(t->q + i * hd + c, bf16_pairs(q + c));
                t->top[i] = -INFINITY, t->total[i] = 0.0f;
                blocks = (t->len[i] + KEYS - 1) / KEYS > blocks ? (t->len[i] + KEYS - 1) / KEYS : blocks;
            }
        }
        for (int64_t j = 0; j < blocks; ++j) {
            const float *key[KEYS], *value[KEYS];
            int64_t upto = 0; /* in-place entries some query reads here */
            for (int64_t m = m0; m < m1; ++m)
                for (int i = 0; i < tiles[m - m0].n; ++i) {
                    Tile *t = tiles + (m - m0);
                    int64_t end = t->len[i] < KEYS * (j + 1) ? t->len[i] : KEYS * (j + 1);
                    if (reads(t, i, j) && in_place(t, i, j) && end - KEYS * j > upto) upto = end - KEYS * j;
                }
            if (upto && a->packed && KEYS * (j + 1) <= a->committed[b]) {
                uint32_t *at = a->packed + b * a->pb + kvh * a->ph + j * KEYS * hd;
                Packed kept = {at, at + KEYS * hd / 2};
                for (int64_t m = m0; m < m1; ++m) take(tiles + (m - m0), j, kept, 0, tiles[m - m0].n, 1, hd, a->scale, s, w, o);
            } else if (upto) {
                for (int n = 0; n < KEYS; ++n)
                    key[n] = n < upto ? kh + (KEYS * j + n) * a->ss : NULL, value[n] = n < upto ? vh + (KEYS * j + n) * a->ss : NULL;
                pack(key, value, hd, shared);
                for (int64_t m = m0; m < m1; ++m) take(tiles + (m - m0), j, shared, 0, tiles[m - m0].n, 1, hd, a->scale, s, w, o);
            }
            for (int64_t m = m0; m < m1; ++m) { /* each token whose path enters block j, from its gathered entries */
                Tile *t = tiles + (m - m0);
                for (int from = 0, to; from < t->n; from = to) {
                    for (to = from + 1; to < t->n && t->token[to] == t->token[from];) ++to;
                    if (!reads(t, from, j) || in_place(t, from, j)) continue;
                    for (int n = 0; n < KEYS; ++n) {
                        int64_t pos = KEYS * j + n, slot = pos < t->inplace[from] ? pos : pos < t->len[from] ? t->path[from][pos - t->inplace[from]] : -1;
                        key[n] = slot < 0 ? NULL : kh + slot * a->ss, value[n] = slot < 0 ? NULL : vh + slot * a->ss;
                    }
                    pack(key, value, hd, own);
                    take(t, j, own, from, to, 0, hd, a->scale, s, w, o);
                }
            }
        }
        for (int64_t m = m0; m < m1; ++m) {
            Tile *t = tiles + (m - m0);
            for (int i = 0; i < t->n; ++i)
                for (int64_t c = 0; c < hd; c += W) store(a->out + t->out[i] + c, load(t->acc + i * hd + c) / splat(t->total[i]));
        }
    }
    _tile_release();
    free(tiles), free(qs), free(w), free(accs), free(s), free(o), free(buf);
}

/* Packs the committed blocks not packed yet: task (b, K/V head). */
static void pack_committed(void *arg) {
    Job *a = arg;
    const float *key[KEYS], *value[KEYS];
    for (int64_t task; (task = pool_take(1)) < a->B * a->KV;) {
        int64_t b = task / a->KV, kvh = task % a->KV;
        const float *kh = a->k + b * a->sb + kvh * a->sh, *vh = a->v + b * a->sb + kvh * a->sh;
        for (int64_t j = a->ready[b]; j < a->committed[b] / KEYS; ++j) {
            uint32_t *at = a->packed + b * a->pb + kvh * a->ph + j * KEYS * a->hd;
            for (int n = 0; n < KEYS; ++n) key[n] = kh + (KEYS * j + n) * a->ss, value[n] = vh + (KEYS * j + n) * a->ss;
            pack(key, value, a->hd, (Packed){at, at + KEYS * a->hd / 2});
        }
    }
}

/* attend's arguments and result (attention.c), for hd 64 or 128; -2 without AMX or for another hd.
   ``packed`` (or NULL): a copy of this layer's committed blocks as the products read them, strides
   pb (rows) and ph (K/V heads) in dwords, blocks of 32 * hd dwords; row b's first ready[b] blocks are
   packed, and its first committed[b] entries will not change until ``ready`` is lowered. Blocks up to
   committed[b] / 32 are packed here first and ``ready`` raised to that. */
int attend_amx(const float *q, const float *k, const float *v, float *out, const int64_t *n_in, const int64_t *path, const int64_t *starts,
               int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D, int64_t hd, int64_t sb, int64_t sh, int64_t ss,
               float scale, int64_t max_keys, int64_t threads, uint32_t *packed, int64_t pb, int64_t ph, int64_t *ready,
               const int64_t *committed) {
    (void)max_keys;
    if (!amx_ready() || (hd != 64 && hd != 128)) return -2;
    int64_t tiles = (T * (H / KV) + ROWS - 1) / ROWS, want = (2 * threads + B * KV - 1) / (B * KV), stale = 0;
    Job job = {q, k, v, out, n_in, path, starts, B, T, H, KV, D, hd, sb, sh, ss, tiles, want < tiles ? want : tiles, scale, packed, pb, ph, ready, committed, 0};
    for (int64_t b = 0; packed && b < B; ++b) stale |= ready[b] < committed[b] / KEYS;
    if (stale) {
        pool_run(pack_committed, &job, threads);
        for (int64_t b = 0; b < B; ++b) ready[b] = ready[b] > committed[b] / KEYS ? ready[b] : committed[b] / KEYS;
    }
    pool_run(run, &job, threads);
    return atomic_load(&job.status);
}

#else
int attend_amx(const float *q, const float *k, const float *v, float *out, const int64_t *n_in, const int64_t *path, const int64_t *starts,
               int64_t B, int64_t T, int64_t H, int64_t KV, int64_t D, int64_t hd, int64_t sb, int64_t sh, int64_t ss,
               float scale, int64_t max_keys, int64_t threads, uint32_t *packed, int64_t pb, int64_t ph, int64_t *ready,
               const int64_t *committed) {
    (void)q, (void)k, (void)v, (void)out, (void)n_in, (void)path, (void)starts, (void)B, (void)T, (void)H, (void)KV, (void)D, (void)hd;
    (void)sb, (void)sh, (void)ss, (void)scale, (void)max_keys, (void)threads, (void)packed, (void)pb, (void)ph, (void)ready, (void)committed;
    return -2;
}
#endif
