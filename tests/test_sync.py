"""bnfast.SyncBatchNorm's algorithm, with threads standing in for ranks (tests/sync_ranks.py).

The same checks run over real MPI processes in tests/test_sync_mpi.py.
"""
import numpy as np
import pytest

import bnfast
from conftest import TOL, assert_close, assert_same, make_input
from sync_ranks import ThreadComm, check_against_single_process, run_ranks


def ok(results):
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_equals_single_process_on_the_concatenated_batch(dtype, size, layout):
    results = ok(run_ranks(size, lambda comm: check_against_single_process(comm, dtype, layout)))
    # Bit-identical running buffers on every rank.
    for r in results[1:]:
        assert_same(r[0], results[0][0])
        assert_same(r[1], results[0][1])
    # Parameter gradients are local; summed over ranks they are the whole batch's.
    gw = sum(r[2].astype(np.float64) for r in results)
    gb = sum(r[3].astype(np.float64) for r in results)
    assert_close(gw, results[0][4], dtype)
    assert_close(gb, results[0][5], dtype)


@pytest.mark.parametrize("spatial", [(), (5,), (2, 2, 2)])
def test_every_input_rank(dtype, spatial):
    ok(run_ranks(3, lambda comm: check_against_single_process(comm, dtype, spatial=spatial)))


def test_cumulative_average_and_empty_ranks(dtype):
    # momentum=None; ranks 1 and 3 have no samples at all.
    ok(run_ranks(4, lambda comm: check_against_single_process(
        comm, dtype, momentum=None, sizes=(4, 0, 3, 0), steps=3)))


def test_collectives_and_bytes():
    C = 6

    def step(comm):
        m = bnfast.SyncBatchNorm(C, comm=comm, dtype=np.float64)
        x = np.random.default_rng(comm.rank).standard_normal((3, C, 2))
        m.backward(np.ones_like(m(x)))
        m.eval()
        m(x)  # evaluation: no communication
        return comm.calls

    for calls in ok(run_ranks(3, step)):
        assert calls == [("Allgather", (2 * C + 2) * 8), ("Allreduce", (2 * C + 1) * 8)]


def test_global_count_of_one_raises_on_every_rank():
    def step(comm):
        m = bnfast.SyncBatchNorm(2, comm=comm)
        x = np.ones((1 if comm.rank == 1 else 0, 2), np.float32)
        before = m.running_mean.copy(), m.running_var.copy()
        try:
            m(x)
        finally:
            assert_same(m.running_mean, before[0])
            assert_same(m.running_var, before[1])
            assert m.num_batches_tracked == 0

    for r in run_ranks(3, step):
        assert isinstance(r, ValueError)
        assert "Expected more than 1 value per channel when training" in str(r)


def test_global_count_of_zero_leaves_running_stats():
    def step(comm):
        m = bnfast.SyncBatchNorm(2, comm=comm)
        y = m(np.ones((0, 2, 3), np.float32))
        gx = m.backward(np.ones_like(y))
        return y.shape, gx.shape, m.running_mean, m.running_var, int(m.num_batches_tracked)

    for shape, gshape, rm, rv, nbt in ok(run_ranks(2, step)):
        assert shape == gshape == (0, 2, 3)
        assert_same(rm, np.zeros(2, np.float32))
        assert_same(rv, np.ones(2, np.float32))
        assert nbt == 1


def test_a_rejected_input_raises_on_every_rank():
    def step(comm):
        m = bnfast.SyncBatchNorm(3, comm=comm)
        channels = 4 if comm.rank == 2 else 3
        m(np.ones((2, channels), np.float32))

    results = run_ranks(3, step)
    assert isinstance(results[2], ValueError) and "3 channels" in str(results[2])
    for r in results[:2]:
        assert isinstance(r, RuntimeError) and "rank(s) [2]" in str(r)


def test_a_rejected_grad_output_raises_on_every_rank():
    def step(comm):
        m = bnfast.SyncBatchNorm(3, comm=comm, dtype=np.float64)
        y = m(np.random.default_rng(comm.rank).standard_normal((4, 3)))
        m.backward(np.ones((5, 3)) if comm.rank == 0 else np.ones_like(y))

    results = run_ranks(2, step)
    assert isinstance(results[0], ValueError) and "grad_output" in str(results[0])
    assert isinstance(results[1], RuntimeError) and "rejected its grad_output" in str(results[1])


