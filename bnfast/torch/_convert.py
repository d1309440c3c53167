"""Swap torch's BatchNorm modules for bnfast's (and back), keeping every object.

A converted module is the same object with its class switched to bnfast's
subclass (which adds no state): its Parameters, buffers, hooks and every
reference to it (optimizers, parents, DDP) stay what they were.
"""
import copy

import torch

from . import _modules
from ._plan import ATTRIBUTE

__all__ = ["convert", "revert"]

# Exact torch types only: user subclasses (and SyncBatchNorm, lazy modules) keep their forward.
_TO_BNFAST = {
    torch.nn.BatchNorm1d: _modules.BatchNorm1d,
    torch.nn.BatchNorm2d: _modules.BatchNorm2d,
    torch.nn.BatchNorm3d: _modules.BatchNorm3d,
}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_BNFAST.items()}


def _swap(model, table, inplace):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        cls = table.get(type(module))
        if cls is not None:
            module.__class__ = cls
            # A plan (bnfast.torch._plan) is bnfast's, not the module's state.
            module.__dict__.pop(ATTRIBUTE, None)
    return model


def convert(model, inplace=False):
    """Run every ``torch.nn.BatchNorm1d/2d/3d`` of ``model`` on bnfast's kernels.

    Modules of exactly those types (not subclasses) become
    :class:`bnfast.torch.BatchNorm1d` & co.: the same module objects (their
    class switched), so their Parameters and buffers are the very same
    objects and ``state_dict`` keys are unchanged.

    Parameters
    ----------
    model : torch.nn.Module
        Itself a BatchNorm, or a model containing some.
    inplace : bool
        Convert ``model`` itself; by default a deep copy is converted (the
        copy's own Parameters, as ``copy.deepcopy`` makes them).

    Returns
    -------
    torch.nn.Module
        The converted model (``model`` itself with ``inplace=True``).

    Examples
    --------
    >>> import torch, bnfast.torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> converted = bnfast.torch.convert(model)
    >>> type(converted[1])
    <class 'bnfast.torch._modules.BatchNorm2d'>
    >>> type(model[1])
    <class 'torch.nn.modules.batchnorm.BatchNorm2d'>
    """
    return _swap(model, _TO_BNFAST, inplace)


def revert(model, inplace=False):
    """Undo :func:`convert`: bnfast's BatchNorm1d/2d/3d become torch's again.

    Fused modules (from :func:`bnfast.torch.fuse`) have no torch counterpart
    and stay.

    Examples
    --------
    >>> import torch, bnfast.torch
    >>> bn = bnfast.torch.revert(bnfast.torch.BatchNorm1d(4))
    >>> type(bn)
    <class 'torch.nn.modules.batchnorm.BatchNorm1d'>
    """
    return _swap(model, _TO_TORCH, inplace)
