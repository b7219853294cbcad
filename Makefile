# Piper: `make test` and `make demo` set everything up from scratch (venv in .venv/, MPI from
# PyPI, the compiled extension) and then run. Other targets: unit, venv, build, lint, bench,
# stress, clean.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MPIRUN := $(VENV)/bin/mpirun
SOURCES := $(shell find csrc -type f) CMakeLists.txt setup.py pyproject.toml

.PHONY: test unit demo venv build lint bench stress clean gpu-wheels gpu-nccl

venv: $(VENV)/.stamp
$(VENV)/.stamp: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.stamp $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import piper_comm as pc; print('piper build:', pc.build_info())"
	touch $@

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check .

# Every test (docs/testing.md): multi-rank cases of one launch shape share one mpirun job.
test: build lint
	$(PY) -m pytest -q tests

# The fast tier for the edit-test loop: the tests not marked `mpi` (pure Python, the C++ planner
# in tests/plan, the cost and resource models), in this one process; no launcher starts
# (PIPER_TEST_NO_LAUNCH: a test that would start one without the marker fails).
unit: build
	PIPER_TEST_NO_LAUNCH=1 $(PY) -m pytest -q -m "not mpi" tests

# The main job on a small default: MoE training of tiny-moe on 4 CPU ranks as 2 emulated nodes
# (PP=2 x EP=2, a pipeline stage per node), loss curve and expert-load plots in runs/demo/,
# then the all-to-all bandwidth benchmark on 8 ranks as 2 emulated nodes.
demo: build
	$(MPIRUN) -genv PIPER_LOCAL_SIZE 2 -genv OMP_NUM_THREADS 1 -n 4 $(PY) -m piper_moe.train \
	    --config tiny --out runs/demo --plot
	$(MPIRUN) -n 8 $(PY) -m piper_comm.bench --local-size 4 -b 8 -e 4M -f 4 \
	    --algos halo,flat,mpi,gloo

# The recorded run of bench/results (8 ranks; local sizes 4 and 1).
bench: build
	bash bench/run_cpu.sh

# The suite RUNS times in a row (the first as `make test` in a fresh clone of HEAD), every
# failure kept with its ranks' outcomes, a table of tests, runs, failures and symptoms at the end.
RUNS ?= 10
stress: venv
	$(PY) bench/stress.py --runs $(RUNS) --fresh-clone

# Wheels the lent GPU machine may lack (it has no network): MPICH for its Python 3.12, in .whl/
# (ignored by git), carried by the device call (docs/gpu.md, bench/gpu_check.sh).
gpu-wheels: venv
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 -d .whl "mpich>=4.2"
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_5_x86_64 \
	    -d .whl "mpi4py>=4.1" "py-spy>=0.4"

# NCCL >= 2.30 (several ranks on one GPU) for the one-GPU check, whose machine's torch has an
# older NCCL: built from a source tree (NCCL_SRC; no registry here has it) for sm_90 only, so
# that it fits a device call's carry, into .whl/libnccl.so.2 (docs/gpu.md). NCCL_ONLY_FUNCS
# (NCCL's ONLY_FUNCS, e.g. "SendRecv|AllReduce Sum * * *") compiles fewer device kernels:
# all of them took 25 minutes of this 2-core machine (NCCL 2.30.7: 33 MB once stripped).
CUDA_HOME ?= /usr/local/cuda
NCCL_ONLY_FUNCS ?=
gpu-nccl:
	@test -n "$(NCCL_SRC)" || { echo "usage: make gpu-nccl NCCL_SRC=<NCCL source tree, >= 2.30>"; exit 2; }
	$(MAKE) -C $(NCCL_SRC) -j$$(nproc) src.build CUDA_HOME=$(CUDA_HOME) \
	    NVCC_GENCODE="-gencode=arch=compute_90,code=sm_90" ONLY_FUNCS="$(NCCL_ONLY_FUNCS)"
	mkdir -p .whl
	cp -L $(NCCL_SRC)/build/lib/libnccl.so.2 .whl/libnccl.so.2
	strip --strip-unneeded .whl/libnccl.so.2
	ls -l .whl/libnccl.so.2

clean:
	rm -rf build $(VENV) piper_comm/_C*.so *.egg-info
