"""What both command-line doors do around a run, beside the run itself: the output files' names,
joining torchrun's job (the process group under the watchdog, the command lines compared, the
output folders probed on rank 0 and its verdict shared), and the line for an output kept aside."""
from __future__ import annotations

import os
import sys


def output_paths(out: str, batch: int) -> list[str]:
    if batch == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}-{i}{ext or '.png'}" for i in range(batch)]


def output_verdict(args) -> str | None:
    """Rank 0 proves each output folder takes new files (a probe file created and removed: a folder
    can pass os.access and still refuse them); None if all do, else why not."""
    from parafuse.outputs import probe_folder
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    paths = output_paths(args.out, max(1, args.batch)) + ([args.report] if args.report else [])
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in paths):
        why = probe_folder(folder)
        if why is not None:
            return f"cannot write in folder {folder!r}: {why}"
    return None


def backend_timeout(args) -> float:
    """The process group's own timeout for these command-line deadlines (`PatchConfig.backend_timeout`)."""
    from parafuse.parallel.config import PatchConfig
    return PatchConfig(startup_timeout=args.startup_timeout, exchange_timeout=args.exchange_timeout).backend_timeout


def join_job(args, watch: bool) -> None:
    """Under torchrun: join the process group (under the watchdog's startup deadline where `watch`),
    compare every rank's command-line arguments, and share rank 0's verdict on the output folders,
    all before any model loads. A single process only probes its folders."""
    from parafuse.parallel import agreement
    from parafuse.parallel.distributed import init_distributed, launched_by_torchrun, pick_device

    verdict = output_verdict(args)
    if launched_by_torchrun():
        if watch:
            from parafuse import watchdog
            dog = watchdog.start(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args.startup_timeout,
                                 args.exchange_timeout)
            with dog.guard("joining the process group", startup_steps=1):
                init_distributed(pick_device(args.device), backend_timeout(args))
        else:
            init_distributed(pick_device(args.device))
        agreement.check_same({f"--{k.replace('_', '-')}": v for k, v in sorted(vars(args).items())},
                             "the command line")
        verdict = agreement.from_rank0(verdict)
    if verdict is not None:
        raise ValueError(verdict)


def report_moved(moved: dict[str, str]) -> int:
    """1, with one line per output, where a file appeared at an output's name during the run: it
    was kept (no --overwrite) and the output saved beside it; else 0."""
    for path, sibling in moved.items():
        print(f"parafuse.generate: error: {path!r} appeared while the run computed and was kept (no --overwrite); "
              f"this run's output is {sibling!r}", file=sys.stderr)
    return 1 if moved else 0
