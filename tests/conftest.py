"""Test configuration (pytest.ini names the paths and the markers).

TRITON_INTERPRET is read when `@triton.jit` decorates a kernel, so it is set here, before any kernel
module can be imported: Triton kernels run through the interpreter on CPU.

Markers by folder: tests/kernels `interpret` (Triton's interpreter), tests/diffusers `diffusers`
(needs diffusers and transformers); `torchrun` (starts a torchrun job) and `slow` are marked on the
tests themselves. `tests/unit` is the fast unit set (docs/testing.md)."""
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

BY_FOLDER = {"kernels": "interpret", "diffusers": "diffusers"}
TORCHRUN_FIXTURES = {"dist_run", "torchrun_run"}     # module fixtures that run one torchrun job for many tests


def pytest_collection_modifyitems(items):
    for item in items:
        folder = os.path.basename(os.path.dirname(str(item.fspath)))
        if folder in BY_FOLDER:
            item.add_marker(getattr(pytest.mark, BY_FOLDER[folder]))
        if TORCHRUN_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.torchrun)
