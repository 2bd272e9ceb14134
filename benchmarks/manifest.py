"""The manifest of benchmarks/results/: every committed result file, the script that writes it, and
what its JSON records of where it came from (device, commit, command) - so a figure in the docs can
be traced to its run, and a result nobody can reproduce stands out.

    python benchmarks/manifest.py            # rewrite benchmarks/results/MANIFEST.json
    python benchmarks/manifest.py --check    # exit 1 if it is not current (tests/benchmarks checks it)

A result's script is the benchmark whose name its file name starts with (`quality_2048_grid_cpu.json`:
quality.py; `gpu_check_*`: gpu_check.py); plots share their JSON's entry. Results written before
benchmarks stamped their provenance (benchmarks/common.py) record a device but no commit: the
manifest says `null` there rather than guess one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MANIFEST = os.path.join(RESULTS, "MANIFEST.json")


def scripts() -> list[str]:
    """Benchmark script names, longest first (so `gpu_check` wins over a shorter prefix)."""
    names = [f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and f not in ("common.py", "manifest.py")]
    return sorted(names, key=len, reverse=True)


def script_of(name: str, known: list[str]) -> str | None:
    stem = os.path.splitext(name)[0]
    return next((s + ".py" for s in known if stem == s or stem.startswith(s + "_")), None)


def origin(path: str) -> dict:
    """Device, commit and command as the JSON records them (stamped provenance, else the older
    `hardware` and `command` fields)."""
    with open(path) as f:
        data = json.load(f)
    prov = data.get("provenance") if isinstance(data, dict) else None
    if isinstance(prov, dict):
        return {"device": prov.get("device"), "commit": prov.get("commit"), "dirty": prov.get("dirty"),
                "command": prov.get("command")}
    hw = data.get("hardware") if isinstance(data, dict) and isinstance(data.get("hardware"), dict) else {}
    command = data.get("command") if isinstance(data, dict) else None
    return {"device": hw.get("device") or hw.get("cpu") or (data.get("target") if isinstance(data, dict) else None),
            "commit": None, "dirty": None, "command": command if isinstance(command, str) else None}


def build() -> dict:
    known = scripts()
    entries = {}
    for name in sorted(os.listdir(RESULTS)):
        if name == os.path.basename(MANIFEST) or not name.endswith((".json", ".png")):
            continue
        entry = {"script": script_of(name, known)}
        if name.endswith(".json"):
            entry.update(origin(os.path.join(RESULTS, name)))
        entries[name] = entry
    return {"results": entries}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if MANIFEST.json is not current")
    a = p.parse_args(argv)
    text = json.dumps(build(), indent=2) + "\n"
    if a.check:
        current = open(MANIFEST).read() if os.path.exists(MANIFEST) else ""
        if current != text:
            print(f"{MANIFEST} is not current: run python benchmarks/manifest.py", file=sys.stderr)
            return 1
        return 0
    with open(MANIFEST, "w") as f:
        f.write(text)
    print(f"wrote {MANIFEST} ({len(build()['results'])} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
