/* Task hand-out of the kernels' parallel regions: contiguous shares, stolen from the back.
 *
 * A kernel numbers its tasks in memory order.  Each thread of a region starts
 * on its own contiguous share of them (thread i of n: tasks [T*i/n, T*(i+1)/n))
 * and takes them front to back, so with cold caches each core streams through
 * one stretch of memory.  Tasks dealt out one at a time (schedule(dynamic, 1))
 * interleave the cores' stretches: on 2 threads, cold caches, that made the
 * normalise pass of a 12.8 MB array ~25% slower and the backward ~15% (torch
 * splits in halves).  A thread that finishes its share takes the remaining
 * tasks of the next shares one at a time from their back, away from where
 * their owners work: a thread preempted mid-call holds up only the task it
 * has, as under dynamic scheduling.  Kernels merge their partials in task
 * order, so who ran a task never changes a bit.
 *
 * Use (the claim is the thread's own, the shares the region's):
 *     bnfast_shares s; bnfast_shares_init(&s, tasks, nt);
 *     #pragma omp parallel num_threads(nt)
 *     { bnfast_claim c = bnfast_claim_start(&s, omp_get_thread_num());
 *       for (t = bnfast_claim_next(&s, &c); t >= 0; t = bnfast_claim_next(&s, &c)) ...; }
 */
#ifndef BNFAST_SHARES_H
#define BNFAST_SHARES_H

#include <stddef.h>
#include <stdint.h>

/* More threads than this start in pairs (or more) on one share: still correct. */
#define BNFAST_MAX_SHARES 64

typedef struct {
    /* The unclaimed tasks [base + front, base + back), front in the low 32 bits and
       back in the high ones: owner and thieves claim with one compare-and-swap.
       (A share holds fewer than 2^32 tasks: a task is thousands of values.) */
    uint64_t span;
    ptrdiff_t base;
    char pad[64 - sizeof(uint64_t) - sizeof(ptrdiff_t)];  /* a cache line each */
} bnfast_share;

typedef struct {
    bnfast_share share[BNFAST_MAX_SHARES];
    int n;
} bnfast_shares;

typedef struct {
    int share;  /* the share this thread is taking tasks from */
    int left;   /* shares it has not yet found empty, its own first */
    int own;    /* its own share: the front, else the back */
} bnfast_claim;

static inline void bnfast_shares_init(bnfast_shares *s, ptrdiff_t tasks, int n_threads) {
    int n = n_threads < 1 ? 1 : (n_threads > BNFAST_MAX_SHARES ? BNFAST_MAX_SHARES : n_threads);
    s->n = n;
    for (int i = 0; i < n; i++) {
        ptrdiff_t start = tasks * i / n, stop = tasks * (i + 1) / n;
        s->share[i].base = start;
        s->share[i].span = (uint64_t)(stop - start) << 32;
    }
}

/* The calling thread's claim: its own share first (thread: its OpenMP number). */
static inline bnfast_claim bnfast_claim_start(const bnfast_shares *s, int thread) {
    bnfast_claim c;
    c.share = thread % s->n;
    c.left = s->n;
    c.own = 1;
    return c;
}

/* The next task for this thread, or -1 when every share is done. */
static inline ptrdiff_t bnfast_claim_next(bnfast_shares *s, bnfast_claim *c) {
    while (c->left > 0) {
        bnfast_share *sh = &s->share[c->share];
        uint64_t span = __atomic_load_n(&sh->span, __ATOMIC_RELAXED);
        for (;;) {
            uint32_t front = (uint32_t)span, back = (uint32_t)(span >> 32);
            if (front >= back)
                break;
            uint64_t rest = c->own ? span + 1 : span - ((uint64_t)1 << 32);
            if (__atomic_compare_exchange_n(&sh->span, &span, rest, 0, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED))
                return sh->base + (c->own ? front : back - 1);
        }
        c->share = c->share + 1 == s->n ? 0 : c->share + 1;
        c->left--;
        c->own = 0;
    }
    return -1;
}

#endif
