"""pytest-benchmark suites: collection of ``bench_*.py`` and the shared fixtures.

``pytest benchmarks/`` collects every ``bench_*.py`` in this folder (the
project's ``testpaths`` is ``tests``, so plain ``pytest`` never runs them).
Options choose the suite::

    pytest benchmarks/ --benchmark-only --bench-shapes 32x256x56x56,256x1024 --bench-dtypes float32,float64

Fixtures for suites: ``bench_shape`` and ``bench_dtype`` (parametrized from
the options), ``bench_inputs`` (the cached :class:`bnfast.bench.data.Inputs`
for them) and ``implementation`` (a factory: name -> the adapter from
``bnfast.bench``, skipping when the library is not installed).
"""
import functools

import pytest

from bnfast.bench.suite import format_shape, parse_dtypes, parse_shapes

DEFAULT_SHAPES = "32x256x56x56,32x2048x7x7,8x64x56x56,256x1024,1x512x7x7"
DEFAULT_DTYPES = "float32"


def pytest_addoption(parser):
    group = parser.getgroup("bnfast benchmarks")
    group.addoption("--bench-shapes", default=DEFAULT_SHAPES,
                    help=f"comma-separated NxCx... shapes (default {DEFAULT_SHAPES})")
    group.addoption("--bench-dtypes", default=DEFAULT_DTYPES,
                    help="comma-separated dtypes: float32, float64 (default float32)")


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` as test modules (pytest's default is ``test_*.py``).

    A file named on the command line is collected by pytest itself already.
    """
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "bench_shape" in metafunc.fixturenames:
        shapes = parse_shapes(config.getoption("--bench-shapes"))
        metafunc.parametrize("bench_shape", shapes, ids=[format_shape(s) for s in shapes])
    if "bench_dtype" in metafunc.fixturenames:
        metafunc.parametrize("bench_dtype", parse_dtypes(config.getoption("--bench-dtypes")))


@functools.lru_cache(maxsize=1)
def _inputs(shape, dtype):
    from bnfast.bench.data import Inputs
    return Inputs(shape, dtype)


@pytest.fixture
def bench_inputs(bench_shape, bench_dtype):
    """Deterministic inputs for the current shape and dtype (the last set is cached)."""
    return _inputs(tuple(bench_shape), bench_dtype)


_IMPLS = {}


@pytest.fixture(scope="session")
def implementation():
    """``implementation(name)``: the ``bnfast.bench`` adapter for bnfast, numpy, torch,
    onnxruntime or copy, made once per session with each library's default threads."""
    def get(name):
        if name not in _IMPLS:
            if name in ("torch", "onnxruntime"):
                pytest.importorskip(name)
            from bnfast.bench.impl_bnfast import Bnfast
            from bnfast.bench.impl_copy import CopyRoofline
            from bnfast.bench.impl_numpy import NumpyPeer
            classes = {"bnfast": Bnfast, "copy": CopyRoofline, "numpy": NumpyPeer}
            if name == "torch":
                from bnfast.bench.impl_torch import TorchPeer as cls
            elif name == "onnxruntime":
                from bnfast.bench.impl_onnxruntime import OnnxRuntimePeer as cls
            else:
                cls = classes[name]
            _IMPLS[name] = cls()
        return _IMPLS[name]
    yield get
    for impl in _IMPLS.values():
        impl.close()
    _IMPLS.clear()
