"""Generate one high-resolution image, on one process or patch-parallel under torchrun.

    python -m parafuse.generate --height 1024 --width 1024 --out image.png
    torchrun --nproc_per_node 4 -m parafuse.generate --mode partial --height 2048 --width 2048

Every argument is checked before any denoising; a bad one exits with status 2 and one line on
stderr, and writes nothing. Outputs are written atomically (temporary file, then rename).
"""
from __future__ import annotations

import argparse
import os
import sys

from parafuse.models import MODELS
from parafuse.parallel.engine import BASELINES, DEFAULT_HALO_PORTION, MODES, NORM_MODES, TEXT_MERGES
from parafuse.parallel.kv_codec import CODECS
from parafuse.runtime import KERNELS
from parafuse.solvers import SOLVERS


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Under torchrun every rank parses the same arguments: only rank 0 says what is wrong."""
        if int(os.environ.get("RANK", 0)) == 0:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="parafuse.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default",
                   help=f"built-in model ({', '.join(MODELS)}) or a local diffusers pipeline folder")
    p.add_argument("--weights", default=None, help="safetensors file overriding the model's own weights")
    p.add_argument("--height", type=int, default=512, help="image height in pixels")
    p.add_argument("--width", type=int, default=512, help="image width in pixels")
    p.add_argument("--steps", type=int, default=20,
                   help="denoising steps = model evaluations, for every solver, of the one-stage schedule; the "
                        "bottleneck schedule scales its stages to it and reports its FLOPs against it (see --schedule)")
    p.add_argument("--schedule", default="plain", choices=("plain", "bottleneck"),
                   help="plain: every step at the image size; bottleneck: full, half, full resolution with "
                        "stage steps 6/20/12 per 50 --steps, strengths 1/0.5/0.6, shifts 3x/2x/1x the model's, "
                        "the first growing as sqrt(pixels)/256 above 256² "
                        "(the published 6/20/8, 1/0.8/0.6, 3x/2x/3x: an explicit --stages list, see the README)")
    p.add_argument("--stages", nargs="+", default=None, metavar="HxW:STEPS[:STRENGTH[:SHIFT]]",
                   help="an explicit stage list, e.g. 256x256:20 512x512:8:0.6:3; the last stage is the image "
                        "size; a stage entered at strength w runs the last ceil(w*STEPS) steps of its grid")
    p.add_argument("--solver", default="dpmpp-2m", help=f"one of: {', '.join(SOLVERS)}")
    p.add_argument("--spacing", default=None, choices=("linspace", "leading", "trailing", "karras"),
                   help="timestep spacing, as diffusers' timestep_spacing (default linspace; flow models: the "
                        "σ table of the solver's diffusers scheduler, leading/trailing refused)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--label", type=int, default=None, help="class label for class-conditional models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="images generated together (seeded as one noise tensor)")
    p.add_argument("--out", default="parafuse.png", help="output PNG (with --batch > 1: NAME-0.png, NAME-1.png, ...)")
    p.add_argument("--report", default=None, help="write the run report (JSON) here")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--mode", default="full", choices=MODES,
                   help="patch exchange: sync (exact), full (stale K/V of the whole image), "
                        "partial (stale K/V window of each neighbour), none (no exchange)")
    p.add_argument("--warmup-steps", type=int, default=4, help="first steps run synchronously")
    p.add_argument("--halo-portion", type=float, default=None,
                   help=f"partial (and pcpp) mode: portion of each neighbour strip whose K/V a strip attends to "
                        f"(default {DEFAULT_HALO_PORTION})")
    p.add_argument("--norm", default=None, choices=NORM_MODES,
                   help="GroupNorm across strips (default: exact; corrected in distrifusion/pcpp, as published; local in none)")
    p.add_argument("--kv-codec", default="none", choices=CODECS,
                   help="stale K/V on the wire (full, partial): none (exact), sign (1 bit an element: the sign of "
                        "the residual against a predicted copy, a scale a token; ~7%% of the bytes in bf16)")
    p.add_argument("--text-merge", default=None, choices=TEXT_MERGES,
                   help="diffusers pipelines with joint text+image attention (SD3, Flux): how the stale steps merge "
                        "the text queries across strips - stale (the default of full and partial: the other "
                        "strips' previous-step outputs, nothing waited on) or exact (an all-reduce waited on)")
    p.add_argument("--cfg-parallel", action="store_true", help="split the two guidance branches across rank pairs")
    p.add_argument("--compare-serial", action="store_true", help="also run the serial model and report PSNR")
    p.add_argument("--reference", default=None, help="PNG to compare the output with (PSNR in the report)")
    p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the steady-state step as a CUDA graph and replay it (CUDA only; default: on "
                        "for CUDA, off on CPU; --no-cuda-graphs runs every step eagerly)")
    p.add_argument("--kernels", default=None, choices=KERNELS,
                   help="PyTorch ops, or parafuse's Triton kernels: the GroupNorm in two launches, the solver "
                        "update in one, a --kv-codec sign message in one (CUDA; one shape of each checked on an "
                        "H100, see the README); default: triton on CUDA, torch elsewhere")
    p.add_argument("--attention-backend", default=None, choices=("auto", "triton", "sdpa", "xformers"),
                   help="attention kernels: auto (the fastest measured on this device class: sdpa today), "
                        "triton (parafuse's halo attention; CUDA), sdpa, xformers (CUDA, optional extra); "
                        "default: $PARAFUSE_ATTENTION_BACKEND, else auto")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="compute dtype of the model, halos and K/V (default: bf16 on CUDA, fp32 on CPU); "
                        "statistics and the solver stay float32")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds a rank may wait for the others while starting (process group, first steps)")
    p.add_argument("--exchange-timeout", type=float, default=300.0,
                   help="seconds a rank may wait for a neighbour during denoising before the job stops, "
                        "naming the rank that stopped answering")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_pipeline_args(p)
    return p.parse_args(argv)


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """Flags of `--model PATH` with a diffusers pipeline folder (parafuse.diffusers.cli)."""
    p.add_argument("--prompt", default=None, help="diffusers pipeline: the prompt")
    p.add_argument("--negative-prompt", default=None, help="diffusers pipeline: the negative prompt")
    p.add_argument("--prompt-embeds", default=None,
                   help="diffusers pipeline: torch.save'd dict of precomputed embeddings named as the pipeline's "
                        "arguments (prompt_embeds, negative_prompt_embeds, ...), for pipelines without text encoders")


def output_paths(out: str, batch: int) -> list[str]:
    if batch == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}-{i}{ext or '.png'}" for i in range(batch)]


def check_writable(path: str, overwrite: bool) -> None:
    from parafuse.checks import missing_path

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"cannot write {path!r}: {folder!r} is a file, not a folder")
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path!r}: folder {folder!r} {missing_path(folder)}")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path!r}: folder {folder!r} is not writable")
    if os.path.isdir(path):
        raise ValueError(f"cannot write {path!r}: it is a folder")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path!r} exists; pass --overwrite to replace it")


# the flags of `--model PATH` with a diffusers pipeline folder, and their defaults (add_pipeline_args)
PIPELINE_ONLY = {"prompt": None, "negative_prompt": None, "prompt_embeds": None}


def given_flags(args, defaults: dict) -> list[str]:
    """The command-line names of the flags among `defaults` that `args` sets to something else."""
    return [f"--{'[no-]' if k == 'cuda_graphs' else ''}{k.replace('_', '-')}" for k, default in defaults.items()
            if getattr(args, k) != default]


def halo_portion(args) -> float:
    """--halo-portion, or its default where it is not given."""
    return DEFAULT_HALO_PORTION if args.halo_portion is None else args.halo_portion


def check_args(args) -> None:
    """Checks of files, paths and the device, and that --halo-portion, if given, is for a mode with
    a window; the model, solver and parallel settings are checked by the runtime (ParallelConfig,
    Runtime.check), before any denoising."""
    from parafuse import checks

    checks.check_numbers(args)              # both doors: the same limits, before any model loads
    checks.check_device(args.device)
    if args.halo_portion is not None and BASELINES.get(args.mode, args.mode) != "partial":
        raise ValueError(f"--halo-portion sets the window of --mode partial (and pcpp); mode {args.mode!r} "
                         f"{'attends to the whole image' if args.mode != 'none' else 'exchanges nothing'}: drop it")
    if args.weights is not None:
        checks.check_input_file(args.weights, "weights file")
    if args.compare_serial and args.reference is not None:
        raise ValueError("--compare-serial and --reference each set the report's one comparison: give one of them "
                         "(a serial run's image saved with --out can be the --reference of a parallel run)")
    if args.reference is not None:
        checks.check_reference(args.reference, args.height, args.width)
    checks.check_image_name(args.out)
    outputs = {f"--out (image {i})" if args.batch > 1 else "--out": p
               for i, p in enumerate(output_paths(args.out, max(1, args.batch)))}
    if args.report:
        checks.check_output_name(args.report, "--report")
        outputs["--report"] = args.report
    checks.check_distinct(outputs)
    for path in outputs.values():
        check_writable(path, args.overwrite)


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
    """The process group's own timeout: past both host deadlines (parafuse.watchdog), so that the
    watchdog, which names the rank that stopped, always fires first."""
    return max(args.startup_timeout, args.exchange_timeout) + 60.0


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


def weights_fingerprint(path: str | None) -> tuple | None:
    """(size, SHA-256 of the safetensors header) of a weights file: ranks given files of the same
    name but different contents are told apart without reading the tensors."""
    import hashlib
    import struct
    if path is None:
        return None
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = f.read(min(length, 100 << 20))
    return os.path.getsize(path), hashlib.sha256(header).hexdigest()


def check_ranks_agree(runtime, req, weights) -> None:
    """Before the first step: the resolved request and settings, the model and the weights are the
    same on every rank (parafuse.parallel.agreement), compared over the runtime's transport."""
    from dataclasses import asdict, fields

    from parafuse.parallel import agreement
    from parafuse.runtime import dtype_name
    values = {f"request.{f.name}": getattr(req, f.name) for f in fields(req)}
    values.update({f"parallel.{k}": v for k, v in asdict(runtime.parallel).items()})
    values.update({"model": runtime.spec.name, "dtype": dtype_name(runtime.dtype), "kernels": runtime.kernels,
                   "attention backend": runtime.attention_backend, "cuda graphs": runtime.cuda_graphs,
                   "weights file (size, header hash)": weights})
    agreement.check_same(values, "the request", transport=runtime.transport)


