"""Host-side deadlines for a distributed run, a clean exit on Ctrl-C, and exits that cannot cut an
output commit in half.

A rank that stops answering (stopped, deadlocked, a hung kernel) leaves its neighbours waiting in
their next exchange forever: NCCL's own watchdog does not watch work inside a CUDA graph, and a
gloo wait blocks for the process group's timeout. So the deadline is kept here, on the host, by
one thread per process:

- the sampling loop calls `progress()` at every step; inside `Watchdog.guard` a rank that makes
  no progress for `exchange_timeout` seconds (`startup_timeout` during the first steps of a
  request, which include the first exchange, warmup and CUDA-graph capture, and while joining
  the process group) stops waiting;
- every process publishes a heartbeat (a counter, its step, host and pid) to torchrun's store
  once a second, and, while guarded, reads its peers' once a second. The heartbeat decides in
  every phase: a peer whose heartbeat has not moved for `exchange_timeout` while this rank made
  no progress for as long has stopped answering, and is named at once, in the startup phase
  too; `startup_timeout` only covers peers that are alive (or not yet started) and slow;
- when a deadline fires otherwise, the rank reads every heartbeat twice, two seconds apart:
  a rank whose counter did not move has stopped answering and is named; if all are alive, the
  ranks at the lowest step are named as stuck;
- a stopped rank on this host is ended (SIGKILL: stopped, it cannot take torchrun's SIGTERM);
  the rank prints one line and exits with status 1; torchrun stops the others.

The process group's own timeout is set past both deadlines (`parafuse.job.backend_timeout`),
so that a backend error without a rank's name never comes first.

On NCCL the host blocks only where it reads a device value (the health check every few steps,
the end of a request), so a stall is seen there: within the timeout plus a few steps.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import threading
import time

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130
HEARTBEAT_SECONDS = 1.0
_exit_lock = threading.RLock()     # held while outputs are renamed: an exit waits for the commit


def close_progress_bars() -> None:
    """End a progress bar's line, so that a message after it starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:
            pass


def exit_now(code: int, message: str | None = None, kill: tuple[int, ...] = ()) -> None:
    """Print `message` (one line), SIGKILL the processes `kill`, and end this one at once, never in
    the middle of a commit. The line goes out before the kills: once a peer dies, torchrun ends
    every rank, and a message printed after that may never be."""
    with _exit_lock:
        close_progress_bars()
        if message:
            print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        for pid in kill:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(code)


def die_by_sigterm(message: str | None) -> None:
    """Print `message` (one line) and end by SIGTERM's default action, as if never caught (torchrun
    reports the signal), never in the middle of a commit."""
    with _exit_lock:
        close_progress_bars()
        if message:
            print(message, file=sys.stderr, flush=True)
        # its disposition is still the default (only SIGINT has a handler); unblocked in this thread,
        # the signal is delivered here: every other thread blocks it
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)                  # the signal ends the process
        os._exit(128 + signal.SIGTERM)


def no_exit():
    """Context manager: exits (deadline, Ctrl-C) wait until the block ends."""
    return _exit_lock


def catch_interrupts(rank: int, prog: str) -> None:
    """Ctrl-C ends the process with one line (rank 0 prints it) and status 130, also while the
    main thread is blocked in an exchange: SIGINT is blocked in this thread (and in every thread
    started after, such as gloo's) and taken by a thread that waits for it. SIGTERM (torchrun
    ending the job after another rank failed) is taken the same way: the rank still ends by the
    signal, after one line naming the peer whose heartbeat its watchdog saw stop, if any."""
    message = f"{prog}: interrupted" if rank == 0 else None
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

    def wait():
        while True:
            if signal.sigwait({signal.SIGINT, signal.SIGTERM}) == signal.SIGINT:
                exit_now(EXIT_INTERRUPTED, message)
            dog = current()
            named = dog.silent_peers() if dog is not None else None
            die_by_sigterm(f"parafuse: rank {rank}: ended by torchrun: {named}" if named else None)

    threading.Thread(target=wait, name="parafuse-sigint", daemon=True).start()
    # a SIGINT that still reaches the main thread (sent to it directly) ends the same way
    signal.signal(signal.SIGINT, lambda n, frame: exit_now(EXIT_INTERRUPTED, message))


