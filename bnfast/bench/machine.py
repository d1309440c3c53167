"""Facts about the machine and the software a benchmark ran on."""
import os
import platform
import subprocess
import sys

import numpy as np

__all__ = ["machine_info", "package_version"]


def _cpu_name():
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    elif sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info():
    """Return ``{"cpu", "cores", "usable_cores", "platform", "load_average"}``.

    ``cores`` is ``os.cpu_count()`` (logical CPUs); ``usable_cores`` the CPUs
    this process may run on (its affinity mask); ``load_average`` the 1, 5
    and 15 minute load at the start (None where the OS has none): other work
    on the machine makes timings noisy.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "load_average": load,
    }


def package_version(name):
    """Installed version of a distribution, or None (does not import it)."""
    if name == "numpy":
        return np.__version__
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return version(name)
    except PackageNotFoundError:
        return None
