"""The manifest of benchmarks/results/: every committed result file, the script that writes it, and
what its JSON records of where it came from (device, commit, command) - so a figure in the docs can
be traced to its run, and a result nobody can reproduce stands out.

    python benchmarks/manifest.py            # rewrite benchmarks/results/MANIFEST.json
    python benchmarks/manifest.py --check    # exit 1 if it is not current (tests/benchmarks checks it)

A result's script is the benchmark whose name its file name starts with (`quality_2048_grid_cpu.json`:
quality.py; `gpu_check_*`: gpu_check.py); plots share their JSON's entry. Each JSON's `schema` is
`parafuse.bench/1` (benchmarks/common.py's `write_result`) or `legacy` (a layout written before it,
read by the same `read_result`). Results written before benchmarks stamped their provenance record
a device but no commit: the manifest says `null` there rather than guess one.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, benchmark_of, parser, read_result  # noqa: E402

MANIFEST = os.path.join(RESULTS, "MANIFEST.json")


def origin(path: str) -> dict:
    """The result's schema (SCHEMA, or LEGACY for a layout written before it) and its device,
    commit and command, as `read_result` reads them."""
    res = read_result(path)
    prov = res["provenance"]
    return {"schema": res["schema"], "device": prov.get("device") or res["hardware"].get("device"),
            "commit": prov.get("commit"), "dirty": prov.get("dirty"), "command": prov.get("command")}


def build() -> dict:
    entries = {}
    for name in sorted(os.listdir(RESULTS)):
        if name == os.path.basename(MANIFEST) or not name.endswith((".json", ".png")):
            continue
        script = benchmark_of(name)
        entry = {"script": script and script + ".py"}
        if name.endswith(".json"):
            entry.update(origin(os.path.join(RESULTS, name)))
        entries[name] = entry
    return {"results": entries}


def main(argv=None) -> int:
    p = parser(__doc__)
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
