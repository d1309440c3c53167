"""The statistics record and its merge (bnfast._records): what MPI ranks and dask chunks combine."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnfast
from bnfast._dtypes import resolve_dtype
from bnfast._records import Record, empty_record, merge, record_of, running_update
from conftest import (
    assert_close,
    assert_split_equal,
    assert_within_ulps,
    make_input,
    with_layout,
)

# Merged statistics vs the float64 reference: float64 partials throughout.
STATS_RTOL = 1e-13


def reference_stats(x):
    x64 = np.moveaxis(np.asarray(x, np.float64), 1, 0).reshape(x.shape[1], -1)
    return x64.mean(axis=1), x64.var(axis=1)


def splits(n, cuts):
    """[(lo, hi), ...] covering range(n) at the given cut points (empty pieces allowed)."""
    points = [0] + sorted(min(c, n) for c in cuts) + [n]
    return list(zip(points[:-1], points[1:]))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_record_matches_reference(rng, dtype, layout):
    x = with_layout(make_input(rng, (9, 4, 5, 3), dtype, loc=100.0), layout)
    rec = record_of(x)
    mean, var = reference_stats(x)
    assert rec.count == 9 * 15
    assert rec.mean.dtype == rec.m2.dtype == np.float64
    np.testing.assert_allclose(rec.mean, mean, rtol=STATS_RTOL)
    np.testing.assert_allclose(rec.var, var, rtol=STATS_RTOL)


@pytest.mark.parametrize("cuts", [(0,), (3, 8, 9, 9), (1, 2, 3, 4, 5, 6), (36,)])
def test_merge_is_independent_of_the_split(rng, dtype, cuts):
    x = make_input(rng, (37, 5, 7), dtype, loc=1000.0)
    whole = record_of(x)
    merged = merge([record_of(x[a:b]) for a, b in splits(37, cuts)])
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-15)
    np.testing.assert_allclose(merged.var, whole.var, rtol=1e-13)


def test_split_statistics_normalise_within_one_ulp(rng, dtype):
    """The issue's contract: a split batch normalises as the whole one, to 1 ulp of the dtype."""
    x = make_input(rng, (24, 6, 4, 4), dtype, loc=50.0)
    w, b = rng.uniform(0.5, 2, 6).astype(dtype), rng.uniform(-1, 1, 6).astype(dtype)
    merged = merge([record_of(x[a:b_]) for a, b_ in splits(24, (3, 10, 11, 20))])
    y = bnfast.batch_norm(x, merged.mean, merged.var, w, b, training=False)
    expected = bnfast.batch_norm(x, None, None, w, b, training=True)
    assert_split_equal(y, expected, dtype)


def test_merge_of_one_record_and_empty_ones(rng, dtype):
    x = make_input(rng, (6, 3), dtype)
    rec = record_of(x)
    merged = merge([empty_record(3), rec, record_of(x[:0]), empty_record(3)])
    assert merged.count == rec.count
    np.testing.assert_array_equal(merged.mean, rec.mean)
    np.testing.assert_array_equal(merged.m2, rec.m2)


def test_empty_input_gives_an_empty_record(dtype):
    for shape in [(0, 3), (0, 3, 4), (2, 3, 0)]:
        rec = record_of(np.zeros(shape, dtype))
        assert rec.count == 0
        np.testing.assert_array_equal(rec.mean, np.zeros(3))
        np.testing.assert_array_equal(rec.m2, np.zeros(3))
    assert merge([empty_record(2)]).count == 0


def test_constant_channel_stays_exact(dtype):
    x = np.full((10, 2, 3), 0.1, dtype)
    merged = merge([record_of(x[:3]), record_of(x[3:4]), record_of(x[4:])])
    np.testing.assert_array_equal(merged.mean, np.full(2, np.float64(dtype(0.1))))
    np.testing.assert_array_equal(merged.m2, np.zeros(2))


def test_nan_and_inf_stay_in_their_channel(rng, dtype):
    x = make_input(rng, (8, 3, 2), dtype)
    x[5, 0, 1] = np.nan
    x[1, 2, 0] = np.inf
    merged = merge([record_of(x[:4]), record_of(x[4:])])
    assert np.isnan(merged.mean[0]) and np.isnan(merged.m2[0])
    assert merged.mean[2] == np.inf
    mean, var = reference_stats(x[:, 1:2])
    np.testing.assert_allclose(merged.mean[1], mean[0], rtol=STATS_RTOL)
    np.testing.assert_allclose(merged.var[1], var[0], rtol=STATS_RTOL)


