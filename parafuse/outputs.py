"""Writing the outputs of one run together or not at all.

Every output (images of a batch, the report) is rendered to bytes first, then written to a
temporary name beside its final one; only when all are written are they moved into place, with
SIGINT and SIGTERM held back for those few moves. A run that fails or is interrupted before
then leaves no output and no temporary file.

Without --overwrite a temporary file is hard-linked to its final name (`os.link` fails if the
name exists, so a file that appeared there while the run denoised is never replaced) and then
removed; a name taken meanwhile makes the run keep its output under a free sibling name
(`image.1.png`), which `commit` returns. With --overwrite it is renamed over the name. (A file
system without hard links refuses the commit with an error rather than risk a replacement.)
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


def commit(files: dict[str, bytes], overwrite: bool = True) -> dict[str, str]:
    """Write every (path: content) to a temporary file, then move them all into place. Without
    `overwrite`, a path that exists by then is kept: the output goes to a free sibling name.
    Returns {path: sibling} for those (empty when every output got its own name)."""
    written, moved = [], {}
    try:
        for path, data in files.items():
            tmp = temp_name(path)
            written.append(tmp)
            with open(tmp, "wb") as f:
                f.write(data)
        with no_exit(), signals_held():
            for path in files:
                if overwrite:
                    os.replace(temp_name(path), path)
                    continue
                final = link_free(temp_name(path), path)
                os.remove(temp_name(path))
                if final != path:
                    moved[path] = final
            written = []
    finally:
        for tmp in written:
            if os.path.exists(tmp):
                os.remove(tmp)
    return moved


def link_free(tmp: str, path: str) -> str:
    """Hard-link `tmp` to `path`, or, if that name exists, to the first free `stem.K.ext`."""
    stem, ext = os.path.splitext(path)
    for k in range(0, 1000):
        name = path if k == 0 else f"{stem}.{k}{ext}"
        try:
            os.link(tmp, name)
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"{path!r} and its siblings {stem}.1{ext} .. {stem}.999{ext} all exist")


def probe_folder(folder: str) -> str | None:
    """Create and remove a file in `folder`; None if it could, else why not (a folder can pass
    os.access and still refuse new files: a read-only mount, a full disk, an ACL)."""
    import tempfile
    try:
        fd, name = tempfile.mkstemp(prefix=".parafuse-probe-", dir=folder)
    except OSError as e:
        return f"a new file there is refused ({e.strerror or e})"
    os.close(fd)
    try:
        os.remove(name)
    except OSError as e:
        return f"a file created there cannot be removed ({e.strerror or e}); remove {name!r}"
    return None
