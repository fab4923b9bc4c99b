/* y = x W^T in bf16 (fp32 sums), with every output computed the same way whatever the row count, by
   one of two kernels the caller names: 1, on Intel AMX tiles (``take_tiles``), or 2, by AVX512-BF16's
   dot-product instruction (``take_dots``). Both read one packed layout and give fp32, each its own
   bits; a CPU with AMX has both, and which pays is measured (``measure_route`` in kernels.py).

   The weights are packed once into AMX's pair-interleaved layout: for each block of 16 outputs and
   each block of 32 inputs, one 16 x 64-byte tile (row r holds inputs 2r and 2r + 1 of every output).
   A call converts x (fp32, any number of rows) to bf16 rows (for the tiles padded to a multiple of
   32) and, on the tiles, for every block of 16 outputs adds tile products over the input blocks in order into fp32 tiles of 16 rows.
   A row's result depends on its own inputs and the weights alone: every output is the same chain of
   tile products in the same order for 1 row or 1,000 (a padded tile costs what a full one does, and
   a product of up to 32 rows reads the weights once, so a tree step's products cost about what an
   AR step's do; past 32 rows, each pair of output blocks takes every group of 32 rows while its
   weights are in the core's cache, so a prompt's products are bound by the tiles, not by memory).

   Output blocks are shared out a few at a time between the calling thread and the workers of
   ``pool.h``. Who computes a block changes no value.
   bf16_products() says which of the two run here (a bit each: none, and their routes are not
   offered); amx_ready() whether AMX tiles run (the AMX attention needs them too). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "vec.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define TILES 1
#define TILE_CHUNK 4 /* output blocks a thread takes at a time */
#define TILE_ROWS 32 /* the rows a call converts are rounded up to whole tiles */
#else
#define TILES 0
#endif
#if defined(__AVX512BF16__)
#define DOTS 1
#define DOT_CHUNK 8
#define GROUP 6 /* rows that share a weight load (``dot_x4``) */
#else
#define DOTS 0
#endif

#if TILES || DOTS
#include <immintrin.h>

typedef struct {
    const uint16_t *a, *w; /* a: [M rounded up to the kernel's rows, K] bf16 (rows past M zero); w: packed */
    float *y;              /* [room, N], or NULL: keep each row's largest output per chunk of blocks instead */
    float *top;            /* [chunks, M] those largest outputs */
    int64_t *at;           /* [chunks, M] their columns (the first, on ties) */
    int64_t M, N, K, blocks, room; /* room: rows y holds (>= M; rows past M take padding's sums) */
    int64_t chunk;                 /* output blocks a thread takes at a time (top and at hold one slot per chunk) */
} Job;

/* A chunk's largest output per row so far, lane by lane (lane l: the block columns n0 + l), and
   where it is: vectors, where a comparison per column took a third of an 8-row argmax. */
typedef struct {
    vf top[32];
    vi at[32];
} Best;

/* Row r's sums of block nb: into y, or folded into ``best`` (restarted at the chunk's first block).
   A lane takes a later column only when it is larger, so each lane keeps the first of its equal ones. */
static inline void finish_row(const Job *j, int64_t nb, int64_t first, int64_t r, vf row, Best *best) {
    int64_t n0 = nb * 16, cols = j->N - n0 < 16 ? j->N - n0 : 16;
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    if (j->y && cols == 16) store(j->y + r * j->N + n0, row);
    else if (j->y) memcpy(j->y + r * j->N + n0, &row, cols * sizeof(float));
    else {
        vi mine = (lane < (vi){0} + (int32_t)cols) & (nb == first ? (vi){0} - 1 : row > best->top[r]);
        best->top[r] = pick(mine, row, nb == first ? splat(-INFINITY) : best->top[r]);
        best->at[r] = (vi)pick(mine, (vf)(lane + (int32_t)n0), (vf)(nb == first ? (vi){0} + INT32_MAX : best->at[r]));
    }
}

