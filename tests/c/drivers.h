/*
 * What the random-case drivers share (tests/c/flat_runs.c, tests/c/flat_tiles.c):
 * their generator and their comparison of two output buffers.
 */
#ifndef BNFAST_TEST_DRIVERS_H
#define BNFAST_TEST_DRIVERS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* xorshift64 from the driver's seed (RNG_SEED, defined before this header): the
 * same cases everywhere. */
static unsigned long long rng_state = RNG_SEED;
static unsigned next_rand(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (unsigned)(rng_state >> 16);
}
static float next_float(float lo, float hi) {
    return lo + (hi - lo) * (float)(next_rand() % 1000001) / 1e6f;
}

/* Coefficient rows m, a, b, d of n values; one case in 8 with a NaN mean and
 * an infinite scale somewhere. */
static void random_rows(float *m, float *a, float *b, float *d, ptrdiff_t n) {
    ptrdiff_t i;
    for (i = 0; i < n; i++) {
        m[i] = next_float(-1.0f, 1.0f);
        a[i] = next_float(0.0f, 3.0f);
        b[i] = next_float(-0.5f, 0.5f);
        d[i] = next_float(-0.5f, 0.5f);
    }
    if (next_rand() % 8 == 0) {
        m[next_rand() % n] = __builtin_nanf("");
        a[next_rand() % n] = __builtin_inff();
    }
}

/* count values of x and add: float32 (float32 0) values, one case in 4 with a
 * NaN in x; half types: random bits (every pattern is a value). */
static void random_inputs(int float32, unsigned char *x, unsigned char *add, ptrdiff_t count) {
    ptrdiff_t i;
    if (float32) {
        for (i = 0; i < count; i++) {
            ((float *)x)[i] = next_float(-4.0f, 4.0f);
            ((float *)add)[i] = next_float(-1.0f, 1.0f);
        }
        if (count > 0 && next_rand() % 4 == 0) ((float *)x)[next_rand() % count] = __builtin_nanf("");
    } else {
        for (i = 0; i < count * 2; i++) {
            x[i] = (unsigned char)next_rand();
            add[i] = (unsigned char)next_rand();
        }
    }
}

/* Whether two buffers agree: the bytes before `offset` and after the last whole
 * value exactly, the `size`-byte values from `offset` on bit for bit or
 * (nan_any) where both are NaN (magnitude bits above `inf`), in any payload --
 * the backward's payloads are not specified where dy * a and (x - m) * b are
 * both NaN: the reference leaves add them in whichever order GCC picked, the
 * flat leaves in the formula's (dy * a first). */
static int same_values(const unsigned char *p, const unsigned char *q, size_t bytes,
                       size_t offset, size_t size, uint32_t inf, int nan_any) {
    uint32_t magnitude = size == 4 ? 0x7fffffffu : 0x7fffu;
    size_t i, end = offset + (bytes - offset) / size * size;
    if (memcmp(p, q, offset) != 0 || memcmp(p + end, q + end, bytes - end) != 0) return 0;
    for (i = offset; i < end; i += size) {
        uint32_t u = 0, v = 0;
        memcpy(&u, p + i, size);
        memcpy(&v, q + i, size);
        if (u != v && !(nan_any && (u & magnitude) > inf && (v & magnitude) > inf)) return 0;
    }
    return 1;
}

#endif /* BNFAST_TEST_DRIVERS_H */
