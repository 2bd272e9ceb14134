"""docs/cli.md's flag table, written from the CLI's parser itself, so that it cannot drift from it.

    python -m parafuse.cli_doc            # rewrite the generated block of docs/cli.md
    python -m parafuse.cli_doc --check    # exit 1 if it is out of date (tests/docs/test_docs_flags.py)

Only the block between `<!-- generated:begin flags -->` and `<!-- generated:end flags -->` is
written; the rest of the page is prose kept by hand.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from parafuse.generate import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_MD = os.path.join(ROOT, "docs", "cli.md")
BEGIN, END = "<!-- generated:begin flags -->", "<!-- generated:end flags -->"


def parser_flags(parser: argparse.ArgumentParser | None = None) -> set[str]:
    """Every option string the CLI accepts (`--no-cuda-graphs` included)."""
    parser = parser or build_parser()
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.default is None or action.default is False or re.search(r"\(default[ :]", action.help or ""):
        return ""            # unset (resolved later, as the help says), an off switch, or said in the help
    return f"`{action.default}`"


def flags_block(parser: argparse.ArgumentParser | None = None) -> str:
    """One table per help group: flag, values, default, help."""
    parser = parser or build_parser()
    lines = [BEGIN, ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        lines += [f"### {group.title}", "", "| flag | values | default | what it does |", "|---|---|---|---|"]
        for a in actions:
            flags = " / ".join(f"`{s}`" for s in a.option_strings)
            if a.choices:
                values = ", ".join(f"`{c}`" for c in a.choices)
            elif a.nargs == 0:
                values = "switch"
            else:
                values = f"`{a.metavar or a.dest.upper()}`" + (" …" if a.nargs in ("+", "*") else "")
            lines.append(f"| {flags} | {values} | {_default(a)} | {_cell(a.help or '')} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def render(page: str, block: str) -> str:
    """`page` with its generated flags block replaced by `block` (appended if it has none)."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        return page.rstrip("\n") + "\n\n" + block + "\n"
    return page[:start] + block + page[end + len(END):]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is out of date")
    a = p.parse_args(argv)
    old = open(CLI_MD).read() if os.path.exists(CLI_MD) else "# Command line\n"
    new = render(old, flags_block())
    if a.check:
        if new != old:
            print("docs/cli.md is out of date: run python -m parafuse.cli_doc")
            return 1
        return 0
    with open(CLI_MD, "w") as f:
        f.write(new)
    print("wrote docs/cli.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
