"""Shared by the benchmark scripts: hardware description and the table / JSON / plot outputs."""
from __future__ import annotations

import json
import os
import platform

import torch

from parafuse.report import device_name

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def hardware() -> dict:
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {"device": device_name(dev), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table of `rows` with (key, header) columns."""
    def fmt(v):
        if isinstance(v, float):
            return "inf" if v == float("inf") else f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(name: str, data: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path
