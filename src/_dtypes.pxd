# Types shared by every compiled module: the kernel layouts (the values of
# bnfast._layout.Layout) and, in one place, the storage types of the data.
# Every kernel body is written once over real_t (accumulating in double); a new
# storage type (float16, bfloat16) is one more line here and in the entries'
# type-number switch.

ctypedef fused real_t:
    float
    double

cdef enum Layout:
    CHANNELS_FIRST = 0   # (N, C, S), C-contiguous
    CHANNELS_LAST = 1    # (M, C) rows, C varies fastest
