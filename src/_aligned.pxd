# Scratch memory aligned to a cache line (64 bytes), for every kernel buffer
# that vector code walks: coefficient tables and tiles, partial-sum rows.
# malloc's 16-byte alignment made every other 32-byte load of a table row
# straddle two cache lines: the channels-last normalise read its tile at
# ~1.6x the cost of the channels-first one with data in cache (a C probe of
# the leaf on 802,816 float32 values, W = 64: 111 us from a malloc'd table,
# 67 us from an aligned one, 64 us for the channels-first leaf).

cdef extern from *:
    """
    #include <stdint.h>
    #include <stdlib.h>
    /* The block malloc returned sits in the word just below the aligned address. */
    static void *bnfast_aligned_malloc(size_t size) {
        unsigned char *raw = (unsigned char *)malloc(size + 64 + sizeof(void *));
        uintptr_t p;
        if (raw == NULL) return NULL;
        p = ((uintptr_t)(raw + sizeof(void *)) + 63) & ~(uintptr_t)63;
        ((void **)p)[-1] = raw;
        return (void *)p;
    }
    static void bnfast_aligned_free(void *p) {
        if (p != NULL) free(((void **)p)[-1]);
    }
    """
    void* aligned_malloc "bnfast_aligned_malloc"(size_t size) noexcept nogil
    void aligned_free "bnfast_aligned_free"(void* p) noexcept nogil
