"""Checks of a request that a user can get wrong, all before any denoising.

Each raises `CheckError` (a ValueError) with one line that says what was wrong and what to do.
`Runtime.check` calls the request checks (numbers, schedule, strips, memory); the CLI calls the
path, device and reference checks before it builds anything.
"""
from __future__ import annotations

import math
import numbers
import os

import numpy as np
import torch

MAX_STEPS = 10_000          # far beyond any useful schedule; a typo of 1e9 steps must not allocate a grid
MAX_BATCH = 1024            # images of one request (each a file for the CLI)
MAX_GUIDANCE = 100.0        # classifier-free guidance is used at 1..20; beyond 100 the image overflows
MAX_SEED = 2 ** 64 - 1      # torch.Generator seeds are 64-bit
TEMP_SUFFIX_LEN = 24        # longest suffix `commit.temp_name` adds to a file name
# Activation memory of one model evaluation, in units of its largest activation (input, output,
# residual and skip tensors alive at once). A floor, not a fit: the refusal must never refuse a
# request that fits, so the estimate errs low.
ACTIVATION_FLOOR = 3


class CheckError(ValueError):
    """A request that cannot run; the message says what to change."""


# ---- one value: type and range, named (shared by Request, Runtime, the CLI and ParallelConfig) --
def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """`value` is an int (bool is not) in [lo, hi]; the error names the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CheckError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    _check_range(name, int(value), lo, hi)
    return int(value)


def check_number(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    """`value` is a finite real number (bool and strings are not) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CheckError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise CheckError(f"{name} must be a finite number, got {value}")
    _check_range(name, value, lo, hi)
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise CheckError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_string(name: str, value, optional: bool = False):
    """`value` is a string, or None where `optional` (which strings a setting takes is checked
    where it is used, with the valid ones listed)."""
    if not (isinstance(value, str) or (optional and value is None)):
        raise CheckError(f"{name} must be a string{' or None' if optional else ''}, got {value!r} "
                         f"({type(value).__name__})")
    return value


def _check_range(name: str, value, lo, hi) -> None:
    stated = f" (range {lo} to {hi})" if lo is not None and hi is not None else ""
    if lo is not None and value < lo:
        raise CheckError(f"{name} must be at least {lo}, got {value}{stated}")
    if hi is not None and value > hi:
        raise CheckError(f"{name} must be at most {hi}, got {value}{stated}")


# ---- numbers of a request: the same limits in both doors (built-in models and pipelines) -------
def check_numbers(req) -> None:
    """Size, steps, batch, seed and guidance of a Request or of the command line's arguments:
    plain range checks, before anything is built from them."""
    check_int("height", req.height, 1)
    check_int("width", req.width, 1)
    check_int("steps", req.steps, 1, MAX_STEPS)
    check_batch(req.batch)
    if not 0 <= check_int("seed", req.seed) <= MAX_SEED:
        raise CheckError(f"seed must be an integer in [0, 2^64 - 1], got {req.seed}")
    check_number("guidance", req.guidance)
    if req.guidance > MAX_GUIDANCE:
        raise CheckError(f"guidance {req.guidance:g} is above {MAX_GUIDANCE:g}: the guided prediction would "
                         f"overflow; classifier-free guidance is used at 1 to 20")
    if req.guidance < 1.0:
        raise CheckError(f"guidance must be >= 1 (1 disables classifier-free guidance), got {req.guidance}")


def check_batch(batch: int) -> None:
    check_int("batch", batch, 1)
    if batch > MAX_BATCH:
        raise CheckError(f"batch must be at most {MAX_BATCH}, got {batch}: run several requests")


