# glm-ft: two commands on a fresh clone — `make train` and `make test` (each installs first if needed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install train test test-fast ui compare bench bench-gpu clean

install: $(STAMP)

# torch first, from its exact pin, then everything else against the full lock (constraints.txt), so no
# dependency can pull a CUDA torch. Re-runs only when the requirement files change.
$(STAMP): requirements.txt constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip check
	touch $(STAMP)

train: install
	$(BIN)/python train.py experiment=quickstart $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# The project's store (train.py's default), on loopback only; `make ui UI_STORE=sqlite:////abs/mlflow.db UI_PORT=5001`.
UI_STORE ?= sqlite:///$(CURDIR)/mlflow.db
UI_PORT ?= 5000
ui: install
	$(BIN)/mlflow ui --backend-store-uri "$(UI_STORE)" --host 127.0.0.1 --port $(UI_PORT)

compare: install
	$(BIN)/python -m glm_ft compare $(ARGS)

# Side-by-side benchmarks against the reference demo's way of doing the same work (bench/README.md).
bench: install
	$(BIN)/python bench/run.py $(ARGS)

# One CUDA GPU: LoRA and P-Tuning v2 on a chatglm3-6b-shaped model (bench/README.md, "GPU mode").
bench-gpu: install
	$(BIN)/python bench/gpu.py $(ARGS)

# Run folders and derived data (preprocessed splits, records of checked data files); keeps the MLflow store, the
# tiny models and the virtual environment.
clean:
	rm -rf outputs multirun .cache/datasets
