/* A small persistent thread pool for the kernels: `mf_parallel(n, fn, ctx)` runs fn(ctx, 0..n-1) over the
 * mf_set_num_threads() threads (the caller is one of them) and returns when all are done.
 *
 * Why not OpenMP: torch ships its own OpenMP runtime, and a second one in the same process (the system libgomp)
 * would keep a second set of threads spinning against torch's. Why not a thread per call (what wgemm.c did before):
 * pthread_create + join costs 20-50 us, as much as a decode step's small products (30-100 us), so only the lm_head
 * could be split. Here a dispatch costs ~1 us while the workers are awake: they spin for ~50 us after their last
 * task (a decode layer issues its parallel regions microseconds apart), then keep polling for HOLD_US more with a
 * sched_yield() between looks (any other runnable thread on that core goes first), then sleep on a condition
 * variable so an idle engine gets the cores back. Why the hold: between two decode steps the engine's Python
 * (scheduler, sampling, output objects) runs for 300-500 us; a worker asleep by then took longer to wake (a futex
 * wake-up of an idle vCPU: 20-60 us measured here) than the small products it was woken for, so at 2 threads the
 * shipped model's step was no faster than at 1 (the lm_head's 3 MB product ran at the one-thread time).
 *
 * Tasks are claimed one at a time with a compare-and-swap on one 64-bit ticket holding (job generation, task
 * count, next task): a worker decides from that single word whether a task is left, so one that wakes late (still
 * holding an old generation, or reading while the caller writes the next job) can never claim a task of another
 * job; `done` counts finished tasks of the current job and the caller waits for it, so no task of a job is still
 * running when mf_parallel returns, and only then are the next job's fields written. Inside a task, nested
 * mf_parallel calls run serially (thread-local flag), and so does a call from a second thread while the pool is
 * busy (a try-lock), so concurrent callers stay correct. Every split the kernels make writes disjoint outputs with the
 * same per-element summation order as one thread, so results are bit-identical for any thread count (tested).
 * After fork() the child has no workers: an atfork handler resets the pool so it starts afresh on first use.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "mimoflash_kernels.h"          /* every kernel's prototype, mf_task */

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define MAX_THREADS 64
#define SPIN_ROUNDS 4000      /* ~50 us of pause instructions, then the hold */
#define HOLD_US 2000          /* polling with sched_yield() before a worker sleeps: longer than a step's Python */
#define TASK_BITS 20          /* ticket = generation (24 bits) | task count (20) | next task (20) */
#define TASK_MASK ((1ULL << TASK_BITS) - 1)
#define GEN_OF(t) ((t) >> (2 * TASK_BITS))

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t ticket;  /* generation | task count | next task (TASK_BITS) */
    _Atomic long done;
    mf_task fn;
    void *ctx;
    int workers;              /* started */
    int stop;
    pthread_t tid[MAX_THREADS];
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
static pthread_mutex_t dispatch_mu = PTHREAD_MUTEX_INITIALIZER;   /* one job at a time */

static int g_threads = 1;

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return 1e6 * (double)t.tv_sec + 1e-3 * (double)t.tv_nsec;
}

/* Waits for a job newer than generation `seen` -> its generation; stop set -> `seen` (the worker exits). */
static uint64_t wait_job(uint64_t seen) {
    uint64_t gen = seen;
    for (int s = 0; s < SPIN_ROUNDS && gen == seen; s++) {
        CPU_RELAX();
        gen = GEN_OF(atomic_load_explicit(&P.ticket, memory_order_acquire));
    }
    double until = now_us() + HOLD_US;
    for (int s = 0; gen == seen && ((s & 15) != 15 || now_us() < until); s++) {
        sched_yield();
        gen = GEN_OF(atomic_load_explicit(&P.ticket, memory_order_acquire));
    }
    if (gen != seen) return gen;
    pthread_mutex_lock(&P.mu);
    while (!P.stop && (gen = GEN_OF(atomic_load_explicit(&P.ticket, memory_order_acquire))) == seen)
        pthread_cond_wait(&P.cv, &P.mu);
    if (P.stop) gen = seen;
    pthread_mutex_unlock(&P.mu);
    return gen;
}

static _Thread_local int in_task;
static int atfork_set;

static int claim(uint64_t gen, long *i) {
    uint64_t t = atomic_load_explicit(&P.ticket, memory_order_acquire);
    for (;;) {
        if (GEN_OF(t) != gen || (t & TASK_MASK) >= ((t >> TASK_BITS) & TASK_MASK)) return 0;
        if (atomic_compare_exchange_weak_explicit(&P.ticket, &t, t + 1, memory_order_acq_rel, memory_order_acquire)) {
            *i = (long)(t & TASK_MASK);
            return 1;
        }
    }
}

static void run_tasks(uint64_t gen) {
    long i;
    in_task = 1;
    while (claim(gen, &i)) {
        P.fn(P.ctx, i);
        atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
    }
    in_task = 0;
}

/* arg: the generation current when the worker was created, before the job that starts it is published. Reading
 * the ticket here instead would, for a thread scheduled after the publish, take that job as already seen and leave
 * it to the caller alone (tests/test_kernels.py checks the first job is shared). */
static void *worker(void *arg) {
    uint64_t seen = (uint64_t)(uintptr_t)arg;
    for (;;) {
        uint64_t gen = wait_job(seen);
        if (gen == seen) return NULL;
        seen = gen;
        run_tasks(gen);
    }
}

static void stop_workers(void) {
    pthread_mutex_lock(&P.mu);
    P.stop = 1;
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    for (int t = 0; t < P.workers; t++) pthread_join(P.tid[t], NULL);
    P.workers = 0;
    P.stop = 0;
}

