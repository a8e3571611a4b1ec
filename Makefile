# DeepServe: `make serve` and `make test` work on a fresh machine with Python 3.10+.
# Everything is installed into $(VENV); models are built into $(REPO) when absent.

PYTHON ?= python3
VENV   ?= .venv
REPO   ?= model-repository
SEED   ?= 0
TORCH_VERSION ?= 2.13.0

BIN := $(VENV)/bin
PY  := $(BIN)/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deepserve-installed
MODELS := $(REPO)/fraud-autoencoder $(REPO)/digit-classifier $(REPO)/digit-classifier-robust

export DEEPSERVE_MODEL_REPOSITORY := $(abspath $(REPO))

.PHONY: install models serve test protos protos-check clean distclean

install: $(STAMP)

# torch goes in first, pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e '.[train,dev]'
	touch $@

models: $(STAMP)
	@missing=""; for m in $(MODELS); do ls $$m/*/manifest.json >/dev/null 2>&1 || missing="$$missing --only $$(basename $$m)"; done; \
	if [ -n "$$missing" ]; then echo "building:$$missing"; $(BIN)/deepserve build --repo $(REPO) --seed $(SEED) $$missing; \
	else echo "models present in $(REPO) (make distclean to rebuild)"; fi

serve: models
	$(BIN)/deepserve serve --repo $(REPO) --config deploy/serve_config.yaml

test: models
	$(PY) -m pytest

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

protos-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check

clean:
	rm -rf .pytest_cache build reports
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(REPO) *.egg-info
