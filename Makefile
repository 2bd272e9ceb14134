# Two entry points (README): `make demo` generates an image with the built-in default model,
# `make test` runs the whole test suite. Both create .venv and install what they need.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.13.0: on the development machines pip takes the CPU build from the local wheel folder.
# Elsewhere set TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" to avoid a CUDA build.
TORCH_INDEX ?=

.PHONY: install demo test clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0" $(TORCH_INDEX)
	$(PY) -m pip install -q "triton==3.6.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m parafuse.generate --height 512 --width 512 --out out/default.png --report out/default.json --overwrite

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) out
