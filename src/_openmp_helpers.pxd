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
