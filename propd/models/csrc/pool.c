/* The worker pool behind pool.h: workers spin a while for the next call, then sleep. */
#include "pool.h"

#include <pthread.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RELAX() _mm_pause()
#else
#define RELAX() ((void)0)
#endif

#define MAX_WORKERS 63
/* How long a worker spins for the next call before it sleeps. A decode step's products come in C calls
   with Python between them (the draft layer's pass, the verification, the argmax: 0.1-0.5 ms apart at
   batch 1), and a sleeping worker woke too late for a short call, which its caller then ran alone. At
   batch 1 on the AMD EPYC (8 MT-Bench questions, interleaved in one process): 2000 pauses (50 us there)
   gave AR 182.8 tokens/s and ProPD 181.3, 8000 (200 us) 190.8 and 195.3, 30000 (750 us) 192.6 and
   197.3; 50 us against this 500 us, AR 204.8 against 213.7 and ProPD 192.1 against 195.2; batch 8
   moved within 1%. Counted in time, not pauses: a pause takes 25 ns there and longer on others. */
#define SPIN_NS 500000L

static struct {
    pthread_mutex_t call, mu;
    pthread_cond_t wake;
    atomic_long generation, open; /* open: the generation of the call running now, 0 between calls */
    atomic_long next;              /* the next item to take */
    atomic_int busy;               /* workers inside a call */
    int started, forked_hook;
    void (*work)(void *);
    void *arg;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

int64_t pool_take(int64_t n) { return atomic_fetch_add(&pool.next, n); }

static long nanoseconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* A worker joins each call it wakes in time for; a late one finds the call closed and waits for the next. */
static void *worker(void *start) {
    long seen = (long)(intptr_t)start;
    for (;;) {
        long now, since = nanoseconds();
        for (int spin = 0; (now = atomic_load(&pool.generation)) == seen; ++spin) {
            if (spin % 16 || nanoseconds() - since < SPIN_NS) {
                RELAX();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            while ((now = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
            break;
        }
        seen = now;
        atomic_fetch_add(&pool.busy, 1);
        if (atomic_load(&pool.open) == now) pool.work(pool.arg);
        atomic_fetch_sub(&pool.busy, 1);
    }
    return NULL;
}

static void forget_workers(void) { pool.started = 0; } /* a forked child has none of its parent's threads */

void pool_run(void (*work)(void *), void *arg, int64_t threads) {
    pthread_mutex_lock(&pool.call);
    if (!pool.forked_hook) pool.forked_hook = 1, pthread_atfork(NULL, NULL, forget_workers);
    for (int64_t want = threads - 1 > MAX_WORKERS ? MAX_WORKERS : threads - 1; pool.started < want; ++pool.started) {
        pthread_t id;
        if (pthread_create(&id, NULL, worker, (void *)(intptr_t)atomic_load(&pool.generation))) break;
        pthread_detach(id);
    }
    pool.work = work, pool.arg = arg;
    atomic_store(&pool.next, 0);
    long generation = atomic_load(&pool.generation) + 1;
    atomic_store(&pool.open, generation);
    if (threads > 1 && pool.started) {
        pthread_mutex_lock(&pool.mu);
        atomic_store(&pool.generation, generation);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.mu);
    } else {
        atomic_store(&pool.generation, generation);
    }
    work(arg);
    atomic_store(&pool.open, 0);
    while (atomic_load(&pool.busy) > 0) RELAX();
    pthread_mutex_unlock(&pool.call);
}

void *scratch(void **buffer, size_t *held, size_t need) {
    if (need > *held) {
        free(*buffer);
        *held = 0;
        if (!(*buffer = aligned_alloc(64, (need + 63) / 64 * 64))) return NULL;
        *held = need;
    }
    return *buffer;
}
