"""bnfast.torch vs stock torch, interleaved: the ratios issue 12 asks for, in one run.

Not a pytest-benchmark suite (pytest-benchmark times one implementation after
the other; on a shared machine the ratios then drift with the load).  Here
the contenders of each case run in turn, round after round, and the minimum
per contender is kept, with the ratio of the medians beside it::

    python benchmarks/torch_compare.py                   # all but compiled (~3 min)
    python benchmarks/torch_compare.py layers overhead   # only these parts
    python benchmarks/torch_compare.py resnet --rounds 9 --threads 2

Parts:

* ``layers``: one BatchNorm layer, forward + backward through autograd
  (``--modes train``, the default) and/or an eval forward under no_grad
  (``eval``), ``torch.nn.BatchNorm*`` vs ``bnfast.torch.convert`` of it
  (``--shapes``, 4-D shapes also channels_last); ``--cold`` empties the
  caches before each call (64 MiB written, untimed), as a model's layers
  find their input: hot-cache timings flatter two-pass kernels.
* ``overhead``: (1, 512, 7, 7) eval forward (no_grad), training forward and
  training forward + backward, torch's module vs bnfast's module.
* ``resnet``: a ResNet-18 training step (forward, backward, SGD update) and an
  eval forward (no_grad), batch 16, 3x112x112, float32, NCHW and
  channels_last: stock vs converted vs converted + fused.
* ``share``: BatchNorm's share of the self CPU time of a training step (torch
  profiler: ``aten::*batch_norm*`` and the ``bnfast::*`` labels).  The profiler
  records every op that a Python autograd node calls, so it counts bnfast's
  glue at several times its cost: ``inside`` measures without it.
* ``inside``: BatchNorm's own wall time inside the ResNet-18 training step
  (forward and backward) and eval forward, stock vs converted, by module and
  gradient hooks (no profiler), and its share of the step.
* ``formats``: the channels_last ResNet-18 step's BatchNorm layers: the memory
  format of their input, output, grad_output and grad_input (a convolution
  reorders what is not channels_last), and the copy ops (``aten::copy_``,
  ``contiguous``, ``clone``, ``to``, ...) of a step, stock vs converted vs fused.
* ``processes`` (only when named: ~6 min): ``resnet`` with each contender in
  a Python process of its own, started anew for every round (``--process-rounds``),
  as a user's process holds one model.  In ``resnet`` the three models share one
  heap: bnfast's pool of warm buffers (``bnfast.torch._buffers``) and the
  stock model's frees move glibc's thresholds for all three, so one model's
  allocations page-fault or not by what the others did (eval channels_last,
  AMD EPYC: 0.96-0.98x there, converted faster in processes of their own).
* ``compiled`` (only when named: inductor takes minutes): the ResNet-18 step
  under ``torch.compile``, stock vs converted vs fused, each compiled, and
  compiled (1, 512, 7, 7) and 16x512x4x4 layers' forward + backward.

Threads: ``torch.set_num_threads(--threads)``, which bnfast.torch uses too.
Every bnfast result is checked against torch's before it is timed.
"""
import argparse
import copy
import json
import pathlib
import statistics
import subprocess
import sys
import time

import torch

import bnfast.torch as bt

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from resnet_step import build_resnet, resnet_batch, train_step  # noqa: E402

nn = torch.nn
DEFAULT_SHAPES = "32x256x56x56,32x2048x7x7,8x64x56x56,256x1024,1x512x7x7"
#: The BatchNorm inputs of the ResNet-18 step (batch 16, 3x112x112): --shapes resnet.
RESNET_SHAPES = "16x64x56x56,16x64x28x28,16x128x14x14,16x256x7x7,16x512x4x4"
LAYOUTS = ("contiguous", "channels_last")


def _time(call, number, before=None):
    if before is not None:  # one call at a time, ``before`` untimed
        before()
        start = time.perf_counter()
        call()
        return time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(number):
        call()
    return (time.perf_counter() - start) / number


