# kd_det: `make test` and `make demo` set everything up on a fresh machine.
# VENV can be overridden: `make test VENV=/path/to/venv`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kd_det-setup-done
PYTEST_ARGS ?=
SOURCES := kd_det tools dev tests projects

.PHONY: setup test demo lint format clean-venv

setup: $(STAMP)

# Re-run only when the environment is new or the install recipe changed; every step is idempotent.
$(STAMP): setup.py projects/MethodStudy/setup.py tools/install_detectron2.py Makefile \
		kd_det/layers/csrc/roi_align_backward.cpp
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools<81" wheel
	@# Unpinned: pip picks the build for this machine (constraint files on CI cap the version).
	$(PY) -m pip install --quiet torch torchvision
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install --quiet -e ".[dev,deploy]"
	@# The method study (projects/MethodStudy), so that its tests run with kd_det's; its external
	@# extra is the third-party scene generator of its generalization check.
	$(PY) -m pip install --quiet -e "projects/MethodStudy[external]"
	@# Compile the CPU ROIAlign backward once now (cached), not inside the first test or run.
	$(PY) -c "from kd_det.layers.roi_align import load_extension as l; print('fast CPU ROIAlign backward:', 'built' if l() else 'unavailable (torchvision fallback)')"
	$(PY) -m kd_det.collect_env
	@touch $(STAMP)

test: setup
	$(PY) -m pytest tests projects/MethodStudy/tests $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py

lint: setup
	$(VENV)/bin/black --check -l 100 $(SOURCES)
	$(VENV)/bin/flake8 --max-line-length 100 --extend-ignore E203,W503 $(SOURCES)

format: setup
	$(VENV)/bin/black -l 100 $(SOURCES)

clean-venv:
	rm -rf $(VENV)