def test_large_offset_keeps_the_variance(dtype):
    """Shifted partials: mean 1e6, std 1 keeps its variance (E[x^2] - E[x]^2 would not)."""
    rng = np.random.default_rng(1)
    x = (1e6 + rng.standard_normal((64, 2))).astype(dtype)
    merged = merge([record_of(x[a:b]) for a, b in splits(64, (5, 17, 40))])
    # (E[x^2] - E[x]^2 in float64 errs by ~1e-4 relative here.)
    np.testing.assert_allclose(merged.var, reference_stats(x)[1], rtol=1e-9)


def test_buffer_round_trip(rng):
    rec = Record(2**40 + 3, rng.standard_normal(5), rng.uniform(0, 1, 5))
    buf = rec.to_buffer()
    assert buf.dtype == np.float64 and buf.shape == (11,)
    back = Record.from_buffer(buf)
    assert back.count == rec.count
    np.testing.assert_array_equal(back.mean, rec.mean)
    np.testing.assert_array_equal(back.m2, rec.m2)


def test_merge_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="3 channels"):
        merge([empty_record(3), empty_record(4)])
    with pytest.raises(ValueError, match="at least one"):
        merge([])


def test_record_of_validates_its_input():
    with pytest.raises(TypeError, match="float32 or float64"):
        record_of(np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        record_of(np.zeros(3))


def test_running_update_matches_the_training_forward(rng, dtype):
    x = make_input(rng, (7, 3, 4), dtype)
    rm, rv = rng.uniform(-1, 1, 3).astype(dtype), rng.uniform(0.5, 2, 3).astype(dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    bnfast.batch_norm(x, rm, rv, training=True, momentum=0.3)
    running_update(rm2, rv2, merge([record_of(x[:2]), record_of(x[2:])]), 0.3)
    assert_within_ulps(rm2, rm, 1)
    assert_within_ulps(rv2, rv, 1)
    assert_close(rv2, rv, dtype)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_running_update_of_half_buffers_raises_as_the_core(rng, half):
    # float16 holds at most 65504: the core raises OverflowError before writing anything
    # (a float16 running_var of inf makes evaluation return zeros); so must every other
    # updater (SyncBatchNorm, bnfast.dask, population_stats).
    x = (rng.standard_normal((64, 2)) * (2000.0 if half == "float16" else 3e19)).astype(
        np.float32)
    dtype = resolve_dtype(half)
    rm, rv = np.zeros(2, dtype), np.ones(2, dtype)
    core_rm, core_rv = rm.copy(), rv.copy()
    with pytest.raises(OverflowError, match="running_var of dtype") as core:
        bnfast.batch_norm(x, core_rm, core_rv, training=True, momentum=1.0)
    with pytest.raises(OverflowError, match="running_var of dtype") as ours:
        running_update(rm, rv, record_of(x), 1.0)
    assert str(ours.value) == str(core.value)
    np.testing.assert_array_equal(rm.astype(np.float32), 0.0)  # nothing written, mean neither
    np.testing.assert_array_equal(rv.astype(np.float32), 1.0)


def test_running_update_needs_more_than_one_value(dtype):
    rm, rv = np.zeros(2, dtype), np.ones(2, dtype)
    with pytest.raises(ValueError, match="more than 1 value per channel, got 1"):
        running_update(rm, rv, record_of(np.ones((1, 2), dtype)), 0.1)
    np.testing.assert_array_equal(rv, 1.0)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=6),
       offset=st.sampled_from([0.0, 1.0, -300.0, 1e5]))
def test_merge_property(sizes, offset):
    """Any split of any batch (empty pieces included) merges to the whole batch's statistics."""
    rng = np.random.default_rng(sum(sizes))
    n = sum(sizes)
    x = offset + rng.standard_normal((n, 3, 2))
    records = []
    lo = 0
    for s in sizes:
        records.append(record_of(x[lo:lo + s]))
        lo += s
    merged = merge(records)
    assert merged.count == 2 * n
    if n == 0:
        return
    mean, var = reference_stats(x)
    np.testing.assert_allclose(merged.mean, mean, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(merged.var, var, rtol=1e-10, atol=1e-14)
