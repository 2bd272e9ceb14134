"""The one way a test starts a torchrun job: `torchrun --standalone` (the rendezvous picks a free
port: no port arithmetic), one thread per rank, the checkout and the test support on PYTHONPATH."""
import os
import subprocess
import sys

from support import ROOT


def command(n: int, *args: str) -> list[str]:
    """torchrun of `n` ranks on this machine running `args` (a script, or -m MODULE ...)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]


def environment(**extra: str) -> dict:
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "kernels"), os.path.join(ROOT, "tests")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def run(n: int, *args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run the job to its end; its output captured as text."""
    return subprocess.run(command(n, *args), cwd=ROOT, env=environment(), capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def start(n: int, *args: str, **popen) -> subprocess.Popen:
    """The job started in a session of its own (a test may stop or kill every process of it);
    stdout and stderr piped."""
    return subprocess.Popen(command(n, *args), cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, **popen)


def start_generate(n: int, *args: str, **popen) -> subprocess.Popen:
    """`python -m parafuse.generate ARGS` on `n` ranks (`start`)."""
    return start(n, "-m", "parafuse.generate", *args, **popen)
