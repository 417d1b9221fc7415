# statqat-ao: the two front-door commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-slow bench demo lint clean

install: $(STAMP)

# Creates the virtual environment if missing and installs the pinned stack plus this
# package (editable, all extras). Re-runs only when the pins or the project file change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[onnx,executorch,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/fidelity.py
	$(PY) benchmarks/fake_quant_speed.py
	$(PY) benchmarks/qat_step_speed.py
	$(PY) benchmarks/digits_accuracy.py
	$(PY) benchmarks/deployment.py
	$(PY) benchmarks/minilm_qat.py
	$(PY) benchmarks/llm_qat_step.py

demo: $(STAMP)
	$(VENV)/bin/statqat demo

lint: $(STAMP)
	$(VENV)/bin/ruff check statqat_ao passes backends tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