def interleaved(calls, rounds, budget=0.005, before=None):
    """``{name: [seconds per call, one per round]}``: each round runs every call in turn.

    ``number`` (calls per timing) is chosen once so that a timing takes about
    ``budget`` seconds for the slowest contender: short timings, many rounds, so
    that some of them miss the other processes of a shared machine.  The order
    of the contenders rotates from round to round (none always runs after the
    same one: what a call leaves in the caches and the heap is the next one's
    weather).  With ``before`` (e.g. a cache flush), every call is timed alone
    after it.
    """
    for call in calls.values():  # warm-up (allocator, first-call paths)
        call()
        call()
    slowest = max(_time(call, 1) for call in calls.values())
    number = max(1, int(budget / max(slowest, 1e-7)))
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(_time(calls[name], number, before))
    return times


def _us(seconds):
    return f"{seconds * 1e6:10.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:10.2f} ms"


def _row(label, times, base="torch"):
    """The minimum of each contender (the machine's least disturbed round) and the
    ratios of the minima, of the medians, and the median of the rounds' own ratios
    (paired: both timings of a round share the machine's load of that moment, so
    the load cancels; a step whose time drifts over a run is compared within each
    round).  Where a contender's own time varies from call to call (page faults of
    fresh memory, which the heap's history decides), the minimum shows its best
    call and the medians its typical one."""
    best = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    paired = {name: statistics.median(b / t for b, t in zip(times[base], times[name]))
              for name in times}
    cells = "  ".join(f"{name} {_us(t)}" for name, t in best.items())
    ratios = "  ".join(f"{base}/{name} {best[base] / best[name]:5.2f}x "
                       f"(median {median[base] / median[name]:5.2f}x, "
                       f"paired {paired[name]:5.2f}x)"
                       for name in best if name != base)
    print(f"{label:<38}{cells}  {ratios}", flush=True)


def _bn(shape, dtype=torch.float32):
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    return cls[len(shape)](shape[1], dtype=dtype)


def _fwd_bwd(module, x, grad):
    def step():
        module(x).backward(grad)
    return step


def _eval(module, x):
    def call():
        with torch.no_grad():
            module(x)
    return call


def layers(args):
    modes = args.modes.split(",")
    flush = None
    if args.cold:  # the caches emptied before each call, as a model's layers find them
        scratch = torch.empty(64 * 2**20 // 4)

        def flush():
            scratch.fill_(1.0)
    print(f"\none layer, module vs module ({', '.join(modes)}), {args.threads} threads, "
          f"min of {args.rounds} interleaved rounds{', cold caches' if args.cold else ''}")
    for text in args.shapes.split(","):
        shape = tuple(int(s) for s in text.split("x"))
        for layout in LAYOUTS:
            if layout == "channels_last" and len(shape) != 4:
                continue
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g)
            grad = torch.randn(shape, generator=g)
            if layout == "channels_last":  # the gradient too, as in a channels_last model
                x = x.contiguous(memory_format=torch.channels_last)
                grad = grad.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            stock = _bn(shape)
            ours = bt.convert(stock)
            torch.testing.assert_close(ours(x), copy.deepcopy(stock)(x), rtol=1e-4, atol=1e-4)
            for mode in modes:
                for m in (stock, ours):
                    m.train(mode == "train")
                if mode == "train":
                    calls = {"torch": _fwd_bwd(stock, x, grad), "bnfast": _fwd_bwd(ours, x, grad)}
                else:
                    calls = {"torch": _eval(stock, x), "bnfast": _eval(ours, x)}
                _row(f"{text} {layout} {mode}", interleaved(calls, args.rounds, before=flush))


def overhead(args):
    shape = (1, 512, 7, 7)
    print(f"\ncall overhead on {shape}, {args.threads} threads")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    grad = torch.ones(shape)
    stock = nn.BatchNorm2d(512)
    ours = bt.convert(stock)

    for mode in ("eval", "train_fwd", "train_fwd_bwd"):
        for m in (stock, ours):
            m.train(mode != "eval")
        if mode == "eval":
            calls = {"torch": _eval(stock, x), "bnfast": _eval(ours, x)}
        elif mode == "train_fwd":
            calls = {"torch": lambda: stock(x), "bnfast": lambda: ours(x)}
        else:
            calls = {"torch": _fwd_bwd(stock, x, grad), "bnfast": _fwd_bwd(ours, x, grad)}
        _row(mode, interleaved(calls, args.rounds))


