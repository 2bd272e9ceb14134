"""One lent GPU session's work as a priority-ordered list of steps, each with a time budget, each
skipped when its result for this commit already exists: the same command, run again, continues
where the last one stopped. Started by benchmarks/gpu_session.sh (which checks the stamp and installs
the carried wheels); docs/gpu-guide.md says how a session runs it.

    bash benchmarks/gpu_session.sh                        # on the GPU, through the device tool
    bash benchmarks/gpu_session.sh --plan                 # what would run in this call; nothing runs
    bash benchmarks/gpu_session.sh --device cpu --smoke   # every step's CPU smoke path (results: /tmp)

A step's result is "for this commit" when the provenance its JSON records has the commit (and dirty
state) that this tree has: git's, else benchmarks/stamp.json's (common.code_state). A step is not
started when its budget exceeds what is left of --limit (default 470 s, counted from the start of
gpu_session.sh, so that a first call with 1-3 minutes of machine start stays within 8 minutes); it is
stopped at the limit if it overruns. Every file written under the results folder by this run is
copied to $OUT after each step (each JSON, and gpu_session.tar holding them all at their repository
paths), so a call stopped by its limit still brings back what ended. A table ends the run: each step,
its status and seconds. Exit status: 0 every step done, 3 steps remain for a rerun, 1 a step failed.

GPU_SESSION_STUB=1: no step runs; each writes its result files with this tree's provenance as if it
had run for exactly its budget (the control flow's test, tests/benchmarks/test_gpu_session.py).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (RESULTS, ROOT, code_state, parser, provenance, read_result, same_code, table,  # noqa: E402
                    write_result)
from gpu_check import BUDGETS, device_slug, section_done  # noqa: E402

DEFAULT_LIMIT = 470     # seconds a call's command may take: 8 minutes less the machine's start
OVERHEAD = 20           # seconds a step's process spends before it measures (imports, CUDA context, nvidia-smi)
SLACK = {"pipelines": 40, "pipelines_4096": 45}    # a gpu_check section's overrun past BUDGETS (its last row,
DEFAULT_SLACK = 15                                  # the pipelines' model builds); estimates, not measured
RESERVE = 10            # seconds kept at the end of --limit: the copy to $OUT and the table
OUT_FILES = 8           # the device tool brings back at most 8 files from $OUT
LIVE_AUTO = os.path.join(ROOT, "parafuse", "attention_auto.json")
ASSUMED_GPU = "NVIDIA H100 80GB HBM3"    # --plan off the GPU: the kind a first call gets
STEPS = ("pipelines", "like_with_like", "scaling_4096", "project_4096", "timeline_4096", "project_timeline",
         "emulator", "kernel_sweep", "pipelines_4096", "rest")     # plan_steps' names, highest priority first


@dataclasses.dataclass
class Step:
    name: str
    what: str
    argv: list[str]
    results: list[tuple[str, str | None]]     # (JSON path, gpu_check section or None): what says it is done
    budget: float = 0.0                        # seconds (gpu_check steps: from their sections)
    sections: tuple[str, ...] = ()             # gpu_check's sections (one gpu_check call)
    reads: tuple[str, ...] = ()                # other steps' result paths it is computed from
    moves: tuple[str, ...] = ()                # files the script writes into benchmarks/results, moved to --results
    seed: tuple[str, str] | None = None        # (source, path): copied before the step where the path is missing
    config_key: str | None = None              # done only if its JSON's config sets this (a step that rewrites
                                               # an earlier step's file with more in it)


def gpu_short(device_name: str) -> str:
    """The committed files' device tag: h100, h200, else the name's slug."""
    slug = device_slug(device_name)
    return next((k for k in ("h100", "h200") if k in slug), slug)


def plan_steps(a, device_name: str) -> list[Step]:
    """The session's steps, highest priority first."""
    py, smoke, res = [sys.executable], a.smoke, a.results
    slug = device_slug(device_name)
    tag = "gpu_session_smoke" if smoke else gpu_short(device_name)
    inside = os.path.abspath(res) == os.path.abspath(RESULTS)

    def at(name: str) -> str:
        return os.path.join(res, name)

    check_json = at(f"gpu_check_{slug}.json")
    check = py + ["benchmarks/gpu_check.py", "--device", a.device] + (["--smoke"] if smoke else []) \
        + ([] if inside else ["--out", check_json])

    def gpu_check(name: str, what: str, sections: tuple[str, ...]) -> Step:
        return Step(name, what, check + ["--only", *sections], [(check_json, s) for s in sections],
                    sections=sections)

    scaling = f"scaling_{tag}_4096_graphs_kernels"
    if smoke:
        scaling_argv = ["--models", "dit-small", "--sizes", "128", "--ranks", "1", "2", "--modes", "full", "sync",
                        "partial", "--kernels", "torch", "--device", "cpu", "--repeat", "1", "--timing-warmup", "0",
                        "--torchrun-size", "0", "--budget", "60"]
        timeline_argv = ["--models", "dit-small", "--sizes", "128", "--ranks", "1", "2", "--modes", "full",
                         "--kernels", "torch", "--device", "cpu", "--repeat", "1", "--timing-warmup", "0",
                         "--torchrun-size", "0", "--timeline"]
        emulator_argv = ["--device", "cpu", "--models", "dit-small", "--sizes", "64", "--emulator-steps", "4",
                         "--emulator-repeats", "2"]     # its spread needs two runs
    else:
        scaling_argv = ["--models", "unet-xl", "dit-xl", "--sizes", "4096", "--ranks", "1", "8", "--modes", "full",
                        "sync", "partial", "--cuda-graphs", "--kernels", "torch", "triton", "--device", a.device,
                        "--dtype", "bf16", "--repeat", "10", "--budget", "240"]
        # the graphed N = 8 step's timeline (projected_fifo_*), in a run of its own: the recorder's
        # events in the captured graph stay out of the timed rows above, and its CUDA-event path,
        # never run before, cannot cost them
        timeline_argv = ["--models", "unet-xl", "--sizes", "4096", "--ranks", "1", "8", "--modes", "full", "sync",
                         "--cuda-graphs", "--kernels", "torch", "--device", a.device, "--dtype", "bf16",
                         "--repeat", "5", "--budget", "150", "--timeline"]
        emulator_argv = ["--device", a.device, "--models", "default", "--sizes", "256", "--emulator-repeats", "2"]
    projected, emulator = f"project_{tag}_4096_graphs_kernels", f"project_emulator_{tag}"
    timeline = f"scaling_{tag}_4096_timeline"
    kernels, auto = at(f"kernel_timings_{tag}.json"), at(f"kernel_timings_{tag}_auto.json")

    def moved(name: str) -> tuple[str, ...]:
        return () if inside else (name + ".json", name + ".png")

    return [
        gpu_check("pipelines", "diffusers SDXL U-Net and Flux-dev through parafuse.parallelize at 2048²",
                  ("pipelines",)),
        gpu_check("like_with_like", "issue 28: per-rank scaling, CUDA graphs, their projection",
                  ("scaling", "graphs", "projection")),
        Step("scaling_4096", "4096², N = 1 and 8, graphed, both kernels, full/sync/partial, unet-xl and dit-xl",
             py + ["benchmarks/scaling.py", *scaling_argv, "--name", scaling if inside else at(scaling)],
             [(at(scaling + ".json"), None)], budget=300),
        Step("project_4096", "the 4096² rows projected to N = 1..16 (both bounds)",
             py + ["benchmarks/project.py", "--scaling", at(scaling + ".json"), "--name", projected[8:]],
             [(at(projected + ".json"), None)], budget=30, reads=(at(scaling + ".json"),), moves=moved(projected)),
        Step("timeline_4096", "unet-xl 4096² N = 8 full/sync, graphed: one steady step's recorded posts and waits",
             py + ["benchmarks/scaling.py", *timeline_argv, "--name", timeline if inside else at(timeline)],
             [(at(timeline + ".json"), None)], budget=180),
        Step("project_timeline", "step 4's projection again, the timelines joined to its rows: the trace-driven "
             "estimate at N = 8 beside both bounds, in the same file",
             py + ["benchmarks/project.py", "--scaling", at(scaling + ".json"), "--timelines", at(timeline + ".json"),
                   "--name", projected[8:]],
             [(at(projected + ".json"), None)], budget=30, reads=(at(scaling + ".json"), at(timeline + ".json")),
             moves=moved(projected), config_key="timelines"),
        Step("emulator", "the projection against the one-GPU emulator over a modelled link, N = 2",
             py + ["benchmarks/project.py", "--validate-emulator", *emulator_argv, "--name", emulator[8:]],
             [(at(emulator + ".json"), None)], budget=120, moves=moved(emulator)),
        Step("kernel_sweep", "the attention kernel sweep and the auto table it implies (not the live table)",
             py + ["benchmarks/kernel_timings.py", "--device", a.device, *(["--smoke"] if smoke else []),
                   "--out", kernels, "--write-auto", auto],
             [(kernels, None)], budget=300, seed=(LIVE_AUTO, auto)),
        gpu_check("pipelines_4096", "the pipelines at 4096²", ("pipelines_4096",)),
        gpu_check("rest", "gpu_check's other sections", ("cli", "nccl", "sync", "bandwidth", "kernels",
                                                          "bottleneck")),
    ]