def test_evaluation_is_local(dtype):
    rng = np.random.default_rng(3)
    x = make_input(rng, (5, 3, 4), dtype)

    def step(comm):
        m = bnfast.SyncBatchNorm(3, comm=comm, dtype=dtype).eval()
        m.running_mean[...] = [0.5, -1.0, 2.0]
        y = m(x)
        # Without running statistics, eval uses the local batch (as torch's SyncBatchNorm).
        local = bnfast.SyncBatchNorm(3, comm=comm, dtype=dtype, track_running_stats=False).eval()
        return y, local(x[comm.rank:]), comm.calls

    for r, (y, y_local, calls) in enumerate(ok(run_ranks(2, step))):
        assert calls == []
        plain = bnfast.BatchNorm1d(3, dtype=dtype).eval()
        plain.running_mean[...] = [0.5, -1.0, 2.0]
        assert_same(y, plain(x))
        assert_close(y_local, bnfast.batch_norm(x[r:], None, None, training=True), dtype, TOL)


def test_output_and_no_grad(dtype):
    x = make_input(np.random.default_rng(4), (6, 2), dtype)

    def step(comm):
        m = bnfast.SyncBatchNorm(2, comm=comm, dtype=dtype)
        out = np.empty_like(x)
        y = m(x, out=out)
        with bnfast.no_grad():
            m(x)
        try:
            m.backward(np.ones_like(x))
        except RuntimeError as exc:
            return y is out, str(exc)

    for same, message in ok(run_ranks(2, step)):
        assert same
        assert "no_grad" in message


def test_backward_after_writing_over_the_input_raises_on_every_rank(dtype):
    # The saved input holds the output then: the gradient would be silently wrong.
    def step(comm):
        m = bnfast.SyncBatchNorm(2, comm=comm, dtype=dtype)
        x = make_input(np.random.default_rng(comm.rank), (4, 2, 3), dtype)
        m(x, out=x)
        try:
            m.backward(np.ones_like(x))
        except RuntimeError as exc:
            return str(exc)

    for message in ok(run_ranks(2, step)):
        assert message is not None and "wrote its output over it" in message


def test_backward_out_over_a_retained_input_raises_on_every_rank(dtype):
    def step(comm):
        m = bnfast.SyncBatchNorm(2, comm=comm, dtype=dtype)
        x = make_input(np.random.default_rng(comm.rank), (4, 2, 3), dtype)
        m(x)
        expected = m.backward(np.ones_like(x), retain_graph=True).copy()
        try:
            m.backward(np.ones_like(x), out=x, retain_graph=True)
        except ValueError as exc:
            return str(exc), expected, m.backward(np.ones_like(x))

    for message, expected, again in ok(run_ranks(2, step)):
        assert "retain_graph=True keeps for another backward" in message
        assert_same(again, expected)


@pytest.mark.parametrize("shift", [1, -1], ids=["out-ahead", "out-behind"])
@pytest.mark.parametrize("over", ["grad_output", "input"])
def test_backward_out_overlapping_its_operands_gets_the_separate_bits(dtype, over, shift):
    # out= one element off grad_output (or the saved input) in one buffer: written
    # through a temporary, as the plain modules' backward.
    shape = (4, 3, 5, 5)
    n = int(np.prod(shape))

    def step(comm):
        rng = np.random.default_rng(10 + comm.rank)
        base = rng.standard_normal(n + 1).astype(dtype)
        ahead, behind = base[1:].reshape(shape), base[:-1].reshape(shape)
        out, shared = (ahead, behind) if shift == 1 else (behind, ahead)
        x = shared if over == "input" else make_input(rng, shape, dtype)
        dy = shared if over == "grad_output" else make_input(rng, shape, dtype)
        m = bnfast.SyncBatchNorm(3, comm=comm, dtype=dtype)
        m(x)
        expected = m.backward(dy.copy(), retain_graph=True)
        assert m.backward(dy, out=out) is out
        return expected, out

    for expected, got in ok(run_ranks(2, step)):
        assert_same(got, expected)


@pytest.mark.parametrize("data, param", [("float16", "float32"), ("bfloat16", "float32"),
                                         ("float32", "float64")])
