# The only place that touches OpenMP directly.  Every kernel cimports these
# wrappers, so a build without OpenMP still compiles (serial fallbacks).

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define BNFAST_OPENMP 1
    static inline int bnfast_max_threads(void) { return omp_get_max_threads(); }
    static inline int bnfast_thread_num(void) { return omp_get_thread_num(); }
    #else
    #define BNFAST_OPENMP 0
    static inline int bnfast_max_threads(void) { return 1; }
    static inline int bnfast_thread_num(void) { return 0; }
    #endif
    """
    bint BNFAST_OPENMP
    int bnfast_max_threads() noexcept nogil
    int bnfast_thread_num() noexcept nogil


# The default thread count on shared machines.  Beside other busy processes a
# team thread is often waiting for a core, and the call then lasts until it gets
# one (a scheduler slice, 1000x a small call).  So the default is the OpenMP
# maximum, but 1 for a while after the kernel preempted this process's threads
# more than 120 times a second over a window of at least 100 ms (involuntary
# context switches: something else wants the cores): 2 s, doubled (up to 32 s)
# each time contention is found again within a second of the last hold ending,
# as it is beside a neighbour that keeps running.  Measured on
# a 2-core VM running 2 threads: ~30/s when quiet, ~190/s beside one busy
# process; one busy thread per process is then the best anyone gets.  Results
# never depend on the thread count.  The state is per extension module (each
# asks the kernel itself), and callers hold the GIL, so no locking.
# (The OpenMP wait policy is left alone: OMP_WAIT_POLICY=passive also ends the
# stalls but makes mid-size calls on a quiet machine 2-3x slower, as each region
# then wakes sleeping threads; a smaller GOMP_SPINCOUNT does not end them.)
cdef extern from *:
    """
    #if defined(__unix__) || defined(__APPLE__)
    #include <sys/resource.h>
    #include <time.h>
    #define BNFAST_CONTENTION_HOLD 2.0     /* seconds on one thread once contended, */
    #define BNFAST_CONTENTION_MAX_HOLD 32.0  /* doubled while contention persists */
    #define BNFAST_CONTENTION_WINDOW 0.1   /* seconds over which the rate is measured */
    #define BNFAST_CONTENTION_RATE 120.0   /* involuntary switches a second */
    static long bnfast_window_nivcsw = -1;
    static double bnfast_checked_at = -1.0, bnfast_window_start = -1.0;
    static double bnfast_serial_until = 0.0, bnfast_hold = BNFAST_CONTENTION_HOLD;
    static inline int bnfast_contended(void) {
        struct rusage ru;
        struct timespec ts;
        if (clock_gettime(CLOCK_MONOTONIC, &ts))
            return 0;
        double now = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
        /* getrusage costs ~1 us (a small call ~7 us): ask at most once a ms */
        if (now - bnfast_checked_at >= 1e-3 && !getrusage(RUSAGE_SELF, &ru)) {
            bnfast_checked_at = now;
            if (bnfast_window_nivcsw < 0) {
                bnfast_window_nivcsw = ru.ru_nivcsw;
                bnfast_window_start = now;
            } else {
                /* the rate over the window so far, judged once it is 100 ms long or
                   has already seen the switches a contended window would */
                double span = now - bnfast_window_start;
                double seen = (double)(ru.ru_nivcsw - bnfast_window_nivcsw);
                double enough = BNFAST_CONTENTION_RATE * BNFAST_CONTENTION_WINDOW;
                if (span < BNFAST_CONTENTION_WINDOW && seen <= enough)
                    return now < bnfast_serial_until;
                if (seen / (span > BNFAST_CONTENTION_WINDOW ? span : BNFAST_CONTENTION_WINDOW)
                        > BNFAST_CONTENTION_RATE) {
                    bnfast_hold = now < bnfast_serial_until + 1.0
                                  ? (2 * bnfast_hold < BNFAST_CONTENTION_MAX_HOLD
                                     ? 2 * bnfast_hold : BNFAST_CONTENTION_MAX_HOLD)
                                  : BNFAST_CONTENTION_HOLD;
                    bnfast_serial_until = now + bnfast_hold;
                }
                bnfast_window_nivcsw = ru.ru_nivcsw;
                bnfast_window_start = now;
            }
        }
        return now < bnfast_serial_until;
    }
    #else
    static inline int bnfast_contended(void) { return 0; }
    #endif
    static inline int bnfast_default_threads(void) {
        int n = bnfast_max_threads();
        return n > 1 && bnfast_contended() ? 1 : n;
    }
    """
    int bnfast_default_threads() noexcept nogil


# Every parallel region hands out its shape-defined tasks (numbered in memory
# order) through bnfast_shares.h: each thread first works through its own
# contiguous share, then takes the others' remaining tasks one at a time, so a
# thread the kernel preempts mid-call holds up only the task it has.  Partials
# are merged in task order after the region, so the hand-out never changes a
# bit of the result.  The pattern (claim and task are the thread's own):
#     bnfast_shares_init(&shares, tasks, nt)
#     with parallel(num_threads=nt):
#         claim = bnfast_claim_start(&shares, bnfast_thread_num())
#         t = bnfast_claim_next(&shares, &claim)
#         while t >= 0:
#             ...task t...
#             t = bnfast_claim_next(&shares, &claim)
cdef extern from "bnfast_shares.h" nogil:
    ctypedef struct bnfast_shares:
        pass
    ctypedef struct bnfast_claim:
        pass
    void bnfast_shares_init(bnfast_shares* shares, Py_ssize_t tasks, int n_threads)
    bnfast_claim bnfast_claim_start(const bnfast_shares* shares, int thread)
    Py_ssize_t bnfast_claim_next(bnfast_shares* shares, bnfast_claim* claim)

cdef enum:
    # Below this many elements a parallel region costs more than it saves.
    SERIAL_ELEMS = 65536


cdef inline int threads_for(Py_ssize_t tasks, Py_ssize_t elems, int n_threads) noexcept nogil:
    """Threads for a call: 1 for small work, never more than there are tasks."""
    if elems < SERIAL_ELEMS or tasks < 2 or n_threads < 2:
        return 1
    if n_threads > tasks:
        return <int>tasks
    return n_threads
