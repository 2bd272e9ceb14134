"""Shared by the benchmark scripts: hardware and provenance, and the table / JSON / plot outputs.

Provenance: every results JSON written through `write_json` carries `provenance` - the commit and
whether the tree differed from it (results under benchmarks/results/ aside), the device, the
driver / CUDA / torch / Triton / NCCL versions and the exact command. On a machine whose copy of
the tree has no git (a lent GPU), the commit comes from the stamp written before the copy:

    python benchmarks/common.py stamp        # writes benchmarks/stamp.json: commit and dirty state
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from parafuse.report import device_name  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STAMP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stamp.json")
ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "TRITON_INTERPRET", "NCCL_ALGO", "NCCL_PROTO",
            "NCCL_MAX_NCHANNELS", "PYTHONPATH")


def hardware() -> dict:
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {"device": device_name(dev), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> dict | None:
    """{commit, dirty, dirty_paths}: HEAD and the tracked or untracked files that differ from it,
    results and the stamp aside (a run's own outputs do not make its code dirty). None without git."""
    commit = (_git("rev-parse", "HEAD") or "").strip()
    if not commit:
        return None
    status = _git("status", "--porcelain", "--untracked-files=all") or ""
    paths = [line[3:] for line in status.splitlines() if line.strip()]
    dirty = [p for p in paths if not p.startswith("benchmarks/results/") and p != "benchmarks/stamp.json"]
    return {"commit": commit, "dirty": bool(dirty), "dirty_paths": dirty[:20]}


def stamp() -> dict:
    """Write benchmarks/stamp.json (the commit and dirty state now), for a copy of the tree without git."""
    state = git_state()
    if state is None:
        raise SystemExit("no git here: stamp the tree where it is a checkout, before copying it")
    state["stamped_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(STAMP, "w") as f:
        json.dump(state, f, indent=2)
    return state


def versions() -> dict:
    """Driver, CUDA, torch, Triton and NCCL versions (None where absent)."""
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "driver": None, "nccl": None, "triton": None}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError):
            pass
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True)
            out["driver"] = smi.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return out


def command_line(argv: list[str] | None = None) -> str:
    """The exact command: `python` and this process's arguments (or `argv` after the script)."""
    args = sys.argv if argv is None else [sys.argv[0], *argv]
    script = os.path.relpath(os.path.abspath(args[0]), ROOT) if args and args[0] else "python"
    return "python " + shlex.join([script, *args[1:]])


def provenance(argv: list[str] | None = None) -> dict:
    """Where a result comes from: commit (git, else the stamp), dirty state, device, versions, command."""
    state = git_state()
    source = "git"
    if state is None and os.path.exists(STAMP):
        state, source = json.load(open(STAMP)), "stamp"
    elif state is None:
        state, source = {"commit": None, "dirty": None}, "unknown"
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {"commit": state.get("commit"), "dirty": state.get("dirty"), "dirty_paths": state.get("dirty_paths", []),
            "commit_source": source, "device": device_name(dev), **versions(), "command": command_line(argv),
            "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table of `rows` with (key, header) columns."""
    def fmt(v):
        if isinstance(v, float):
            return "inf" if v == float("inf") else f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(name: str, data: dict, provenance_: dict | None = None) -> str:
    """Write `data` under benchmarks/results/ (or at `name` if absolute), stamped with its
    provenance: `provenance_` (taken when the run began), else now."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    data = {"provenance": provenance_ or data.get("provenance") or provenance(), **data}
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["stamp"]:
        raise SystemExit("usage: python benchmarks/common.py stamp")
    print(json.dumps(stamp(), indent=2))