/* The largest of ``best``'s lanes per row, the first column of equal ones, as the chunk's result. */
static void finish_chunk(const Job *j, int64_t first, const Best *best) {
    for (int64_t r = 0; r < j->M; ++r) {
        float *top = j->top + first / j->chunk * j->M + r;
        int64_t *at = j->at + first / j->chunk * j->M + r;
        *top = -INFINITY, *at = -1;
        for (int l = 0; l < 16; ++l)
            if (*at < 0 || best->top[r][l] > *top || (best->top[r][l] == *top && best->at[r][l] < *at)) *top = best->top[r][l], *at = best->at[r][l];
    }
}

#endif

#if TILES
#include <sys/syscall.h>
#include <unistd.h>

#include "tiles.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

#define AHEAD 4 /* input blocks ahead whose weights the two-block loop fetches into L2 (17-32 rows: 3-5% off a step) */

/* Whether ``count`` whole blocks from nb, rows r0 .. r0 + rows, go from the tiles straight into y:
   a tile store row by row into the outputs, where a store to a buffer and a copy row by row took a
   sixth of a 32-row product's time. */
static int direct(const Job *j, int64_t nb, int64_t count, int64_t r0, int64_t rows) {
    return j->y && j->M > 8 && r0 + rows <= j->room && (nb + count) * 16 <= j->N;
}

#define OUT(nb, r) (j->y + (r) * j->N + (nb) * 16)

/* Block nb's sums for rows r0.. (r0 + 0-15 in sums[0], r0 + 16-31 in sums[1]) as finish_row takes them. */
static void finish_block(const Job *j, int64_t nb, int64_t first, int64_t r0, float sums[2][16 * 16], Best *best) {
    int64_t rows = j->M - r0 < 32 ? j->M - r0 : 32;
    for (int64_t r = 0; r < rows; ++r) finish_row(j, nb, first, r0 + r, load(sums[r / 16] + (r % 16) * 16), best);
}

#define WEIGHTS(nb, kb) (j->w + ((nb) * kblocks + (kb)) * 512)
#define INPUTS(half, kb) (j->a + (r0 + (half) * 16) * K + (kb) * 32)

/* Output blocks taken TILE_CHUNK at a time until none is left. Every output is the same chain of tile
   products over the input blocks in order, started from zero; only how many independent chains
   share the tiles changes with the row count: up to 16 rows, four blocks at once (sums in tiles
   0-3, inputs in 4, weights in 5 and 6); more, two blocks of both row halves of each group of 32
   rows in turn (sums 0-3, inputs 4 and 5, weights 6 and 7). An inputs' tile then serves several weight tiles, and several
   weight streams come from memory at once (30 layers' 3072 x 576 products on the Intel Xeon with
   AMX, 2 threads: 1 row 170 -> 150 us each, 32 rows 262 -> 222 us). */
