"""benchmarks/common.py, the one harness: every script builds its parser there and none imports the
tests; a cheap script's run writes the one schema; every committed result reads into it; the
timer, the run config and the atomic writer do what they say."""
import ast
import json
import os
import subprocess
import sys

import pytest

from support import ROOT

import common

BENCH = os.path.join(ROOT, "benchmarks")
SCRIPTS = sorted(f for f in os.listdir(BENCH) if f.endswith(".py") and f not in ("common.py", "swd.py"))


def tree(name: str) -> ast.Module:
    with open(os.path.join(BENCH, name)) as f:
        return ast.parse(f.read(), name)


def imported(mod: ast.Module) -> dict[str, set[str]]:
    """module -> the names imported from it (an `import X` counts as X with no names)."""
    out: dict[str, set[str]] = {}
    for node in ast.walk(mod):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.setdefault(node.module, set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                out.setdefault(a.name, set())
    return out


def runnable(mod: ast.Module) -> bool:
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in mod.body)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_builds_its_parser_through_the_harness_and_no_script_imports_the_tests(name):
    """A script (`python benchmarks/NAME.py`) builds its parser with common.parser; a module of one
    (pipelines_gpu.py: gpu_check.py's sections) imports the harness; none imports the tests."""
    mod = tree(name)
    names = imported(mod)
    from_harness = names.get("common", set()) | names.get("benchmarks.common", set())
    assert from_harness, f"{name} does not use benchmarks/common.py"
    calls = {ast.unparse(n.func) for n in ast.walk(mod) if isinstance(n, ast.Call)}
    assert "argparse.ArgumentParser" not in calls, f"{name}: a parser of its own"
    if runnable(mod):
        assert "parser" in from_harness and "parser" in calls, f"{name}: build the parser with common.parser"
    roots = {m.split(".")[0] for m in names}
    assert not roots & {"tests", "support", "conftest"}, f"{name} imports the tests: {roots}"


def test_results_are_written_only_through_the_harness():
    """No script saves a figure or a result JSON itself (worker hand-offs and the auto table aside),
    and no loop rebinds a function's parameter (a plot loop over `name` once sent the figure to
    benchmarks/results/<the last name>.png)."""
    for name in SCRIPTS:
        mod = tree(name)
        calls = [ast.unparse(n.func) for n in ast.walk(mod) if isinstance(n, ast.Call)]
        assert not any(c.endswith(".savefig") for c in calls), f"{name}: use common.save_plot"
        assert "write_json" not in calls
        for fn in (n for n in ast.walk(mod) if isinstance(n, ast.FunctionDef)):
            params = {a.arg for a in fn.args.args}
            for loop in (n for n in ast.walk(fn) if isinstance(n, ast.For)):
                rebound = {t.id for t in ast.walk(loop.target) if isinstance(t, ast.Name)} & params
                assert not rebound, f"{name}:{loop.lineno} {fn.name}() rebinds its parameter {rebound}"