class Watchdog:
    def __init__(self, rank: int, world_size: int, startup_timeout: float, exchange_timeout: float,
                 store=None, prefix: str = "parafuse"):
        self.rank, self.world_size = rank, world_size
        self.startup_timeout, self.exchange_timeout = startup_timeout, exchange_timeout
        self.store, self.prefix = store, prefix
        self.step = 0                     # steps done (all requests), published in the heartbeat
        self._what: str | None = None     # what the guarded block does; None: nothing watched
        self.last_what = "starting"       # what the last guarded block did
        self._since = time.monotonic()
        self._startup_left = 0
        self._beat = 0
        self._peers: dict[int, tuple[int, float, str, int]] = {}   # rank: (beat, when it last moved, host, pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="parafuse-watchdog", daemon=True)
        self._thread.start()

    # ---- the main thread ---------------------------------------------------------------------
    def guard(self, what: str, startup_steps: int = 0):
        """Watch the block: it must make progress every exchange_timeout seconds (startup_timeout
        until `startup_steps` steps have been made)."""
        return _Guard(self, what, startup_steps)

    def progress(self, step: int | None = None) -> None:
        self._since = time.monotonic()
        self.step += 1
        if self._startup_left:
            self._startup_left -= 1

    def close(self) -> None:
        """Stop the thread (it finishes any store call it is in)."""
        global _current
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        if _current is self:
            _current = None

    # ---- the watchdog thread -------------------------------------------------------------------
    def _key(self, rank: int) -> str:
        return f"{self.prefix}/beat/{rank}"

    def _publish(self) -> None:
        self._beat += 1
        if self.store is not None:
            try:
                self.store.set(self._key(self.rank), f"{self._beat} {self.step} {socket.gethostname()} {os.getpid()}")
            except Exception:
                pass          # the store is gone (torchrun is ending the job): nothing to tell

    def _read(self) -> dict[int, tuple[int, int, str, int]]:
        beats = {}
        for r in range(self.world_size):
            if r == self.rank:
                continue
            try:
                if self.store.check([self._key(r)]):
                    beat, step, host, pid = self.store.get(self._key(r)).decode().split()
                    beats[r] = (int(beat), int(step), host, int(pid))
            except Exception:
                pass
        return beats

    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.wait(0.25):
            now = time.monotonic()
            what = self._what
            if now >= next_beat:
                self._publish()
                next_beat = now + HEARTBEAT_SECONDS
                if what is not None and self.store is not None:
                    self._track(now)
            if what is None:
                continue
            limit = self.startup_timeout if self._startup_left else self.exchange_timeout
            stalled = now - self._since
            silent = {r: v for r, v in self._peers.items() if now - v[1] > self.exchange_timeout}
            if stalled > self.exchange_timeout and silent:
                here = socket.gethostname()
                exit_now(EXIT_FAILED, f"parafuse: rank {self.rank}: no progress for {stalled:.0f} s while {what}: "
                                      f"rank {', '.join(map(str, silent))} stopped answering (no heartbeat for "
                                      f"{max(now - v[1] for v in silent.values()):.0f} s, limit --exchange-timeout "
                                      f"{self.exchange_timeout:g} s); ended",
                         kill=tuple(v[3] for v in silent.values() if v[2] == here))
            if stalled > limit:
                culprits, stopped_here = self._culprits()
                exit_now(EXIT_FAILED, f"parafuse: rank {self.rank}: no progress for {stalled:.0f} s while {what} "
                                      f"(limit {limit:g} s): {culprits}", kill=stopped_here)

    def _track(self, now: float) -> None:
        """Read the peers' heartbeats; note when each last moved (a peer not yet seen is not
        tracked: it is still starting, which startup_timeout covers)."""
        for r, (beat, _, host, pid) in self._read().items():
            seen = self._peers.get(r)
            self._peers[r] = (beat, now if seen is None or seen[0] != beat else seen[1], host, pid)

    def silent_peers(self, seconds: float = 2 * HEARTBEAT_SECONDS) -> str | None:
        """The peers whose heartbeat this rank last saw move more than `seconds` ago (tracked while
        guarded), in words; None if none."""
        now = time.monotonic()
        silent = {r: now - v[1] for r, v in self._peers.items() if now - v[1] > seconds}
        if not silent:
            return None
        return (f"rank {', '.join(map(str, silent))} stopped answering (no heartbeat for "
                f"{max(silent.values()):.0f} s)")

    def peer_failure(self) -> tuple[str, tuple[int, ...]] | None:
        """After an error from the backend (a peer's connection closed, a backend timeout): the
        peers that stopped answering or never reported, in words, and the pids to end; None if
        every peer is alive (the error is this rank's own)."""
        if self.store is None or self.world_size == 1:
            return None
        return self._blame()[1]

    def _culprits(self) -> tuple[str, tuple[int, ...]]:
        """Which ranks stopped answering (heartbeats read twice, 2 s apart), and the pids of those
        on this host: stopped, they cannot take torchrun's SIGTERM, so `exit_now` ends them and the
        job ends now. If every peer is alive, those at the lowest step are named as stuck."""
        if self.store is None or self.world_size == 1:
            return "a peer rank stopped answering (no store to ask which)", ()
        beats, blamed = self._blame()
        if blamed is not None:
            return blamed
        low = min(v[1] for v in beats.values())
        stuck = [r for r, v in beats.items() if v[1] == low]
        return (f"rank {', '.join(map(str, stuck))} is alive but stuck after {low} steps "
                f"(this rank: {self.step})", ())

    def _blame(self) -> tuple[dict, tuple[str, tuple[int, ...]] | None]:
        """The peers' heartbeats read twice, 2 s apart; and the ranks whose counter did not move
        (with their pids on this host) or that never reported, in words, or None if all are alive."""
        first = self._read()
        until = time.monotonic() + 2 * HEARTBEAT_SECONDS
        while time.monotonic() < until:       # keep beating: a peer asking the same about this rank must see it alive
            self._publish()
            time.sleep(HEARTBEAT_SECONDS / 4)
        second = self._read()
        missing = [r for r in range(self.world_size) if r != self.rank and r not in second]
        stopped = [r for r in second if r in first and second[r][0] == first[r][0]]
        if stopped:
            here = socket.gethostname()
            return second, (f"rank {', '.join(map(str, stopped))} stopped answering (no heartbeat for "
                            f"{2 * HEARTBEAT_SECONDS:.0f} s); ended",
                            tuple(second[r][3] for r in stopped if second[r][2] == here))
        if missing:
            return second, (f"rank {', '.join(map(str, missing))} never reported (not started, or died)", ())
        return second, None