# ---- state ------------------------------------------------------------------------------------------
def result_done(path: str, section: str | None, state: dict, smoke: bool) -> bool:
    """Whether the JSON at `path` (its gpu_check `section`) holds a result of the code `state` describes."""
    if not os.path.exists(path):
        return False
    res = read_result(path)
    if section is not None:
        return bool(res.get("smoke")) == smoke and section_done(res.get("sections", {}), section, state)
    return same_code(res["provenance"], state)


def newer_than_reads(step: Step) -> bool:
    """A step computed from other results is done only if its result is no older than theirs."""
    ats = [read_result(p)["provenance"].get("at") or "" for p in step.reads]
    return all((read_result(p)["provenance"].get("at") or "") >= max(ats, default="") for p, _ in step.results)


def pending(step: Step, state: dict, smoke: bool) -> list:
    """What of `step` is not yet done for this code: its sections (gpu_check), else [the step]."""
    if step.sections:
        return [s for p, s in step.results if not result_done(p, s, state, smoke)]
    done = all(result_done(p, s, state, smoke) for p, s in step.results) and newer_than_reads(step) \
        and all(read_result(p)["config"].get(step.config_key) for p, _ in step.results if step.config_key)
    return [] if done else [step.name]


def budget(step: Step, todo: list) -> tuple[float, float]:
    """(seconds needed to start the step usefully, seconds it is estimated to take): a gpu_check step
    starts when its first pending section fits (gpu_check --time-limit drops the others)."""
    if not step.sections:
        return step.budget, step.budget
    cost = [BUDGETS[s] + SLACK.get(s, DEFAULT_SLACK) for s in todo]
    return OVERHEAD + cost[0], OVERHEAD + sum(cost)


