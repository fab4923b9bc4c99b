/* Worker threads kept alive between calls, shared by propd's C kernels. A call lasts ~20-500 us;
   starting threads per call would cost as much. */
#ifndef PROPD_POOL_H
#define PROPD_POOL_H
#include <stddef.h>
#include <stdint.h>

/* Run work(arg) on the calling thread and on up to threads - 1 workers, and return when every one
   has finished. ``work`` takes its items with pool_take until none is left: a worker that wakes
   late (torch's own threads may hold the other cores) leaves more items to the others instead of
   holding the call up. Who computes an item must change no value. */
void pool_run(void (*work)(void *), void *arg, int64_t threads);

/* The first of the next ``n`` items of the running call (items past the end mean: done). */
int64_t pool_take(int64_t n);

/* A buffer of at least ``need`` bytes, 64-byte aligned, that stays with the caller's (thread-local)
   ``buffer`` / ``held`` between calls (a prompt's rows are megabytes, and a fresh mapping of them per
   call cost its page faults); NULL without memory. */
void *scratch(void **buffer, size_t *held, size_t need);
#endif
