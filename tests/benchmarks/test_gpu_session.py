"""benchmarks/gpu_session.py's control flow without running a step (GPU_SESSION_STUB, --plan): a
result of this commit is skipped, one of another commit is not, a step that does not fit what is
left of --limit is not started, and the same command run again continues with what remains;
gpu_check.py's own skip and --time-limit; gpu_session.sh's refusals. Seconds, no measurement."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

from support import ROOT  # noqa: E402

import gpu_check
import gpu_session
from common import code_state, provenance, write_result

GPU = "NVIDIA H100 80GB HBM3"


def statuses(capsys) -> dict:
    """step -> status, from the table gpu_session prints last."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")]
    return {cells[0]: cells[1] for cells in rows if cells[0] != "step"}


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.delenv("GPU_SESSION_LIMIT", raising=False)

    def run(limit: float, *extra: str, stub: bool = True) -> int:
        monkeypatch.setenv("GPU_SESSION_T0", "")         # each call a fresh command: its clock starts now
        monkeypatch.setenv("GPU_SESSION_STUB", "1" if stub else "0")
        return gpu_session.main(["--results", str(tmp_path), "--gpu-name", GPU, "--limit", str(limit), *extra])
    return run


def need(name: str, results: str) -> float:
    """The seconds step `name` needs to start, with nothing of it done."""
    a = type("A", (), {"smoke": False, "device": "cuda", "results": results})()
    step = next(s for s in gpu_session.plan_steps(a, GPU) if s.name == name)
    return gpu_session.budget(step, list(step.sections) or [name])[0]


def test_plan_skips_results_of_this_commit_and_runs_those_of_another(session, tmp_path, capsys):
    write_result(str(tmp_path / "project_emulator_h100.json"), "project", {}, [], provenance())
    write_result(str(tmp_path / "kernel_timings_h100.json"), "kernel_timings", {}, [],
                 {**provenance(), "commit": "0" * 40})
    assert session(100_000, "--plan") == 0
    got = statuses(capsys)
    assert got["emulator"] == "done before, this commit"
    assert got["kernel_sweep"] == "would start"                   # another commit's result: measured again
    assert got["pipelines"] == "would start (pipelines)" and got["project_4096"] == "would start"
    assert list(got) == list(gpu_session.STEPS)
    assert session(100_000, "--plan", "--steps", "rest", "emulator") == 0
    assert list(statuses(capsys)) == ["emulator", "rest"]
    assert sorted(os.listdir(tmp_path)) == ["kernel_timings_h100.json", "project_emulator_h100.json"]  # none written


def test_a_step_past_the_limit_is_not_started_and_a_rerun_continues(session, tmp_path, capsys):
    limit = gpu_session.RESERVE + need("pipelines", str(tmp_path)) + 5      # the first step fits, nothing after it
    out = tmp_path / "out"
    assert session(limit, "--out-dir", str(out)) == 3
    got = statuses(capsys)
    assert got["pipelines"] == "done now"
    assert sorted(os.listdir(out)) == ["gpu_check_nvidia_h100_80gb_hbm3.json", "gpu_session.tar"]   # what it wrote
    with tarfile.open(out / "gpu_session.tar") as tar:
        assert tar.getnames() == ["gpu_check_nvidia_h100_80gb_hbm3.json"]     # outside the repository: its name
    assert got["like_with_like"].startswith("not started: time") and got["emulator"].startswith("not started: time")
    assert got["project_4096"].startswith("not started: needs scaling_h100_4096_graphs_kernels.json")
    check = tmp_path / "gpu_check_nvidia_h100_80gb_hbm3.json"
    assert set(json.loads(check.read_text())["sections"]) == {"pipelines"}

    assert session(100_000) == 0                                      # the same command again: the rest
    got = statuses(capsys)
    assert got["pipelines"] == "done before, this commit"
    assert all(got[s] == "done now" for s in got if s != "pipelines"), list(got.items())
    assert set(json.loads(check.read_text())["sections"]) == set(gpu_check.SECTIONS)

    # a result of another commit is measured again; the projection of rows newer than it, too
    res = json.loads((tmp_path / "scaling_h100_4096_graphs_kernels.json").read_text())
    res["provenance"]["commit"] = "0" * 40
    (tmp_path / "scaling_h100_4096_graphs_kernels.json").write_text(json.dumps(res))
    projected = json.loads((tmp_path / "project_h100_4096_graphs_kernels.json").read_text())
    projected["provenance"]["at"] = "2000-01-01T00:00:00Z"        # projected before the rows measured anew
    (tmp_path / "project_h100_4096_graphs_kernels.json").write_text(json.dumps(projected))
    assert session(100_000) == 0
    got = statuses(capsys)
    assert got["scaling_4096"] == "done now" and got["project_4096"] == "done now"
    assert got["emulator"] == "done before, this commit"