VARIANTS = ("stock", "converted", "fused")


def resnet(args):
    print(f"\nResNet-18, batch 16, 3x112x112, float32, {args.threads} threads, "
          f"min of {args.rounds} interleaved rounds")
    for layout in LAYOUTS:
        x, target = resnet_batch(layout)
        models = {v: build_resnet(v, layout) for v in VARIANTS}
        with torch.no_grad():
            expected = models["stock"].eval()(x)
            for v in VARIANTS[1:]:
                torch.testing.assert_close(models[v].eval()(x), expected, rtol=1e-3, atol=1e-3)
        steps = {}
        for v, model in models.items():
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            steps[v] = train_step(model, x, target, opt)
        _row(f"train step {layout}", interleaved(steps, args.rounds, budget=0), "stock")

        for model in models.values():
            model.eval()
        evals = {v: _eval(m, x) for v, m in models.items()}
        _row(f"eval forward {layout}", interleaved(evals, args.rounds, budget=0), "stock")


def compiled(args):
    """The ResNet-18 training step under ``torch.compile`` (inductor): stock vs
    converted vs converted + fused, each compiled; and two compiled layers."""
    print(f"\ntorch.compile (inductor), ResNet-18 training step, batch 16, 3x112x112, "
          f"float32, {args.threads} threads, min of {args.rounds} interleaved rounds")
    for layout in LAYOUTS:
        x, target = resnet_batch(layout)
        steps, outputs = {}, {}
        for v in VARIANTS:
            model = build_resnet(v, layout).train()
            compiled_model = torch.compile(model)
            outputs[v] = compiled_model(x).detach()  # compiles; checked below
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            steps[v] = train_step(compiled_model, x, target, opt)
        for v in VARIANTS[1:]:
            torch.testing.assert_close(outputs[v], outputs["stock"], rtol=1e-3, atol=1e-3)
        _row(f"compiled train step {layout}", interleaved(steps, args.rounds, budget=0),
             "stock")
    for shape in ((1, 512, 7, 7), (16, 512, 4, 4)):
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn_like(x)
        stock = nn.BatchNorm2d(512)
        layers = {"torch": torch.compile(stock),
                  "bnfast": torch.compile(bt.convert(copy.deepcopy(stock)))}
        torch.testing.assert_close(layers["bnfast"](x), layers["torch"](x), rtol=1e-4,
                                   atol=1e-4)
        _row(f"compiled {'x'.join(map(str, shape))} train", interleaved(
            {name: _fwd_bwd(layer, x, grad) for name, layer in layers.items()}, args.rounds))



#: processes: timed calls per process, after three untimed ones.
_PROCESS_CALLS = {"train": 10, "eval": 30}


def _resnet_calls(variant, layout, mode, calls, threads):
    """Seconds of ``calls`` calls of a fresh ResNet-18 (after three untimed ones): the
    child's side of ``processes``."""
    torch.set_num_threads(threads)
    x, target = resnet_batch(layout)
    model = build_resnet(variant, layout).train(mode == "train")
    if mode == "train":
        call = train_step(model, x, target, torch.optim.SGD(model.parameters(), lr=0.01))
    else:
        def call():
            with torch.no_grad():
                model(x)
    for _ in range(3):
        call()
    return [_time(call, 1) for _ in range(calls)]


def _in_process(variant, layout, mode, threads):
    """``_resnet_calls`` in a new Python process: the child's median and minimum."""
    child = subprocess.run(
        [sys.executable, __file__, "--child", f"{variant},{layout},{mode}",
         "--threads", str(threads)], check=True, capture_output=True, text=True)
    times = json.loads(child.stdout.strip().splitlines()[-1])
    return statistics.median(times), min(times)


