"""Writing the outputs of one run together or not at all.

Every output (images of a batch, the report) is rendered to bytes first, then written to a
temporary name beside its final one; only when all are written are they renamed into place, with
SIGINT and SIGTERM held back for those few renames. A run that fails or is interrupted before
then leaves no output and no temporary file.
"""
from __future__ import annotations

import os
import signal

from parafuse.watchdog import no_exit


def temp_name(path: str) -> str:
    """`path` with a suffix of at most `checks.TEMP_SUFFIX_LEN` characters, unique to this process."""
    return f"{path}.{os.getpid() % 10**9}.partial"


class signals_held:
    """SIGINT and SIGTERM arriving inside the block are delivered when it ends (main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.pending: list[int] = []
        self.old = {s: signal.signal(s, lambda n, frame: self.pending.append(n)) for s in self.SIGNALS}

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        for n in self.pending:
            signal.raise_signal(n)
        return False


def commit(files: dict[str, bytes]) -> None:
    """Write every (path: content) to a temporary file, then rename them all into place."""
    written = []
    try:
        for path, data in files.items():
            tmp = temp_name(path)
            written.append(tmp)
            with open(tmp, "wb") as f:
                f.write(data)
        with no_exit(), signals_held():
            for path in files:
                os.replace(temp_name(path), path)
            written = []
    finally:
        for tmp in written:
            if os.path.exists(tmp):
                os.remove(tmp)
