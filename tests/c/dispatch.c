/*
 * Prints BNFAST_DISPATCH_AVX2 (whether this build compiles the run-time picked
 * AVX2 / AVX-512 variants) for tests/test_half_leaves.py.
 */
#include <stdio.h>

#include "bnfast_simd.h"

int main(void) {
    printf("%d\n", BNFAST_DISPATCH_AVX2);
    return 0;
}