# ---- the library's types: Request's fields and Runtime's arguments, each error naming its field --
def check_request(req) -> None:
    """Types and plain ranges of every field of a Request (Request.__post_init__, which it leaves
    holding Python numbers); what depends on the model (size multiples, label range, context
    width, the solver's name) is Runtime.check's."""
    import torch as _torch

    from parafuse.stages import Stage
    check_numbers(req)
    for name in ("solver", "schedule", "upsample"):
        check_string(name, getattr(req, name))
    if req.label is not None:
        check_int("label", req.label, 0)
    if not isinstance(req.solver_options, dict) or not all(isinstance(k, str) for k in req.solver_options):
        raise CheckError(f"solver_options must be a dict of option names, got {req.solver_options!r}")
    if req.context is not None:
        c = req.context
        if not isinstance(c, _torch.Tensor) or c.dim() != 3 or not c.is_floating_point():
            raise CheckError(f"context must be a floating-point tensor [batch, L, context_dim], got "
                             f"{tuple(c.shape) if isinstance(c, _torch.Tensor) else type(c).__name__}")
        if c.shape[0] not in (1, req.batch):
            raise CheckError(f"context has batch {c.shape[0]}, the request batch {req.batch}: give one context "
                             f"[1, L, D] for every image or one per image [{req.batch}, L, D]")
    if req.stages is not None:
        if not isinstance(req.stages, (tuple, list)) or not all(isinstance(s, Stage) for s in req.stages):
            raise CheckError(f"stages must be a tuple of parafuse.stages.Stage, got {req.stages!r}: build them with "
                             f"Stage(height, width, steps, ...) or parse_stages(['HxW:STEPS', ...])")
    # numpy integers and floats pass the checks; the fields keep Python's (torch's seeding takes no numpy int)
    for name in ("height", "width", "steps", "batch", "seed") + (("label",) if req.label is not None else ()):
        object.__setattr__(req, name, int(getattr(req, name)))
    object.__setattr__(req, "guidance", float(req.guidance))


def check_runtime_args(args: dict) -> None:
    """Types of Runtime's arguments, by name (`locals()` at the top of Runtime.__init__; names it
    does not know are left alone); values are checked where they are used."""
    import torch.nn as nn

    from parafuse.parallel.distributed import ParallelLayout
    from parafuse.parallel.transport import Transport
    from parafuse.parallel.config import PatchConfig
    kinds = {"model": ((str, nn.Module), "a built-in model's name or an nn.Module"),
             "parallel": ((PatchConfig, type(None)), "a PatchConfig (or ParallelConfig(...)) or None"),
             "device": ((str, torch.device, type(None)), "a device string, a torch.device or None"),
             "weights": ((str, os.PathLike, type(None)), "a safetensors file's path or None"),
             "layout": ((ParallelLayout, type(None)), "a ParallelLayout or None"),
             "transport": ((Transport, type(None)), "a Transport or None"),
             "dtype": ((str, torch.dtype, type(None)), "fp32, bf16, fp16, a torch.dtype or None"),
             "cuda_graphs": ((bool, type(None)), "True, False or None"),
             "kernels": ((str, type(None)), "a string or None"),
             "attention_backend": ((str, type(None)), "a string or None")}
    for name, value in args.items():
        if name in kinds and not isinstance(value, kinds[name][0]):
            raise CheckError(f"Runtime: {name} must be {kinds[name][1]}, got {value!r} ({type(value).__name__})")
    for name in ("startup_timeout", "exchange_timeout"):
        if args.get(name) is not None and check_number(name, args[name]) <= 0:
            raise CheckError(f"{name} must be a positive number of seconds, got {args[name]}")


# ---- schedule --------------------------------------------------------------------------------
def _repeats(solver) -> int | None:
    """Grid index of the first evaluation whose σ does not decrease from the previous one."""
    sig = solver.sigmas.numpy()
    same = np.nonzero(np.diff(sig) >= 0)[0]
    return int(same[0]) if len(same) else None


