"""Report what was built: version, OpenMP, threads, compiler flags."""
import platform
import sys

import numpy as np

from . import _openmp

try:
    from ._build_info import BUILD_INFO
except ImportError:  # built by a tool that bypassed setup.py's build_ext
    BUILD_INFO = {"compile_args": [], "link_args": [], "openmp": None, "compiler": "",
                  "debug": False}


def openmp_enabled():
    """Return True if the compiled kernels use OpenMP."""
    return _openmp.openmp_enabled()


def config():
    """Return the build and run-time configuration as a dict."""
    from . import __version__
    return {
        "bnfast": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "openmp": openmp_enabled(),
        "max_threads": _openmp.max_threads(),
        "compile_args": list(BUILD_INFO.get("compile_args", [])),
        "link_args": list(BUILD_INFO.get("link_args", [])),
        "compiler": BUILD_INFO.get("compiler", ""),
        "debug_build": bool(BUILD_INFO.get("debug", False)),
    }


def show_config(file=None):
    """Print version, OpenMP on/off, max threads and compiler flags."""
    cfg = config()
    lines = [
        f"bnfast {cfg['bnfast']} (python {cfg['python']}, numpy {cfg['numpy']})",
        f"platform:      {cfg['platform']}",
        f"OpenMP:        {'enabled' if cfg['openmp'] else 'DISABLED (serial build)'}",
        f"max threads:   {cfg['max_threads']}",
        f"compile args:  {' '.join(cfg['compile_args'])}",
        f"link args:     {' '.join(cfg['link_args'])}",
        f"compiler:      {cfg['compiler']}",
    ]
    if cfg["debug_build"]:
        lines.append("debug build:   bounds checks ON, -O0")
    print("\n".join(lines), file=file or sys.stdout)