static void after_fork_child(void) {
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER, dmu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    P.mu = mu;
    P.cv = cv;
    dispatch_mu = dmu;
    P.workers = 0;
    P.stop = 0;
}

void mf_set_num_threads(int n) {
    n = n < 1 ? 1 : (n > MAX_THREADS ? MAX_THREADS : n);
    if (n == g_threads) return;
    pthread_mutex_lock(&dispatch_mu);        /* not while a job runs */
    if (P.workers > n - 1) stop_workers();   /* fewer threads: restart lazily with the new count */
    g_threads = n;
    pthread_mutex_unlock(&dispatch_mu);
}

int mf_num_threads(void) { return in_task ? 1 : g_threads; }

/* Runs fn(ctx, i) for i in [0, n), on up to mf_set_num_threads() threads; serially when nested, single-threaded,
 * n == 1 (or >= 2^20 tasks), or while another thread's job holds the pool. */
void mf_parallel(long n, mf_task fn, void *ctx) {
    if (n <= 0) return;
    if (n == 1 || g_threads == 1 || in_task || (uint64_t)n > TASK_MASK || pthread_mutex_trylock(&dispatch_mu)) {
        for (long i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    if (!atfork_set) {
        pthread_atfork(NULL, NULL, after_fork_child);
        atfork_set = 1;
    }
    uint64_t before = GEN_OF(atomic_load_explicit(&P.ticket, memory_order_relaxed));
    while (P.workers < g_threads - 1) {
        if (pthread_create(&P.tid[P.workers], NULL, worker, (void *)(uintptr_t)before) != 0) break;
        P.workers++;
    }
    if (P.workers == 0) {                    /* no thread could be started: do it here */
        pthread_mutex_unlock(&dispatch_mu);
        for (long i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    P.fn = fn;
    P.ctx = ctx;
    atomic_store_explicit(&P.done, 0, memory_order_relaxed);
    uint64_t gen = (GEN_OF(atomic_load_explicit(&P.ticket, memory_order_relaxed)) + 1) & 0xffffffu;
    atomic_store_explicit(&P.ticket, gen << (2 * TASK_BITS) | (uint64_t)n << TASK_BITS, memory_order_release);
    pthread_mutex_lock(&P.mu);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    run_tasks(gen);
    while (atomic_load_explicit(&P.done, memory_order_acquire) < n) CPU_RELAX();
    pthread_mutex_unlock(&dispatch_mu);
}

/* Runs range(ctx, lo, hi) over [0, n) in chunks of a multiple of `align` units, about 4 chunks per thread, claimed
 * as threads free up: on this shared 2-vCPU machine one core often runs a product ~1.4x slower than the other
 * (measured: halves of a 16-row lm_head in 3.1 vs 4.4 ms), and with one chunk per thread the fast one waited.
 * mf_read_sum splits its buffer this way (the products chunk the same way, over a group: wgemm.c's
 * mf_gemm_group); chunk boundaries do not change any output's summation order. */
typedef struct {
    void (*range)(void *, long, long);
    void *ctx;
    long n, per;
} range_job;

static void range_task(void *p, long t) {
    const range_job *j = (const range_job *)p;
    long lo = t * j->per, hi = lo + j->per < j->n ? lo + j->per : j->n;
    if (lo < hi) j->range(j->ctx, lo, hi);
}

void mf_parallel_ranges(long n, long align, void (*range)(void *, long, long), void *ctx) {
    long T = mf_num_threads();
    long per = (n + 4 * T - 1) / (4 * T);
    per = (per + align - 1) / align * align;
    range_job j = {range, ctx, n, per > 0 ? per : align};
    mf_parallel((n + j.per - 1) / j.per, range_task, &j);
}

/* Scratch kept per thread between calls: the decode kernels run with the same sizes every layer and step, and
 * buffers over glibc's mmap threshold (128 KB; a 16-sequence MoE layer of the benchmark model needs ~0.9 MB) were
 * mapped, page-faulted and unmapped on every call; small ones were a malloc/free per attention task. One growing
 * buffer per slot and thread (0, 1: decode.c's layer and MoE rows; 2: an attention task's row pointers and scores;
 * 3: mf_experts_bf16's list of experts; 4: speculate.c's buffers), kept for the thread's life; NULL when it cannot
 * grow. */
#define SCRATCH_SLOTS 5
static _Thread_local void *arena[SCRATCH_SLOTS];
static _Thread_local size_t arena_bytes[SCRATCH_SLOTS];

void *mf_scratch(int slot, size_t bytes) {
    if (arena_bytes[slot] < bytes) {
        free(arena[slot]);
        arena[slot] = malloc(bytes);
        arena_bytes[slot] = arena[slot] ? bytes : 0;
    }
    return arena[slot];
}

/* For tests (kernels.pool_threads_used): runs n tasks of ~spin_us microseconds each through mf_parallel and returns
 * how many distinct threads ran them, to check that the workers take part from the first job on. */
typedef struct {
    long spin_ns;
    _Atomic unsigned long who[MAX_THREADS];
} probe_job;

static void probe_task(void *p, long i) {
    (void)i;
    probe_job *j = (probe_job *)p;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    do clock_gettime(CLOCK_MONOTONIC, &b);
    while ((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec) < j->spin_ns);
    unsigned long me = (unsigned long)pthread_self();
    for (int s = 0; s < MAX_THREADS; s++) {
        unsigned long cur = 0;
        if (atomic_compare_exchange_strong(&j->who[s], &cur, me) || cur == me) return;
    }
}

long mf_pool_probe(long n, long spin_us) {
    probe_job j = {spin_us * 1000L, {0}};
    mf_parallel(n, probe_task, &j);
    long distinct = 0;
    for (int s = 0; s < MAX_THREADS; s++) distinct += atomic_load(&j.who[s]) != 0;
    return distinct;
}