def check_finite_weights(model, path: str) -> None:
    import torch
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise ValueError(f"weights file {path!r} holds NaN or infinite values (first in {bad}): it cannot denoise")


def run(args) -> int:
    from contextlib import nullcontext

    import torch

    if os.path.isfile(os.path.join(args.model, "model_index.json")):      # a diffusers pipeline folder
        return run_diffusers(args)
    runtime, req, reference = prepare(args)
    if runtime.spec.untrained and runtime.layout.rank == 0:
        print(f"parafuse.generate: note: model {args.model!r} is untrained (random weights, for benchmarks): "
              f"its images are noise, its timings real", file=sys.stderr)
    with runtime.watchdog.guard("comparing the ranks' requests", 1) if runtime.watchdog else nullcontext():
        check_ranks_agree(runtime, req, weights_fingerprint(args.weights))
    result = runtime.generate(req, progress=not args.no_progress)
    with runtime.watchdog.guard("gathering rank statistics") if runtime.watchdog else nullcontext():
        ranks = runtime.gather_rank_stats(result)
    comparison = compare(args, runtime, req, result, reference) if runtime.layout.rank == 0 else None
    if runtime.layout.world_size > 1:
        # the others wait while rank 0 runs the serial reference: no deadline here (its length is the
        # serial run's); a rank that dies meanwhile still ends the job through torchrun
        torch.distributed.barrier()
    code = 0
    if runtime.layout.rank == 0:
        code = write_outputs(args, runtime, req, result, ranks, comparison)
    runtime.close()
    return code


