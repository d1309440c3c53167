"""pytest-benchmark suites: collection of ``bench_*.py`` and the shared fixtures.

``pytest benchmarks/`` collects every ``bench_*.py`` in this folder (the
project's ``testpaths`` is ``tests``, so plain ``pytest`` never runs them).
Options choose the suite::

    pytest benchmarks/ --benchmark-only \\
        --bench-shapes 32x256x56x56,256x1024 --bench-dtypes float32,float64

Fixtures for suites: ``bench_shape`` and ``bench_dtype`` (parametrized from
the options), ``bench_inputs`` (the cached :class:`bnfast.bench.data.Inputs`
for them), ``implementation`` (name -> the implementation from the
``bnfast bench`` registry, skipping when the library is not installed) and
``bench_case`` (check against :mod:`bnfast.testing`, then time one mode of
one implementation).
"""
import functools

import pytest

from bnfast.bench.suite import format_shape, parse_dtypes, parse_shapes

DEFAULT_SHAPES = "32x256x56x56,32x2048x7x7,8x64x56x56,256x1024,1x512x7x7"
DEFAULT_DTYPES = "float32"
#: bench_half.py: arrays over 8 MB in float32, where memory decides.
DEFAULT_HALF_SHAPES = "32x256x56x56,32x512x28x28,32x2048x7x7,4096x1024"
#: bench_layouts.py: images (4-D), the streamed sizes and one that stays cached.
DEFAULT_LAYOUT_SHAPES = "32x256x56x56,32x64x56x56,32x2048x7x7,8x64x28x28"


def pytest_addoption(parser):
    group = parser.getgroup("bnfast benchmarks")
    group.addoption("--bench-shapes", default=DEFAULT_SHAPES,
                    help=f"comma-separated NxCx... shapes (default {DEFAULT_SHAPES})")
    group.addoption("--bench-dtypes", default=DEFAULT_DTYPES,
                    help="comma-separated dtypes: float32, float64, float16, bfloat16 "
                         "(default float32)")
    group.addoption("--half-shapes", default=DEFAULT_HALF_SHAPES,
                    help=f"shapes of bench_half.py (default {DEFAULT_HALF_SHAPES})")
    group.addoption("--layout-shapes", default=DEFAULT_LAYOUT_SHAPES,
                    help=f"4-D shapes of bench_layouts.py (default {DEFAULT_LAYOUT_SHAPES})")


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
    if "half_shape" in metafunc.fixturenames:
        shapes = parse_shapes(config.getoption("--half-shapes"))
        metafunc.parametrize("half_shape", shapes, ids=[format_shape(s) for s in shapes])
    if "layout_shape" in metafunc.fixturenames:
        shapes = parse_shapes(config.getoption("--layout-shapes"))
        if any(len(s) != 4 for s in shapes):
            raise pytest.UsageError("--layout-shapes: 4-D shapes (N, C, H, W), the "
                                    f"layouts of images; got {config.getoption('--layout-shapes')}")
        metafunc.parametrize("layout_shape", shapes, ids=[format_shape(s) for s in shapes])


_HALF_RATIOS = []


@pytest.fixture(scope="session")
def half_ratios():
    """The rows of bench_half.py's ratio table (printed at the end of the session)."""
    return _HALF_RATIOS


_LAYOUT_RATIOS = []


@pytest.fixture(scope="session")
def layout_ratios():
    """The rows of bench_layouts.py's ratio table (printed at the end of the session)."""
    return _LAYOUT_RATIOS


def pytest_terminal_summary(terminalreporter):
    _half_summary(terminalreporter.write_line)
    _layout_summary(terminalreporter.write_line)


def _versus(ratio, paired_ratio, width):
    """The two torch cells of a summary row: the ratio of the minima in ``width``
    columns and the paired one in 8, or dashes where torch did not run."""
    if ratio is None:
        return f"{'-':>{width}}{'-':>8}"
    return f"{ratio:>{width - 1}.2f}x{paired_ratio:>7.2f}x"


