"""Test configuration. TRITON_INTERPRET is read when `@triton.jit` decorates a kernel, so it is set
here, before any kernel module can be imported: Triton kernels run through the interpreter on CPU."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
# the checkout itself, for runs without `pip install -e .`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of minutes (an inductor compile); deselect with -m 'not slow'")
