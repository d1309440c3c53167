/* Driver of src/bnfast_shares.h under real OpenMP teams (tests/test_shares.py).
 *
 * For each case (tasks, threads, late): a team of `threads` claims the tasks of
 * one bnfast_shares; thread `late` (-1: none) first sleeps 100 ms, so the others
 * run out of work and steal its share.  Writes, per case and task, three int32:
 * how many times it was claimed, the claiming thread, and the claim's position
 * in that thread's sequence.
 */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "bnfast_shares.h"

static const int CASES[][3] = {
    {1, 2, -1}, {7, 3, -1}, {100, 2, -1}, {1000, 2, 1}, {1000, 2, 0}, {1000, 8, 3},
    {5, 100, -1}, {1000, 130, 70}, {64, 64, 63}, {0, 4, -1},
};

int main(void) {
    for (size_t k = 0; k < sizeof CASES / sizeof CASES[0]; k++) {
        int tasks = CASES[k][0], threads = CASES[k][1], late = CASES[k][2];
        int32_t *rec = calloc(3 * (size_t)tasks + 1, sizeof(int32_t));
        bnfast_shares shares;
        bnfast_shares_init(&shares, tasks, threads);
        #pragma omp parallel num_threads(threads)
        {
            int me = omp_get_thread_num(), seq = 0;
            if (me == late) {
                struct timespec pause = {0, 100 * 1000 * 1000};
                nanosleep(&pause, NULL);
            }
            bnfast_claim claim = bnfast_claim_start(&shares, me);
            for (ptrdiff_t t = bnfast_claim_next(&shares, &claim); t >= 0;
                 t = bnfast_claim_next(&shares, &claim)) {
                __atomic_fetch_add(&rec[3 * t], 1, __ATOMIC_RELAXED);
                rec[3 * t + 1] = me;
                rec[3 * t + 2] = seq++;
            }
        }
        fwrite(rec, sizeof(int32_t), 3 * (size_t)tasks, stdout);
        free(rec);
    }
    return 0;
}
