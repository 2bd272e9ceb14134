"""Processes a test watches: a torchrun job of `parafuse.generate` started in its own session, its
stderr read in a thread, a rank's pid (tests that stop a rank)."""
import os
import re
import signal
import socket
import subprocess
import threading
import time

from support.launch import start_generate as torchrun  # noqa: F401  (the stopped-rank tests' name)

def free_port() -> int:
    """A free TCP port on this machine, for a launcher that needs one named (torchrun's multi-node
    scripts; torchrun itself runs --standalone: `support.launch`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stderr:
    """Collects a process's stderr in a thread, so the test can wait for a line."""

    def __init__(self, proc):
        self.text = ""
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc):
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            self.text += chunk.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            assert time.monotonic() < deadline, self.text[-3000:]
            time.sleep(0.2)


def rank_pid(torchrun_pid: int, rank: int) -> int:
    for line in subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True).stdout.split():
        with open(f"/proc/{line}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return int(line)
    raise AssertionError(f"no rank {rank} under torchrun {torchrun_pid}")


class FakeStore:
    """torchrun's store as the watchdog uses it; rank 1's heartbeat is frozen or alive at step 2."""

    def __init__(self, peer_alive: bool, host: str = "otherhost"):
        self.data, self.peer_alive, self.reads, self.host = {}, peer_alive, 0, host

    def set(self, key, value):
        self.data[key] = value

    def check(self, keys):
        return True

    def get(self, key):
        if key.endswith("/0"):
            return self.data[key].encode()
        self.reads += 1
        beat = self.reads if self.peer_alive else 7
        return f"{beat} 2 {self.host} 4321".encode()


def stop_a_rank_and_expect_it_named(proc, rank: int, progress: str, timeout: float, outputs) -> None:
    """Stop `rank` of a torchrun job (`proc`, its own session) once stderr shows `progress` (past
    the warmup), then check that the job ended within the exchange deadline `timeout`, naming the
    stopped rank, and wrote nothing to the folder `outputs`. The deadline bound is a guard against a
    hang, not a timing."""
    err = Stderr(proc)
    try:
        err.wait_for(progress)
        os.kill(rank_pid(proc.pid, rank), signal.SIGSTOP)
        stopped = time.monotonic()
        proc.wait(timeout=timeout + 60)
        ended = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err.thread.join(5)
    assert proc.returncode != 0
    assert f"rank {rank} stopped answering" in err.text, err.text[-3000:]
    assert ended < timeout + 10, (ended, err.text[-3000:])
    assert not list(outputs.iterdir())