def _half_summary(write):
    if not _HALF_RATIOS:
        return
    write("")
    write("half precision: interleaved calls (half / float32 of the same shape; torch / "
          "bnfast in the half dtype); ratios of the minima, and paired: the median of the "
          "rounds' ratios")
    write(f"{'mode':<9}{'dtype':<10}{'shape':<15}{'f32 MB':>8}{'half':>11}{'float32':>11}"
          f"{'half/f32':>10}{'paired':>8}{'torch/bnfast':>14}{'paired':>8}")
    for r in _HALF_RATIOS:
        vs_torch = _versus(r["torch_over_bnfast"], r["torch_over_bnfast_paired"], 14)
        write(f"{r['mode']:<9}{r['dtype']:<10}{r['shape']:<15}{r['float32_MB']:>8}"
              f"{r['half_s'] * 1e3:>9.2f}ms{r['float32_s'] * 1e3:>9.2f}ms"
              f"{r['half_over_float32']:>10.2f}{r['half_over_float32_paired']:>8.2f}{vs_torch}")


def _layout_summary(write):
    if not _LAYOUT_RATIOS:
        return
    write("")
    write("layouts: interleaved calls on the same values (last: channels-last, first: "
          "channels-first; copy: np.copyto of the array; torch on the channels-last data); "
          "ratios of the minima, and paired: the median of the rounds' ratios")
    write(f"{'mode':<14}{'dtype':<10}{'shape':<15}{'MB':>7}{'last':>11}{'first':>11}"
          f"{'last/first':>11}{'paired':>8}{'last/copy':>10}{'first/copy':>11}"
          f"{'torch/last':>11}{'paired':>8}")
    for r in _LAYOUT_RATIOS:
        vs_torch = _versus(r["torch_over_last"], r["torch_over_last_paired"], 11)
        write(f"{r['mode']:<14}{r['dtype']:<10}{r['shape']:<15}{r['MB']:>7}"
              f"{r['last_s'] * 1e3:>9.2f}ms{r['first_s'] * 1e3:>9.2f}ms"
              f"{r['last_over_first']:>11.2f}{r['last_over_first_paired']:>8.2f}"
              f"{r['last_over_copy']:>10.2f}{r['first_over_copy']:>11.2f}{vs_torch}")


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
    """``implementation(name, allocate=False, required=True)``: the implementation
    from the :mod:`bnfast.bench.peers` registry (bnfast, numpy, torch, onnxruntime
    or copy), made once per session with each library's default threads; when its
    library is not installed, skips the test (``required``) or returns None (an
    optional contender)."""
    from bnfast.bench.peers import make

    def get(name, allocate=False, required=True):
        if (name, allocate) not in _IMPLS:
            try:
                _IMPLS[name, allocate] = make(name, allocate=allocate)
            except ImportError as exc:
                if not required:
                    return None
                pytest.skip(str(exc))
        return _IMPLS[name, allocate]
    yield get
    for impl in _IMPLS.values():
        impl.close()
    _IMPLS.clear()


@pytest.fixture
def bench_case(benchmark, implementation, bench_inputs, bench_shape, bench_dtype):
    """``bench_case(mode, impl)``: check one implementation of one case against
    :mod:`bnfast.testing` (never time a wrong answer), then time it in the
    group ``"<mode> <dtype> <shape>"``.  ``impl`` may end in ``-alloc``: the
    call allocates its outputs (as user code usually does)."""
    from bnfast.bench.check import compare, expected
    from bnfast.bench.suite import Case

    def run(mode, impl):
        case = Case(mode, bench_dtype, tuple(bench_shape))
        name, _, alloc = impl.partition("-")
        adapter = implementation(name, allocate=bool(alloc))
        why = case.skip_reason() or adapter.unsupported(case)
        if why:
            pytest.skip(why)
        prepared = adapter.prepare(case, bench_inputs)
        if prepared.check is not None:
            checked = compare(prepared.check(), expected(mode, bench_inputs), bench_dtype)
            assert checked["correct"], checked
        benchmark.group = f"{mode} {bench_dtype} {format_shape(bench_shape)}"
        benchmark.extra_info.update(
            mode=mode, dtype=bench_dtype, shape=list(bench_shape),
            threads=adapter.effective_threads,
            bytes_moved=adapter.bytes_moved(case) if name == "copy" else case.bytes_moved)
        benchmark(prepared.run)
    return run
