"""torch.compile and torch.export of converted models: no graph break for bnfast's ops.

Compiling is slow on a small machine (tens of seconds with inductor): the
models are small, and all but one test use the ``aot_eager`` backend, which
runs the fake kernels, autograd and functionalization without code generation.
"""
import copy

import pytest

torch = pytest.importorskip("torch")

import bnfast.torch as bt  # noqa: E402

nn = torch.nn


class Block(nn.Module):
    """conv -> bn -> relu -> conv -> bn (+ residual) -> relu, and a BatchNorm1d head."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.head = nn.BatchNorm1d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)) + x)
        return self.head(out.mean((2, 3)))


def _model(fused=False):
    torch.manual_seed(0)
    model = bt.convert(Block().double())
    return bt.fuse(model) if fused else model


def _x(channels_last=False):
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _train_step(model, x):
    model.zero_grad(set_to_none=True)
    loss = (model(x) ** 2).sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _compare(eager, compiled, x):
    for _ in range(2):  # buffers updated by the first call feed the second
        loss, grads = _train_step(eager, x)
        loss2, grads2 = _train_step(compiled, x)
        torch.testing.assert_close(loss2, loss, rtol=1e-9, atol=1e-12)
        for g, g2 in zip(grads, grads2):
            torch.testing.assert_close(g2, g, rtol=1e-9, atol=1e-12)
    for (key, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=key)
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True], ids=["converted", "fused"])
def test_no_graph_break(fused):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_model(fused))(_x())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    targets = {str(n.target) for g in explanation.graphs for n in g.graph.nodes}
    assert any("bnfast" in t for t in targets)


@pytest.mark.parametrize("fused", [False, True], ids=["converted", "fused"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_compiled_aot_eager_matches_eager(fused, channels_last):
    torch._dynamo.reset()
    eager = _model(fused)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    _compare(eager, compiled, _x(channels_last))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_compiled_inductor_matches_eager(channels_last):
    # The operators take inductor's layouts (flexible_layout): it makes an NCHW model's
    # convolutions channels_last, so the fused ops run on channels_last tensors traced
    # as NCHW (the backward must read the mask's layout from the mask, not the trace).
    torch._dynamo.reset()
    eager = _model(fused=True)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    _compare(eager, compiled, _x(channels_last))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export(training):
    model = _model(fused=True).train(training)
    reference = copy.deepcopy(model)
    program = torch.export.export(copy.deepcopy(model), (_x(),))
    targets = {str(n.target) for n in program.graph.nodes}
    assert {"bnfast.batch_norm.default", "bnfast.fused_batch_norm.default"} <= targets
    if training:
        mutated = set(program.run_decompositions({}).graph_signature.buffers_to_mutate.values())
        assert {"bn1.running_mean", "bn2.running_var", "head.running_mean"} <= mutated
    exported = program.module()
    with torch.no_grad():
        expected = reference(_x())
        torch.testing.assert_close(exported(_x()), expected, rtol=1e-12, atol=1e-12)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, rtol=1e-12, atol=1e-14,
                                   msg=key)
