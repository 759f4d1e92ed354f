# unidd_ray: `make demo` runs the default pipeline, `make test` the fast test suite.
# Both install what they need first (Debian packages, .venv, the package) and skip
# steps that are already done.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-all install system-packages bench clean

demo: install
	$(BIN)/unidd-ray pipeline

# lint-imports checks the package's layers (the contracts in pyproject.toml) before the tests run
test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: system-packages $(STAMP)

# FFCV compiles against OpenCV and libjpeg-turbo; Fashion-MNIST comes from Debian.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

bench: install
	cd benchmarks && ../$(BIN)/python spectral.py

clean:
	rm -rf $(VENV) build *.egg-info
