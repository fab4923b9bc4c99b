/* What propd's two Q4_1 kernels share (``matmul_q4.c``: bf16 inputs; ``matmul_q4i8.c``: int8 inputs):
   the blocks' size, the macros that spell out code per output block, and how a call's work is cut. */
#ifndef PROPD_Q4_H
#define PROPD_Q4_H
#include <stdint.h>

#include "pool.h"
#include "vec.h"

#define Q4_BLOCK 320 /* bytes per 16 outputs x 32 inputs: 256 of levels, then 16 d and 16 m (fp16) */
#define Q4_CHUNK 8   /* output blocks a thread takes at a time */
#define EIGHT(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define FOUR(X) X(0) X(1) X(2) X(3)

/* A pool task's work: output blocks Q4_CHUNK at a time, every group of up to ``group`` rows over them,
   a row alone over a whole chunk at once (``row``), two rows four blocks at a time (``two``), other
   groups two blocks at a time (``rest``: from block nb, 1-2 blocks, rows r0 .. r0 + rows). Inlined
   into each kernel's task, so that the calls are direct. */
static inline __attribute__((always_inline)) void q4_take(const void *job, int64_t M, int64_t blocks, int group,
                                                           void (*row)(const void *, int64_t, int64_t), void (*two)(const void *, int64_t, int64_t),
                                                           void (*rest)(const void *, int64_t, int64_t, int64_t, int64_t)) {
    for (int64_t first; (first = pool_take(Q4_CHUNK)) < blocks;) {
        int64_t count = first + Q4_CHUNK < blocks ? Q4_CHUNK : blocks - first;
        for (int64_t r0 = 0, rows; r0 < M; r0 += rows) {
            rows = group_rows(M - r0, group);
            if (rows == 1 && count == Q4_CHUNK)
                row(job, first, r0);
            else if (rows == 2 && count == Q4_CHUNK)
                for (int64_t b = 0; b < count; b += 4) two(job, first + b, r0);
            else
                for (int64_t b = 0; b < count; b += 2) rest(job, first + b, count - b < 2 ? count - b : 2, r0, rows);
        }
    }
}
#endif