static void take_tiles(void *arg) {
    const Job *j = arg;
    configure_tiles();
    int64_t K = j->K, kblocks = K / 32;
    float sums[4][2][16 * 16];
    Best best;
    for (int64_t first; (first = pool_take(TILE_CHUNK)) < j->blocks;) {
        int64_t last = first + TILE_CHUNK < j->blocks ? first + TILE_CHUNK : j->blocks;
        for (int64_t nb = first; nb < last;) {
            if (j->M <= 16 && last - nb == 4) {
                int64_t r0 = 0;
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t kb = 0; kb < kblocks; ++kb) {
                    _tile_loadd(4, INPUTS(0, kb), K * 2);
                    _tile_loadd(5, WEIGHTS(nb, kb), 64); _tile_dpbf16ps(0, 4, 5);
                    _tile_loadd(6, WEIGHTS(nb + 1, kb), 64); _tile_dpbf16ps(1, 4, 6);
                    _tile_loadd(5, WEIGHTS(nb + 2, kb), 64); _tile_dpbf16ps(2, 4, 5);
                    _tile_loadd(6, WEIGHTS(nb + 3, kb), 64); _tile_dpbf16ps(3, 4, 6);
                }
                if (direct(j, nb, 4, 0, 16)) {
                    _tile_stored(0, OUT(nb, 0), j->N * 4); _tile_stored(1, OUT(nb + 1, 0), j->N * 4);
                    _tile_stored(2, OUT(nb + 2, 0), j->N * 4); _tile_stored(3, OUT(nb + 3, 0), j->N * 4);
                } else {
                    _tile_stored(0, sums[0][0], 64); _tile_stored(1, sums[1][0], 64);
                    _tile_stored(2, sums[2][0], 64); _tile_stored(3, sums[3][0], 64);
                    for (int b = 0; b < 4; ++b) finish_block(j, nb + b, first, 0, sums[b], &best);
                }
                nb += 4;
            } else if (last - nb >= 2) {
                for (int64_t r0 = 0; r0 < j->M; r0 += 32) {
                    int64_t upper = j->M - r0 > 16; /* rows r0 + 16.. hold inputs */
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    for (int64_t kb = 0; kb < kblocks; ++kb) {
                        for (int l = 0; r0 == 0 && l < 1024; l += 64) { /* two weight tiles in flight wait on memory; four (up to 16 rows) do not */
                            _mm_prefetch((const char *)WEIGHTS(nb, kb + AHEAD) + l, _MM_HINT_T1);
                            _mm_prefetch((const char *)WEIGHTS(nb + 1, kb + AHEAD) + l, _MM_HINT_T1);
                        }
                        _tile_loadd(4, INPUTS(0, kb), K * 2);
                        _tile_loadd(5, INPUTS(1, kb), K * 2);
                        _tile_loadd(6, WEIGHTS(nb, kb), 64);
                        _tile_loadd(7, WEIGHTS(nb + 1, kb), 64);
                        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
                        if (upper) {
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    if (direct(j, nb, 2, r0, upper ? 32 : 16)) {
                        _tile_stored(0, OUT(nb, r0), j->N * 4); _tile_stored(1, OUT(nb + 1, r0), j->N * 4);
                        if (upper) {
                            _tile_stored(2, OUT(nb, r0 + 16), j->N * 4);
                            _tile_stored(3, OUT(nb + 1, r0 + 16), j->N * 4);
                        }
                        continue;
                    }
                    _tile_stored(0, sums[0][0], 64); _tile_stored(1, sums[1][0], 64);
                    if (upper) {
                        _tile_stored(2, sums[0][1], 64);
                        _tile_stored(3, sums[1][1], 64);
                    }
                    finish_block(j, nb, first, r0, sums[0], &best);
                    finish_block(j, nb + 1, first, r0, sums[1], &best);
                }
                nb += 2;
            } else {
                for (int64_t r0 = 0; r0 < j->M; r0 += 32) {
                    int64_t upper = j->M - r0 > 16;
                    _tile_zero(0); _tile_zero(2);
                    for (int64_t kb = 0; kb < kblocks; ++kb) {
                        _tile_loadd(4, INPUTS(0, kb), K * 2);
                        _tile_loadd(5, INPUTS(1, kb), K * 2);
                        _tile_loadd(6, WEIGHTS(nb, kb), 64);
                        _tile_dpbf16ps(0, 4, 6);
                        if (upper) _tile_dpbf16ps(2, 5, 6);
                    }
                    if (direct(j, nb, 1, r0, upper ? 32 : 16)) {
                        _tile_stored(0, OUT(nb, r0), j->N * 4);
                        if (upper) _tile_stored(2, OUT(nb, r0 + 16), j->N * 4);
                        continue;
                    }
                    _tile_stored(0, sums[0][0], 64);
                    if (upper) _tile_stored(2, sums[0][1], 64);
                    finish_block(j, nb, first, r0, sums[0], &best);
                }
                nb += 1;
            }
        }
        if (!j->y) finish_chunk(j, first, &best);
    }
    _tile_release();
}

#undef OUT
#undef WEIGHTS
#undef INPUTS

int amx_ready(void) {
    static int ready = -1;
    if (ready < 0) ready = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return ready;
}

#else
int amx_ready(void) { return 0; }
#endif

#if DOTS
/* Every output of a tile is one chain of dot-product instructions over the input pairs in order,
   started from zero, whatever the tile: a tile only says how many chains share a weight load or an
   input broadcast. The accumulators are named one by one: kept in an array, GCC held them in
   memory (a load and a store around every instruction) and a group of 4 rows ran at half the
   instruction's rate (8-token batch-1 steps 16.2 -> 13.5 ms, 16 tokens 24.3 -> 19.2). */
#define EACH_PAIR                                  \
    for (int64_t kb = 0; kb < j->K / 32; ++kb)     \
        for (int p = 0; p < 16; ++p, fetch_lines(next))
#define WEIGHTS(b) ((__m512bh)_mm512_loadu_si512(j->w + (nb + (b)) * (j->K / 32 * 512) + kb * 512 + p * 32))
#define BROADCAST(r)                                                               \
    int32_t pair##r;                                                               \
    memcpy(&pair##r, j->a + (r0 + (r)) * j->K + kb * 32 + 2 * p, sizeof pair##r);  \
    __m512bh a##r = (__m512bh)_mm512_set1_epi32(pair##r);
#define DOT(r, b) c##r##b = _mm512_dpbf16_ps(c##r##b, a##r, w##b)
#define ROW4(r) { BROADCAST(r) DOT(r, 0); DOT(r, 1); DOT(r, 2); DOT(r, 3); }
#define ROW8(r) { BROADCAST(r) DOT(r, 0); DOT(r, 1); DOT(r, 2); DOT(r, 3); DOT(r, 4); DOT(r, 5); DOT(r, 6); DOT(r, 7); }

/* The weights of the chunk a thread takes next, fetched into L2 a few lines per pair of inputs
   while its groups of rows compute on this chunk's. Without it, a chunk's first group of rows
   waited on memory and its later groups on arithmetic, one after the other, with memory idle
   (30 layers' products on the AMD EPYC, weights cold, 2 threads: 16 rows 13.2 -> 11.7 ms, 8 rows
   9.0 -> 8.5, 32 rows 20.9 -> 20.3; reading the weights alone takes 6.4 ms. From the L3 the
   fetches cost 5-7%). */
typedef struct {
    const char *at, *end;
    int64_t lines; /* per pair of inputs */
} Fetch;

static inline void fetch_lines(Fetch *f) {
    if (!f || f->at >= f->end) return;
    for (int64_t l = 0; l < f->lines; ++l) _mm_prefetch(f->at + 64 * l, _MM_HINT_T1);
    f->at += 64 * f->lines;
}

/* Rows r0 .. r0 + rows (1-6) of ``count`` blocks (1-4) from nb: 24 chains at most, 29 of the 32
   vector registers with the weights and an input. Groups of 6 rows rather than 4 read a chunk's
   weights from L2 fewer times a call (30 layers' products on the AMD EPYC, weights cold: 16 rows
   12.7-13.2 -> 12.3-12.8 ms, 32 rows 22.7-23.4 -> 21.1-21.6). */
static void dot_x4(const Job *j, int64_t nb, int64_t count, int64_t first, int64_t r0, int rows, Best *best, Fetch *next) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    __m512 c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
    __m512 c40 = c00, c41 = c00, c42 = c00, c43 = c00, c50 = c00, c51 = c00, c52 = c00, c53 = c00;
    EACH_PAIR {
        __m512bh w0 = WEIGHTS(0), w1 = count > 1 ? WEIGHTS(1) : w0, w2 = count > 2 ? WEIGHTS(2) : w0, w3 = count > 3 ? WEIGHTS(3) : w0;
        UP_TO_6_ROWS(ROW4)
    }
    const __m512 sums[6][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}, {c40, c41, c42, c43}, {c50, c51, c52, c53}};
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < count; ++b) finish_row(j, nb + b, first, r0 + r, (vf)sums[r][b], best);
}