def processes(args):
    """The ResNet-18 step and eval forward, each contender in a process of its own."""
    rounds = args.process_rounds
    print(f"\nResNet-18, batch 16, 3x112x112, float32, {args.threads} threads, a process per "
          f"contender and round ({rounds} rounds; per process the median of "
          f"{_PROCESS_CALLS['train']} steps or {_PROCESS_CALLS['eval']} eval forwards)")
    for layout in LAYOUTS:
        for mode in ("train", "eval"):
            medians = {v: [] for v in VARIANTS}
            minima = {v: [] for v in VARIANTS}
            for r in range(rounds):
                for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
                    median, least = _in_process(v, layout, mode, args.threads)
                    medians[v].append(median)
                    minima[v].append(least)
            label = f"{'train step' if mode == 'train' else 'eval forward'} {layout}"
            _row(label, medians, "stock")
            best = {v: min(t) for v, t in minima.items()}
            print(f"{'':<38}minima: " + "  ".join(
                f"{v} {_us(t)} ({best['stock'] / t:5.2f}x)" for v, t in best.items()),
                flush=True)

# Self CPU time of aten::native_batch_norm(_backward) & co. and of the bnfast::* labels.
_BN_KEYS = ("batch_norm", "batchnorm")


def bn_share(model, x, target, steps=3, repeats=3):
    """``(BatchNorm's self CPU time, all self CPU time)`` per training step, in seconds,
    from the least loaded of ``repeats`` profiles of ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile
    model.train()
    step = train_step(model, x, target, torch.optim.SGD(model.parameters(), lr=0.01))
    step()
    best = None
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        bn = sum(e.self_cpu_time_total for e in events
                 if any(k in e.key.lower() for k in _BN_KEYS))
        if best is None or total < best[1]:
            best = (bn, total)
    return best[0] / steps / 1e6, best[1] / steps / 1e6


def share(args):
    print("\nBatchNorm's share of a ResNet-18 training step's self CPU time (torch profiler)")
    for layout in LAYOUTS:
        x, target = resnet_batch(layout)
        for v in VARIANTS:
            bn, total = bn_share(build_resnet(v, layout), x, target)
            print(f"{layout:<14}{v:<10} BatchNorm {_us(bn)} of {_us(total)} "
                  f"({bn / total:5.1%})", flush=True)


class _BatchNormClock:
    """Wall time of every BatchNorm of a model, forward and backward, by hooks.

    A forward pre-hook and forward hook bracket each forward; in training the
    output's gradient hook (the gradient reaches the layer) and the input's (the
    layer's backward has returned it) bracket its backward, the autograd
    engine's call of the node included.  No profiler: torch's profiler records
    every op a Python autograd node calls, which counts bnfast's glue at several
    times its cost (``share``).  Each BatchNorm's input must be a tensor only it
    reads (ResNet's are convolutions' outputs), else the input's hook waits for
    the other readers' gradients too.
    """

    def __init__(self, model):
        self.reset()
        self._started = {}
        self._handles = []
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._handles.append(module.register_forward_pre_hook(self._enter))
                self._handles.append(module.register_forward_hook(self._leave))

    def reset(self):
        self.forward = self.backward = 0.0
        self.forwards = self.backwards = 0  # calls timed: a hook that never fired shows

    def remove(self):
        for handle in self._handles:
            handle.remove()

    def _enter(self, module, inputs):
        self._started[module] = time.perf_counter()

    def _leave(self, module, inputs, output):
        self.forward += time.perf_counter() - self._started.pop(module)
        self.forwards += 1
        x = inputs[0]
        if output.requires_grad and x.requires_grad:
            started = []
            output.register_hook(lambda grad: started.append(time.perf_counter()))
            x.register_hook(lambda grad: self._backward_done(started))

    def _backward_done(self, started):
        self.backward += time.perf_counter() - started.pop()
        self.backwards += 1


def inside(args):
    """BatchNorm's own wall time inside the ResNet-18 step and eval forward (hooks)."""
    print(f"\nBatchNorm inside ResNet-18 (batch 16, 3x112x112, float32, {args.threads} "
          f"threads): its forward and backward wall time per step by hooks, "
          f"{args.rounds} interleaved rounds")
    variants = ("stock", "converted")  # fused modules hold the add and ReLU too
    for layout in LAYOUTS:
        x, target = resnet_batch(layout)
        for mode in ("train", "eval"):
            clocks, calls = {}, {}
            for v in variants:
                model = build_resnet(v, layout).train(mode == "train")
                clocks[v] = _BatchNormClock(model)
                if mode == "train":
                    opt = torch.optim.SGD(model.parameters(), lr=0.01)
                    calls[v] = train_step(model, x, target, opt)
                else:
                    calls[v] = _eval(model, x)
            steps, bn = {v: [] for v in variants}, {v: [] for v in variants}
            for r in range(args.rounds + 2):  # two warm-up rounds
                for v in variants[r % 2:] + variants[:r % 2]:
                    clocks[v].reset()
                    start = time.perf_counter()
                    calls[v]()
                    expected = (20, 20 if mode == "train" else 0)  # ResNet-18's BNs
                    assert (clocks[v].forwards, clocks[v].backwards) == expected, v
                    if r >= 2:
                        steps[v].append(time.perf_counter() - start)
                        bn[v].append(clocks[v].forward + clocks[v].backward)
            label = f"{'train step' if mode == 'train' else 'eval forward'} {layout}"
            _row(f"{label}: BN", bn, "stock")
            print(f"{'':<38}BN share of the median {'step' if mode == 'train' else 'forward'}: "
                  + "  ".join(f"{v} {statistics.median(bn[v]) / statistics.median(steps[v]):5.1%}"
                              for v in variants), flush=True)
            for clock in clocks.values():
                clock.remove()


def _format(tensor):
    if tensor.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous" if tensor.is_contiguous() else "strided"


_COPY_OPS = ("aten::copy_", "aten::contiguous", "aten::clone", "aten::to", "aten::_to_copy",
             "aten::reshape", "aten::_reshape_alias")


def formats(args):
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile
    print("\nchannels_last ResNet-18 step: BatchNorm memory formats and copy ops per step")
    x, target = resnet_batch("channels_last")
    for v in VARIANTS:
        model = build_resnet(v, "channels_last").train()
        seen = Counter()

        def record(what, tensor, seen=seen):
            seen[f"{what} {_format(tensor)}"] += 1

        def hook(module, inputs, output):
            record("input", inputs[0])
            record("output", output)
            output.register_hook(lambda g: record("grad_output", g))
            if inputs[0].requires_grad:
                inputs[0].register_hook(lambda g: record("grad_input", g))
        handles = [m.register_forward_hook(hook) for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        step = train_step(model, x, target, torch.optim.SGD(model.parameters(), lr=0.01))
        step()
        for h in handles:
            h.remove()
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        copies = {e.key: e.count for e in prof.key_averages() if e.key in _COPY_OPS}
        print(f"{v:<10} BatchNorm tensors: {dict(sorted(seen.items()))}", flush=True)
        print(f"{'':<10} copy ops: {dict(sorted(copies.items()))}", flush=True)


PARTS = {"layers": layers, "overhead": overhead, "resnet": resnet, "share": share,
         "inside": inside, "formats": formats, "compiled": compiled, "processes": processes}
#: What runs without parts named: all but ``compiled`` (inductor compiles for minutes here)
#: and ``processes`` (a new process, torch imported, per timing: minutes).
DEFAULT_PARTS = ("layers", "overhead", "resnet", "share", "inside", "formats")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="*", metavar="part",
                        help=f"what to run: {', '.join(PARTS)} "
                             f"(default: {', '.join(DEFAULT_PARTS)})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help="layers: NxCx... shapes, or resnet (ResNet-18's)")
    parser.add_argument("--cold", action="store_true",
                        help="layers: 64 MiB written before each call (caches emptied)")
    parser.add_argument("--modes", default="train",
                        help="layers: train (forward + backward) and/or eval (no_grad forward)")
    parser.add_argument("--process-rounds", type=int, default=4,
                        help="processes: rounds (each starts one process per contender)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # processes' own children
    args = parser.parse_args(argv)
    if args.child:
        variant, layout, mode = args.child.split(",")
        print(json.dumps(_resnet_calls(variant, layout, mode, _PROCESS_CALLS[mode],
                                       args.threads)))
        return
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(PARTS)}")
    if args.shapes == "resnet":
        args.shapes = RESNET_SHAPES
    torch.set_num_threads(args.threads)
    for name in args.parts or DEFAULT_PARTS:
        PARTS[name](args)


if __name__ == "__main__":
    main()