def test_parameter_gradients_take_the_parameters_dtype(data, param):
    # 65536 values a channel: a float16 bias gradient would overflow to inf.
    def step(comm):
        m = bnfast.SyncBatchNorm(2, comm=comm, dtype=data, param_dtype=param)
        plain = bnfast.BatchNorm2d(2, dtype=data, param_dtype=param)
        x = make_input(np.random.default_rng(comm.rank), (16, 2, 64, 64), m.dtype)
        dy = np.ones_like(x)
        m(x)
        m.backward(dy)
        plain(x)
        plain.backward(dy)
        return m, plain

    for m, plain in ok(run_ranks(2, step)):
        for name in ("weight", "bias"):
            grad = getattr(m, name + "_grad")
            assert grad.dtype == np.dtype(param) == getattr(m, name).dtype
        # Local gradients: this rank's batch, as the plain module's on it.
        assert_same(m.bias_grad, plain.bias_grad)
        assert np.all(m.bias_grad == 16 * 64 * 64)


class _ShortPeer:
    """Two ranks, the other's module of ``other`` channels: its record arrives short, as
    MPICH leaves it for the rank of more channels (the rest of the buffer untouched; the
    rank of fewer channels gets MPI's 'Message truncated' error instead)."""

    def __init__(self, other):
        self.other = other

    def Get_size(self):
        return 2

    def Get_rank(self):
        return 0

    def Allgather(self, send, recv):
        recv[0] = send
        peer = np.zeros(2 * self.other + 2)
        peer[-1] = self.other
        flat = recv.reshape(-1)
        n = min(peer.size, recv.shape[1])
        flat[recv.shape[1]:recv.shape[1] + n] = peer[:n]


def test_ranks_with_modules_of_other_sizes_raise():
    m = bnfast.SyncBatchNorm(3, comm=_ShortPeer(2))
    with pytest.raises(RuntimeError, match=r"differ in num_features \(this rank's: 3; ranks \[1\]"):
        m(np.ones((4, 3), np.float32))
    assert int(m.num_batches_tracked) == 0 and np.all(m.running_var == 1.0)


def test_input_dims_and_repr():
    comm = ThreadComm.group(1)[0]
    m = bnfast.SyncBatchNorm(3, comm=comm)
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        m(np.ones(3, np.float32))
    assert repr(m).startswith("SyncBatchNorm(3, eps=1e-05")
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                   "num_batches_tracked"}


def test_convert_and_revert_share_arrays():
    comm = ThreadComm.group(1)[0]
    bns = [bnfast.BatchNorm1d(2), bnfast.BatchNorm3d(3, affine=False).eval()]
    converted = bnfast.convert_sync_batchnorm({"a": bns[0], "b": (bns[1], "other")}, comm=comm)
    a, (b, other) = converted["a"], converted["b"]
    assert isinstance(a, bnfast.SyncBatchNorm) and isinstance(b, bnfast.SyncBatchNorm)
    assert other == "other" and a.comm is comm
    assert a.weight is bns[0].weight and a.running_var is bns[0].running_var
    assert a.num_batches_tracked is bns[0].num_batches_tracked
    assert b.weight is None and not b.training
    back = bnfast.revert_sync_batchnorm([a, b])
    assert [type(m) for m in back] == [bnfast.BatchNorm1d, bnfast.BatchNorm3d]
    assert back[0].running_mean is bns[0].running_mean
    assert type(bnfast.revert_sync_batchnorm(bnfast.SyncBatchNorm(2, comm=comm))) \
        is bnfast.BatchNorm2d
    with pytest.raises(TypeError, match="fused"):
        bnfast.convert_sync_batchnorm(bnfast.FusedBatchNorm2d(2), comm=comm)


def test_convert_and_revert_keep_the_parameters_dtype():
    comm = ThreadComm.group(1)[0]
    bn = bnfast.BatchNorm2d(2, dtype="float32", param_dtype="float64")
    sync = bnfast.convert_sync_batchnorm(bn, comm=comm)
    assert sync.param_dtype == np.float64 and sync.weight is bn.weight
    back = bnfast.revert_sync_batchnorm(sync)
    assert back.param_dtype == np.float64 and back.weight is bn.weight
    x = make_input(np.random.default_rng(0), (4, 2, 3, 3), np.float32)
    back(x)
    back.backward(np.ones_like(x))
    assert back.weight_grad.dtype == back.bias_grad.dtype == np.float64


def test_import_does_not_need_mpi4py():
    import subprocess
    import sys
    code = ("import sys; sys.modules['mpi4py'] = None; import bnfast\n"
            "try:\n    bnfast.SyncBatchNorm(2)\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert 'pip install "bnfast[mpi]"' in out
