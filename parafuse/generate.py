"""Generate one high-resolution image, on one process or patch-parallel under torchrun.

    python -m parafuse.generate --height 1024 --width 1024 --out image.png
    torchrun --nproc_per_node 4 -m parafuse.generate --mode partial --height 2048 --width 2048

Every argument is checked before any denoising; a bad one exits with status 2 and one line on
stderr, and writes nothing. Outputs are written atomically (temporary file, then rename).
"""
from __future__ import annotations

import argparse
import enum
import os
import re
import sys

from parafuse.job import join_job, output_paths, report_moved
from parafuse.models import MODELS
from parafuse.parallel.config import FIELDS, PatchConfig
from parafuse.parallel.config import defaults as config_defaults
from parafuse.solvers import SOLVERS
from parafuse.stages import (DEFAULT_SHIFT_REFERENCE_PX, DEFAULT_SHIFT_SCALES, DEFAULT_STEPS, DEFAULT_STRENGTHS,
                             PUBLISHED_BASE_SHIFT, PUBLISHED_SHIFTS, PUBLISHED_STEPS, PUBLISHED_STRENGTHS, SCHEDULES)

CONFIG_DEFAULTS = config_defaults()


def _slashed(values, unit: str = "") -> str:
    return "/".join(f"{v:g}{unit}" for v in values)


