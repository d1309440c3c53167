"""``python -m bnfast``: the bench command end to end, its JSON, plot, peers and errors.

Every run here is tiny (a few small shapes, ``--repeat 2``); nothing asserts
on timings.
"""
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import bnfast
from bnfast.__main__ import main
from bnfast.bench import schema
from bnfast.bench.check import compare
from bnfast.bench.progress import progress
from bnfast.bench.suite import MODES, parse_shapes
from bnfast.bench.timing import TimingPolicy, measure

TINY = ["--shapes", "4x3x5x5,16x8", "--repeat", "2", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(tmp_path, *args):
    """Run ``bench`` in-process with ``args``; return (exit code, document)."""
    path = tmp_path / "bench.json"
    code = main(["bench", *TINY, "--json", str(path), *args])
    return code, json.loads(path.read_text())


def rows(doc, **match):
    return [r for r in doc["results"] if all(r[k] == v for k, v in match.items())]


# --- the command line ------------------------------------------------------

def test_no_subcommand_prints_short_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "bench" in out and "config" in out


def test_config_subcommand_shows_build(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "OpenMP" in out and bnfast.__version__ in out


def test_quick_end_to_end_json_follows_documented_keys(tmp_path, capsys):
    code, doc = run_json(tmp_path, "--quick", "--dtypes", "float32,float64")
    assert code == 0
    out = capsys.readouterr().out
    assert "eval" in out and "GB/s" in out and "check" in out
    assert schema.validate(doc) == []
    assert doc["settings"]["quick"] is True
    assert doc["settings"]["shapes"] == [[4, 3, 5, 5], [16, 8]]
    assert doc["build"] == bnfast._config.config()
    # every (mode, dtype, shape) has a copy roofline and a bnfast row
    n_cases = len(MODES) * 2 * 2
    assert len(rows(doc, impl="copy", status="ok")) == n_cases
    assert len(rows(doc, impl="bnfast")) == n_cases
    for r in rows(doc, impl="bnfast", status="ok"):
        assert r["correct"] is True, r
        assert r["gbps"] > 0 and r["fraction_of_copy_bandwidth"] > 0
        assert math.isclose(r["bnfast_speedup"], 1.0)
    for r in rows(doc, impl="numpy", status="ok"):
        assert r["correct"] is True, r


def test_half_precision_against_torch_in_the_same_dtype(tmp_path, capsys):
    pytest.importorskip("torch")
    code, doc = run_json(tmp_path, "--dtypes", "f16,bf16", "--peers", "all")
    assert code == 0, capsys.readouterr().out
    assert doc["settings"]["dtypes"] == ["float16", "bfloat16"]
    assert schema.validate(doc) == []
    n_cases = len(MODES) * 2 * 2
    assert len(rows(doc, impl="copy", status="ok")) == n_cases
    assert len(rows(doc, impl="bnfast", status="ok")) == n_cases
    for impl in ("bnfast", "torch"):
        for r in rows(doc, impl=impl, status="ok"):
            assert r["correct"] is True, r
    assert len(rows(doc, impl="torch", status="ok")) == n_cases
    # ONNX Runtime where it has the kernel (float16), a clean note where not.
    assert {r["dtype"] for r in rows(doc, impl="onnxruntime", status="ok")} == {"float16"}
    for r in rows(doc, impl="onnxruntime", dtype="bfloat16", mode="eval"):
        assert r["status"] == "unsupported" and "bfloat16" in r["note"]
    assert all(r["status"] == "unsupported" for r in rows(doc, impl="numpy"))
    # Half the bytes of float32: the bandwidth column counts 2-byte values.
    r = rows(doc, impl="bnfast", mode="eval", dtype="bfloat16", shape=[16, 8])[0]
    assert r["bytes_moved"] == 2 * 16 * 8 * 2


def test_allocate_outputs_mode_times_allocating_calls(tmp_path):
    code, doc = run_json(tmp_path, "--modes", "eval,train,fused_eval", "--outputs", "allocate")
    assert code == 0
    assert doc["settings"]["outputs"] == "allocate"
    timed = [r for r in doc["results"] if r["status"] == "ok" and r["impl"] != "copy"]
    assert timed and all(r["allocates"] and r["correct"] for r in timed)


def test_schema_keys_are_read_from_its_docstring():
    assert set(schema.KEYS) == {"Top level", "Machine", "Versions", "Settings", "Each result"}
    assert "mean_s" in schema.KEYS["Each result"] and "python" in schema.KEYS["Versions"]
    assert "neighbours" in schema.KEYS["Top level"] and "busy" in schema.KEYS["Settings"]


def test_json_to_stdout_is_parseable(capsys):
    assert main(["bench", *TINY, "--modes", "eval", "--peers", "none", "--json", "-"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert schema.validate(doc) == []
    assert "GB/s" in captured.err  # the table moves to stderr


def test_backward_modes_run_and_are_correct(tmp_path):
    code, doc = run_json(tmp_path, "--modes", "backward,backward_eval,fused_backward",
                         "--peers", "numpy")
    assert code == 0
    ours = rows(doc, impl="bnfast")
    assert len(ours) == 3 * 2 * 2 and all(r["status"] == "ok" and r["correct"] for r in ours), ours
    assert all(r["correct"] for r in rows(doc, impl="numpy", mode="backward"))
    assert {r["status"] for r in rows(doc, impl="numpy", mode="fused_backward")} == {"unsupported"}


def test_busy_runs_neighbour_processes_during_the_measurement(tmp_path, capsys):
    import multiprocessing
    code, doc = run_json(tmp_path, "--quick", "--busy", "2", "--modes", "eval", "--peers", "none")
    assert code == 0
    assert schema.validate(doc) == []
    assert doc["settings"]["busy"] == 2
    n = doc["neighbours"]
    assert n["processes"] == 2 and len(n["calls"]) == 2 and all(c > 0 for c in n["calls"])
    assert "busy: 2 neighbour process(es) running bnfast" in capsys.readouterr().out
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("bnfast-busy")]
    for r in rows(doc, status="ok"):
        assert r["mean_s"] > 0 and r["median_s"] > 0
        assert min(r["times_s"]) <= r["mean_s"] <= max(r["times_s"])


def test_quiet_run_has_no_neighbours(tmp_path):
    code, doc = run_json(tmp_path, "--modes", "eval", "--peers", "none")
    assert code == 0
    assert doc["settings"]["busy"] == 0 and doc["neighbours"] is None


# --- peers -----------------------------------------------------------------

def test_torch_and_onnxruntime_peers_are_correct_when_installed(tmp_path):
    code, doc = run_json(tmp_path, "--modes", "eval,train,backward,fused_eval",
                         "--dtypes", "float32,float64")
    assert code == 0
    for peer in ("torch", "onnxruntime"):
        if peer in doc["unavailable"]:
            continue
        ran = rows(doc, impl=peer, status="ok")
        assert ran, peer
        assert all(r["correct"] for r in ran), [r for r in ran if not r["correct"]]
    for r in rows(doc, impl="onnxruntime"):
        if r["mode"] in ("train", "backward"):
            assert r["status"] == "unsupported"


def test_missing_peers_are_reported_not_crashed_on(tmp_path):
    path = tmp_path / "bench.json"
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['onnxruntime'] = None\n"
        "sys.modules['tqdm'] = None\n"
        "from bnfast.__main__ import main\n"
        f"sys.exit(main(['bench', '--quick', *{TINY!r}, '--json', {str(path)!r}]))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "torch: skipped" in proc.stdout and "onnxruntime: skipped" in proc.stdout
    assert "pip install 'bnfast[onnx]'" in proc.stdout  # names the extra to install
    doc = json.loads(path.read_text())
    assert schema.validate(doc) == []
    assert set(doc["unavailable"]) == {"torch", "onnxruntime"}
    assert doc["versions"]["torch"] is None
    assert {r["impl"] for r in doc["results"]} == {"copy", "bnfast", "numpy"}


def test_peer_that_raises_is_an_error_row_not_a_crash(tmp_path, monkeypatch):
    from bnfast.bench import impl_numpy

    def broken(self, case, inputs):
        raise RuntimeError("boom")

    monkeypatch.setattr(impl_numpy.NumpyPeer, "prepare", broken)
    code, doc = run_json(tmp_path, "--modes", "eval", "--peers", "numpy")
    assert code == 0
    assert all(r["status"] == "error" and "boom" in r["note"] for r in rows(doc, impl="numpy"))


def test_bnfast_that_raises_fails_the_run(tmp_path, monkeypatch):
    # CI runs `bnfast bench --quick`: a kernel that raises must not pass as exit 0.
    from bnfast.bench import impl_bnfast

    def broken(*args, **kwargs):
        raise RuntimeError("kernel crashed")

    monkeypatch.setattr(impl_bnfast.bnfast, "batch_norm", broken)
    code, doc = run_json(tmp_path, "--modes", "eval", "--peers", "none")
    assert code == 1
    assert all(r["status"] == "error" for r in rows(doc, impl="bnfast"))


def test_fast_wrong_answer_shows_as_wrong(tmp_path, capsys, monkeypatch):
    from bnfast.bench import impl_bnfast

    real = bnfast.batch_norm

    def off_by_a_little(*args, **kwargs):
        y = real(*args, **kwargs)
        y += y.dtype.type(1e-3)
        return y

    monkeypatch.setattr(impl_bnfast.bnfast, "batch_norm", off_by_a_little)
    code, doc = run_json(tmp_path, "--modes", "eval", "--peers", "none")
    assert code == 1
    assert "WRONG" in capsys.readouterr().out
    assert all(r["correct"] is False for r in rows(doc, impl="bnfast"))


# --- threads ---------------------------------------------------------------

def test_threads_option_applies_to_every_implementation(tmp_path):
    before = None
    try:
        import torch
        before = torch.get_num_threads()
    except ImportError:
        torch = None
    code, doc = run_json(tmp_path, "--modes", "eval", "--threads", "1")
    assert code == 0
    assert doc["settings"]["threads"] == 1
    assert doc["threads"]["bnfast"] == 1
    for peer in ("torch", "onnxruntime"):
        if peer not in doc["unavailable"]:
            assert doc["threads"][peer] == 1
    if torch is not None:
        assert torch.get_num_threads() == before  # restored after the run


# --- plot ------------------------------------------------------------------

def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "speedup.png"
    assert main(["bench", *TINY, "--modes", "eval,fused_eval", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_plot_without_matplotlib_is_a_clean_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exc:
        main(["bench", *TINY, "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_output_paths_are_checked_before_the_run(tmp_path, option, capsys):
    if option == "--plot":
        pytest.importorskip("matplotlib")
    bad = [str(tmp_path)]  # a directory
    if option == "--plot":
        bad.append(str(tmp_path / "speedup.xyz"))  # a format matplotlib does not write
    for path in bad:
        with pytest.raises(SystemExit) as exc:
            main(["bench", *TINY, option, path])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and ("is a directory" in err or "format 'xyz'" in err)


# --- argument errors -------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--shapes", "32x"], "bad shape"),
    (["--shapes", "axb"], "bad shape"),
    (["--shapes", "32"], "at least 2 dimensions"),
    (["--shapes", "0x3"], "positive"),
    (["--shapes", ","], "no shapes"),
    (["--modes", "inference"], "unknown mode"),
    (["--dtypes", "float8"], "unknown dtype"),
    (["--peers", "jax"], "unknown peer"),
    (["--threads", "0"], "positive integer"),
    (["--repeat", "two"], "positive integer"),
    (["--busy", "-1"], "non-negative integer"),
    (["--threads", "100000"], "at most 65536"),
    (["--min-time", "inf"], "positive number"),
    (["--min-time", "nan"], "positive number"),
    (["--shapes", "1000000x1000000"], "more than this machine's"),
    (["--shapes", "x".join(["2"] * 65)], "at most 64 dimensions"),
])
def test_bad_arguments_give_a_clean_argparse_error(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_module_runs_as_a_script():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bnfast", "bench", "--shapes", "3x4x5",
                           "--modes", "eval", "--dtypes", "float32", "--peers", "numpy",
                           "--repeat", "1"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0
    proc = subprocess.run([sys.executable, "-m", "bnfast", "bench", "--shapes", "3x"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 2 and "bad shape" in proc.stderr


# --- building blocks -------------------------------------------------------

def test_parse_shapes_accepts_the_documented_syntax():
    assert parse_shapes("32x64x112x112, 256X1024") == ((32, 64, 112, 112), (256, 1024))


def test_compare_flags_nan_missing_and_misshaped_outputs():
    ref = {"y": np.ones((2, 3))}
    assert compare({"y": np.ones((2, 3), np.float32)}, ref, "float32")["correct"]
    nan = np.ones((2, 3))
    nan[0, 0] = np.nan
    assert compare({"y": nan}, ref, "float64")["correct"] is False
    assert compare({}, ref, "float64")["correct"] is False
    assert compare({"y": np.ones(6)}, ref, "float64")["correct"] is False
    assert compare({"y": np.ones((2, 3)) + 1e-3}, ref, "float32")["correct"] is False


def test_measure_takes_the_requested_samples():
    calls = []
    timing = measure(lambda: calls.append(1), TimingPolicy(repeat=3))
    assert len(timing.times) == 3 and timing.median > 0
    assert len(calls) >= 3 * timing.number


def test_progress_falls_back_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    stream = io.StringIO()
    bar = progress(2, stream=stream)
    bar.update("eval float32 2x3", "bnfast")
    bar.update("eval float32 2x3", "numpy")
    bar.close()
    assert "[1/2] eval float32 2x3" in stream.getvalue()


def test_onnx_model_passes_the_onnx_checker():
    onnx = pytest.importorskip("onnx")
    from bnfast.bench.impl_onnxruntime import batch_norm_model
    p = np.ones(3, np.float32)
    for fused in (False, True):
        model = onnx.load_from_string(
            batch_norm_model((2, 3, 4), np.float32, p, p, p, p, 1e-5, fused))
        onnx.checker.check_model(model, full_check=True)


def test_import_bnfast_does_not_import_torch():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("import sys, bnfast, bnfast.__main__; "
            "print('torch' in sys.modules, 'onnxruntime' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)
    assert proc.stdout.split() == ["False", "False"], proc.stderr
