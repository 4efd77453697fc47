# rtcontour: `make serve` and `make test` work on a fresh Debian machine (`make serve` as an
# ordinary user; `make test` installs Debian packages, with sudo unless run as root).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps
APT_PACKAGES := dcmtk dicom3tools plastimatch chromium orthanc orthanc-dicomweb

.PHONY: install install-test serve test lint typecheck bench clean

$(STAMPS)/venv: pyproject.toml
	mkdir -p $(STAMPS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e .
	touch $@

$(STAMPS)/test-deps: $(STAMPS)/venv pyproject.toml
	$(BIN)/pip install -q -e '.[dev,train]'
	touch $@

$(STAMPS)/apt:
	mkdir -p $(STAMPS)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	touch $@

install: $(STAMPS)/venv

serve: $(STAMPS)/venv
	$(BIN)/rtcontour serve

test: $(STAMPS)/test-deps $(STAMPS)/apt lint typecheck
	$(BIN)/pytest -q

lint: $(STAMPS)/test-deps
	$(BIN)/ruff check common service worker models tests bench

# mypy cannot follow the editable install's import hook, so it reads the folders under their
# installed names (rtcontour.common, ...) through a farm of links in build/typecheck.
TYPECHECK := build/typecheck
typecheck: $(STAMPS)/test-deps
	mkdir -p $(TYPECHECK)/rtcontour
	for p in common service worker models; do ln -sfn "$(CURDIR)/$$p" $(TYPECHECK)/rtcontour/$$p; done
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy --explicit-package-bases \
	  $$(find -L $(TYPECHECK)/rtcontour -name '*.py' -not -path '*/__pycache__/*')

bench: $(STAMPS)/test-deps
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.bench_ingest
	$(BIN)/python -m bench.bench_rtstruct
	$(BIN)/python -m bench.bench_inference

clean:
	rm -rf $(VENV) $(STAMPS) build *.egg-info
