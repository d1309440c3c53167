"""The JSON document ``python -m bnfast bench --json FILE`` writes, key by key.

Top level
---------
schema : str
    ``"bnfast-bench/1"``; changes when a key changes meaning.
created : str
    When the run finished, ISO 8601 in UTC.
command : list of str or null
    The command-line arguments of the run.
machine : object
    ``cpu`` (model name), ``cores`` (logical CPUs), ``usable_cores`` (in this
    process's affinity mask), ``platform``, ``load_average`` (1/5/15-minute
    load at the start, or null).
versions : object
    ``python``, ``numpy``, ``bnfast``, ``torch``, ``onnxruntime``,
    ``threadpoolctl``: version strings, null when not installed or not loaded.
build : object
    ``bnfast._config.config()``: OpenMP on/off, max threads, compiler and flags.
settings : object
    ``shapes`` (list of lists), ``modes``, ``dtypes``, ``peers`` (requested),
    ``threads`` (``--threads``, null for each library's default), ``outputs``
    (``"preallocated"``: outputs written into buffers made once, or
    ``"allocate"``: every call allocates), ``quick``, ``repeat`` (fixed
    samples per measurement, or null), ``min_time`` (target seconds per
    measurement), ``tolerance`` (dtype -> accepted scaled error).
threads : object
    Implementation name -> thread count it ran with (``"default"`` where the
    library picks at run time).
unavailable : object
    Peer name -> why it was skipped (not importable, failed to load).
notes : list of str
    Warnings about the run (busy machine, partial thread limits, skipped peers).
results : list of object
    One entry per case and implementation, keys below.
summary : object
    mode -> peer -> ``{"geomean_speedup", "cases"}``: geometric mean of
    ``bnfast_speedup`` over the cases where both ran.

Each result
-----------
mode : str
    ``eval``, ``train``, ``backward`` or ``fused_eval``.
dtype : str
    ``float32`` or ``float64``.
shape : list of int
    ``[N, C, *spatial]``.
impl : str
    ``bnfast``, ``copy`` (the roofline), ``numpy``, ``torch`` or ``onnxruntime``.
status : str
    ``ok`` (timed), ``unsupported`` (this implementation has no such mode,
    e.g. backward before bnfast has ``batch_norm_backward``), ``skipped``
    (the case cannot run, e.g. one value per channel in training) or
    ``error`` (it raised; see ``note``).
note : str or null
    Why it is not ``ok``, or what went wrong in the check.
median_s : float or null
    Median seconds per call.
min_s : float or null
    Fastest sample, seconds per call (less sensitive to a busy machine).
times_s : list of float
    Seconds per call of every sample.
number : int or null
    Calls per sample (tiny cases loop to stay above timer resolution).
bytes_moved : int or null
    Bytes the operation must read and write: eval 2, train 3, backward 5,
    fused_eval 3 times ``x.nbytes`` (copy: 2, or 3 for fused_eval).
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
    Largest absolute difference to the float64 NumPy reference over all
    outputs (train also checks running_mean/running_var; backward all
    three gradients).
error : float or null
    Largest difference scaled by ``max(1, max |reference|)`` of its output.
worst : str or null
    The output that ``error`` comes from (``y``, ``running_var``, ``grad_weight``...).
tolerance : float
    Accepted ``error`` for the dtype.
correct : bool or null
    ``error <= tolerance``; null when nothing was checked (copy, or not run).
"""

__all__ = ["SCHEMA_VERSION", "TOP_LEVEL_KEYS", "RESULT_KEYS", "MACHINE_KEYS",
           "VERSION_KEYS", "SETTINGS_KEYS", "validate"]

SCHEMA_VERSION = "bnfast-bench/1"

TOP_LEVEL_KEYS = ("schema", "created", "command", "machine", "versions", "build", "settings",
                  "threads", "unavailable", "notes", "results", "summary")
MACHINE_KEYS = ("cpu", "cores", "usable_cores", "platform", "load_average")
VERSION_KEYS = ("python", "numpy", "bnfast", "torch", "onnxruntime", "threadpoolctl")
SETTINGS_KEYS = ("shapes", "modes", "dtypes", "peers", "threads", "outputs", "quick", "repeat",
                 "min_time", "tolerance")
RESULT_KEYS = ("mode", "dtype", "shape", "impl", "status", "note", "median_s", "min_s", "times_s", "number",
               "bytes_moved", "gbps", "fraction_of_copy_bandwidth", "bnfast_speedup", "allocates",
               "max_abs_error", "error", "worst", "tolerance", "correct")
STATUSES = ("ok", "unsupported", "skipped", "error")


def validate(doc):
    """Return a list of problems with a benchmark document (empty if it follows this schema)."""
    problems = []

    def keys(obj, expected, where):
        if not isinstance(obj, dict):
            problems.append(f"{where}: not an object")
            return
        got, want = set(obj), set(expected)
        if got != want:
            problems.append(f"{where}: missing {sorted(want - got)}, unexpected {sorted(got - want)}")

    keys(doc, TOP_LEVEL_KEYS, "top level")
    if problems:
        return problems
    if doc["schema"] != SCHEMA_VERSION:
        problems.append(f"schema: {doc['schema']!r} is not {SCHEMA_VERSION!r}")
    keys(doc["machine"], MACHINE_KEYS, "machine")
    keys(doc["versions"], VERSION_KEYS, "versions")
    keys(doc["settings"], SETTINGS_KEYS, "settings")
    if not isinstance(doc["results"], list):
        problems.append("results: not a list")
        return problems
    for i, r in enumerate(doc["results"]):
        keys(r, RESULT_KEYS, f"results[{i}]")
        if isinstance(r, dict) and r.get("status") not in STATUSES:
            problems.append(f"results[{i}].status: {r.get('status')!r}")
        if isinstance(r, dict) and r.get("status") == "ok" and not (
                isinstance(r.get("median_s"), float) and r["median_s"] > 0):
            problems.append(f"results[{i}]: ok without a positive median_s")
    return problems
