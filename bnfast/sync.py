"""SyncBatchNorm: batch statistics over the whole batch of a data-parallel MPI job.

Each rank holds a slice of the batch (any size, empty included).  In training:

* forward: each rank computes its statistics record (:mod:`bnfast._records`:
  count, float64 mean and m2 per channel, from the training kernel) and ONE
  collective, ``comm.Allgather``, hands every rank all of them
  (``P * (2C + 2) * 8`` bytes: the record and C, which every rank checks);
  every rank merges them in rank order with the
  one merge, so all ranks hold bit-identical statistics and running buffers.
  No ``E[x^2] - E[x]^2``, no variance rebuilt from ``invstd``.
* backward: ONE ``comm.Allreduce`` of ``(sum_dy, sum_dy_xmu)`` per channel and
  the count (``(2C + 1) * 8`` bytes; the count checks that every rank is in the
  backward of the same forward).  Parameter gradients stay local, as torch's
  (summed over ranks they are the whole batch's; a data-parallel optimiser
  averages or sums them).
* evaluation: no communication (running statistics, or local batch statistics
  without them, as ``torch.nn.SyncBatchNorm``).

A rank whose input is rejected still takes part in the collective (with a
marker record), so every rank raises instead of waiting forever.

``mpi4py`` (the ``mpi`` extra) is needed only for the default communicator
(``MPI.COMM_WORLD``): any object with mpi4py's buffer-based ``Allgather``,
``Allreduce``, ``Get_rank`` and ``Get_size`` serves as ``comm``.
"""
import math

import numpy as np

from . import _backward, _forward, _layout
from . import functional as F
from ._layout import overlaps
from ._records import Record, merge, running_update
from ._threads import resolve_threads
from ._validation import (
    as_float_array,
    check_channel_vector,
    check_eps,
    check_flag,
    check_momentum,
    check_out,
    check_running_stats,
)
from .backward import is_grad_enabled
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _backward_arguments, _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]

# A rank's count word when its input was rejected: the others raise too.
_REJECTED = -1
# The backward's count word of a rank that rejected its grad_output: far below any
# sum of real counts, so the reduced count cannot match the forward's.
_REJECTED_BACKWARD = -float(2 ** 60)


