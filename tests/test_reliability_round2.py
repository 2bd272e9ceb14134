"""Reliability, second round (issue 26): the pipeline door checks what the built-in door checks,
ranks that disagree are refused, overflow is caught at N > 1, a rank stopped early is named, and
no file appears or vanishes behind the user's back. Every case of the issue is one test here
(docs/reliability.md lists them)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_reliability import SMALL, bad  # noqa: E402

from parafuse.generate import main  # noqa: E402


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """A tiny PixArt pipeline folder (tests/diffusers_cases.py) and embeddings of the right width."""
    from diffusers_cases import call_kwargs, pipeline_path
    root = tmp_path_factory.mktemp("pipelines")
    path = pipeline_path(str(root), "pixart")
    kw = call_kwargs("pixart")
    embeds = root / "embeds.pt"
    torch.save({k: kw[k] for k in ("prompt_embeds", "negative_prompt_embeds", "prompt_attention_mask",
                                   "negative_prompt_attention_mask")}, embeds)
    return path, str(embeds), kw


def pipeline_args(pixart, embeds=None):
    path, good, kw = pixart
    return ["--model", path, "--prompt-embeds", embeds or good, "--height", str(kw["height"]),
            "--width", str(kw["width"]), "--steps", "2", "--no-progress"]


# ---- 1. one request check for both doors -----------------------------------------------------
NUMBERS = [
    (["--guidance", "inf"], "guidance must be a finite number"),
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--guidance", "-5"], "guidance must be >= 1"),
    (["--guidance", "1e39"], "guidance 1e+39 is above 100"),
    (["--steps", "0"], "steps must be at least 1"),
    (["--steps", "20000"], "steps must be at most 10000"),
    (["--batch", "0"], "batch must be at least 1"),
    (["--seed", "-1"], "seed must be an integer in [0, 2^64 - 1]"),
    (["--seed", str(2 ** 64)], "seed must be an integer in [0, 2^64 - 1]"),
    (["--height", "0"], "height must be at least 1"),
]


@pytest.mark.parametrize("args, match", NUMBERS)
def test_both_doors_refuse_the_same_numbers(tmp_path, capsys, pixart, args, match):
    """The same limits and the same line, exit 2, nothing written, in the built-in door and the
    pipeline door (whose checks run before the pipeline loads)."""
    bad(tmp_path, capsys, *args, match=match)
    bad(tmp_path, capsys, *args, match=match, base=pipeline_args(pixart))


def test_prompt_embeds_content_is_checked(tmp_path, capsys, pixart):
    path, good, kw = pixart
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    listed = tmp_path / "list.pt"
    torch.save([kw["prompt_embeds"]], listed)
    wide = tmp_path / "wide.pt"
    torch.save({"prompt_embeds": torch.randn(1, 5, 17), "negative_prompt_embeds": torch.randn(1, 5, 17)}, wide)
    bad(tmp_path, capsys, match="is not a torch.save'd file of tensors", base=pipeline_args(pixart, str(junk)))
    bad(tmp_path, capsys, match="must hold a dict of tensors", base=pipeline_args(pixart, str(listed)))
    bad(tmp_path, capsys, match="prompt_embeds is torch.float32 of shape (1, 5, 17); the pipeline's denoiser "
                                "takes floating-point embeddings 16 wide", base=pipeline_args(pixart, str(wide)))
    bad(tmp_path, capsys, match="is a folder; give a file", base=pipeline_args(pixart, str(tmp_path)))
