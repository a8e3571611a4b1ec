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

.PHONY: install models serve nginx test tools perf-analyzer-install perf-analyzer bench bench-generation bench-build bench-recommender graph-collection overload fuzz protos protos-check k8s k8s-check clean distclean

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

# With the admission front (nginx in front of the gateway, docs/reliability.md "Overload") when
# nginx is there (installed here as root); FRONT=0 serves without it.
serve: models nginx
	@front=$${FRONT:-$$( { command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 && echo 1 || echo 0)}; \
	echo "admission front: $$front"; \
	$(BIN)/deepserve serve --repo $(REPO) --config deploy/serve_config.yaml $$([ "$$front" = 1 ] && echo --admission-front)

nginx:
	@$(MAKE) --no-print-directory tools DEBIAN_PACKAGES=nginx-light

test: models tools perf-analyzer-install graph-collection
	$(PY) -m pytest

# Real networks for the recommender's evaluation (co-authorship and e-mail graphs), from Debian's
# python3-graph-tool package (apt-get download; apt-get update first as root), sha256-checked.
GRAPHS_DIR := .data/graph-collection
export DEEPSERVE_GRAPH_COLLECTION := $(abspath $(GRAPHS_DIR))
graph-collection: $(STAMP)
	@$(PY) -m deepserve.models.graph.collection --into $(GRAPHS_DIR) >/dev/null

# Debian's packages the tests use, installed where we may: Prometheus (server and promtool)
# for the metrics tests, libb64 for perf_analyzer, nginx for the admission front. RUNLEVEL=1
# keeps the packages from starting their own services (nginx would serve port 80).
DEBIAN_PACKAGES := prometheus libb64-0d nginx-light
tools:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: Debian packages missing (sudo apt-get install$$missing); the tests that need them will be skipped"; fi; fi

# Triton's perf_analyzer, from the tritonclient 2.50.0 wheel (newer ones need glibc 2.38), with
# the CUDA runtime library it links against, in its own venv. Not fatal: its tests skip without it.
PERF_VENV := .venv-perf
perf-analyzer-install:
	@test -f $(PERF_VENV)/.installed || { $(PYTHON) -m venv $(PERF_VENV) && \
	  $(PERF_VENV)/bin/pip install --quiet 'tritonclient==2.50.0' 'nvidia-cuda-runtime-cu12' && \
	  touch $(PERF_VENV)/.installed; } || echo "note: perf_analyzer could not be installed; its tests will be skipped"

# perf_analyzer against a running `make serve` (HOST), every model: its table (docs/benchmarks.md).
perf-analyzer: perf-analyzer-install
	$(PY) loadtests/perf_analyzer.py --target $(HOST)

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

# Peak memory and time of `deepserve build --data` on generated transaction tables of BUILD_ROWS
# rows (docs/benchmarks.md); the CSVs (about 2.7 GB at 10M rows) go to /tmp and are deleted after.
BUILD_ROWS ?= 1000000 10000000
bench-build: $(STAMP)
	$(PY) loadtests/bench/build_memory.py --rows $(BUILD_ROWS)

# The graph recommender on generated clustered graphs of 5k, 50k and 200k users (10 edges per user)
# and on the real networks: build time, peak RSS, served p50/p99 per request and recall@10 against
# the heuristics (docs/benchmarks.md).
bench-recommender: graph-collection
	$(PY) -m loadtests.bench.recommender

# Four times the capacity, open loop, against the shipped admission bounds: offered and admitted
# rates, latencies against the unloaded ones, refusals and every other status code (docs/reliability.md).
overload: models
	$(PY) loadtests/bench/overload.py --repo $(REPO)

# Hostile requests to every model over both APIs (tests/fuzz), against its own service and
# through the admission front: prints requests by API and category, status codes, INTERNAL/UNKNOWN
# (must be 0), replica restarts, readiness and the gateway's memory. `make test` runs a seeded
# few hundred of the same.
FUZZ_REQUESTS ?= 10000
FUZZ_SEED     ?= 0
fuzz: models
	DEEPSERVE_FUZZ_REQUESTS=$(FUZZ_REQUESTS) DEEPSERVE_FUZZ_SEED=$(FUZZ_SEED) \
		$(PY) -m pytest tests/fuzz/test_fuzz.py tests/fuzz/test_fuzz_front.py -m fuzz -p no:cacheprovider

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
	rm -rf $(VENV) $(KSERVE_VENV) $(PERF_VENV) $(REPO) $(GRAPHS_DIR) *.egg-info

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
