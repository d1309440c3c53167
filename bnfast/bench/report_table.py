"""The text table ``bnfast bench`` prints: one row per case."""
import math

from .runner import UNSTABLE
from .suite import ITEMSIZE, format_shape

__all__ = ["format_report", "format_time"]

_PEER_TITLES = {"numpy": "numpy", "torch": "torch", "onnxruntime": "onnxrt"}


def format_time(seconds):
    """``0.0123`` -> ``"12.30 ms"``."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def _size(nbytes):
    if nbytes >= 1e6:
        return f"{nbytes / 1e6:.1f} MB"
    return f"{nbytes / 1e3:.1f} kB"


def _speedup_cell(row):
    if row is None:
        return "-"
    if row["status"] == "unsupported":
        return "n/a"
    if row["status"] != "ok":
        return row["status"]
    if row["bnfast_speedup"] is None:
        return "-"
    cell = f"{row['bnfast_speedup']:.2f}x"
    return cell + "!" if row["correct"] is False else cell


def _check_cell(row):
    if row is None:
        return "-"
    if row["status"] == "unsupported":
        return "n/a"
    if row["status"] != "ok":
        return row["status"].upper()
    if row["correct"] is None:
        return "-"
    return "ok" if row["correct"] else "WRONG"


def _err_cell(row):
    if row is None or row.get("error") is None:
        return "-"
    return f"{row['error']:.1e}"


def _header(doc):
    m, b = doc["machine"], doc["build"]
    threads = ", ".join(f"{k} {v}" for k, v in doc["threads"].items() if k != "copy")
    return (f"bnfast {doc['versions']['bnfast']} bench | {m['cpu']} ({m['usable_cores']} cores) | "
            f"OpenMP {'on' if b.get('openmp') else 'OFF'} | threads: {threads} | "
            f"outputs {doc['settings']['outputs']}"
            + (f" | busy: {n['processes']} neighbour process(es) running bnfast "
               f"({'+'.join(map(str, n['calls']))} calls)" if (n := doc["neighbours"]) else ""))


def format_report(doc):
    """Return the whole text report for a benchmark document: header, table, summary, notes."""
    peers = [p for p in doc["threads"] if p not in ("copy", "bnfast")]
    cases = {}
    for r in doc["results"]:
        cases.setdefault((r["mode"], r["dtype"], tuple(r["shape"])), {})[r["impl"]] = r

    titles = ["mode", "dtype", "shape", "size", "bnfast", "mean", "GB/s", "%copy"]
    titles += [_PEER_TITLES.get(p, p) for p in peers] + ["err", "check"]
    right = set(range(3, len(titles) - 1))
    body = []
    previous_mode = None
    for (mode, dtype, shape), rows in cases.items():
        if previous_mode is not None and mode != previous_mode:
            body.append(None)
        previous_mode = mode
        ours = rows.get("bnfast")
        ok = ours is not None and ours["status"] == "ok"
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        time_cell = _check_cell(ours)
        if ok:
            time_cell = format_time(ours["median_s"])
            time_cell += "~" if ours["median_s"] > UNSTABLE * ours["min_s"] else " "
        cells = [mode, dtype, format_shape(shape), _size(nbytes), time_cell,
                 format_time(ours["mean_s"]) if ok else "-",
                 f"{ours['gbps']:.1f}" if ok and ours["gbps"] else "-",
                 f"{100 * ours['fraction_of_copy_bandwidth']:.0f}%"
                 if ok and ours["fraction_of_copy_bandwidth"] else "-"]
        cells += [_speedup_cell(rows.get(p)) for p in peers]
        cells += [_err_cell(ours), _check_cell(ours)]
        body.append(cells)

    widths = [max([len(t)] + [len(c[i]) for c in body if c is not None])
              for i, t in enumerate(titles)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [_header(doc), "", line(titles), line(["-" * w for w in widths])]
    out += ["" if c is None else line(c) for c in body]
    out += ["", f"bnfast: median time per call ('~': unstable, median > {UNSTABLE:g}x the fastest "
                "sample); mean: mean time per call, stalls included;",
            "GB/s: bytes that must move (eval 2, train 3, backward 5, backward_eval 4, "
            "fused_eval 3, fused_backward 6 x array size) / median time;",
            "%copy: that bandwidth relative to np.copyto of the same array (np.add with the addend "
            "for fused_eval);",
            f"{', '.join(_PEER_TITLES.get(p, p) for p in peers) or 'peers'}: "
            "peer time / bnfast time (median; >1: bnfast faster), '!' = that peer's result "
            "is WRONG;",
            "err: max abs error vs the float64 reference (bnfast.testing), divided by "
            "max(1, max|reference|); "
            "check: WRONG when err > " + ", ".join(f"{v:g} ({k})" for k, v in
                                                    doc["settings"]["tolerance"].items()) + "."]
    if doc["summary"]:
        out.append("")
        out.append("geometric-mean speedup of bnfast:")
        for mode, per_peer in doc["summary"].items():
            parts = [f"{_PEER_TITLES.get(p, p)} {v['geomean_speedup']:.2f}x ({v['cases']} cases)"
                     for p, v in per_peer.items()]
            out.append(f"  {mode:<14} " + ", ".join(parts))
    notes = list(doc["notes"])
    wrong = [r for r in doc["results"] if r["correct"] is False]
    for r in wrong:
        notes.append(f"WRONG: {r['impl']} {r['mode']} {r['dtype']} {format_shape(r['shape'])}: "
                     f"error {r['error']!r} > {r['tolerance']:g}"
                     + (f" ({r['note']})" if r["note"] else ""))
    seen = set()
    for r in doc["results"]:
        bnfast_missing = r["impl"] == "bnfast" and r["status"] == "unsupported"
        if r["status"] == "error" or bnfast_missing:
            key = (r["impl"], r["mode"], r["note"])
            if key not in seen:
                seen.add(key)
                notes.append(f"{r['impl']} {r['mode']}: {r['note']}")
    if doc["settings"]["outputs"] == "preallocated":
        allocating = sorted({(r["impl"], r["mode"]) for r in doc["results"]
                             if r["status"] == "ok" and r["allocates"]})
        for impl, mode in allocating:
            notes.append(f"{impl} {mode}: allocates its output on every call (no out= parameter)")
    if notes:
        out.append("")
        out += [f"note: {n}" for n in notes]
    return "\n".join(out)
