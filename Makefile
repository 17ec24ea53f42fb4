# fedbench: `make run` installs and runs the main job, `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Data: $FEDBENCH_DATA if set, else the workplace copy in ../shared/data, else ./data
# (where torchvision downloads Fashion-MNIST on a machine with internet).
FEDBENCH_DATA ?= $(if $(wildcard ../shared/data/FashionMNIST),$(abspath ../shared/data),$(CURDIR)/data)
export FEDBENCH_DATA
# Extra options for every `fedbench grid` of the bench targets, e.g. on one GPU:
#   make bench GRID_FLAGS="--jobs 2 --cells-per-process 16 --set train.compile=reduce-overhead"
GRID_FLAGS ?=

.PHONY: install run test bench bench-quick bench-ablation bench-adaptive bench-byzantine bench-fmnist-paper perf clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# The main job: the quick attack x defense grid on Fashion-MNIST, then its report.
run: bench-quick

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/fedbench grid benchmarks/paper.yaml $(GRID_FLAGS)
	$(BIN)/fedbench report runs/paper --out results/paper

bench-quick: install
	$(BIN)/fedbench grid benchmarks/quick.yaml $(GRID_FLAGS)
	$(BIN)/fedbench report runs/quick --out results/quick

# The published Fashion-MNIST protocol, 50 rounds, 6 cells (hours on a CPU; resumable).
bench-fmnist-paper: install
	$(BIN)/fedbench grid benchmarks/fmnist_paper.yaml $(GRID_FLAGS)
	$(BIN)/fedbench report runs/fmnist_paper --out results/fmnist_paper

# Adaptive backdoors x every defense but Bulyan (195 cells), and SDFC's adaptive-client study.
bench-adaptive: install
	$(BIN)/fedbench grid benchmarks/adaptive.yaml $(GRID_FLAGS)
	$(BIN)/fedbench report runs/adaptive --out results/adaptive
	$(BIN)/fedbench grid benchmarks/sdfc_adaptive.yaml $(GRID_FLAGS)
	$(BIN)/fedbench report runs/sdfc_adaptive --out results/sdfc_adaptive

# The untargeted attacks x every defense but Bulyan, 336 cells (about 7 CPU-hours of cell time; resumable).
bench-byzantine: install
	$(BIN)/fedbench grid benchmarks/byzantine.yaml $(GRID_FLAGS)
	$(BIN)/fedbench report runs/byzantine --out results/byzantine --reference runs/quick

bench-ablation: install
	$(BIN)/fedbench grid benchmarks/sdfc_ablation.yaml $(GRID_FLAGS)
	$(BIN)/fedbench report runs/sdfc_ablation --out results/sdfc_ablation

perf: install
	$(BIN)/python benchmarks/perf/run_all.py

clean:
	rm -rf runs build *.egg-info
