# attnbench quick start:  make bench  (set up and run the default sweep)  ·  make test  (set up and test)
#
# Set-up creates .venv/ at the repo root. Where the python running make already has torch (a GPU
# box), the venv sees it (--system-site-packages) and a constraints file pins it: it is reused,
# never replaced. Elsewhere it installs $(TORCH_SPEC), the CPU build here, so no CUDA wheels.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test
ARGS ?=

.PHONY: setup bench test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  echo "setup: reusing the torch already installed for $(PYTHON)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q "$(TORCH_SPEC)" numpy; \
	fi
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

bench: setup
	$(BIN)/attnbench $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
