#!/usr/bin/env python3
"""The README's two commands, needing only Python 3.11 and pip:

    python3 bootstrap.py demo   # generate out/default.png with the built-in default model
    python3 bootstrap.py test   # run the whole test suite

Each creates .venv (once) and installs parafuse with its test dependencies into it. torch 2.13.0
is installed first on its own, so that nothing pulls a multi-GB CUDA build: on the development
machines pip takes the CPU build from the local wheel folder; elsewhere set
TORCH_INDEX=https://download.pytorch.org/whl/cpu (or install the torch you want into .venv first).
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
PY = os.path.join(VENV, "bin", "python")
STAMP = os.path.join(VENV, ".parafuse-installed")


def sh(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def install() -> None:
    if os.path.exists(STAMP) and os.path.getmtime(STAMP) >= os.path.getmtime(os.path.join(ROOT, "setup.py")):
        return
    if not os.path.exists(PY):
        sh(sys.executable, "-m", "venv", VENV)
    pip = [PY, "-m", "pip", "install", "-q"]
    if subprocess.run([PY, "-c", "import torch"], capture_output=True).returncode != 0:
        index = os.environ.get("TORCH_INDEX")
        sh(*pip, "torch==2.13.0", *(["--index-url", index] if index else []))
    sh(*pip, "triton==3.6.0")          # the version the interpreter-mode kernel tests are run with
    sh(*pip, "-e", ".[test]")
    open(STAMP, "w").close()


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("demo", "test"):
        print(__doc__)
        return 2
    install()
    if what == "demo":
        os.makedirs(os.path.join(ROOT, "out"), exist_ok=True)
        cmd = [PY, "-m", "parafuse.generate", "--height", "512", "--width", "512",
               "--out", "out/default.png", "--report", "out/default.json", "--overwrite", *sys.argv[2:]]
    else:
        # two workers (pytest-xdist), each taking whole files (module fixtures built once): the
        # suite is mostly single-threaded Python, so a 2-core machine runs it in about 3/4 the time
        cmd = [PY, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", "--durations", "15", "tests",
               *sys.argv[2:]]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
