"""The benchmarks' one harness: every script in benchmarks/ builds its command line, its runs, its
timings and its result file here.

- `parser` and the `add_*` groups: one definition of each shared flag (`--name`, `--seeds`,
  `--repeat`/`--timing-warmup`, `--device`/`--dtype`, and the run flags `--model(s)`, `--size(s)`,
  `--steps`, `--ranks`, `--mode(s)`, `--warmup(s)`, `--portion(s)`, `--solver`);
- `patch_config`: the `PatchConfig` of a run (a mode, with `+sign` for the K/V codec, its warmup and
  window), so that every parallel run is built from the one config the library runs on;
- `time_calls`: the one timer (CUDA events per call, or CUDA-graph replay; perf_counter on CPU):
  warm-up calls, then `repeat` timed calls, their median, min/max, quartiles and count;
- `write_result`: the one result schema, `parafuse.bench/1` - {schema, benchmark, provenance,
  hardware, config (the arguments), rows, ...the script's own extras} - written atomically (a run
  that fails leaves no half-written file), its plot beside it (`save_plot`);
- `read_result`: any committed result, of this schema or of the layouts written before it (their
  `args` as `config`, their `command` and device in `provenance`), for report.py and manifest.py.

Provenance: every result written through `write_result` carries `provenance` - the commit and
whether the tree differed from it (results under benchmarks/results/ aside), the device, the
driver / CUDA / torch / Triton / NCCL versions and the exact command. On a machine whose copy of
the tree has no git (a lent GPU), the commit comes from the stamp written before the copy:

    python benchmarks/common.py stamp        # writes benchmarks/stamp.json: commit and dirty state
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
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


def code_state() -> tuple[dict, str]:
    """(the code a result here would come from: {commit, dirty, dirty_paths}, its source): git, else
    the stamp, else unknown (commit None)."""
    state = git_state()
    if state is not None:
        return state, "git"
    if os.path.exists(STAMP):
        with open(STAMP) as f:
            return json.load(f), "stamp"
    return {"commit": None, "dirty": None}, "unknown"


def same_code(prov: dict | None, state: dict) -> bool:
    """Whether a result's provenance is of the code `state` describes: the same known commit, and the
    same dirty files where either tree was dirty (a rerun may skip what such a result measured)."""
    prov = prov or {}
    return (state.get("commit") is not None and prov.get("commit") == state["commit"]
            and bool(prov.get("dirty")) == bool(state.get("dirty"))
            and sorted(prov.get("dirty_paths") or []) == sorted(state.get("dirty_paths") or []))


def provenance(argv: list[str] | None = None) -> dict:
    """Where a result comes from: commit (git, else the stamp), dirty state, device, versions, command."""
    state, source = code_state()
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


SCHEMA = "parafuse.bench/1"
LEGACY = "legacy"          # a result written before SCHEMA (read_result reads it into the same keys)
HERE = os.path.dirname(os.path.abspath(__file__))
NOT_BENCHMARKS = ("common.py", "manifest.py", "swd.py")   # the harness, the manifest, a metric module


# ---- the command line ---------------------------------------------------------------------------------
def parser(doc: str, name: str | None = None, **kw) -> argparse.ArgumentParser:
    """A benchmark's parser: its description is the docstring's first paragraph; with `name`,
    `--name` (the result's name, benchmarks/results/NAME.json and NAME.png; a path: written there)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0], **kw)
    if name is not None:
        p.add_argument("--name", default=name, help="result name: benchmarks/results/NAME.json and .png (a path "
                                                    "with a folder: written there) (default: %(default)s)")
    return p


def add_seeds(p: argparse.ArgumentParser, default) -> None:
    """--seeds: a list of noise seeds, or (an int default) how many, 0..N-1."""
    if isinstance(default, int):
        p.add_argument("--seeds", type=int, default=default,
                       help="how many seeds: 0, 1, ..., N-1 (default: %(default)s)")
    else:
        p.add_argument("--seeds", nargs="+", type=int, default=list(default), help="noise seeds (default: %(default)s)")


def add_timing(p: argparse.ArgumentParser, repeat: int = 5, warmup: int | None = 2) -> None:
    """--repeat (timed calls of each measured thing) and --timing-warmup (untimed calls before them;
    warmup None: no such flag, where the script's own first call is the warm-up)."""
    g = p.add_argument_group("timing (common.time_calls)")
    g.add_argument("--repeat", type=int, default=repeat, help="timed calls per measurement (default: %(default)s)")
    if warmup is not None:
        g.add_argument("--timing-warmup", type=int, default=warmup,
                       help="untimed calls before them (compilation, autotuning, caches) (default: %(default)s)")


def add_device(p: argparse.ArgumentParser, device: str | None = None, dtype: bool = True) -> None:
    """--device (default: cuda where there is one, else cpu) and, with `dtype`, --dtype (add_dtype)."""
    p.add_argument("--device", default=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                   help="torch device (default: %(default)s)")
    if dtype:
        add_dtype(p)


def add_dtype(p: argparse.ArgumentParser, default: str | None = None,
              help: str = "compute dtype (PatchConfig.dtype)") -> None:
    """--dtype fp32 | bf16 | fp16 (default None: bf16 on CUDA, fp32 on CPU)."""
    p.add_argument("--dtype", default=default, choices=("fp32", "bf16", "fp16"),
                   help=help + (" (default: %(default)s)" if default else " (default: bf16 on CUDA, fp32 on CPU)"))


RUN_FLAGS = {     # the run flags the scripts share: type and help (a list default makes the flag take several)
    "model": (str, "built-in model (parafuse.models)"), "models": (str, "built-in models (parafuse.models)"),
    "size": (int, "image side in pixels"), "sizes": (int, "image sides in pixels"),
    "steps": (int, "denoising steps"), "ranks": (int, "strip counts N"),
    "mode": (str, "patch exchange (PatchConfig.mode)"),
    "modes": (str, "patch exchanges (PatchConfig.mode; MODE+sign: with --kv-codec sign)"),
    "warmup": (int, "synchronous first steps (PatchConfig.warmup_steps)"),
    "warmups": (int, "synchronous first steps swept (PatchConfig.warmup_steps)"),
    "portion": (float, "partial's window (PatchConfig.halo_portion)"),
    "portions": (float, "partial's windows swept (PatchConfig.halo_portion)"),
    "solver": (str, "solver (parafuse.solvers)"),
}


def add_run(p: argparse.ArgumentParser, **defaults) -> None:
    """The run flags named (RUN_FLAGS), each with the script's default; a list default takes several values."""
    g = p.add_argument_group("run (PatchConfig)")
    for key, default in defaults.items():
        kind, text = RUN_FLAGS[key]
        several = isinstance(default, (list, tuple))
        g.add_argument("--" + key, type=kind, nargs="+" if several else None,
                       default=list(default) if several else default, help=f"{text} (default: %(default)s)")


def config_of(args: argparse.Namespace) -> dict:
    """The arguments as the result's `config` (what JSON can hold; anything else as its str)."""
    return json.loads(json.dumps(vars(args), default=str))


# ---- the runs -------------------------------------------------------------------------------------------
def patch_config(mode: str | None = None, warmup: int | None = None, portion: float | None = None, **settings):
    """The PatchConfig of a benchmark's run: `mode` (default: the library's; `MODE+sign`: with the
    one-bit K/V codec), its synchronous warmup steps (default: the library's), and `portion` as the
    window where the mode has one (a swept portion is ignored by the modes without a window, instead
    of refused); any other PatchConfig setting by keyword (a serial run: `patch_config(dtype=...)`)."""
    from parafuse.parallel.config import DEFAULT_MODE, DEFAULT_WARMUP_STEPS, PatchConfig

    mode, _, codec = str(mode or DEFAULT_MODE).partition("+")
    windowed = PatchConfig(mode=mode).windowed
    kv_codec = codec or settings.pop("kv_codec", "none")
    settings.pop("kv_codec", None)
    return PatchConfig(mode=mode, warmup_steps=DEFAULT_WARMUP_STEPS if warmup is None else warmup,
                       halo_portion=portion if windowed else None, kv_codec=kv_codec, **settings)


def config_flags(config) -> list[str]:
    """The `parafuse.generate` flags of `config`'s settings that differ from the defaults: a torchrun
    run built from the same PatchConfig as an in-process one."""
    from parafuse.parallel.config import FIELDS, defaults

    out, base = [], defaults()
    for name, f in FIELDS.items():
        value = getattr(config, name)
        if value == base[name] or value is None or name in config._filled:   # filled: the mode's own default
            continue
        if f.kind is bool:      # store_true, or --X / --no-X where the default is None (the device's)
            out.append(f.option(name) if value else "--no-" + f.option(name)[2:])
        else:
            out += [f.option(name), str(getattr(value, "value", value))]
    return out


# ---- timing ---------------------------------------------------------------------------------------------
def time_calls(fn, device="cpu", repeat: int = 5, warmup: int = 2, max_seconds: float | None = None,
               replay: bool = False) -> dict:
    """Time `fn()`: `warmup` untimed calls, then `repeat` timed ones (fewer only past `max_seconds`).
    CPU: perf_counter around each call. CUDA: events around each call (no synchronisation per call
    beyond the one that reads them), the host's time to issue it beside; with `replay`, back-to-back
    calls (about 2 ms of work) captured in one CUDA graph and each replay timed, per call (eager
    back-to-back launches where the capture fails). Returns `timing_stats` of the calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    if cuda and replay:
        return _replayed(fn, device, repeat)
    times, host, begin = [], [], time.perf_counter()
    for _ in range(max(1, repeat)):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if max_seconds is not None and time.perf_counter() - begin > max_seconds:
            break
    return timing_stats(times, host or None, 1, "cuda-events" if cuda else "perf_counter")


def _replayed(fn, device, repeat: int) -> dict:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(3):
        fn()
    b.record()
    b.synchronize()
    inner = max(1, min(50, round(2.0 / (a.elapsed_time(b) / 3))))
    method, graph = "cuda-graph", torch.cuda.CUDAGraph()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        run = graph.replay
    except RuntimeError:                  # a backend that cannot be captured: back-to-back launches
        torch.cuda.synchronize(device)
        method = "cuda-events"

        def run():
            for _ in range(inner):
                fn()
    run()
    times = []
    for _ in range(max(1, repeat)):
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000 / inner)
    return timing_stats(times, None, inner, method)


def timing_stats(times: list[float], host: list[float] | None = None, inner: int = 1,
                 method: str = "perf_counter") -> dict:
    """Seconds per call: median, min, max, quartiles, spread ((max - min) / median) and the count;
    `host_seconds`: the median time to issue a call (CUDA; on CPU the call itself)."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    med = statistics.median(times)
    return {"seconds": med, "seconds_min": min(times), "seconds_max": max(times), "seconds_p25": q[0],
            "seconds_p75": q[2], "spread": (max(times) - min(times)) / med if med else 0.0, "count": len(times),
            "inner": inner, "timing": method, "host_seconds": statistics.median(host) if host else med}


def median_seconds(fn, device="cpu", repeat: int = 5, warmup: int = 2, **kw) -> float:
    """The median seconds of `time_calls`."""
    return time_calls(fn, device, repeat, warmup, **kw)["seconds"]


# ---- results --------------------------------------------------------------------------------------------
def result_path(name: str, ext: str = ".json") -> str:
    """benchmarks/results/NAME.ext (NAME with a folder, or absolute: there); a NAME ending in .json or
    .png has it replaced (a result's plot: result_path("x.json", ".png") is x.png)."""
    stem = os.path.splitext(name)[0] if name.endswith((".json", ".png")) else name
    return os.path.join(RESULTS, stem + ext)


def write_atomic(path: str, write) -> str:
    """`write(tmp_path)`, then rename onto `path`: a reader never sees half a file, a failure leaves none."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(folder, f".{stem}.{os.getpid()}.tmp{ext}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_result(name: str, benchmark: str, config: dict, rows: list, provenance_: dict | None = None,
                 hardware_: dict | None = None, **extras) -> str:
    """Write the result `name` (result_path) in the one schema: {schema, benchmark, provenance (taken
    when the run began, else now), hardware, config, rows, **extras}. Returns its path."""
    data = {"schema": SCHEMA, "benchmark": benchmark, "provenance": provenance_ or provenance(),
            "hardware": hardware_ or hardware(), "config": config, "rows": rows, **extras}
    text = json.dumps(data, indent=2, default=str)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return write_atomic(result_path(name), write)


def rewrite_result(path: str, res: dict) -> str:
    """Write back a result read by `read_result` and changed (a --reproject): in the schema, a legacy
    one's keys as read_result gave them."""
    keys = ("schema", "benchmark", "config", "rows", "provenance", "hardware")
    return write_result(path, res["benchmark"], res["config"], res["rows"], res["provenance"], res["hardware"],
                        **{k: v for k, v in res.items() if k not in keys})


def save_plot(fig, name: str, dpi: int = 100) -> str:
    """Save `fig` beside the result `name` (NAME.png; a name ending in .png is kept), atomically."""
    return write_atomic(result_path(name, ".png"), lambda tmp: fig.savefig(tmp, dpi=dpi))


def benchmarks() -> list[str]:
    """The benchmark scripts' names (benchmarks/NAME.py), longest first."""
    names = [f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and f not in NOT_BENCHMARKS]
    return sorted(names, key=len, reverse=True)


def benchmark_of(filename: str) -> str | None:
    """The benchmark whose result `filename` is: the longest script name it starts with."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    return next((s for s in benchmarks() if stem == s or stem.startswith(s + "_")), None)


def read_result(path: str) -> dict:
    """A result file as the one schema. A result written before it (LEGACY) is read into the same
    keys: `args` becomes `config`; `provenance` is its own stamp where it has one, with the
    top-level `command` and the device (hardware's, else its `target`) filled in where missing;
    every other key is kept as it is (a legacy `config` beside `args` as `model_config`; peers.py's
    `measured` and `counted` lists, whose rows say which they are, and project.py's `projections`,
    as `rows`)."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a result is a JSON object, this is a {type(data).__name__}")
    if data.get("schema") == SCHEMA:
        return data
    extras = {k: v for k, v in data.items() if k not in ("provenance", "hardware", "args", "rows")}
    if "args" in data and "config" in data:
        extras["model_config"] = extras.pop("config")
    rows = data.get("rows", [])
    if "rows" not in data and "measured" in data and "counted" in data:    # peers.py's: two lists of rows
        rows = extras.pop("measured") + extras.pop("counted")
    elif "rows" not in data and "projections" in data:                      # project.py's
        rows = extras.pop("projections")
    hw = data.get("hardware") if isinstance(data.get("hardware"), dict) else {}
    prov = dict(data.get("provenance") or {})
    command = data.get("command")
    prov.setdefault("command", command if isinstance(command, str) else None)
    prov.setdefault("device", hw.get("device") or hw.get("cpu") or data.get("target"))
    prov.setdefault("commit", None)
    prov.setdefault("dirty", None)
    return {**extras, "schema": LEGACY, "benchmark": benchmark_of(path), "provenance": prov, "hardware": hw,
            "config": data.get("args") if "args" in data else data.get("config", {}), "rows": rows}


def read_results(pattern: str, folder: str = RESULTS) -> list[tuple[str, dict]]:
    """(path, read_result) of each result under `folder` matching the glob `pattern`, sorted by path."""
    import glob
    return [(p, read_result(p)) for p in sorted(glob.glob(os.path.join(folder, pattern)))]


if __name__ == "__main__":
    if sys.argv[1:] != ["stamp"]:
        raise SystemExit("usage: python benchmarks/common.py stamp")
    print(json.dumps(stamp(), indent=2))
