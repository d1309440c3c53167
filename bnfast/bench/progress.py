"""A progress bar on stderr: tqdm when installed, a plain counter otherwise."""
import sys

__all__ = ["progress"]


class _Plain:
    """Fallback: ``[ 3/40] eval float32 8x64x56x56: torch`` on one rewritten line (a TTY),
    or one line per case (a log file)."""

    def __init__(self, total, stream):
        self.total, self.n, self.stream = total, 0, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._last_case = None

    def update(self, case_label, impl_name):
        self.n += 1
        width = len(str(self.total))
        if self.tty:
            line = f"[{self.n:{width}d}/{self.total}] {case_label}: {impl_name}"
            self.stream.write("\r" + line[:78].ljust(78))
        elif case_label != self._last_case:
            self.stream.write(f"[{self.n:{width}d}/{self.total}] {case_label}\n")
            self._last_case = case_label
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()


class _Tqdm:
    def __init__(self, total, stream, tqdm):
        self.bar = tqdm(total=total, file=stream, unit="run", leave=False, dynamic_ncols=True)

    def update(self, case_label, impl_name):
        self.bar.set_description_str(f"{case_label}: {impl_name}", refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()


class _Silent:
    def update(self, case_label, impl_name):
        pass

    def close(self):
        pass


def progress(total, enabled=True, stream=None):
    """Return a bar with ``update(case_label, impl_name)`` (one step) and ``close()``."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Plain(total, stream)
    return _Tqdm(total, stream, tqdm)