def prepare(args):
    """Every check, the runtime (model loaded, process group joined, patch layers swapped in) and
    the request, and the reference image if asked for: all before any denoising. A bad input is a
    ValueError saying what to change."""
    from parafuse import report as rep
    from parafuse.checks import CheckError
    from parafuse.models import ModelError
    from parafuse.parallel.geometry import GeometryError
    from parafuse.runtime import ParallelConfig, Request, Runtime
    from parafuse.stages import parse_stages

    check_args(args)
    given = given_flags(args, PIPELINE_ONLY)
    if given:
        raise ValueError(f"{', '.join(given)}: only for a diffusers pipeline folder (--model PATH); the built-in "
                         f"models have no text encoder (their text models take a context tensor through the library's "
                         f"Request(context=...))")
    if args.text_merge is not None:
        raise ValueError("--text-merge: only for diffusers pipelines with joint text+image attention (SD3, Flux); "
                         "the built-in models read text by cross-attention, which needs no merge")
    for name in ("startup_timeout", "exchange_timeout"):
        if not 0 < getattr(args, name) < float("inf"):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {getattr(args, name)}")
    join_job(args, watch=True)
    parallel = ParallelConfig(args.mode, args.warmup_steps, halo_portion(args), args.norm, args.cfg_parallel,
                              args.kv_codec)
    req = Request(args.height, args.width, args.steps, args.solver, args.guidance, args.seed, args.label, args.batch,
                  solver_options={"spacing": args.spacing} if args.spacing else {}, schedule=args.schedule,
                  stages=parse_stages(args.stages) if args.stages is not None else None)
    try:
        runtime = Runtime(args.model, parallel, device=args.device, weights=args.weights, dtype=args.dtype,
                          cuda_graphs=args.cuda_graphs, kernels=args.kernels,
                          attention_backend=args.attention_backend,
                          startup_timeout=args.startup_timeout, exchange_timeout=args.exchange_timeout)
        if args.weights is not None:
            check_finite_weights(runtime.model, args.weights)
        runtime.check(req)
        reference = rep.load_png(args.reference) if args.reference is not None else None
    except (ModelError, GeometryError, CheckError) as e:
        raise ValueError(str(e)) from None
    return runtime, req, reference


