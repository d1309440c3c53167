# Types shared by every compiled module: the kernel layouts (the values of
# bnfast._layout.Layout) and, in one place, the fused storage types.

cdef enum Layout:
    CHANNELS_FIRST = 0   # (N, C, S), C-contiguous
    CHANNELS_LAST = 1    # (M, C) rows, C varies fastest
