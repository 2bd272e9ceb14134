"""How many key ranges a halo attention launch splits into (split-KV): plain Python, no Triton, so
that the dispatcher (parafuse.attention) classes shapes by the same rule the kernel launches by."""
from __future__ import annotations

BLOCK_M = 128           # the query block the rule counts programs with (the largest candidate's)


def busy(programs: int, sms: int) -> float:
    """The fraction of the SM slots of the launch's waves that hold a program (1: no idle tail)."""
    return programs / (-(-programs // sms) * sms)


def kv_splits(programs: int, keys: int, sms: int, unit: int = 128, max_splits: int = 8, gain: float = 1.15,
              full: float = 0.95) -> int:
    """1, unless splitting the keys into s ranges (each >= 2 blocks of `unit` keys) raises the busy
    fraction of the SMs by at least `gain` (a split pays a float32 partial and the merge): then the
    fewest ranges that keep `full` of the slots busy (else the best). E.g. 160 programs on 132 SMs
    (one wave and a 28-program tail, 61% busy) split 4 ways (97%), 320 programs 2 ways (81% -> 97%);
    512 programs (97% busy) do not split."""
    most = max(1, min(max_splits, keys // (2 * unit)))
    counts = range(1, most + 1)
    best = next((s for s in counts if busy(programs * s, sms) >= full),
                max(counts, key=lambda s: (busy(programs * s, sms), -s)))
    return best if busy(programs * best, sms) >= gain * busy(programs, sms) else 1


def programs(queries: int, batch_heads: int) -> int:
    return -(-queries // BLOCK_M) * batch_heads
