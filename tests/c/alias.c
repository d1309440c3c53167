/*
 * Drives src/bnfast_alias.h's rule on addresses (never dereferenced): an output
 * at every 16-byte offset of a page, near its end too, and inputs at byte
 * distances around it, NULL in each input slot.  Prints one line per case,
 * "out_offset d1 d2 walk_down stream_stalls" (d: the input's distance from the
 * output in bytes, or "null"), for tests/test_alias.py to check against the
 * rule written in Python.
 */
#include <stdio.h>
#include <stdint.h>

#include "bnfast_alias.h"

static const long DISTANCES[] = {-4097, -4096, -4095, -257, -256, -255, -64, -16, -1, 0,
                                 1, 16, 64, 255, 256, 257, 2048, 4095, 4096, 4097};
#define ND (long)(sizeof DISTANCES / sizeof DISTANCES[0])

static void show(long d, int null) {
    if (null) printf(" null");
    else printf(" %ld", d);
}

int main(void) {
    const uintptr_t page = (uintptr_t)1 << 20;  /* addresses only: a page well above 0 */
    long o, i, j;
    for (o = 0; o < 4096; o += 16) {
        const char *out = (const char *)(page + (uintptr_t)o);
        for (i = 0; i <= ND; i++) {
            for (j = 0; j <= ND; j++) {
                const char *in1 = i == ND ? NULL : out + DISTANCES[i];
                const char *in2 = j == ND ? NULL : out + DISTANCES[j];
                printf("%ld", o);
                show(i == ND ? 0 : DISTANCES[i], i == ND);
                show(j == ND ? 0 : DISTANCES[j], j == ND);
                printf(" %d %d\n", bnfast_walk_down(out, in1, in2),
                       bnfast_stream_stalls(out, in1, in2));
            }
        }
    }
    return 0;
}