class _Guard:
    def __init__(self, dog: Watchdog, what: str, startup_steps: int):
        self.dog, self.what, self.startup_steps = dog, what, startup_steps

    def __enter__(self):
        self.dog._startup_left = self.startup_steps
        self.dog._since = time.monotonic()
        self.dog._what = self.what
        return self.dog

    def __exit__(self, *exc):
        self.dog._what = None
        self.dog.last_what = self.what        # what an error raised from the block interrupted
        return False


_current: Watchdog | None = None


def start(rank: int, world_size: int, startup_timeout: float, exchange_timeout: float) -> Watchdog:
    """The process's watchdog (one per process), heartbeating through torchrun's store when
    MASTER_ADDR/MASTER_PORT name one."""
    global _current
    if _current is not None:
        _current.startup_timeout, _current.exchange_timeout = startup_timeout, exchange_timeout
        return _current
    _current = Watchdog(rank, world_size, startup_timeout, exchange_timeout, _store(), _prefix())
    atexit.register(_close_at_exit)
    return _current


def _close_at_exit() -> None:
    """Stop the heartbeat thread before the interpreter finalizes, for programs that never close
    it: a daemon thread still inside a store call then can abort the whole process on its way back
    into Python ("terminate called without an active exception", SIGABRT) - the likely cause of
    the rare SIGABRT at the end of the torchrun test worker, seen only under load."""
    if _current is not None:
        _current.close()


def current() -> Watchdog | None:
    return _current


def _prefix() -> str:
    return (f"parafuse/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/"
            f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")


def _store():
    import datetime

    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10))
    except Exception:
        return None