def compare(args, runtime, req, result, reference) -> dict | None:
    """Rank 0: the image against a serial run of the same request (--compare-serial) or against
    --reference; None when neither was asked for."""
    from parafuse import report as rep
    from parafuse.models import load_model
    from parafuse.parallel.distributed import ParallelLayout
    from parafuse.runtime import ParallelConfig, Runtime

    if args.compare_serial:
        serial = Runtime(load_model(args.model, args.weights), ParallelConfig(), device=args.device,
                         layout=ParallelLayout(0, 1), dtype=runtime.dtype)
        return rep.compare(result.image, serial.generate(req).image, "serial")
    if reference is not None:
        return rep.compare(result.image[0], reference, args.reference)
    return None


def write_outputs(args, runtime, req, result, ranks, comparison) -> int:
    """Rank 0: every output rendered first, then all written and moved into place together (none
    on failure). Returns the exit status: 1 where an output had to be saved under another name."""
    from parafuse import report as rep
    from parafuse.outputs import commit

    files = {path: rep.png_bytes(image) for image, path in zip(result.image, output_paths(args.out, args.batch))}
    if args.report:
        files[args.report] = rep.json_bytes(rep.build_report(runtime, req, result, ranks, comparison))
    moved = commit(files, overwrite=args.overwrite)
    psnr = ""
    if comparison:
        db = "identical" if comparison["psnr_db"] is None else f"{comparison['psnr_db']:.2f} dB"
        psnr = f", PSNR vs {comparison['reference']} {db}"
    written = [moved.get(p, p) for p in output_paths(args.out, args.batch)]
    print(f"wrote {', '.join(written)} "
          f"({result.timing['total_seconds']:.2f} s denoising on {runtime.layout.world_size} rank(s){psnr})")
    return report_moved(moved)


def report_moved(moved: dict[str, str]) -> int:
    """1, with one line per output, where a file appeared at an output's name during the run: it
    was kept (no --overwrite) and the output saved beside it; else 0."""
    for path, sibling in moved.items():
        print(f"parafuse.generate: error: {path!r} appeared while the run computed and was kept (no --overwrite); "
              f"this run's output is {sibling!r}", file=sys.stderr)
    return 1 if moved else 0


def run_diffusers(args) -> int:
    import importlib.util

    missing = [m for m in ("diffusers", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"--model {args.model!r} is a diffusers pipeline folder, which needs the "
                         f"{' and '.join(missing)} package(s): pip install 'parafuse[diffusers]'")
    from parafuse.diffusers.cli import run_pipeline
    return run_pipeline(args)


def main(argv=None) -> int:
    from parafuse.health import NonFiniteError
    from parafuse.parallel.distributed import launched_by_torchrun, run_guarded
    from parafuse.watchdog import catch_interrupts, close_progress_bars

    rank = int(os.environ.get("RANK", 0))
    if launched_by_torchrun():      # before any thread starts: the exchange threads inherit the mask
        catch_interrupts(rank, "parafuse.generate")
    args = parse_args(argv)
    try:
        code = run_guarded(run, args, user_errors=(ValueError, NonFiniteError))
    except (ValueError, NonFiniteError) as e:
        # the same message on every rank: only rank 0 prints it
        close_progress_bars()
        if rank == 0:
            print(f"parafuse.generate: error: {e}", file=sys.stderr)
        code = 1 if isinstance(e, NonFiniteError) else 2
    except KeyboardInterrupt:
        close_progress_bars()
        print("parafuse.generate: interrupted", file=sys.stderr)
        code = 130
    _shutdown()
    return code


def _shutdown() -> None:
    from parafuse import watchdog
    if watchdog.current() is not None:
        watchdog.current().close()      # its thread must not be inside a store call at exit
    try:
        import gc

        import torch.distributed as dist
        if dist.is_initialized():
            gc.collect()        # drop what still refers to the process group, so destroying it joins its threads
            dist.destroy_process_group()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