def expected(step: Step, todo: list, left: float) -> tuple[list, float]:
    """(what the step is expected to do, seconds) if each part takes its budget: a gpu_check step runs
    each pending section that fits what is left of its --time-limit (as gpu_check does), in order."""
    if not step.sections:
        return todo, step.budget
    t, ran = 0.0, []
    for s in todo:
        if BUDGETS[s] <= left - OVERHEAD - DEFAULT_SLACK - t:
            ran.append(s)
            t += BUDGETS[s] + SLACK.get(s, DEFAULT_SLACK)
    return ran, OVERHEAD + t


# ---- running ----------------------------------------------------------------------------------------
class Clock:
    """Seconds since gpu_session.sh started (GPU_SESSION_T0), plus the time stub steps pretend to take."""

    def __init__(self):
        self.t0 = float(os.environ.get("GPU_SESSION_T0") or time.time())
        self.pretended = 0.0

    def elapsed(self) -> float:
        return time.time() - self.t0 + self.pretended


def run_process(argv: list[str], timeout: float, env: dict) -> tuple[int | None, bool]:
    """(exit status, stopped at the timeout): the step's process group is ended at `timeout` seconds."""
    print(f"$ {' '.join(argv)}", flush=True)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=max(timeout, 1)), False
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                return proc.wait(timeout=wait), True
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        return proc.poll(), True


def stub(step: Step, todo: list, prov: dict, smoke: bool) -> None:
    """GPU_SESSION_STUB: write the step's results as if it had run (the sections `todo`, or its JSON)."""
    for path, section in step.results:
        if section is not None and section not in todo:
            continue
        if section is None:
            write_result(path, "gpu_session_stub", {"step": step.name, **({step.config_key: "stub"}
                                                                         if step.config_key else {})}, [], prov)
            continue
        sections = read_result(path)["sections"] if os.path.exists(path) else {}
        sections[section] = {"result": {"stub": True}, "seconds": 0.0, "provenance": prov}
        write_result(path, "gpu_check", {"stub": True}, [], prov, smoke=smoke, sections=sections)