def world_communicator():
    """``mpi4py.MPI.COMM_WORLD``, or an ImportError naming the extra to install."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError('bnfast.SyncBatchNorm needs mpi4py for its default communicator: '
                          'pip install "bnfast[mpi]" (or pass comm=)') from exc
    return MPI.COMM_WORLD


class _SyncSaved:
    """What a synchronised training forward keeps for backward."""

    __slots__ = ("input", "layout", "weight", "mean", "invstd", "count", "local_count",
                 "input_overwritten")

    def __init__(self, input, layout, weight, mean, invstd, count, local_count,
                 input_overwritten):
        self.input = input
        self.input_overwritten = input_overwritten
        self.layout = layout
        self.weight = weight
        self.mean = mean
        self.invstd = invstd
        self.count = count
        self.local_count = local_count


class SyncBatchNorm(_BatchNorm):
    """Batch Normalization over the batch of all ranks of an MPI communicator.

    As ``torch.nn.SyncBatchNorm`` (any input with ``ndim >= 2``), on NumPy
    arrays: in training every rank normalises with the statistics of the
    concatenated batch of all ranks (uneven and empty slices included) and
    updates its running buffers identically.  The result equals single-process
    :class:`bnfast.BatchNorm2d` & co. on the concatenated batch (within 1 ulp
    for float32, 1e-12 relative for float64).

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, bias, dtype, param_dtype, n_threads
        As :class:`bnfast.BatchNorm1d`.
    comm : mpi4py communicator, optional (keyword-only)
        The ranks whose batches are one batch (default ``MPI.COMM_WORLD``;
        sub-communicators from ``comm.Split`` work).  Every rank of it must
        call forward (and backward) in training together.

    Notes
    -----
    A global batch of one value per channel raises torch's ValueError on
    every rank; a global batch of zero values leaves the running statistics
    alone (``num_batches_tracked`` still counts the call, as BatchNorm's).

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> class OneRank:  # any object with mpi4py's buffer collectives serves as comm
    ...     def Get_size(self): return 1
    ...     def Get_rank(self): return 0
    ...     def Allgather(self, send, recv): recv[...] = send
    ...     def Allreduce(self, send, recv): recv[...] = send
    >>> m = bnfast.SyncBatchNorm(2, comm=OneRank(), dtype=np.float64)
    >>> m(np.array([[1.0, 2.0], [3.0, 6.0]]))
    array([[-0.999995  , -0.99999875],
           [ 0.999995  ,  0.99999875]])
    >>> m.running_mean, m.running_var
    (array([0.2, 0.4]), array([1.1, 1.7]))
    """

    _ndim_text = "at least 2D"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, comm=None, bias=True, dtype=np.float32,
                 param_dtype=None, n_threads=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, bias=bias,
                         dtype=dtype, param_dtype=param_dtype, n_threads=n_threads)
        self.comm = world_communicator() if comm is None else comm

    def _check_input_dim(self, x):
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")

    # -- forward ------------------------------------------------------------------
    def _forward(self, input, addend, relu, out):
        if not self.training:  # no communication: running (or local batch) statistics
            return super()._forward(input, addend, relu, out)
        comm = self.comm
        C = self.num_features
        send = np.empty(2 * C + 2)
        send[-1] = C  # checked by every rank: modules of other sizes must not merge
        try:
            x, weight, bias, eps, factor, out, nt = self._check_training(input, out)
            x, layout = _layout.in_kernel_layout(x)
            local = _local_record(x, layout, nt)
            local.to_buffer(send[:-1])
        except Exception:
            send[0:1].view(np.int64)[0] = _REJECTED
            _gather(comm, send, C)  # take part, so the other ranks raise too
            raise
        total = merged_total(_gather(comm, send, C), "communicator")
        counted = self.track_running_stats
        if counted and total.count > 0:
            running_update(self.running_mean, self.running_var, total, factor)
        if counted:
            self.num_batches_tracked += 1
        var = total.var if total.count > 0 else np.ones(C)
        result, coef, _, _ = F.normalize(x, total.mean, var, weight, bias, False, 0.0, eps,
                                         None, False, out, nt, True, False, None)
        if is_grad_enabled():
            self._saved = _SyncSaved(x, layout, None if weight is None else weight.copy(),
                                     coef[0], coef[1], total.count, local.count,
                                     out is not None and overlaps(out, x))
        else:
            self._saved = None
            self._saved_missing = ("the last forward() ran under bnfast.no_grad(), which saves "
                                   "nothing for backward")
        return result

    def _check_training(self, input, out):
        """The local checks of a training forward; ``(x, weight, bias, eps, factor, out, nt)``.

        A single value per channel is fine here: only the global count must exceed 1.
        """
        x = as_float_array(input, "input")
        self._check_input_dim(x)
        if x.dtype != self.dtype:
            raise TypeError(
                f"input dtype {x.dtype} does not match the module's dtype {self.dtype}: "
                f"build the module with dtype={x.dtype.name!r} or cast the input explicitly")
        C = self.num_features
        if x.shape[1] != C:
            raise ValueError(f"expected input with {C} channels (axis 1), "
                             f"got input of shape {x.shape}")
        if self.track_running_stats:
            check_running_stats(self.running_mean, self.running_var, C, True)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked + 1)
            else:
                factor = check_momentum(self.momentum)
        else:
            factor = 0.0
        weight = check_channel_vector(self.weight, "weight", C)
        bias = check_channel_vector(self.bias, "bias", C)
        eps = check_eps(self.eps, True)
        if out is not None:
            out = check_out(out, x)
        return x, weight, bias, eps, factor, out, resolve_threads(self.n_threads)

    # -- backward -----------------------------------------------------------------
    def _backward(self, grad_output, retain_graph, out=None):
        retain_graph = check_flag(retain_graph, "retain_graph")
        saved = self._saved
        if not isinstance(saved, _SyncSaved):
            return super()._backward(grad_output, retain_graph, out)
        C = self.num_features
        sums = np.empty(2 * C + 1)
        try:
            # Every rank checks before the collective: a rank that raises still takes part.
            dy_given = grad_output
            dy, out = _backward_arguments(saved, grad_output, out, retain_graph)
            dy = _layout.to_layout(dy, saved.layout)
            _local_sums(saved.input, dy, saved.mean, saved.layout, sums,
                        resolve_threads(self.n_threads))
            sums[2 * C] = saved.local_count
        except Exception:
            sums[:] = 0.0
            sums[2 * C] = _REJECTED_BACKWARD
            self.comm.Allreduce(sums, np.empty_like(sums))
            raise
        total = np.empty_like(sums)
        self.comm.Allreduce(sums, total)
        if total[2 * C] != saved.count:
            raise RuntimeError(
                "SyncBatchNorm backward: the ranks' counts sum to "
                f"{total[2 * C]:.0f}, not the forward's {saved.count}: a rank rejected its "
                "grad_output, or the ranks are not all in the backward of the same forward")
        gx = _grad_input(saved.input, dy, saved.mean, saved.invstd, saved.weight,
                         total[:C], total[C:2 * C], saved.count, out, saved.layout,
                         resolve_threads(self.n_threads), dy_given)
        if not retain_graph:
            self._saved = None
            self._saved_missing = ("backward() was already called on the last forward, which "
                                   "freed what it saved (pass retain_graph=True to keep it)")
        # Local parameter gradients, as torch's SyncBatchNorm.
        if saved.weight is not None:
            gw = self._as_param_dtype(sums[C:2 * C] * saved.invstd)
            self.weight_grad = gw if self.weight_grad is None else self.weight_grad + gw
        if self.bias is not None:
            gb = self._as_param_dtype(sums[:C])
            self.bias_grad = gb if self.bias_grad is None else self.bias_grad + gb
        return gx, None


def merged_total(records, group_kind):
    """The ranks' records, in rank order, checked and merged into the global one.

    Every rank gets the same records, so every rank raises the same error: a
    rank that rejected its input, or one value per channel in the whole batch.
    """
    rejected = [r for r, rec in enumerate(records) if rec.count == _REJECTED]
    if rejected:
        raise RuntimeError(f"SyncBatchNorm: rank(s) {rejected} of the {group_kind} rejected "
                           "their input (see their error); nothing was updated")
    total = merge(records)
    if total.count == 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {total.count}")
    return total


def _gather(comm, send, C):
    """Every rank's record, in rank order: the forward's one collective.

    Each rank's last word is its module's C: a rank whose module has other
    channels sends a record of another size, which MPI may truncate (an error
    there) or leave short here (the NaN fill shows it): every rank raises.
    """
    recv = np.full((comm.Get_size(), 2 * C + 2), np.nan)
    comm.Allgather(send, recv)
    if not np.all(recv[:, -1] == C):
        raise RuntimeError(f"SyncBatchNorm: the ranks' modules differ in num_features (this "
                           f"rank's: {C}; ranks {np.flatnonzero(recv[:, -1] != C).tolist()} "
                           "sent records of another size)")
    return [Record.from_buffer(row[:-1]) for row in recv]


def _local_record(x, layout, nt):
    """The record of a checked, laid-out chunk (see ``_records.record_of``)."""
    count = x.shape[0] * math.prod(x.shape[2:])
    C = x.shape[1]
    if count == 0:
        return Record(0, np.zeros(C), np.zeros(C))
    mean, var, _ = _forward.moments(x, layout, nt)
    return Record(count, mean, var * count)


# -- the backward's arithmetic ------------------------------------------------------
# The compiled backward in two halves, with the ranks' reduction in between:
# pass 1 writes the local float64 sums (``sums=``), pass 2 runs with the global
# sums and count (``sums_given=True``), so a step costs what BatchNorm's does
# plus one Allreduce, and dx has the kernel's arithmetic exactly.

def _local_sums(x, dy, mean, layout, sums, n_threads=1):
    """``sums[:C] = sum(dy)``, ``sums[C:2C] = sum((x - mean) * dy)`` per channel, float64."""
    C = x.shape[1]
    local = np.empty((2, C))
    _backward.backward(x, dy, None, mean, np.ones(C), None, None, None, False, False, layout,
                       True, False, n_threads, local)
    sums[:2 * C] = local.ravel()


def _grad_input(x, dy, mean, invstd, weight, sum_dy, sum_xdy, count, out, layout,
                n_threads=1, dy_given=None):
    """dx = (dy - sum_dy/n - (x - mean) * invstd**2 * sum_xdy/n) * invstd * weight,
    with the global sums and count: the compiled backward's pass 2.

    ``out`` is written directly where it may be (x or the caller's grad_output
    ``dy_given`` exactly, elementwise; no partial overlap), else through a temporary.
    """
    result, target = _layout.write_target(out, x, layout, same_ok=(x, dy, dy_given))
    given = np.ascontiguousarray(np.stack([sum_dy, sum_xdy]))
    _backward.backward(x, dy, None, mean, invstd, weight, target, None, False, False, layout,
                       True, False, n_threads, given, True, count)
    if target is not result:
        np.copyto(result, target)
    return result


# -- conversion -----------------------------------------------------------------------
_PLAIN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


def convert_sync_batchnorm(module, comm=None):
    """Replace bnfast BatchNorm modules by :class:`SyncBatchNorm` sharing their arrays.

    As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new module holds
    the same ``weight``, ``bias``, running buffers and ``num_batches_tracked``
    arrays (not copies) and the same training mode.

    Parameters
    ----------
    module : BatchNorm1d/2d/3d, or a list, tuple or dict of modules
        Containers are converted element by element (a new container of the
        same kind); anything else is returned unchanged.
    comm : mpi4py communicator, optional
        As :class:`SyncBatchNorm`'s.

    Returns
    -------
    The converted module or container.

    Raises
    ------
    TypeError
        A fused module (``FusedBatchNorm2d`` & co.): SyncBatchNorm has no
        fused epilogue, and converting it silently would change the result.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> class OneRank:
    ...     def Get_size(self): return 1
    ...     def Get_rank(self): return 0
    >>> bn = bnfast.BatchNorm2d(3)
    >>> sync = bnfast.convert_sync_batchnorm([bn], comm=OneRank())[0]
    >>> type(sync).__name__, sync.running_mean is bn.running_mean
    ('SyncBatchNorm', True)
    >>> type(bnfast.revert_sync_batchnorm(sync)).__name__
    'BatchNorm2d'
    """
    if isinstance(module, (list, tuple)):
        return type(module)(convert_sync_batchnorm(m, comm) for m in module)
    if isinstance(module, dict):
        return type(module)((k, convert_sync_batchnorm(m, comm)) for k, m in module.items())
    if not isinstance(module, _BatchNorm) or isinstance(module, SyncBatchNorm):
        return module
    if type(module) not in _PLAIN.values():
        raise TypeError(f"convert_sync_batchnorm: {type(module).__name__} is not converted "
                        "(SyncBatchNorm has no fused addend/ReLU epilogue)")
    sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats, comm=comm, bias=module.bias is not None,
                         dtype=module.dtype, param_dtype=module.param_dtype,
                         n_threads=module.n_threads)
    _share_state(module, sync)
    sync._plain_class = type(module)
    return sync


def revert_sync_batchnorm(module, cls=None):
    """The inverse of :func:`convert_sync_batchnorm`: plain BatchNorm modules sharing the arrays.

    Parameters
    ----------
    module : SyncBatchNorm, or a list, tuple or dict of modules
    cls : BatchNorm1d, BatchNorm2d or BatchNorm3d, optional
        The class to revert to; by default the one converted from, else
        :class:`bnfast.BatchNorm2d`.
    """
    if isinstance(module, (list, tuple)):
        return type(module)(revert_sync_batchnorm(m, cls) for m in module)
    if isinstance(module, dict):
        return type(module)((k, revert_sync_batchnorm(m, cls)) for k, m in module.items())
    if not isinstance(module, SyncBatchNorm):
        return module
    target = cls or getattr(module, "_plain_class", BatchNorm2d)
    if target not in _PLAIN.values():
        raise TypeError(f"cls must be BatchNorm1d, BatchNorm2d or BatchNorm3d, got {target!r}")
    plain = target(module.num_features, module.eps, module.momentum, module.affine,
                   module.track_running_stats, bias=module.bias is not None,
                   dtype=module.dtype, param_dtype=module.param_dtype,
                   n_threads=module.n_threads)
    _share_state(module, plain)
    return plain


def _share_state(source, target):
    """target's parameters, buffers, gradients and mode become source's own arrays."""
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                 "weight_grad", "bias_grad", "training"):
        setattr(target, name, getattr(source, name))
