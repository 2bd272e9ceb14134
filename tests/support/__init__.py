"""What the tests share: the repository root, one way to start torchrun jobs (`launch`), the
capture trace (`capture`), process helpers (`processes`), the case matrices of the parallel and
diffusers tests and their torchrun workers. The tiny models and pipelines themselves are
library code both tests and benchmarks import (`parafuse.models`, `parafuse.diffusers.tiny`)."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