/* Rows r0 .. r0 + rows (1-2) of 8 blocks from nb: the weights stream from memory, and 8 chains a
   row hide the instruction's latency. */
static void dot_x8(const Job *j, int64_t nb, int64_t first, int64_t r0, int rows, Best *best, Fetch *next) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c04 = c00, c05 = c00, c06 = c00, c07 = c00;
    __m512 c10 = c00, c11 = c00, c12 = c00, c13 = c00, c14 = c00, c15 = c00, c16 = c00, c17 = c00;
    EACH_PAIR {
        __m512bh w0 = WEIGHTS(0), w1 = WEIGHTS(1), w2 = WEIGHTS(2), w3 = WEIGHTS(3), w4 = WEIGHTS(4), w5 = WEIGHTS(5), w6 = WEIGHTS(6), w7 = WEIGHTS(7);
        ROW8(0)
        if (rows > 1) ROW8(1)
    }
    const __m512 sums[2][8] = {{c00, c01, c02, c03, c04, c05, c06, c07}, {c10, c11, c12, c13, c14, c15, c16, c17}};
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < 8; ++b) finish_row(j, nb + b, first, r0 + r, (vf)sums[r][b], best);
}

/* Output blocks taken DOT_CHUNK at a time until none is left; per group of up to 6 rows, the chunk's
   blocks 8 at a time (1-2 rows) or 4 at a time (3-6 rows, and the chunk's tail). With more than one
   group, the next chunk is taken at the start of this one, and its weights fetched meanwhile
   (``Fetch``). A single group streams its weights once, as the hardware's prefetcher expects, and
   takes its next chunk only when done (one taken early and held could leave the other threads
   idle at the end of the call). */
