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
# In build order: the generators are judged by digit-classifier, so it comes first.
MODELS := $(REPO)/fraud-autoencoder $(REPO)/digit-classifier $(REPO)/digit-classifier-robust \
          $(REPO)/digit-dcgan $(REPO)/digit-diffusion $(REPO)/graph-recommender

export DEEPSERVE_MODEL_REPOSITORY := $(abspath $(REPO))

.PHONY: install models serve test tools bench bench-generation protos protos-check k8s k8s-check clean distclean

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

test: models tools
	$(PY) -m pytest

# Debian's Prometheus (server and promtool) for the metrics tests; installed where we may.
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "note: Debian's prometheus package is missing (sudo apt-get install prometheus); its tests will be skipped"; fi; }

# KServe, the peer in the benchmark, lives in its own venv: its pins clash with Ray's.
KSERVE_VENV := .venv-kserve
$(KSERVE_VENV)/.installed:
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install --quiet 'kserve==0.21.0' onnxruntime numpy
	touch $@

bench: models $(KSERVE_VENV)/.installed
	$(PY) loadtests/bench/bench.py --repo $(REPO)

# Diffusion images/s at concurrency 1 and 16, with and without step batching.
bench-generation: models
	$(PY) loadtests/bench/generation.py --repo $(REPO)

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

protos-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check

# deploy/k8s/: the generated serveConfigV2 patches, from deploy/serve_config.yaml (docs/deploy.md).
k8s: $(STAMP)
	$(PY) scripts/k8s.py generate

k8s-check: $(STAMP)
	$(PY) scripts/k8s.py generate --check

clean:
	rm -rf .pytest_cache build reports
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(KSERVE_VENV) $(REPO) *.egg-info

# Load test against an already running `make serve` (loadtests/README.md). Override e.g.
#   make loadtest USERS=16 DURATION=60 SLO_ARGS="--slo-p99-ms 50 --slo-error-rate 0.01"
HOST          ?= 127.0.0.1:9000
USERS         ?= 8
SPAWN_RATE    ?= $(USERS)
DURATION      ?= 20
LOADTEST_USER ?= MixUser
LOADTEST_OUT  ?= reports/loadtest
SLO_ARGS      ?=

.PHONY: loadtest
loadtest: models
	$(PY) loadtests/run.py --host $(HOST) --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) \
		--user $(LOADTEST_USER) --out $(LOADTEST_OUT) $(SLO_ARGS)
