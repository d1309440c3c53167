"""``fuse(model)``: a ``torch.fx`` pass that folds ``bn -> relu`` and
``bn -> add(residual) -> relu`` into bnfast's fused modules.
"""
import collections
import operator
import warnings

import torch
import torch.fx as fx

from . import _modules

__all__ = ["fuse"]

# BatchNorm types fused (torch's exact types and bnfast's plain ones) -> fused type.
_FUSED = {
    torch.nn.BatchNorm1d: _modules.FusedBatchNorm1d,
    torch.nn.BatchNorm2d: _modules.FusedBatchNorm2d,
    torch.nn.BatchNorm3d: _modules.FusedBatchNorm3d,
    _modules.BatchNorm1d: _modules.FusedBatchNorm1d,
    _modules.BatchNorm2d: _modules.FusedBatchNorm2d,
    _modules.BatchNorm3d: _modules.FusedBatchNorm3d,
}
_LEAVES = frozenset(_FUSED) | frozenset(_FUSED.values())
_RELU_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class _Tracer(fx.Tracer):
    """Keeps bnfast's modules whole (torch.nn modules are leaves already)."""

    def is_leaf_module(self, m, qualname):
        return type(m) in _LEAVES or super().is_leaf_module(m, qualname)


def _is_relu(node, modules):
    if node.op == "call_module":
        return type(modules[node.target]) is torch.nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


# A module's hook registries: a fused module would drop what they hold.
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
          "_load_state_dict_post_hooks")


def _has_hooks(module):
    return any(getattr(module, name, None) for name in _HOOKS)


def _single_user(node):
    return len(node.users) == 1 and next(iter(node.users))


def _residual(add, bn):
    """The other operand of ``add = bn + other`` (or ``other + bn``), or None."""
    if add.op == "call_function" and add.target in _ADD_FUNCTIONS:
        args = list(add.args)
        if len(args) != 2 or add.kwargs:  # torch.add(a, b, alpha=...) is not a plain add
            return None
    elif add.op == "call_method" and add.target in ("add", "add_") and len(add.args) == 2 \
            and not add.kwargs:
        args = list(add.args)
    else:
        return None
    if args.count(bn) != 1:
        return None
    in_place = add.target in (operator.iadd, "add_")
    if in_place and args[0] is not bn:  # the residual itself is written: others may read it
        return None
    other = args[1] if args[0] is bn else args[0]
    return other if isinstance(other, fx.Node) else None


# Operators that write a tensor they are given (fx records `a += b`, `a[i] = v`).
_IN_PLACE_FUNCTIONS = frozenset((operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                 operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                                 operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                                 operator.imatmul, operator.setitem))


def _side_effect_between(bn, relu, add, modules):
    """Whether a node after ``bn`` and before ``relu`` (other than ``add``) writes a
    tensor in place or reads ``bn``'s attributes: the fused module runs where the
    ReLU was, so either would see (or make) the other order."""
    node = bn.next
    while node is not relu:
        if node is not add:
            if node.op == "call_method" and node.target.endswith("_"):
                return True
            if node.op == "call_function" and (
                    node.target in _IN_PLACE_FUNCTIONS or node.kwargs.get("inplace")
                    or getattr(node.target, "__name__", "").endswith("_")):
                return True
            if node.op == "call_module" and getattr(modules[node.target], "inplace", False):
                return True
            if node.op == "get_attr" and node.target.startswith(bn.target + "."):
                return True
        node = node.next
    return False


def _fused_module(bn):
    """A fused module holding ``bn``'s very Parameters and buffers: its registries
    themselves, so a later ``.to()`` of either model (which puts new buffer tensors
    into the registry) converts both."""
    fused = _FUSED[type(bn)](bn.num_features, bn.eps, bn.momentum, bn.affine,
                             bn.track_running_stats, device="meta")
    fused._parameters = bn._parameters
    fused._buffers = bn._buffers
    fused._non_persistent_buffers_set = bn._non_persistent_buffers_set
    fused.train(bn.training)
    return fused


def fuse(model):
    """Fold ``relu(bn(x))`` and ``relu(bn(x) + residual)`` into bnfast's fused modules.

    ``model`` is traced with ``torch.fx``; every BatchNorm1d/2d/3d module
    (torch's or bnfast's) whose output feeds only a ReLU, or only an add whose
    output feeds only a ReLU (ResNet's basic and bottleneck blocks), becomes
    a :class:`bnfast.torch.FusedBatchNorm2d` & co. holding the same
    Parameters and buffers.  Other BatchNorms stay as they are (convert them
    with :func:`bnfast.torch.convert`), and so do those whose module or ReLU
    module has hooks (a warning names them: the fused module would not run them),
    and those with an in-place write or a read of the BatchNorm's attributes
    between it and its ReLU (the fused module runs where the ReLU was).

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    torch.nn.Module
        A ``torch.fx.GraphModule`` sharing ``model``'s Parameters and
        buffers; ``model`` itself is never changed.  If ``model`` cannot be
        traced, a ``UserWarning`` says why and ``model`` is returned as it is.

    Examples
    --------
    >>> import torch, bnfast.torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
    ...                             torch.nn.ReLU())
    >>> fused = bnfast.torch.fuse(model)
    >>> [type(m).__name__ for m in fused.children()]
    ['Conv2d', 'FusedBatchNorm2d']
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...)
        warnings.warn(f"bnfast.torch.fuse: model could not be traced by torch.fx "
                      f"({type(exc).__name__}: {exc}); it is returned unchanged", UserWarning,
                      stacklevel=2)
        return model
    gm = fx.GraphModule(model, graph, type(model).__name__)
    modules = dict(gm.named_modules())
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    hooked = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) not in _FUSED:
            continue
        if calls[node.target] != 1:  # a module called twice is fused at neither call
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        user = _single_user(node)
        if not user:
            continue
        addend = None
        if not _is_relu(user, modules):
            addend = _residual(user, node)
            relu = _single_user(user) if addend is not None else None
            if not relu or not _is_relu(relu, modules):
                continue
            add, user = user, relu
        if _side_effect_between(node, user, add if addend is not None else None, modules):
            continue  # fusing would move the BatchNorm past it
        relu_module = modules.get(user.target) if user.op == "call_module" else None
        if _has_hooks(modules[node.target]) or (relu_module is not None
                                                and _has_hooks(relu_module)):
            hooked.append(node.target)  # fusing would silently drop them
            continue
        fused_name = node.target
        gm.add_submodule(fused_name, _fused_module(modules[node.target]))
        with gm.graph.inserting_after(user):
            new = gm.graph.call_module(fused_name, (node.args[0],) if addend is None
                                       else (node.args[0], addend))
        user.replace_all_uses_with(new)
        gm.graph.erase_node(user)
        if addend is not None:
            gm.graph.erase_node(add)
        gm.graph.erase_node(node)
    if hooked:
        names = ", ".join(map(repr, hooked))
        warnings.warn(f"bnfast.torch.fuse: {names} not fused: the BatchNorm or its ReLU has "
                      "hooks, which a fused module would not run", UserWarning, stacklevel=2)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
