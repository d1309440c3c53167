"""The JSON document ``bnfast bench --json FILE`` writes, key by key.

This docstring is the one description of the document: the key lists that
:func:`validate` checks are read from its sections below.

Top level
---------
schema : str
    ``"bnfast-bench/2"``; changes when a key is added or changes meaning.
created : str
    When the run finished, ISO 8601 in UTC.
command : list of str or null
    The command-line arguments of the run.
machine : object
    See *Machine*.
versions : object
    See *Versions*.
build : object
    ``bnfast._config.config()``: OpenMP on/off, max threads, compiler and flags.
settings : object
    See *Settings*.
threads : object
    Implementation name -> thread count it ran with (``"default"`` where the
    library picks at run time).
unavailable : object
    Peer name -> why it was skipped (not importable, failed to load).
neighbours : object or null
    With ``--busy N``: ``processes`` (N), ``workload`` (what each neighbour
    process ran in a loop: ``call``, ``shape``, ``dtype``, ``threads``) and
    ``calls`` (how many calls each neighbour made during the run).
notes : list of str
    Warnings about the run (busy machine, partial thread limits, skipped peers).
results : list of object
    One entry per case and implementation, see *Each result*.
summary : object
    mode -> peer -> ``{"geomean_speedup", "cases"}``: geometric mean of
    ``bnfast_speedup`` over the cases where both ran.

Machine
-------
cpu : str
    CPU model name.
cores : int
    Logical CPUs.
usable_cores : int
    CPUs in this process's affinity mask.
platform : str
    ``platform.platform()``.
load_average : list of float or null
    1/5/15-minute load at the start.

Versions
--------
python, numpy, bnfast, torch, onnxruntime, threadpoolctl : str or null
    Version strings, null when not installed or not loaded.

Settings
--------
shapes : list of list of int
    The shapes of the suite.
modes, dtypes : list of str
    The modes and dtypes of the suite.
peers : list of str
    The peers requested.
threads : int or null
    ``--threads``; null for each library's default.
outputs : str
    ``"preallocated"`` (outputs written into buffers made once) or
    ``"allocate"`` (every call allocates).
quick : bool
    ``--quick``.
repeat : int or null
    Fixed samples per measurement.
min_time : float
    Target seconds per measurement.
busy : int
    ``--busy``: neighbour processes running bnfast during the measurements.
tolerance : object
    dtype -> accepted scaled error.

Each result
-----------
mode : str
    ``eval``, ``train``, ``backward``, ``backward_eval``, ``fused_eval`` or
    ``fused_backward`` (see :data:`bnfast.bench.suite.MODES`).
dtype : str
    ``float32`` or ``float64``.
shape : list of int
    ``[N, C, *spatial]``.
impl : str
    ``bnfast``, ``copy`` (the roofline), ``numpy``, ``torch`` or ``onnxruntime``.
status : str
    ``ok`` (timed), ``unsupported`` (this implementation has no such mode),
    ``skipped`` (the case cannot run, e.g. one value per channel in
    training) or ``error`` (it raised; see ``note``).
note : str or null
    Why it is not ``ok``, or what went wrong in the check.
median_s : float or null
    Median seconds per call.
mean_s : float or null
    Mean seconds per call, stalls included: under ``--busy`` the figure that
    shows what sharing the cores costs.
min_s : float or null
    Fastest sample, seconds per call (less sensitive to a busy machine).
times_s : list of float
    Seconds per call of every sample.
number : int or null
    Calls per sample (tiny cases loop to stay above timer resolution).
bytes_moved : int or null
    Bytes the operation must read and write, in ``x.nbytes``: eval 2, train 3,
    backward 5, backward_eval 4, fused_eval 3, fused_backward 6 (copy: 2, or
    3 for fused_eval).
gbps : float or null
    Effective bandwidth, ``bytes_moved / median_s / 1e9``.
fraction_of_copy_bandwidth : float or null
    ``gbps`` over the copy roofline's ``gbps`` for the same case (1.0 = at
    the speed of ``np.copyto``).
bnfast_speedup : float or null
    This implementation's ``median_s`` over bnfast's: how many times faster
    bnfast is (>1: bnfast wins).
allocates : bool or null
    Whether each timed call allocated its output.
max_abs_error : float or null
    Largest absolute difference to the float64 reference
    (:mod:`bnfast.testing`) over all outputs (train also checks
    running_mean/running_var; the backward modes every gradient).
error : float or null
    Largest difference scaled by ``max(1, max |reference|)`` of its output.
worst : str or null
    The output that ``error`` comes from (``y``, ``running_var``, ``grad_weight``...).
tolerance : float
    Accepted ``error`` for the dtype.
correct : bool or null
    ``error <= tolerance``; null when nothing was checked (copy, or not run).
"""
import re

__all__ = ["SCHEMA_VERSION", "KEYS", "STATUSES", "validate"]

SCHEMA_VERSION = "bnfast-bench/2"
STATUSES = ("ok", "unsupported", "skipped", "error")


def _sections(doc):
    """Section title -> the keys it documents (``name : type`` lines, comma lists too)."""
    keys = {}
    sections = re.findall(r"^(\w[\w ]*)\n-+\n(.*?)(?=^\w[\w ]*\n-+\n|\Z)", doc, re.M | re.S)
    for title, body in sections:
        names = re.findall(r"^([a-z_][\w, ]*) : ", body, re.M)
        keys[title] = tuple(k.strip() for line in names for k in line.split(","))
    return keys


#: Section -> keys, from this module's docstring: ``Top level``, ``Machine``,
#: ``Versions``, ``Settings``, ``Each result``.
KEYS = _sections(__doc__)


def validate(doc):
    """Return a list of problems with a benchmark document (empty if it follows this schema)."""
    problems = []

    def keys(obj, section, where):
        if not isinstance(obj, dict):
            problems.append(f"{where}: not an object")
            return
        got, want = set(obj), set(KEYS[section])
        if got != want:
            problems.append(f"{where}: missing {sorted(want - got)}, "
                            f"unexpected {sorted(got - want)}")

    keys(doc, "Top level", "top level")
    if problems:
        return problems
    if doc["schema"] != SCHEMA_VERSION:
        problems.append(f"schema: {doc['schema']!r} is not {SCHEMA_VERSION!r}")
    keys(doc["machine"], "Machine", "machine")
    keys(doc["versions"], "Versions", "versions")
    keys(doc["settings"], "Settings", "settings")
    if not isinstance(doc["results"], list):
        return problems + ["results: not a list"]
    for i, r in enumerate(doc["results"]):
        keys(r, "Each result", f"results[{i}]")
        if isinstance(r, dict) and r.get("status") not in STATUSES:
            problems.append(f"results[{i}].status: {r.get('status')!r}")
        if isinstance(r, dict) and r.get("status") == "ok" and not (
                isinstance(r.get("median_s"), float) and r["median_s"] > 0):
            problems.append(f"results[{i}]: ok without a positive median_s")
    return problems
