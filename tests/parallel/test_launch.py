"""The launchers: one node, and two "nodes" on localhost through torchrun's c10d rendezvous."""
import json
import os
import re
import subprocess
import sys

import pytest

from support import ROOT
from support.processes import free_port

ARGS = ["--model", "dit-small", "--height", "32", "--width", "32", "--steps", "2", "--solver", "ddim",
        "--mode", "partial", "--warmup-steps", "1", "--no-progress"]


def env(**extra):
    return dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **extra)


def why(stderr: str) -> list[str]:
    """The lines of a failed node's stderr that say what went wrong (a C++ abort's `what()`, a
    Python error), which its last lines - torchrun's summary - do not."""
    return [line for line in stderr.splitlines() if re.search(r"terminate called|what\(\)|Error|error:", line)][:20]


@pytest.mark.torchrun
def test_single_node(tmp_path):
    out = tmp_path / "one.png"
    proc = subprocess.run(["bash", "launch/single_node.sh", "2", *ARGS, "--out", str(out),
                           "--report", str(tmp_path / "one.json")],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists() and json.loads((tmp_path / "one.json").read_text())["world_size"] == 2


@pytest.mark.torchrun
def test_two_nodes_on_localhost(tmp_path):
    port = str(free_port())
    out, rep = tmp_path / "two.png", tmp_path / "two.json"
    procs = [subprocess.Popen(["bash", "launch/multi_node.sh", "1", *ARGS, "--out", str(out), "--report", str(rep)],
                              cwd=ROOT, env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NNODES="2",
                                                NODE_RANK=str(node), RDZV_ID=f"test{port}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    # a worker's own error comes before torchrun's summary at the end of stderr: both, per node
    assert all(p.returncode == 0 for p in procs), [(why(o[1]), o[1][-1500:]) for o in outs]
    report = json.loads(rep.read_text())
    assert report["world_size"] == 2 and report["mode"] == "partial"
    assert report["ranks"][1]["bytes_sent"]["attn_kv"] > 0