def test_gpu_check_sections_split_by_the_time_left(session, tmp_path, capsys):
    """A gpu_check step starts when its first pending section fits; the sections that do not are left."""
    first = need("pipelines", str(tmp_path))
    scaling = gpu_session.OVERHEAD + gpu_check.BUDGETS["scaling"] + gpu_session.DEFAULT_SLACK
    assert session(gpu_session.RESERVE + first + scaling + 5) == 3
    got = statuses(capsys)
    assert got["like_with_like"].startswith("done now: scaling;") and "graphs" in got["like_with_like"]
    assert session(100_000, "--plan") == 0
    assert statuses(capsys)["like_with_like"] == "would start (graphs, projection)"


def test_gpu_check_skips_a_section_of_this_commit_and_honours_its_time_limit(tmp_path, capsys):
    out = str(tmp_path / "g.json")
    read = {"scaling": {"result": {"rows": []}, "provenance": provenance()},      # what the projection reads, as
            "graphs": {"result": {"skipped": "CUDA graphs need a CUDA device"}, "provenance": provenance()}}  # on CPU
    write_result(out, "gpu_check", {}, [], provenance(), smoke=True, sections=read)
    argv = ["--device", "cpu", "--smoke", "--out", out, "--only", "projection"]
    assert gpu_check.main(argv) == 0                  # no rows: a quick "skipped" result
    written = os.path.getmtime(out)
    assert gpu_check.main(argv) == 0
    assert "projection: done for this commit" in capsys.readouterr().out and os.path.getmtime(out) == written
    assert gpu_check.main(argv[:-1] + ["bottleneck", "--time-limit", "1"]) == 0
    assert "bottleneck: not started" in capsys.readouterr().out
    assert set(json.loads(open(out).read())["sections"]) == {"scaling", "graphs", "projection"}


def test_section_done_needs_this_commit_no_error_and_a_projection_newer_than_its_rows():
    state, _ = code_state()
    prov = {**provenance(), "at": "2026-01-02T00:00:00Z"}
    later = {**prov, "at": "2026-01-03T00:00:00Z"}
    sections = {"scaling": {"provenance": prov}, "graphs": {"provenance": prov}, "projection": {"provenance": later},
                "cli": {"provenance": {**prov, "commit": "0" * 40}}, "sync": {"error": "x", "provenance": prov}}
    assert gpu_check.section_done(sections, "scaling", state) and gpu_check.section_done(sections, "projection", state)
    assert not gpu_check.section_done(sections, "cli", state) and not gpu_check.section_done(sections, "sync", state)
    sections["graphs"]["provenance"] = {**prov, "at": "2026-01-04T00:00:00Z"}     # graphs measured after it
    assert not gpu_check.section_done(sections, "projection", state)


def test_the_entry_script_refuses_without_a_commit_or_without_diffusers(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "gpu_session.sh"
    shutil.copy(os.path.join(ROOT, "benchmarks", "gpu_session.sh"), script)
    env = dict(os.environ, GIT_DIR=str(tmp_path / "no-git"), PYTHON="false")
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "benchmarks/stamp.json" in proc.stderr and len(proc.stderr.splitlines()) == 1
    (tmp_path / "benchmarks" / "stamp.json").write_text("{}")
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and ".wheels" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_a_step_past_its_time_is_stopped_with_its_children(tmp_path):
    t0, pid_file = time.monotonic(), tmp_path / "pid"
    child = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    rc, stopped = gpu_session.run_process([sys.executable, "-c", child], 3, dict(os.environ))
    assert stopped and rc != 0 and time.monotonic() - t0 < 20
    stat = f"/proc/{int(pid_file.read_text())}/stat"
    time.sleep(0.2)      # the step's whole process group was ended: the grandchild is gone, or a zombie
    assert not os.path.exists(stat) or open(stat).read().rsplit(")", 1)[1].split()[0] == "Z"
