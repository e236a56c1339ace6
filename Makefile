# The README's two commands: `make demo` and `make test`. Each bootstraps .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test lint typecheck bench clean browser wrk screenshot

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# What bench/bench_http.py measures otpy against (uvicorn, hypercorn, h11).
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Debian packages, installed when missing (the project's machines run as root). A failure
# stops make: a test that needs them must never be skipped for want of them.
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -q -y --no-install-recommends
define apt_need
	@if ! $(2); then \
	  echo "make: installing Debian's $(1)"; \
	  { $(APT_GET) install $(1) >/dev/null 2>&1 || \
	    { apt-get -q update >/dev/null && $(APT_GET) install $(1); }; } && $(2) || \
	  { echo "make: FAILED to install $(1) with apt-get (as root); it is needed here" >&2; \
	    exit 1; }; \
	fi
endef

# The browser tests drive Debian's Chromium through chromedriver (selenium never fetches
# a browser of its own).
browser:
	$(call apt_need,chromium chromium-driver,test -x /usr/bin/chromium -a -x /usr/bin/chromedriver)

wrk:
	$(call apt_need,wrk,command -v wrk >/dev/null)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(PY) -m ruff check otpy tests examples bench

typecheck: $(STAMP)
	$(PY) -m mypy --strict otpy

test: lint typecheck browser
	$(PY) -m pytest

# The README's picture of the dashboard, taken by headless Chromium.
screenshot: $(STAMP) browser
	$(PY) examples/dashboard_shot.py docs/img/dashboard.png

bench: $(BENCH_STAMP) wrk
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) *.egg-info