def check_schedule(runtime, req) -> None:
    """A grid that repeats a timestep makes multistep solvers divide by a zero step (NaN or a
    ZeroDivisionError): refuse it and say how many steps this spacing allows."""
    try:
        solver = runtime.make_solver(req)
    except (ValueError, TypeError) as e:
        raise CheckError(f"solver {req.solver!r}: {e}") from None
    k = _repeats(solver)
    if k is None:
        return
    spacing = req.solver_options.get("spacing") or "the default"
    # a grid of integer timesteps holds at most num_train_timesteps distinct ones: search below that
    start = min(req.steps - 1, getattr(solver.schedule, "num_train_timesteps", req.steps - 1))
    fits = next((n for n in range(start, 0, -1) if _repeats(runtime.make_solver(_with_steps(req, n))) is None), 1)
    raise CheckError(f"--steps {req.steps} with {spacing} spacing repeats a timestep at step {k + 1} (model "
                     f"{runtime.spec.name!r} has {runtime.spec.schedule.get('num_train_timesteps', 1000)} training "
                     f"timesteps): use --steps {fits} or fewer, or --spacing karras")


def _with_steps(req, steps: int):
    from dataclasses import replace
    return replace(req, steps=steps)


# ---- strips, in pixels -------------------------------------------------------------------------
def strip_geometry(runtime, req):
    """The request's strip geometry; a strip too thin for the model is refused in the pixels the
    user typed, with the number of ranks that would work and the height that would."""
    from parafuse.parallel.geometry import GeometryError, StripGeometry

    spec, n = runtime.spec, runtime.layout.patch_degree
    c, unit = spec.codec_factor, spec.downsample_factor

    def geometry(height_px: int, strips: int):
        g = StripGeometry(height_px // c, req.width // c, strips, unit)
        runtime.profile.check_strips(g)
        return g

    try:
        return geometry(req.height, n)
    except GeometryError:
        pass
    step = c * unit
    ranks = next((m for m in range(n - 1, 0, -1) if _fits(geometry, req.height, m)), 1)
    height = next(h for h in range(req.height + step, req.height + step * (64 * n + 64), step) if _fits(geometry, h, n))
    raise CheckError(f"height {req.height} px is too short for {n} strips of model {spec.name!r} (each strip needs "
                     f"enough rows for the model's halos): use at most {ranks} rank(s) at this height, or a height "
                     f"of at least {height} px")


def _fits(geometry, height_px: int, strips: int) -> bool:
    from parafuse.parallel.geometry import GeometryError
    try:
        geometry(height_px, strips)
        return True
    except GeometryError:
        return False


# ---- memory ----------------------------------------------------------------------------------
def available_memory(device: torch.device) -> int:
    """Bytes one rank can use: free device memory on CUDA; on CPU the host's available memory
    shared by the ranks of this node."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 1 << 62         # unknown: do not refuse
    return avail // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def estimate_memory(runtime, req, geometry) -> dict:
    """A lower estimate of the bytes one rank needs for `req`, by part:
    weights; the full-image noise and this strip's latent with the solver history (float32);
    the exchange buffers of the patch plan; the activations of one evaluation (a floor of
    ACTIVATION_FLOOR times the largest activation of any site, at the strip's rows); rank 0's
    decoded image."""
    spec = runtime.spec
    batch = runtime.model_batch(req)
    item = torch.empty((), dtype=runtime.dtype).element_size()
    weights = sum(p.numel() * p.element_size() for p in runtime.model.parameters())
    rows = max(geometry.rows)
    latent = req.batch * spec.latent_channels * geometry.width * 4
    state = latent * (geometry.height + 6 * rows)          # full noise once; x, x̂0 and up to 4 history tensors
    buffers, activations = (strip_memory(runtime.plan(geometry, batch), item) if runtime.engine is not None
                            else (0, activation_floor(runtime.profile.sites, geometry, batch, item)))
    image = req.batch * 3 * req.height * req.width * 4 if runtime.layout.rank == 0 else 0
    parts = {"weights": weights, "latent_and_solver": state, "exchange_buffers": buffers,
             "activations": activations, "image": image}
    parts["total"] = sum(parts.values())
    return parts


def activation_floor(sites, geometry, batch: int, item: int) -> int:
    """ACTIVATION_FLOOR times the largest activation of any site, at the strip's tokens (its rows
    times the width, over every grid of a token sequence)."""
    largest = 0
    for s in sites:
        largest = max(largest, s.channels * max(geometry.tokens(s.factor)))
    return ACTIVATION_FLOOR * largest * batch * item


def strip_memory(plan, item: int) -> tuple[int, int]:
    """(exchange buffers, activation floor) in bytes of one strip under `plan`."""
    from parafuse.parallel.plan import SiteKind

    buffers = 0
    for s in plan.sites.values():
        if s.kind == SiteKind.CONV:
            buffers += sum(math.prod(sh) for sh in plan.halo_shapes(s)) * item
        elif s.kind == SiteKind.ATTN:
            kv = math.prod(plan.kv_shape(s, plan.stale_step.kv)) * item
            # --kv-codec sign keeps the mirror's drift beside the K/V buffer (parallel.kv_codec)
            buffers += kv * (2 if plan.settings.kv_codec != "none" and plan.stale_step.stale else 1)
    return buffers, activation_floor(plan.sites.values(), plan.geometry, plan.batch, item)


def check_strip_memory(plan, device: torch.device, other: int, what: str) -> None:
    """The diffusers door's memory floor: a strip's buffers and activations under `plan`, and
    `other` bytes the door holds besides, against what this rank has free (weights already loaded)."""
    item = torch.empty((), dtype=plan.dtype).element_size()
    buffers, activations = strip_memory(plan, item)
    need, have = buffers + activations + other, available_memory(device)
    if need <= have:
        return
    n = plan.n
    raise CheckError(f"{what} needs at least {_size(need)} per rank on {n} rank(s) besides the weights "
                     f"({_size(activations)} of it activations), but {_size(have)} is free on {device}: use about "
                     f"{math.ceil(n * need / max(have, 1))} ranks, or a smaller image")


def check_fits(runtime, req, geometry) -> None:
    """Refuse a request whose lower memory estimate exceeds what this rank has, saying how many
    ranks or how small an image would fit. The weights are already loaded when this runs, so the
    free memory is compared with the rest, which all shrinks with the strip or the image."""
    need = estimate_memory(runtime, req, geometry)
    have = available_memory(runtime.device)
    more = need["total"] - need["weights"]
    if more <= have:
        return
    share = have / more
    n, f = runtime.layout.patch_degree, runtime.spec.pixel_factor
    w, h = (max(f, int(math.sqrt(share) * side) // f * f) for side in (req.width, req.height))
    hint = (f"an image of at most {w}x{h} px" if req.batch == 1 else f"a batch of at most {max(1, int(req.batch * share))}")
    raise CheckError(f"{req.width}x{req.height} px (batch {req.batch}) needs at least {_size(more)} per rank on {n} "
                     f"rank(s) besides the weights ({_size(need['activations'])} of it activations), but {_size(have)} "
                     f"is free on {runtime.device}: use about {math.ceil(n / share)} ranks, or {hint}")


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


# ---- files and devices (CLI) -------------------------------------------------------------------
IMAGE_EXTENSIONS = (".png",)


def missing_path(path: str) -> str:
    """Why `path` cannot be reached, in words: too long for the file system, under a regular file,
    or missing."""
    full = os.path.abspath(path)
    try:
        path_max = os.pathconf("/", "PC_PATH_MAX")
        name_max = os.pathconf("/", "PC_NAME_MAX")
    except (OSError, ValueError):
        path_max, name_max = 4096, 255
    if len(os.fsencode(full)) >= path_max:
        return f"is {len(os.fsencode(full))} bytes long; this file system allows {path_max - 1}"
    long = next((n for n in full.split(os.sep) if len(os.fsencode(n)) > name_max), None)
    if long is not None:
        return f"has a name of {len(os.fsencode(long))} bytes; this file system allows {name_max}"
    parent = os.path.dirname(full)
    while parent != os.path.dirname(parent) and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
        return f"lies under {parent!r}, which is a file, not a folder"
    return "does not exist"


def check_input_file(path: str, what: str) -> None:
    """`path` is an existing regular file: a folder or a missing path is named as what it is."""
    if os.path.isdir(path):
        raise CheckError(f"{what} {path!r} is a folder; give a file")
    if not os.path.isfile(path):
        raise CheckError(f"{what} {path!r} {missing_path(path)}")


def read_json(path: str, what: str):
    """The JSON in `path`; a file that is not JSON is named, with where it stops being JSON."""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckError(f"{what} {path!r} is not JSON ({e}): the folder is damaged; save the pipeline again") from None
    except OSError as e:
        raise CheckError(f"{what} {path!r} cannot be read ({e.strerror})") from None


def check_output_name(path: str, what: str) -> None:
    if not path:
        raise CheckError(f"{what} is empty: give a file name such as image.png")
    name = os.path.basename(path)
    if not name:
        raise CheckError(f"{what} {path!r} names a folder: give a file name such as {os.path.join(path, 'image.png')}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        name_max = os.pathconf(folder if os.path.isdir(folder) else "/", "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(name)) + TEMP_SUFFIX_LEN > name_max:
        raise CheckError(f"{what} file name is {len(os.fsencode(name))} bytes long; this file system allows "
                         f"{name_max} (less {TEMP_SUFFIX_LEN} for the temporary name): use a shorter name")


def check_image_name(path: str) -> None:
    check_output_name(path, "--out")
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        raise CheckError(f"--out {path!r}: parafuse writes lossless 8-bit PNG only; use a name ending in .png"
                         + (f" (not {ext})" if ext else ""))


def check_distinct(paths: dict[str, str]) -> None:
    """Refuse two outputs of one run that name the same file (one would overwrite the other)."""
    seen: dict[str, str] = {}
    for what, path in paths.items():
        real = os.path.realpath(path)
        if real in seen:
            raise CheckError(f"{seen[real]} and {what} are the same file {path!r}: give each output its own name")
        seen[real] = what


def check_reference(path: str, height: int, width: int) -> None:
    """The reference must be a readable PNG of the output's size, decoded whole."""
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        raise CheckError(f"reference {path!r} is a folder; give a PNG file")
    if not os.path.isfile(path):
        raise CheckError(f"reference image {path!r} {missing_path(path)}")
    try:
        with Image.open(path) as img:
            fmt, size = img.format, img.size
            img.load()                      # every pixel decoded now: a truncated file fails here, not after compute
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CheckError(f"reference {path!r} is not a readable image ({type(e).__name__}: {e}); give a "
                         f"whole PNG file") from None
    if fmt != "PNG":
        raise CheckError(f"reference {path!r} is {fmt}, not PNG: give a PNG (a lossy format would lower the PSNR)")
    if size != (width, height):
        raise CheckError(f"reference {path!r} is {size[0]}x{size[1]}, the output {width}x{height}")


def check_device(requested: str | None, allow_meta: bool = False) -> None:
    """A device string the runtime can use: cpu, cuda, cuda:N (N below the device count); the
    library also takes `meta` (trace and plan a model without allocating; the CLI makes images)."""
    if requested is None:
        return
    try:
        dev = torch.device(requested)
    except (RuntimeError, ValueError):
        raise CheckError(f"unknown device {requested!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda") and not (allow_meta and dev.type == "meta"):
        raise CheckError(f"device {requested!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckError(f"device {requested!r} asked for, but this machine has no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CheckError(f"device {requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:
            raise CheckError(f"--device {requested} would put every rank of this node on one GPU; use --device cuda "
                             f"(each rank takes the GPU of its LOCAL_RANK)")
