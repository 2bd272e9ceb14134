"""Docs hold GPU figures only inside the blocks benchmarks/report.py generates from committed JSON:
any timing or speedup figure elsewhere in README.md or docs/*.md fails, unless marked as a CPU figure
with its JSON source. The README stays a front page: short, with one-line table cells."""
import glob
import os

import pytest

from support import ROOT  # noqa: E402
from report import figures_outside_blocks  # noqa: E402

SOURCE = "benchmarks/results/scaling_cpu.json"      # a committed JSON


@pytest.mark.parametrize("path", [os.path.join(ROOT, "README.md"),
                                  *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))])
def test_no_timing_or_speedup_figure_outside_generated_blocks(path):
    bad = figures_outside_blocks(open(path).read())
    assert not bad, f"{os.path.relpath(path, ROOT)}: figures outside generated blocks (mark CPU figures with " \
                    f"<!-- cpu-figure: benchmarks/results/NAME.json -->): {bad[:5]}"


@pytest.mark.parametrize("line", ["the step took 21.5 ms", "encode 71 µs", "a 4.25× speedup", "7.81x over NVLink",
                                  "copies at 2899 GB/s", "attention at 374 TFLOP/s", "takes 58 us"])
def test_a_figure_outside_a_block_is_found(line):
    assert figures_outside_blocks(f"# title\n\n{line}\n") == [line]


def test_figures_inside_a_block_or_marked_cpu_with_an_existing_source_pass():
    text = ("intro\n<!-- generated:begin speed -->\n| 7.81× | 21.5 ms |\n<!-- generated:end speed -->\n"
            f"on this CPU 2.00x <!-- cpu-figure: {SOURCE} -->\n"
            "a 3 × 3 convolution, 24 heads x 128, 2048² pixels, 8 GPUs\n")
    assert os.path.exists(os.path.join(ROOT, SOURCE))
    assert figures_outside_blocks(text) == []


def test_a_cpu_mark_whose_json_does_not_exist_does_not_excuse_the_figure():
    line = "2.00x <!-- cpu-figure: benchmarks/results/no_such_run.json -->"
    assert figures_outside_blocks(line) == [line]


def test_an_unclosed_or_mismatched_block_does_not_hide_figures():
    text = "<!-- generated:begin a -->\n7.81x\n<!-- generated:end b -->\n"
    assert figures_outside_blocks(text) == ["7.81x"]


def table_cells(text: str) -> list[str]:
    return [cell.strip() for line in text.splitlines() if line.startswith("|")
            for cell in line.strip().strip("|").split("|")]


def test_readme_is_a_front_page():
    """At most 300 lines and 30 KB, no table cell over 150 characters (issue 29's limits)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.splitlines()) <= 300 and len(text.encode()) <= 30_000
    long = [c for c in table_cells(text) if len(c) > 150]
    assert not long, f"README.md table cells over 150 characters: {long[:3]}"


def test_a_long_table_cell_is_found():
    assert table_cells("text | not a table\n| a | " + "x" * 151 + " |\n") == ["a", "x" * 151]
