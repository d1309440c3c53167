"""``bnfast bench``: bnfast against NumPy, PyTorch and ONNX Runtime, and the copy roofline.

Modules, one job each:

* :mod:`~bnfast.bench.suite`     shapes, modes, dtypes, bytes each mode must move
* :mod:`~bnfast.bench.data`      deterministic inputs per (shape, dtype)
* :mod:`~bnfast.bench.check`     the correctness check against :mod:`bnfast.testing`
* :mod:`~bnfast.bench.timing`    warm-up, median and mean of repeats
* :mod:`~bnfast.bench.busy`      ``--busy N``: neighbour processes running bnfast
* ``impl_*``                     bnfast, the NumPy/PyTorch/ONNX Runtime peers, np.copyto
* :mod:`~bnfast.bench.peers`     the registry of implementations (also for ``benchmarks/``)
* :mod:`~bnfast.bench.runner`    the loop over cases and implementations
* :mod:`~bnfast.bench.schema`    the JSON document, documented key by key
* ``report_table``, ``report_plot``  the text table and the speedup plot

Nothing here is imported by ``import bnfast``; torch and onnxruntime are
imported only when a benchmark runs.
"""
from .runner import BenchSettings, run_benchmark
from .schema import SCHEMA_VERSION, validate
from .timing import TimingPolicy

__all__ = ["BenchSettings", "TimingPolicy", "run_benchmark", "validate", "SCHEMA_VERSION"]
