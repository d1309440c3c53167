"""``torch.nn.BatchNorm1d/2d/3d`` subclasses whose forward runs bnfast's operators.

They add no state: parameters, buffers, ``state_dict`` keys, hooks,
``.to()`` and optimizers are torch's.  :func:`bnfast.torch.convert` turns a
torch BatchNorm into one of these by switching its class (the very same
module, Parameter and buffer objects).
"""
import torch

from ._plan import ATTRIBUTE
from .functional import call

_Proxy = torch.fx.Proxy

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "FusedBatchNorm1d", "FusedBatchNorm2d", "FusedBatchNorm3d"]


def _arguments(module, input):
    """``F.batch_norm``'s arguments after input, as ``torch.nn.BatchNorm2d.forward`` makes
    them (and with its side effect: ``num_batches_tracked`` counted in training)."""
    module._check_input_dim(input)
    # The registries, not attribute access: nn.Module.__getattr__ costs ~0.5 us a name.
    params, buffers = module._parameters, module._buffers
    try:
        weight, bias = params["weight"], params["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        tracked_batches = buffers["num_batches_tracked"]
    except KeyError:  # deleted or replaced by plain attributes: torch's lookup
        weight, bias = module.weight, module.bias
        running_mean, running_var = module.running_mean, module.running_var
        tracked_batches = module.num_batches_tracked
    momentum = module.momentum
    factor = 0.0 if momentum is None else momentum
    training = module.training
    if training and module.track_running_stats and tracked_batches is not None:
        tracked_batches.add_(1)
        if momentum is None:  # cumulative moving average
            factor = 1.0 / float(tracked_batches)
    # Batch statistics in training, and in evaluation when there are no buffers.
    batch_stats = training or (running_mean is None and running_var is None)
    tracked = not training or module.track_running_stats
    return (running_mean if tracked else None, running_var if tracked else None,
            weight, bias, batch_stats, factor, module.eps)


def _traced(module, *args):
    """Under ``torch.fx`` tracing, a ``call_module`` node for ``module``, as fx makes for
    torch's own BatchNorm (a leaf by its ``torch.nn`` module path, which ours lack):
    fx-based tools keep the module, its train/eval switch and its counter."""
    tracer = args[0].tracer
    path = tracer.path_of_module(module)
    if not path:  # the root itself: fx traces into it, as into torch's BatchNorm as root
        raise torch.fx.proxy.TraceError(f"{type(module).__name__} as the root module cannot be "
                                        "traced: trace a module that holds it")
    return tracer.create_proxy("call_module", path, args, {})


class _BatchNorm:
    def forward(self, input):
        """Normalise ``input`` as torch's BatchNorm does, on bnfast's kernels."""
        if isinstance(input, _Proxy):
            return _traced(self, input)
        rm, rv, w, b, training, factor, eps = _arguments(self, input)
        return call(input, None, rm, rv, w, b, training, factor, eps, False, self)

    def __getstate__(self):
        # The plan (views of this module's tensors) is not state: copies and pickles
        # build their own on their first call.
        state = super().__getstate__()
        state.pop(ATTRIBUTE, None)
        return state


class _FusedBatchNorm:
    def forward(self, input, addend=None):
        """``relu(bn(input) + addend)`` (``addend`` optional, input's shape) in one pass."""
        if isinstance(input, _Proxy):
            return _traced(self, input) if addend is None else _traced(self, input, addend)
        rm, rv, w, b, training, factor, eps = _arguments(self, input)
        return call(input, addend, rm, rv, w, b, training, factor, eps, True, self)


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on bnfast's kernels (same constructor and state).

    Examples
    --------
    >>> import torch, bnfast.torch
    >>> bn = bnfast.torch.BatchNorm1d(2)
    >>> isinstance(bn, torch.nn.BatchNorm1d)
    True
    >>> bn(torch.tensor([[1.0, 2.0], [3.0, 6.0]])).detach()
    tensor([[-1.0000, -1.0000],
            [ 1.0000,  1.0000]])
    """


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on bnfast's kernels; ``channels_last`` input is used in place."""


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on bnfast's kernels; ``channels_last_3d`` input is used in place."""


class FusedBatchNorm1d(_FusedBatchNorm, BatchNorm1d):
    """``relu(BatchNorm1d(x) + addend)`` in one pass, with autograd.

    Same constructor, parameters and ``state_dict`` as ``torch.nn.BatchNorm1d``.

    Examples
    --------
    >>> import torch, bnfast.torch
    >>> bn = bnfast.torch.FusedBatchNorm1d(2)
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    >>> bn(x, torch.full_like(x, 0.5)).detach()
    tensor([[0.0000, 0.0000],
            [1.5000, 1.5000]])
    """


class FusedBatchNorm2d(_FusedBatchNorm, BatchNorm2d):
    """``relu(BatchNorm2d(x) + addend)`` in one pass (ResNet's block tail), with autograd."""


class FusedBatchNorm3d(_FusedBatchNorm, BatchNorm3d):
    """``relu(BatchNorm3d(x) + addend)`` in one pass, with autograd."""
