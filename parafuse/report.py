"""The run report (docs/design.md §5): one schema for every run."""
from __future__ import annotations

import json
import math
import os
import platform

import torch


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1], measured on the [0, 1] scale (inf when identical)."""
    mse = ((a.float() - b.float()) / 2).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def compare(image: torch.Tensor, reference: torch.Tensor, name: str) -> dict:
    """PSNR and max abs difference; identical images have no finite PSNR: psnr_db is then null
    (strict JSON has no Infinity) and `identical` says why."""
    db = psnr(image, reference)
    return {"reference": name, "psnr_db": db if math.isfinite(db) else None, "identical": not math.isfinite(db),
            "max_abs_diff": ((image.float() - reference.float()) / 2).abs().max().item()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({cpu}, {os.cpu_count()} cores)"


def run_report(session, run: dict, timing: dict, ranks: list[dict], comparison: dict | None = None) -> dict:
    """The report of one request, the same keys from both doors: `run` holds what was asked (model,
    pipeline, size, steps, solver, guidance, seed, batch, schedule), `timing` what the door measured
    (total_seconds, step_seconds, and flops and stages where the door knows them)."""
    cfg, lay = session.config, session.layout
    steps = timing["step_seconds"]
    total_sent = sum(sum(r["bytes_sent"].values()) for r in ranks)
    parallel = lay.patch_degree > 1
    return {
        **{k: run.get(k) for k in RUN_KEYS},
        "device": device_name(session.device), "torch": torch.__version__, "diffusers": _version("diffusers"),
        "world_size": lay.world_size, "mode": cfg.mode.value if parallel else "serial",
        "warmup_steps": cfg.warmup_steps, "halo_portion": cfg.halo_portion, "cfg_parallel": cfg.cfg_parallel,
        "norm_mode": cfg.norm_mode.value if parallel else None, "text_merge": cfg.text_merge.value,
        "kv_codec": cfg.kv_codec.value, "attention_backend": cfg.attention_backend.value, "dtype": cfg.dtype.value,
        "cuda_graphs": cfg.cuda_graphs, "kernels": cfg.kernels.value,
        "stages": timing.get("stages"),       # per stage: size (px), steps, shift, strength, evaluations, seconds
        "total_seconds": timing["total_seconds"], "step_seconds": steps, "flops": timing.get("flops"),
        "ranks": [{k: r[k] for k in RANK_KEYS} for r in ranks],
        "bytes_sent_per_step": total_sent / max(1, len(steps)),
        "compare": comparison,
    }


RUN_KEYS = ("model", "pipeline", "height", "width", "steps", "solver", "guidance", "seed", "batch", "schedule")
RANK_KEYS = ("rank", "rows", "evaluations", "bytes_sent", "bytes_received", "bytes_sent_per_peer",
             "bytes_received_per_peer", "peak_memory_bytes", "state_bytes")


def build_report(runtime, req, result, ranks: list[dict], comparison: dict | None = None) -> dict:
    """A built-in model's run report (`run_report`)."""
    run = {"model": runtime.spec.name, "pipeline": None, "height": req.height, "width": req.width, "steps": req.steps,
           "solver": req.solver, "guidance": req.guidance, "seed": req.seed, "batch": req.batch,
           "schedule": req.schedule if req.stages is None else "stages"}
    return run_report(runtime.session, run, result.timing, ranks, comparison)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def json_bytes(data: dict) -> bytes:
    """Strict JSON: a NaN or Infinity raises instead of writing what parsers reject."""
    return json.dumps(data, indent=2, allow_nan=False).encode()


def png_bytes(image: torch.Tensor) -> bytes:
    """[3, H, W] in [-1, 1] as an 8-bit PNG."""
    import io

    from PIL import Image

    arr = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def load_png(path: str) -> torch.Tensor:
    from PIL import Image
    import numpy as np

    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1