def test_a_cheap_script_writes_the_one_schema(tmp_path):
    """solvers.py on two solvers (a few seconds): its file is the schema, and read back unchanged."""
    proc = subprocess.run([sys.executable, "benchmarks/solvers.py", "--solvers", "ddim", "euler", "--calls", "5", "8",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    path = tmp_path / "solvers_gaussian.json"
    res = json.loads(path.read_text())
    assert list(res)[:6] == ["schema", "benchmark", "provenance", "hardware", "config", "rows"]
    assert res["schema"] == common.SCHEMA and res["benchmark"] == "solvers"
    assert res["provenance"]["command"].startswith("python benchmarks/solvers.py --solvers ddim euler")
    assert {"commit", "dirty", "device", "torch"} <= set(res["provenance"]) and res["hardware"]["device"]
    assert res["config"]["solvers"] == ["ddim", "euler"] and res["config"]["calls"] == [5, 8]
    assert len(res["rows"]) == 5 and all(set(r["solvers"]) == {"ddim", "euler"} for r in res["rows"])
    assert common.read_result(str(path)) == res
    assert (tmp_path / "solvers_gaussian.png").exists()
    assert sorted(os.listdir(tmp_path)) == ["solvers_gaussian.json", "solvers_gaussian.png"]   # no temporary left


def test_every_committed_result_reads_into_the_schema():
    """read_result: the schema's keys for every committed JSON, new or legacy (a legacy file's args
    as config, its command and device in provenance); the manifest says which each is."""
    manifest = json.load(open(os.path.join(common.RESULTS, "MANIFEST.json")))["results"]
    for f in sorted(os.listdir(common.RESULTS)):
        if not f.endswith(".json") or f == "MANIFEST.json":
            continue
        res = common.read_result(os.path.join(common.RESULTS, f))
        assert res["schema"] in (common.SCHEMA, common.LEGACY) and res["schema"] == manifest[f]["schema"], f
        assert res["benchmark"] and os.path.exists(os.path.join(BENCH, res["benchmark"] + ".py")), f
        assert isinstance(res["provenance"], dict) and isinstance(res["hardware"], dict), f
        assert isinstance(res["config"], dict) and isinstance(res["rows"], list), f
        raw = json.load(open(os.path.join(common.RESULTS, f)))
        if res["schema"] == common.LEGACY and "args" in raw:
            assert res["config"] == raw["args"] and "args" not in res
        if res["schema"] == common.LEGACY and isinstance(raw.get("command"), str) and "provenance" not in raw:
            assert res["provenance"]["command"] == raw["command"]
    quality = common.read_result(os.path.join(common.RESULTS, "quality_cpu.json"))
    assert quality["rows"] and quality["config"]["seeds"] and quality["provenance"]["device"].startswith("cpu")


def test_time_calls_warms_up_then_times_each_call():
    calls = []
    t = common.time_calls(lambda: calls.append(1), "cpu", repeat=7, warmup=3)
    assert len(calls) == 10 and t["count"] == 7 and t["timing"] == "perf_counter" and t["inner"] == 1
    assert t["seconds_min"] <= t["seconds_p25"] <= t["seconds"] <= t["seconds_p75"] <= t["seconds_max"]
    assert t["spread"] == pytest.approx((t["seconds_max"] - t["seconds_min"]) / t["seconds"])
    s = common.timing_stats([3.0, 1.0, 2.0])
    assert (s["seconds"], s["seconds_min"], s["seconds_max"], s["count"]) == (2.0, 1.0, 3.0, 3)


def test_patch_config_and_its_flags_are_the_library_config():
    """A benchmark's run is a PatchConfig: `MODE+sign` sets the codec, a swept portion reaches only a
    windowed mode; config_flags gives parafuse.generate the same config."""
    from parafuse.generate import config_from_args, parse_args
    from parafuse.parallel.config import PatchConfig

    c = common.patch_config("full+sign", 2, 0.1, dtype="bf16", cuda_graphs=False)
    assert c == PatchConfig(mode="full", warmup_steps=2, kv_codec="sign", dtype="bf16", cuda_graphs=False)
    assert common.patch_config("partial", 1, 0.1).halo_portion == 0.1
    for cfg in (c, common.patch_config("partial", 1, 0.1, kernels="torch"), common.patch_config("sync")):
        assert config_from_args(parse_args(common.config_flags(cfg))) == cfg


def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "r.json"
    common.write_result(str(path), "solvers", {"a": 1}, [{"x": 1}], provenance_={"commit": None},
                        hardware_={"device": "cpu"})
    before = path.read_text()

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("{half")
        raise RuntimeError("the run died while writing")
    with pytest.raises(RuntimeError):
        common.write_atomic(str(path), fail)
    with pytest.raises(RuntimeError):
        common.write_atomic(str(tmp_path / "new.json"), fail)
    assert path.read_text() == before and sorted(os.listdir(tmp_path)) == ["r.json"]
    assert common.result_path("x") == os.path.join(common.RESULTS, "x.json")
    assert common.result_path(str(tmp_path / "x.json"), ".png") == str(tmp_path / "x.png")