def move_out(step: Step, dest: str, existed: set[str]) -> str | None:
    """Move the files `step` could only write into benchmarks/results to `dest`; an error message if
    one of them was there before the step (a committed file: never moved)."""
    for name in step.moves:
        src = os.path.join(RESULTS, name)
        if name in existed:
            return f"benchmarks/results/{name} existed before the step: not moved (pick another --results)"
        if os.path.exists(src):
            shutil.move(src, os.path.join(dest, name))
    return None


def written_since(folder: str, t0: float) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.endswith((".json", ".png")) and os.path.getmtime(os.path.join(folder, f)) >= t0)


def copy_out(files: list[str], out: str) -> None:
    """Every file this run wrote, into $OUT: gpu_session.tar (paths relative to the repository, or to
    the results folder outside it) and each JSON beside it while the device tool's 8 files allow."""
    os.makedirs(out, exist_ok=True)
    with tarfile.open(os.path.join(out, ".gpu_session.tar.tmp"), "w") as tar:
        for f in files:
            rel = os.path.relpath(f, ROOT)
            tar.add(f, arcname=rel if not rel.startswith("..") else os.path.basename(f))
    os.replace(os.path.join(out, ".gpu_session.tar.tmp"), os.path.join(out, "gpu_session.tar"))
    for f in [f for f in files if f.endswith(".json")][:OUT_FILES - 1]:
        shutil.copy2(f, out)


def run_step(step: Step, a, left: float, env: dict) -> tuple[int | None, bool, str | None]:
    """(exit status, stopped at the limit, an error of the driver's own) of the step's process."""
    if step.seed and not os.path.exists(step.seed[1]) and os.path.exists(step.seed[0]):
        shutil.copy2(*step.seed)     # the auto table merges into a copy of the live one
    existed = {n for n in step.moves if os.path.exists(os.path.join(RESULTS, n))}
    argv = step.argv + (["--time-limit", f"{left - OVERHEAD - DEFAULT_SLACK:.0f}"] if step.sections else [])
    rc, stopped = run_process(argv, left, env)
    return rc, stopped, move_out(step, a.results, existed)


def outcome(step: Step, todo: list, still: list, rc: int | None, stopped: bool, error: str | None) -> str:
    """The table's status of a step that was started."""
    if error:
        return f"failed: {error}"
    if stopped:
        return "stopped at the limit" + (f"; remain: {', '.join(still)}" if still else "")
    if rc != 0 or (still and not step.sections):
        return f"failed (exit {rc})" + (f": {', '.join(still)} not done" if step.sections and still else "")
    if still:
        return f"done now: {', '.join(s for s in todo if s not in still)}; not started: time: {', '.join(still)}"
    return "done now"


def not_started(step: Step, todo: list, left: float, state: dict, a, planned: set) -> str | None:
    """Why the step is not started now (a result it reads is missing, or it does not fit), else None."""
    missing = [p for p in step.reads if p not in planned and not result_done(p, None, state, a.smoke)]
    if missing:
        return f"not started: needs {os.path.basename(missing[0])} of this commit"
    need = budget(step, todo)[0]
    if need > left:
        return f"not started: time (needs {need:.0f} s, {max(left, 0):.0f} s left)"
    return None


