"""Help that cannot drift: every `--flag` the README and docs/ name exists in the CLI's parser, every
parser flag is documented (docs/cli.md's table, generated from the parser), and that table is current."""
import glob
import os
import re

import pytest

from parafuse.cli_doc import BEGIN, CLI_MD, END, flags_block, parser_flags, render

from support import ROOT  # noqa: E402
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
# flags of torchrun itself, which the pages show in front of `-m parafuse.generate`
TORCHRUN = {"--nproc_per_node", "--nproc-per-node", "--nnodes", "--node_rank", "--node-rank", "--standalone",
            "--rdzv_backend", "--rdzv-backend", "--rdzv_endpoint", "--rdzv-endpoint", "--master_addr",
            "--master_port"}
# a code span or code line that runs another program: its flags are that program's, not the CLI's
OTHER_PROGRAM = re.compile(r"\.py\b|\.sh\b|pytest|parafuse\.train|parafuse\.cli_doc|\bpip\b|\bgit\b")


def spans(text: str) -> list[str]:
    """The pieces of a page a flag is read from: each code line (fenced or indented), each inline code
    span (which may run over a line break), and the prose around them."""
    code, prose, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            prose.append("")
        elif fenced or line.startswith("    ") and not line.lstrip().startswith(("-", "*", "|")):
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
    rest = "\n".join(prose)
    return code + re.findall(r"`([^`]+)`", rest) + [re.sub(r"`[^`]+`", " ", rest)]


def flags_named(text: str) -> set[str]:
    return {f for s in spans(text) if not OTHER_PROGRAM.search(s) for f in FLAG.findall(s)}


@pytest.mark.parametrize("path", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_flag_a_page_names_exists(path):
    unknown = flags_named(open(path).read()) - parser_flags() - TORCHRUN
    assert not unknown, f"{os.path.relpath(path, ROOT)} names flags parafuse.generate does not have: {sorted(unknown)}"


def test_every_parser_flag_is_documented():
    text = "".join(open(p).read() for p in PAGES)
    undocumented = {f for f in parser_flags() if f"`{f}`" not in text}
    assert not undocumented, f"flags documented nowhere (run python -m parafuse.cli_doc): {sorted(undocumented)}"


def test_the_flag_table_is_generated_from_the_parser_and_current():
    page = open(CLI_MD).read()
    assert BEGIN in page and END in page
    assert render(page, flags_block()) == page, "docs/cli.md is out of date: run python -m parafuse.cli_doc"


def test_a_stale_table_or_an_unknown_flag_is_caught():
    page = open(CLI_MD).read()
    assert render(page.replace("`--height`", "`--heigth`"), flags_block()) != page.replace("`--height`", "`--heigth`")
    assert flags_named("run `python -m parafuse.generate --heigth 64`") - parser_flags() == {"--heigth"}
    assert flags_named("    python benchmarks/scaling.py --smoke") == set()
    assert flags_named("see `python benchmarks/scaling.py\n--smoke`") == set()
    assert flags_named("torchrun --nproc_per_node 2 -m parafuse.generate --mode sync") - parser_flags() == \
        {"--nproc_per_node"}
