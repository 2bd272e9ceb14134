"""The GPU check's logic, run on CPU with tiny models (CI has no GPU): every section completes and
reports, and its JSON is the schema the README's tables are read from."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    sections = res["sections"]
    assert set(sections) == {"cli", "nccl", "sync", "scaling", "graphs", "bandwidth", "kernels", "bottleneck",
                             "projection"}
    assert sections["bottleneck"]["result"]["flops_saving"] > 2 and sections["bottleneck"]["result"]["wall_clock_saving"] > 0
    assert all(r["projected_speedup"] > 0 for r in sections["projection"]["result"]["nvlink4"])
    assert all("error" not in s for s in sections.values())
    assert sections["cli"]["result"]["bf16"]["exit"] == 0 and sections["cli"]["result"]["bf16"]["dtype"] == "bf16"
    assert sections["nccl"]["result"]["exit"] == 0
    assert all(r["fp32_ok"] for r in sections["sync"]["result"].values())
    rows = sections["scaling"]["result"]["rows"]
    strips = [r for r in rows if r.get("mode") in ("full", "partial")]
    assert {r["n"] for r in strips} == {2, 4, 8}
    assert all(r["speedup"] > 0 and r["bytes_per_step"]["attn_kv"] > 0 for r in strips)
    assert sections["graphs"]["result"] == {"skipped": "CUDA graphs need a CUDA device"}
    assert "| section | result |" in proc.stdout


def test_multi_gpu_check_smoke_on_cpu_with_gloo(tmp_path):
    """The multi-GPU check is ready for the day several GPUs are lent: its logic runs here over gloo."""
    out = tmp_path / "mgc.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "benchmarks/multi_gpu_check.py", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["backend"] == "gloo"
    checks = {r["check"]: r for r in res["rows"]}
    assert all(r["ok"] for r in res["rows"])
    assert checks["unet-small partial = emulator"]["value"] <= 1e-4
    assert any("speedup at N=2" in c for c in checks)
