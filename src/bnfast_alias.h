/*
 * 4K aliasing: whether an output lies just past an input modulo 4 KiB.
 *
 * A load whose low 12 address bits match an older store still in the store
 * buffer waits for it.  A walk up the arrays that stores y[i] and then loads
 * x[j > i] meets that wherever y lies 1..BNFAST_ALIAS_NEAR bytes past x modulo
 * 4 KiB: every load waits.  32x512x28x28 eval, two threads, out= 16-64 bytes
 * past x (Xeon VM): the flat walks' half data 2x slower (3.9-4.3 against
 * 2.0-2.8 ms), float32 ~15%; with non-temporal stores the run-by-run leaves
 * 2-3x (half) and 13-17x (float32, 16 bytes past: 60 against 3.5 ms, partly
 * written lines).  glibc's memmove walks down there.
 *
 * bnfast_walk_down: the flat walks (bnfast_flat_runs.h, bnfast_flat_tiles.h)
 * go down their span where fewer inputs lie just past the output than just
 * behind it (in place: up).  bnfast_stream_stalls: the run-by-run and the
 * register rows' leaves (bnfast_rows.h) only walk up; where an input lies just
 * behind the output they store cached (the callers in src/_affine.pxd and
 * src/_backward.pyx): 60 -> 5 ms above.
 */
#ifndef BNFAST_ALIAS_H
#define BNFAST_ALIAS_H

#include <stddef.h>

#define BNFAST_ALIAS_NEAR 256

/* to lies 1..BNFAST_ALIAS_NEAR bytes past from modulo 4 KiB (either NULL: no). */
static inline int bnfast_alias_near(const void *from, const void *to) {
    size_t ahead = ((size_t)to - (size_t)from) & 4095u;
    return from != NULL && to != NULL && ahead != 0 && ahead <= BNFAST_ALIAS_NEAR;
}

/* Whether a walk that stores to out and reads in1 and in2 (either NULL) goes down.
 * -DBNFAST_WALK_DOWN_ALWAYS (tests/c/flat_runs.c, flat_tiles.c): always. */
static inline int bnfast_walk_down(const void *out, const void *in1, const void *in2) {
#ifdef BNFAST_WALK_DOWN_ALWAYS
    (void)out; (void)in1; (void)in2;
    return 1;
#else
    return bnfast_alias_near(in1, out) + bnfast_alias_near(in2, out)
           > bnfast_alias_near(out, in1) + bnfast_alias_near(out, in2);
#endif
}

/* Whether an upward walk storing to out stalls on in1 or in2 (either NULL). */
static inline int bnfast_stream_stalls(const void *out, const void *in1, const void *in2) {
    return bnfast_alias_near(in1, out) || bnfast_alias_near(in2, out);
}

#endif /* BNFAST_ALIAS_H */