static void take_dots(void *arg) {
    const Job *j = arg;
    Best best;
    const int64_t groups = (j->M + GROUP - 1) / GROUP, block_bytes = j->K / 32 * 1024;
    for (int64_t first = pool_take(DOT_CHUNK), after; first < j->blocks; first = after) {
        int64_t last = first + DOT_CHUNK < j->blocks ? first + DOT_CHUNK : j->blocks;
        after = groups > 1 ? pool_take(DOT_CHUNK) : j->blocks;
        int64_t ahead = after < j->blocks ? (after + DOT_CHUNK < j->blocks ? DOT_CHUNK : j->blocks - after) : 0;
        Fetch fetch = {NULL, NULL, 0};
        if (ahead) {
            int64_t steps = groups * ((last - first + 3) / 4) * (j->K / 32) * 16; /* pairs of inputs the groups take, about */
            fetch.at = (const char *)(j->w + after * (block_bytes / 2));
            fetch.end = fetch.at + ahead * block_bytes;
            fetch.lines = (ahead * block_bytes / 64 + steps - 1) / steps;
        }
        for (int64_t r0 = 0, rows; r0 < j->M; r0 += rows) {
            rows = group_rows(j->M - r0, GROUP);
            Fetch *next = fetch.lines ? &fetch : NULL;
            for (int64_t nb = first; nb < last;) {
                if (rows <= 2 && last - nb >= 8) {
                    dot_x8(j, nb, first, r0, rows, &best, next);
                    nb += 8;
                } else {
                    int64_t count = last - nb < 4 ? last - nb : 4;
                    dot_x4(j, nb, count, first, r0, rows, &best, next);
                    nb += count;
                }
            }
        }
        if (!j->y) finish_chunk(j, first, &best);
        if (groups == 1) after = pool_take(DOT_CHUNK);
    }
}
#endif

/* Which kernels multiply here, a bit each: 1 AMX tiles (where Linux lets this process use them), 2
   AVX512-BF16. */
int bf16_products(void) { return (TILES && amx_ready() ? 1 : 0) | (DOTS ? 2 : 0); }

