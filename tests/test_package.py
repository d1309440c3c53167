"""The package as a user meets it: an unbuilt source tree explains itself."""
import pathlib
import shutil
import subprocess
import sys

import bnfast

PACKAGE = pathlib.Path(bnfast.__file__).parent


def test_unbuilt_source_tree_says_how_to_build(tmp_path):
    # The sources without any compiled module, as a fresh clone is: importing
    # them (e.g. `python -m bnfast` from the repository root) must say what to
    # do, not report a circular import.
    shutil.copytree(PACKAGE, tmp_path / "bnfast",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    # -S: no site-packages, so an editable install cannot supply the modules.
    result = subprocess.run([sys.executable, "-S", "-c", "import bnfast"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "bnfast is not built: run `pip install -e .`" in result.stderr
    assert "circular import" not in result.stderr


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "bnfast", "config"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "OpenMP" in result.stdout
