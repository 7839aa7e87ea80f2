# Each target sets itself up: a fresh clone needs only `make demo` or `make test`.
PY ?= python3
# llama.cpp backend: auto picks CUDA when a GPU and nvcc are found, Metal on macOS, else the CPU
# (ossgguf/build.py); `make setup GPU=cuda|metal|vulkan|rocm|cpu` forces one and rebuilds.
GPU ?= auto
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench lint clean

setup: $(STAMP)
	@$(BIN)/python ossgguf/build.py --gpu $(GPU) --venv $(VENV)

$(STAMP): pyproject.toml ossgguf/build.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# llama.cpp for this machine's backend, RPC included (~5 min on 2 cores the first time; the
	# wheel is kept in ~/.cache/ossgguf/wheels, keyed by its build flags).
	$(BIN)/python ossgguf/build.py --gpu $(GPU) --venv $(VENV)
	$(BIN)/pip install -e '.[dev,server,tools]'
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
