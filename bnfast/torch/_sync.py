"""SyncBatchNorm for PyTorch jobs on CPUs: ``torch.distributed`` (gloo) process groups.

``torch.nn.SyncBatchNorm`` refuses CPU tensors.  This subclass runs the
algorithm of :class:`bnfast.SyncBatchNorm` over a process group instead of an
MPI communicator:

* forward: each rank's statistics record (count, float64 mean and m2 per
  channel, from the training kernel), ONE ``all_gather`` of ``2C + 1`` float64
  per rank, merged in rank order on every rank (:mod:`bnfast._records`), so the
  statistics and running buffers are bit-identical everywhere; the input is
  normalised with them by bnfast's kernel;
* backward (autograd): ONE ``all_reduce`` of ``(sum_dy, sum_dy_xmu)`` and the
  count; parameter gradients stay local, as torch's (DDP reduces them).

Evaluation, a world of one rank and an uninitialised ``torch.distributed``
take bnfast's plain BatchNorm road (no communication), as torch does.
"""
import numpy as np
import torch
import torch.distributed as dist

from .. import _layout
from .. import functional as _functional
from .. import sync as _sync
from .._records import Record, running_update
from .._validation import check_channel_vector, check_eps, check_input
from ._modules import _arguments
from ._modules import _FusedBatchNorm as _FusedMixin
from ._tensors import as_numpy, empty_like, from_numpy
from .functional import batch_norm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _all_gather(send, group):
    """Every rank's buffer, in rank order (the forward's one collective)."""
    size = dist.get_world_size(group)
    parts = [torch.empty_like(send) for _ in range(size)]
    dist.all_gather(parts, send, group=group)
    return [Record.from_buffer(p.numpy()) for p in parts]


class _SyncFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, group):
        C = input.shape[1]
        send = np.empty(2 * C + 1)
        try:
            x = check_input(as_numpy(input))
            w = check_channel_vector(as_numpy(weight), "weight", C)
            b = check_channel_vector(as_numpy(bias), "bias", C)
            eps = check_eps(eps, True)
            x, layout = _layout.in_kernel_layout(x)
            nt = torch.get_num_threads()
            local = _sync._local_record(x, layout, nt)
            local.to_buffer(send)
        except Exception:
            send[0:1].view(np.int64)[0] = _sync._REJECTED
            _all_gather(torch.from_numpy(send), group)  # take part: the others raise too
            raise
        total = _sync.merged_total(_all_gather(torch.from_numpy(send), group), "process group")
        if running_mean is not None and total.count > 0:
            running_update(as_numpy(running_mean), as_numpy(running_var), total, momentum)
            torch.autograd.graph.increment_version(running_mean)
            torch.autograd.graph.increment_version(running_var)
        var = total.var if total.count > 0 else np.ones(C)
        out = empty_like(input)
        _, coef, _, _ = _functional.normalize(x, total.mean, var, w, b, False, 0.0, eps, None,
                                              False, as_numpy(out), nt, True, False, None)
        ctx.save_for_backward(input, weight)
        ctx.stats = (coef[0], coef[1], total.count, local.count, layout)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        mean, invstd, count, local_count, layout = ctx.stats
        x, _ = _layout.in_kernel_layout(as_numpy(input))
        C = x.shape[1]
        dy = _layout.to_layout(as_numpy(grad), layout)
        sums = np.empty(2 * C + 1)
        _sync._local_sums(x, dy, mean, layout, sums, torch.get_num_threads())
        sums[2 * C] = local_count
        total = torch.from_numpy(sums.copy())
        dist.all_reduce(total, group=ctx.group)
        total = total.numpy()
        if total[2 * C] != count:
            raise RuntimeError(f"SyncBatchNorm backward: the ranks' counts sum to "
                               f"{total[2 * C]:.0f}, not the forward's {count}")
        w = None if weight is None else as_numpy(weight).astype(np.float64)
        need = ctx.needs_input_grad
        gx = gw = gb = None
        if need[0]:
            gx = from_numpy(_sync._grad_input(x, dy, mean, invstd, w, total[:C],
                                              total[C:2 * C], count, None, layout,
                                              torch.get_num_threads()))
        if weight is not None and need[1]:
            gw = torch.from_numpy(sums[C:2 * C] * invstd).to(weight.dtype)
        if need[2]:
            gb = torch.from_numpy(sums[:C].copy()).to(weight.dtype)
        return gx, gw, gb, None, None, None, None, None


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` for CPU tensors, on bnfast's kernels (gloo process groups).

    Same constructor, parameters, buffers and ``state_dict`` as torch's.  In
    training, with ``torch.distributed`` initialised and more than one rank in
    ``process_group`` (default: the world), every rank normalises with the
    statistics of all ranks' batches (uneven and empty ones included): the
    result equals single-process BatchNorm on the concatenated batch.
    Otherwise it is :class:`bnfast.torch.BatchNorm2d`'s forward.

    Examples
    --------
    >>> import torch, bnfast.torch
    >>> bn = bnfast.torch.SyncBatchNorm(2)   # no process group: plain BatchNorm
    >>> bn(torch.tensor([[1.0, 2.0], [3.0, 6.0]])).detach()
    tensor([[-1.0000, -1.0000],
            [ 1.0000,  1.0000]])
    """

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self.process_group or (dist.group.WORLD if _initialized() else None)
        if not (self.training and group is not None and dist.get_world_size(group) > 1):
            return batch_norm(input, *_arguments(self, input))
        running_mean, running_var, weight, bias, _, factor, eps = _arguments(self, input)
        return _SyncFunction.apply(input, weight, bias, running_mean, running_var, factor, eps,
                                   group)


def _initialized():
    return dist.is_available() and dist.is_initialized()


def convert_sync_batchnorm(model, process_group=None):
    """Every BatchNorm of ``model`` becomes a :class:`bnfast.torch.SyncBatchNorm`.

    As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (which builds new
    modules holding the same Parameters and buffers), for torch's and
    bnfast's BatchNorm1d/2d/3d alike.

    Raises
    ------
    TypeError
        A fused module (``bnfast.torch.FusedBatchNorm2d`` & co.): SyncBatchNorm
        has no addend/ReLU epilogue.

    Examples
    --------
    >>> import torch, bnfast.torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    >>> type(bnfast.torch.convert_sync_batchnorm(model)[1]).__name__
    'SyncBatchNorm'
    """
    for module in model.modules():
        if isinstance(module, _FusedMixin):
            raise TypeError(f"convert_sync_batchnorm: {type(module).__name__} is not converted "
                            "(SyncBatchNorm has no fused addend/ReLU epilogue)")
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    for module in converted.modules():
        if type(module) is torch.nn.SyncBatchNorm:
            module.__class__ = SyncBatchNorm
    return converted
