# sdkiln — `make help` lists the targets. `make demo` and `make test` each work on a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SDKILN := $(VENV)/bin/sdkiln
RECIPE ?= recipes/tiny.yaml
ARGS ?=
# The venv is (re)built when the dependency pins or the package definition change.
INSTALLED := $(VENV)/.installed

# The studio's browser tests drive Debian's chromium (Playwright's own browser download is not
# reachable here). `make test` installs it with apt-get when it is missing; SDKILN_NO_BROWSER=1 skips
# those tests instead (for machines without apt); SDKILN_CHROMIUM points them at another binary.
SDKILN_CHROMIUM ?= /usr/bin/chromium
export SDKILN_CHROMIUM

.PHONY: help install browser test test-slow demo studio build plan verify bench lint format clean bench-real gpu-wheels gpu-check

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(INSTALLED) ## create .venv: torch (CPU) first, then sdkiln[build,dev,studio,openvino] under constraints.txt

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, or pip resolves a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[build,dev,studio,openvino]'
	touch $@

browser: ## install Debian's chromium for the studio's browser tests (apt-get; SDKILN_NO_BROWSER=1 skips)
	@if [ -n "$$SDKILN_NO_BROWSER" ] || [ -x "$(SDKILN_CHROMIUM)" ]; then exit 0; fi; \
	echo "installing chromium with apt-get for the studio's browser tests (SDKILN_NO_BROWSER=1 skips them)"; \
	sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	export DEBIAN_FRONTEND=noninteractive; \
	$$sudo apt-get install -y chromium \
	  || { $$sudo apt-get update && $$sudo apt-get install -y chromium; }

test: lint browser ## lint (ruff, import layering), then the offline test suite (slow/gpu/macos/network are opt-in)
	$(PY) -m pytest $(ARGS)

test-slow: install ## the real-size tests (minutes, ~10 GB of memory)
	$(PY) -m pytest -m slow $(ARGS)

demo: install ## build the offline tiny recipe end to end and render examples with the runtime
	$(SDKILN) build recipes/tiny.yaml $(ARGS)
	$(SDKILN) demo artifacts/tiny --out artifacts/demo

studio: install ## the sketch studio on BUNDLE (default artifacts/tiny, built if missing): http://127.0.0.1:7860
	@if [ -z "$(BUNDLE)" ] && [ ! -f artifacts/tiny/manifest.json ]; then $(SDKILN) build recipes/tiny.yaml; fi
	$(SDKILN) studio --model $(or $(BUNDLE),artifacts/tiny) $(ARGS)

build: install ## build RECIPE=recipes/x.yaml [ARGS="key=value ..."]
	$(SDKILN) build $(RECIPE) $(ARGS)

plan: install ## show HIT/MISS for each step of RECIPE, with the reason
	$(SDKILN) plan $(RECIPE) $(ARGS)

verify: install ## re-hash the bundle of RECIPE against its manifest
	$(SDKILN) verify artifacts/$(basename $(notdir $(RECIPE)))

bench: install ## benchmark a bundle: make bench BUNDLE=artifacts/tiny
	$(SDKILN) bench $(or $(BUNDLE),artifacts/tiny) $(ARGS)

# The real-size CPU benchmark (issue 14): recipes/bench.yaml (SD 1.5 + scribble ControlNet + TAESD, random
# weights; ~40 min to build the first time, ~23 GB of disk) and one bench run (~40 min) that writes
# benchmarks/results/<time>-bench.{json,md,png}, updates the tables in README.md and benchmarks/README.md,
# and records this machine's picks for `--backend auto`. Heavy: both steps wait for /tmp/sdkiln-heavy.lock.
BENCH_REAL_BACKENDS ?= torch,onnx/fp32,onnx/int8-static,openvino/fp32,openvino/fp32@bf16,openvino/int8,openvino/int8@bf16
BENCH_REAL_LEVERS ?= taesd,taesd+cn2,taesd+steps3,taesd+steps2,taesd+steps2+cn1
bench-real: install ## real-size SD 1.5 + ControlNet + TAESD: build recipes/bench.yaml, bench it, update the README tables
	flock /tmp/sdkiln-heavy.lock $(SDKILN) build recipes/bench.yaml
	flock /tmp/sdkiln-heavy.lock $(SDKILN) bench artifacts/bench --backends $(BENCH_REAL_BACKENDS) \
		--components text_encoder,unet,controlnet.scribble,vae_decoder,taesd_decoder --tasks sketch \
		--repeat 3 --task-repeat 2 --levers $(BENCH_REAL_LEVERS) --deepcache 2 \
		--readme benchmarks/README.md --readme README.md $(ARGS)

# The NVIDIA check runs on a GPU machine's own CUDA PyTorch (not this venv's CPU build); packages that
# machine lacks travel as wheels in .whl/ (`make gpu-wheels` where pip reaches an index).
GPU_PYTHON ?= python3
GPU_PY_VERSION ?= 3.12
GPU_WHEELS ?= diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 importlib-metadata==10.2.0 zipp==4.1.2

gpu-wheels: install ## download the wheels gpu-check installs on a GPU machine with no index into .whl/
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY_VERSION) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

gpu-check: ## on an NVIDIA GPU: tiny engines, parity of each GPU backend, real-size timings (artifacts/gpu-check)
	$(GPU_PYTHON) stages/gpu_check.py --out artifacts/gpu-check --wheels .whl $(ARGS)

lint: install ## ruff and the import-linter layering contracts, exactly as CI runs them
	$(VENV)/bin/ruff check stages runtime tests benchmarks
	$(VENV)/bin/ruff format --check stages runtime tests benchmarks
	$(VENV)/bin/lint-imports

format: install ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix stages runtime tests benchmarks
	$(VENV)/bin/ruff format stages runtime tests benchmarks

clean: ## remove the venv and built artifacts (keeps artifacts/README.md)
	rm -rf $(VENV) artifacts/cache artifacts/*/ .pytest_cache .ruff_cache
