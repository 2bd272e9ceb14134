"""The run report (DESIGN.md section 5): one schema for every run."""
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


def build_report(runtime, req, result, ranks: list[dict], comparison: dict | None = None) -> dict:
    from parafuse.runtime import dtype_name

    par, steps = runtime.parallel, result.timing["step_seconds"]
    total_sent = sum(sum(r["bytes_sent"].values()) for r in ranks)
    return {
        "model": runtime.spec.name, "height": req.height, "width": req.width, "steps": req.steps,
        "solver": req.solver, "guidance": req.guidance, "seed": req.seed, "batch": req.batch,
        "device": device_name(runtime.device), "torch": torch.__version__,
        "world_size": runtime.layout.world_size, "mode": par.mode if runtime.layout.patch_degree > 1 else "serial",
        "warmup_steps": par.warmup_steps, "halo_portion": par.halo_portion, "cfg_parallel": par.cfg_parallel,
        "norm_mode": runtime.engine.norm_mode if runtime.engine is not None else None,
        "kv_codec": par.kv_codec,
        "attention_backend": runtime.attention_backend, "dtype": dtype_name(runtime.dtype),
        "cuda_graphs": runtime.cuda_graphs, "kernels": runtime.kernels,
        "schedule": req.schedule if req.stages is None else "stages",
        "stages": result.timing["stages"],       # per stage: size (px), steps, shift, strength, evaluations, seconds
        "total_seconds": result.timing["total_seconds"], "step_seconds": steps,
        "flops": result.timing["flops"],
        "ranks": [{k: r[k] for k in ("rank", "rows", "bytes_sent", "bytes_received", "bytes_sent_per_peer",
                                      "bytes_received_per_peer", "peak_memory_bytes", "state_bytes")}
                  for r in ranks],
        "bytes_sent_per_step": total_sent / max(1, len(steps)),
        "compare": comparison,
    }


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
