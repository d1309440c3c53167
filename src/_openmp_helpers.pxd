# The only place that touches OpenMP directly.  Every kernel cimports these
# wrappers, so a build without OpenMP still compiles (serial fallbacks).

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define BNFAST_OPENMP 1
    static int bnfast_max_threads(void) { return omp_get_max_threads(); }
    static int bnfast_thread_num(void) { return omp_get_thread_num(); }
    #else
    #define BNFAST_OPENMP 0
    static int bnfast_max_threads(void) { return 1; }
    static int bnfast_thread_num(void) { return 0; }
    #endif
    """
    bint BNFAST_OPENMP
    int bnfast_max_threads() noexcept nogil
    int bnfast_thread_num() noexcept nogil


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