#if TILES || DOTS
/* Kernel ``kernel``'s plan for a job: ``job``'s pool task (NULL where it does not run here), its chunk
   of output blocks, and the rows a call rounds its inputs up to. */
static void (*plan(int64_t kernel, Job *job, int64_t *rows))(void *) {
#if TILES
    if (kernel == 1 && (bf16_products() & 1)) return job->chunk = TILE_CHUNK, *rows = TILE_ROWS, take_tiles;
#endif
#if DOTS
    if (kernel == 2) return job->chunk = DOT_CHUNK, *rows = 1, take_dots;
#endif
    return NULL;
}

/* x [M, K] (fp32; K a multiple of 32) as the bf16 rows a call multiplies, zero rows up to a multiple
   of ``rows``, in this thread's scratch; NULL without memory, or for a shape the calls do not take. */
static uint16_t *bf16_rows(const float *x, int64_t M, int64_t K, int64_t rows) {
    static _Thread_local void *buffer;
    static _Thread_local size_t held;
    size_t need = (size_t)((M + rows - 1) / rows * rows * K * 2);
    uint16_t *a = K % 32 == 0 && M >= 1 ? scratch(&buffer, &held, need) : NULL;
    if (!a) return NULL;
    for (int64_t i = 0; i < M * K; i += W) store_bf16(a + i, load(x + i)); /* K % 32 == 0: whole vectors */
    memset(a + M * K, 0, need - (size_t)(M * K * 2));
    return a;
}

/* y [M, N] (fp32) = x [M, K] (fp32; K a multiple of 32) times the packed weights' transpose by
   ``kernel`` (1 or 2), with up to ``threads`` - 1 workers helping the calling thread; y has room for
   ``room`` >= M rows (those past M get the zero rows' sums: a caller that rounds its rows up to 32
   lets every tile go straight into y). Returns 0, or -1 where the kernel does not run here, without
   memory, or for a shape it does not take. */
int bf16_linear_into(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t room, int64_t threads, int64_t kernel) {
    Job job = {NULL, w, y, NULL, NULL, M, N, K, (N + 15) / 16, room, 0};
    int64_t rows;
    void (*take)(void *) = plan(kernel, &job, &rows);
    if (!take || !(job.a = bf16_rows(x, M, K, rows))) return -1;
    pool_run(take, &job, threads);
    return 0;
}

/* bf16_linear_into with room for M rows. */
int bf16_linear(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads, int64_t kernel) {
    return bf16_linear_into(x, w, y, M, N, K, M, threads, kernel);
}

/* at [M] = the column of each row's largest output of the product bf16_linear computes (the first
   of equal ones, as torch's argmax), without writing the outputs: a greedy step's vocabulary
   projection. Returns 0, or -1 as bf16_linear. */
int bf16_argmax(const float *x, const uint16_t *w, int64_t *at, int64_t M, int64_t N, int64_t K, int64_t threads, int64_t kernel) {
    int64_t blocks = (N + 15) / 16, rows;
    Job job = {NULL, w, NULL, NULL, NULL, M, N, K, blocks, M, 0};
    void (*take)(void *) = plan(kernel, &job, &rows);
    if (!take || M > 32 || !(job.a = bf16_rows(x, M, K, rows))) return -1;
    int64_t chunks = (blocks + job.chunk - 1) / job.chunk;
    float *tops = job.top = malloc(sizeof(float) * chunks * M);
    int64_t *ats = job.at = malloc(sizeof(int64_t) * chunks * M);
    if (!tops || !ats) return free(tops), free(ats), -1;
    pool_run(take, &job, threads);
    for (int64_t r = 0; r < M; ++r) /* chunks in column order: a later one wins only when larger */
        for (int64_t c = 0, best = 0; c < chunks; ++c)
            if (c == 0 || tops[c * M + r] > tops[best * M + r]) best = c, at[r] = ats[c * M + r];
    free(tops), free(ats);
    return 0;
}

typedef struct {
    const float *y;
    int64_t *at;
    float *top;
    int64_t M, N, k;
    int normalized;
} TopJob;

