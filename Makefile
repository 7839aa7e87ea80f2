# Each target sets itself up: a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# llama-cpp-python compiles llama.cpp (~5 min on 2 cores the first time; pip caches the wheel).
	$(BIN)/pip install -e '.[dev,server]'
	$(MAKE) --no-print-directory $(REFCONV) || echo "note: llama.cpp's converter not fetched; the tests that compare with it fetch it (tests/llama_source.py) or fail"
	touch $(STAMP)

# llama.cpp's own converter (from the same llama-cpp-python release's source), a test reference.
REFCONV := .cache/llama.cpp/convert_hf_to_gguf.py
$(REFCONV):
	mkdir -p .cache/sdist
	$(BIN)/pip download -q --no-deps --no-binary :all: -d .cache/sdist llama-cpp-python==0.3.36
	tar -xzf .cache/sdist/llama_cpp_python-0.3.36.tar.gz -C .cache --strip-components=2 \
		--wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*' \
		'*/vendor/llama.cpp/common/download.cpp'
	rm -rf .cache/sdist

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/ossgguf demo

bench: setup
	$(BIN)/python bench/run_all.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
