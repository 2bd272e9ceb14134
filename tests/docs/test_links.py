"""Links in README.md and docs/: no relative link leaves the repository, none points to a missing
file, and none to a missing #anchor (GitHub's heading slugs)."""
import glob
import os
import re
from urllib.parse import unquote

import pytest

from support import ROOT  # noqa: E402
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s.*)?$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)      # http:, https:, mailto:, ...


def without_code(text: str) -> str:
    """The page with fenced and indented code and inline code spans blanked out (links there are text)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        elif fenced or line.startswith("    ") and not line.lstrip().startswith(("-", "*", "|")):
            out.append("")
        else:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links reduced to their text, tags dropped, lower case, every
    character but letters, digits, spaces, hyphens and underscores removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set[str]:
    seen, out, fenced = {}, set(), False
    for line in open(path).read().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    out |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", open(path).read()))
    return out


def links(path: str) -> list[str]:
    text = without_code(open(path).read())
    return INLINE.findall(text) + REFERENCE.findall(text)


def broken(path: str, root: str = ROOT) -> list[str]:
    bad = []
    for target in links(path):
        if EXTERNAL.match(target):
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), unquote(file))) if file else path
        if os.path.relpath(dest, root).startswith(".."):
            bad.append(f"{target}: leaves the repository")
        elif not os.path.exists(dest):
            bad.append(f"{target}: no such file")
        elif anchor and dest.endswith(".md") and unquote(anchor) not in anchors(dest):
            bad.append(f"{target}: no heading with this anchor in {os.path.relpath(dest, root)}")
    return bad


@pytest.mark.parametrize("path", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve_inside_the_repository(path):
    bad = broken(path)
    assert not bad, f"{os.path.relpath(path, ROOT)}: {bad}"


def test_slugs_follow_github():
    assert slug("On a GPU: NVIDIA H100 80GB HBM3, torch 2.11.0+cu130") == "on-a-gpu-nvidia-h100-80gb-hbm3-torch-2110cu130"
    assert slug("The `--kv-codec sign` codec") == "the---kv-codec-sign-codec"
    assert slug("Issue 13's targets at a glance") == "issue-13s-targets-at-a-glance"


def test_a_broken_link_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [gone](#nowhere) [file](missing.md) [out](../../../../etc/passwd)\n"
                    "`[in code](missing.md)`\n")
    bad = broken(str(page), root=str(tmp_path))
    assert any("#nowhere" in b for b in bad) and any("missing.md: no such file" in b for b in bad)
    assert any("leaves the repository" in b for b in bad) and len(bad) == 3
