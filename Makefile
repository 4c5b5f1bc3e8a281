# samresnets: `make test` (unit tests + notebooks in the smoke profile), `make report`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pins that this project's CI machine holds on local disk; any torch >= 2.4 works.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv test unit clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || \
	  $(PY) -m pip install -q $(TORCH_PINS) 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -c "import samlib, torch, torchvision, pytest, hypothesis"
	touch $@

unit: venv
	$(PY) -m pytest -q

test: unit

clean-venv:
	rm -rf $(VENV)