# the bottleneck schedule's help, from the constants that define it (so it cannot drift from them)
SCHEDULE_HELP = (f"plain: every step at the image size; bottleneck: full, half, full resolution with stage steps "
                 f"{_slashed(DEFAULT_STEPS)} per 50 --steps, strengths {_slashed(DEFAULT_STRENGTHS)}, shifts "
                 f"{_slashed(DEFAULT_SHIFT_SCALES, 'x')} the model's, the first growing as "
                 f"sqrt(pixels)/{DEFAULT_SHIFT_REFERENCE_PX} above {DEFAULT_SHIFT_REFERENCE_PX}² (the published "
                 f"{_slashed(PUBLISHED_STEPS)}, {_slashed(PUBLISHED_STRENGTHS)}, "
                 f"{_slashed([s / PUBLISHED_BASE_SHIFT for s in PUBLISHED_SHIFTS], 'x')}: an explicit --stages "
                 f"list; docs/bottleneck.md)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Under torchrun every rank parses the same arguments: only rank 0 says what is wrong."""
        if int(os.environ.get("RANK", 0)) == 0:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say its default and X is a value
    (not None, not an off switch's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or re.search(r"\(default[ :]", action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser (also read by parafuse.cli_doc, which writes docs/cli.md from it)."""
    p = _Parser(prog="parafuse.generate", description=__doc__.split("\n\n")[0],
                formatter_class=_HelpFormatter)
    groups = {name: p.add_argument_group(title) for name, title in GROUPS.items()}
    image, sampling, outputs = groups["image"], groups["sampling"], groups["outputs"]
    image.add_argument("--model", default="default",
                       help=f"built-in model ({', '.join(MODELS)}) or a local diffusers pipeline folder")
    image.add_argument("--weights", default=None, help="safetensors file overriding the model's own weights")
    image.add_argument("--height", type=int, default=512, help="image height in pixels")
    image.add_argument("--width", type=int, default=512, help="image width in pixels")
    image.add_argument("--seed", type=int, default=0, help="noise seed (the noise is drawn for the whole image, "
                                                                "so the image does not depend on the rank count)")
    image.add_argument("--batch", type=int, default=1, help="images generated together (seeded as one noise tensor)")
    image.add_argument("--label", type=int, default=None, help="class label for class-conditional models")
    sampling.add_argument("--steps", type=int, default=20,
                          help="denoising steps = model evaluations, for every solver, of the one-stage schedule; "
                               "the bottleneck schedule scales its stages to it and reports its FLOPs against it")
    sampling.add_argument("--schedule", default="plain", choices=SCHEDULES,
                          help=SCHEDULE_HELP)
    sampling.add_argument("--stages", nargs="+", default=None, metavar="HxW:STEPS[:STRENGTH[:SHIFT]]",
                          help="an explicit stage list, e.g. 256x256:20 512x512:8:0.6:3; the last stage is the "
                               "image size; a stage entered at strength w runs the last ceil(w*STEPS) steps of its "
                               "grid")
    sampling.add_argument("--solver", default="dpmpp-2m", help=f"one of: {', '.join(SOLVERS)}")
    sampling.add_argument("--spacing", default=None, choices=("linspace", "leading", "trailing", "karras"),
                          help="timestep spacing, as diffusers' timestep_spacing (default linspace; flow models: "
                               "the σ table of the solver's diffusers scheduler, leading/trailing refused)")
    sampling.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    add_config_args(groups)
    outputs.add_argument("--out", default="parafuse.png",
                         help="output PNG (with --batch > 1: NAME-0.png, NAME-1.png, ...)")
    outputs.add_argument("--report", default=None, help="write the run report (JSON) here")
    outputs.add_argument("--overwrite", action="store_true", help="replace existing output files")
    outputs.add_argument("--compare-serial", action="store_true", help="also run the serial model and report PSNR")
    outputs.add_argument("--reference", default=None, help="PNG to compare the output with (PSNR in the report)")
    outputs.add_argument("--no-progress", action="store_true", help="no progress bar")
    groups["gpu"].add_argument("--device", default=None,
                               help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    add_pipeline_args(groups["pipeline"])
    return p


GROUPS = {"image": "image", "sampling": "sampling", "parallel": "parallel (PatchConfig)",
          "gpu": "GPU (PatchConfig)", "deadlines": "deadlines (PatchConfig)", "outputs": "outputs",
          "pipeline": "diffusers pipeline folders (--model PATH)"}


def add_config_args(groups: dict) -> None:
    """One flag per PatchConfig setting: its type, choices, default and help from `config.FIELDS`."""
    for name, f in FIELDS.items():
        group, default = groups[f.group], CONFIG_DEFAULTS[name]
        if f.kind is bool and default is None:
            group.add_argument(f.option(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=f.help)
        elif f.kind is bool:
            group.add_argument(f.option(name), dest=name, action="store_true", help=f.help)
        elif isinstance(f.kind, type) and issubclass(f.kind, enum.Enum):
            group.add_argument(f.option(name), dest=name, default=None if default is None else default.value,
                               choices=[m.value for m in f.kind], help=f.help)
        else:
            group.add_argument(f.option(name), dest=name, type=f.kind, default=default, help=f.help)


def config_from_args(args) -> PatchConfig:
    """The PatchConfig of the command line (a bad combination: ConfigError, a ValueError)."""
    return PatchConfig(**{name: getattr(args, name) for name in FIELDS})


def add_pipeline_args(p) -> None:
    """Flags of `--model PATH` with a diffusers pipeline folder (parafuse.diffusers.cli)."""
    p.add_argument("--prompt", default=None, help="diffusers pipeline: the prompt")
    p.add_argument("--negative-prompt", default=None, help="diffusers pipeline: the negative prompt")
    p.add_argument("--prompt-embeds", default=None,
                   help="diffusers pipeline: torch.save'd dict of precomputed embeddings named as the pipeline's "
                        "arguments (prompt_embeds, negative_prompt_embeds, ...), for pipelines without text encoders")


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
# the flags that pick parafuse's own samplers and models: a diffusers pipeline has its own (its
# scheduler, its one-stage schedule)
BUILTIN_ONLY = {"weights": None, "solver": "dpmpp-2m", "spacing": None, "label": None, "compare_serial": False,
                "reference": None, "schedule": "plain", "stages": None}


def given_flags(args, defaults: dict) -> list[str]:
    """The command-line names of the flags among `defaults` that `args` sets to something else."""
    return [f"--{k.replace('_', '-')}" for k, default in defaults.items() if getattr(args, k) != default]


def check_args(args) -> PatchConfig:
    """The parallel settings (PatchConfig), and checks of files, paths and the device; the model and
    solver are checked by the runtime (Runtime.check), before any denoising."""
    from parafuse import checks

    checks.check_numbers(args)              # both doors: the same limits, before any model loads
    config = config_from_args(args)
    checks.check_device(args.device)
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
    return config


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
    result = runtime.generate(req, progress=not args.no_progress)     # compares the ranks' requests first
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
    from parafuse.runtime import Request, Runtime
    from parafuse.stages import parse_stages

    parallel = check_args(args)
    given = given_flags(args, PIPELINE_ONLY)
    if given:
        raise ValueError(f"{', '.join(given)}: only for a diffusers pipeline folder (--model PATH); the built-in "
                         f"models have no text encoder (their text models take a context tensor through the library's "
                         f"Request(context=...))")
    if args.text_merge is not None:
        raise ValueError("--text-merge: only for diffusers pipelines with joint text+image attention (SD3, Flux, "
                         "Qwen-Image); the built-in models read text by cross-attention, which needs no merge")
    join_job(args, watch=True)
    req = Request(args.height, args.width, args.steps, args.solver, args.guidance, args.seed, args.label, args.batch,
                  solver_options={"spacing": args.spacing} if args.spacing else {}, schedule=args.schedule,
                  stages=parse_stages(args.stages) if args.stages is not None else None)
    try:
        runtime = Runtime(args.model, parallel, device=args.device, weights=args.weights)
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
    from parafuse.runtime import Runtime

    if args.compare_serial:
        serial = Runtime(load_model(args.model, args.weights), PatchConfig(dtype=runtime.config.dtype),
                         device=args.device, layout=ParallelLayout(0, 1))
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


def run_diffusers(args) -> int:
    import importlib.util

    missing = [m for m in ("diffusers", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"--model {args.model!r} is a diffusers pipeline folder, which needs the "
                         f"{' and '.join(missing)} package(s): pip install 'parafuse[diffusers]'")
    config = check_args(args)
    given = given_flags(args, BUILTIN_ONLY)
    if given:
        raise ValueError(f"{', '.join(given)}: only for parafuse's built-in models; a diffusers pipeline runs "
                         f"with its own weights, scheduler and one-stage schedule")
    from parafuse.diffusers.cli import run_pipeline
    return run_pipeline(args, config, output_paths(args.out, args.batch))


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