/* Row r's k largest outputs, largest first (of equal ones, the first column first), and with
   ``normalized`` minus the row's logsumexp (a max, then exp sums in column order). */
static void top_rows(void *arg) {
    const TopJob *j = arg;
    for (int64_t r; (r = pool_take(1)) < j->M;) {
        const float *y = j->y + r * j->N;
        float *top = j->top + r * j->k;
        int64_t *at = j->at + r * j->k, held = 0;
        for (int64_t c = 0; c < j->N; ++c) {
            if (held == j->k && !(y[c] > top[held - 1])) continue;
            int64_t i = held < j->k ? held++ : held - 1;
            for (; i > 0 && y[c] > top[i - 1]; --i) top[i] = top[i - 1], at[i] = at[i - 1];
            top[i] = y[c], at[i] = c;
        }
        if (!j->normalized) continue;
        vf sum = splat(0.0f);
        int64_t whole = j->N / W * W;
        float high = top[0]; /* the row's maximum */
        for (int64_t c = 0; c < whole; c += W) sum += vexp(load(y + c) - splat(high));
        float total = fold(sum);
        for (int64_t c = whole; c < j->N; ++c) total += expf(y[c] - high);
        float lse = high + logf(total);
        for (int64_t i = 0; i < j->k; ++i) top[i] -= lse;
    }
}

/* at [M, k], top [M, k] = each row of y [M, N]'s k largest values (1 <= k <= N), largest first, the
   first column of equal ones first; ``normalized``: as log-probabilities (minus the row's
   logsumexp). Returns 0, or -1 where k is out of range. */
int rows_topk(const float *y, int64_t *at, float *top, int64_t M, int64_t N, int64_t k, int normalized, int64_t threads) {
    if (k < 1 || k > N) return -1;
    TopJob job = {y, at, top, M, N, k, normalized};
    pool_run(top_rows, &job, M >= 4 ? threads : 1);
    return 0;
}

/* ``rows_topk`` of the product bf16_linear computes. Returns 0, or -1 as bf16_linear. */
int bf16_topk(const float *x, const uint16_t *w, int64_t *at, float *top, int64_t M, int64_t N, int64_t K, int64_t k, int normalized,
             int64_t threads, int64_t kernel) {
    static _Thread_local void *buffer;
    static _Thread_local size_t held;
    int64_t room = (M + 31) / 32 * 32;
    float *outputs = k >= 1 && k <= N ? scratch(&buffer, &held, sizeof(float) * (size_t)(room * N)) : NULL;
    if (!outputs || bf16_linear_into(x, w, outputs, M, N, K, room, threads, kernel)) return -1;
    return rows_topk(outputs, at, top, M, N, k, normalized, threads);
}

#else
int bf16_linear_into(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t room, int64_t threads, int64_t kernel) {
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)room, (void)threads, (void)kernel;
    return -1;
}
int bf16_linear(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t threads, int64_t kernel) {
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)threads, (void)kernel;
    return -1;
}
int bf16_argmax(const float *x, const uint16_t *w, int64_t *at, int64_t M, int64_t N, int64_t K, int64_t threads, int64_t kernel) {
    (void)x, (void)w, (void)at, (void)M, (void)N, (void)K, (void)threads, (void)kernel;
    return -1;
}
int bf16_topk(const float *x, const uint16_t *w, int64_t *at, float *top, int64_t M, int64_t N, int64_t K, int64_t k, int normalized,
              int64_t threads, int64_t kernel) {
    (void)x, (void)w, (void)at, (void)top, (void)M, (void)N, (void)K, (void)k, (void)normalized, (void)threads, (void)kernel;
    return -1;
}
int rows_topk(const float *y, int64_t *at, float *top, int64_t M, int64_t N, int64_t k, int normalized, int64_t threads) {
    (void)y, (void)at, (void)top, (void)M, (void)N, (void)k, (void)normalized, (void)threads;
    return -1;
}
#endif
