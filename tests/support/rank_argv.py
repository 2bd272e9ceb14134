"""parafuse.generate with one rank started differently: `torchrun ... tests/support/rank_argv.py RANK
FLAG=VALUE,... -- ARGS` runs `parafuse.generate ARGS` on every rank, with each FLAG set to VALUE on
rank RANK (tests/cli/test_reliability_round2.py: ranks that disagree are refused). CHANGES `stop`
instead: rank RANK stops itself (SIGSTOP) as its first denoising step begins (a rank stopped
during warmup)."""
import os
import sys


from parafuse.generate import main  # noqa: E402


def argv_of(rank: int, changed_rank: int, changes: str, args: list[str]) -> list[str]:
    args = list(args)
    if rank == changed_rank:
        for change in changes.split(","):
            flag, value = change.split("=", 1)
            i = args.index(flag)
            args[i + 1] = value
    return args


def stop_at_first_step() -> None:
    import signal

    from parafuse.runtime import Denoising
    before = Denoising.before_step

    def before_step(self, k):
        if k == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
        before(self, k)
    Denoising.before_step = before_step


if __name__ == "__main__":
    changed, changes, sep, *rest = sys.argv[1:]
    assert sep == "--"
    rank = int(os.environ["RANK"])
    if changes == "stop":
        if rank == int(changed):
            stop_at_first_step()
        sys.exit(main(rest))
    sys.exit(main(argv_of(rank, int(changed), changes, rest)))