def session(a, steps: list[Step], state: dict, mode: str) -> list[dict]:
    """Run (mode "run"), stub ("stub") or plan ("plan") the steps in order; the table's rows."""
    clock, rows, planned = Clock(), [], set()
    started_at = time.time() - 1
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"TRITON_INTERPRET": "1"} if a.device == "cpu" else {}))
    prov = provenance() if mode == "stub" else None
    for step in steps:
        todo = pending(step, state, a.smoke)
        left = a.limit - RESERVE - clock.elapsed()
        why = "done before, this commit" if not todo else not_started(step, todo, left, state, a, planned)
        if why:
            rows.append({"step": step.name, "status": why, "seconds": 0.0, "remains": bool(todo)})
            continue
        if mode != "plan":
            print(f"\n=== {step.name}: {step.what} (budget {budget(step, todo)[1]:.0f} s, {left:.0f} s left)",
                  flush=True)
        t0 = clock.elapsed()
        if mode == "run":
            rc, stopped, error = run_step(step, a, left, env)
        else:
            ran, seconds = expected(step, todo, left)
            clock.pretended += seconds
            if mode == "plan":
                planned.update(p for p, s in step.results if s is None or s in ran)
                rows.append({"step": step.name, "status": "would start" + (f" ({', '.join(ran)})" if step.sections
                                                                            else ""), "seconds": seconds,
                             "remains": len(ran) < len(todo)})
                continue
            stub(step, ran, prov, a.smoke)
            rc, stopped, error = 0, False, None
        still = pending(step, state, a.smoke)
        status = outcome(step, todo, still, rc, stopped, error)
        rows.append({"step": step.name, "status": status, "seconds": clock.elapsed() - t0, "remains": bool(still),
                     "failed": status.startswith("failed")})
        if a.out_dir:       # after each step: a call stopped by the device tool keeps what ended
            copy_out(written_since(a.results, started_at), a.out_dir)
    return rows


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu with --smoke")
    p.add_argument("--smoke", action="store_true", help="each step's tiny CPU path (the control flow, not figures)")
    p.add_argument("--plan", action="store_true",
                   help="print the steps, their budgets, which are done for this commit and which would start")
    p.add_argument("--limit", type=float, default=float(os.environ.get("GPU_SESSION_LIMIT", DEFAULT_LIMIT)),
                   help="seconds this command may take from gpu_session.sh's start (default: GPU_SESSION_LIMIT, "
                        "else %(default)s)")
    p.add_argument("--results", default=None,
                   help="the results folder (default: benchmarks/results; with --smoke /tmp/gpu_session_smoke)")
    p.add_argument("--out-dir", default=os.environ.get("OUT"), help="where the written files are copied "
                                                                    "(default: $OUT, where it is set)")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                   help="run only these steps (their priority order kept): a session whose commit differs from the "
                        "one that ran the first steps may go on with the later ones")
    p.add_argument("--gpu-name", default=None, help="--plan off the GPU: the device whose file names to check "
                                                    f"(default: the GPU here, else {ASSUMED_GPU!r})")
    a = p.parse_args(argv)
    if a.device == "cpu" and not a.smoke:
        p.error("--device cpu runs only the smoke paths: add --smoke")
    a.results = os.path.abspath(a.results or ("/tmp/gpu_session_smoke" if a.smoke else RESULTS))
    os.makedirs(a.results, exist_ok=True)
    mode = "plan" if a.plan else "stub" if os.environ.get("GPU_SESSION_STUB") == "1" else "run"
    if a.device == "cpu":
        device_name = "cpu"
    elif torch.cuda.is_available():
        device_name = a.gpu_name or torch.cuda.get_device_name()
    elif mode == "run":
        print("no CUDA device here: run this on the GPU, or use --plan, or --device cpu --smoke", file=sys.stderr)
        return 2
    else:
        device_name = a.gpu_name or ASSUMED_GPU
    state, source = code_state()
    if state.get("commit") is None:
        print("no git and no benchmarks/stamp.json: run python benchmarks/common.py stamp before the copy",
              file=sys.stderr)
        return 2
    print(f"this commit: {state['commit'][:12]}{' (dirty)' if state.get('dirty') else ''} from {source}; "
          f"device {device_name}; results in {a.results}; limit {a.limit:.0f} s"
          + (" (plan: each step assumed to take its budget)" if mode == "plan" else "")
          + (" (stub: no step runs)" if mode == "stub" else ""), flush=True)
    steps = [s for s in plan_steps(a, device_name) if s.name in a.steps]
    rows = session(a, steps, state, mode)
    print("\n" + table(rows, [("step", "step"), ("status", "status"), ("seconds", "seconds")]))
    remain = [r["step"] for r in rows if r.get("remains")]
    if remain:
        print(f"\nremaining: {' '.join(remain)}; the same command (a fresh --limit) continues with them "
              "(a failed step is tried again)")
    if a.out_dir and os.path.isdir(a.out_dir) and mode != "plan":
        print(f"copied to {a.out_dir}: {' '.join(sorted(os.listdir(a.out_dir))) or 'nothing (nothing written)'}")
    if mode == "plan":
        return 0
    return 1 if any(r.get("failed") for r in rows) else 3 if remain else 0


if __name__ == "__main__":
    sys.exit(main())
