# Two commands do everything from a fresh clone: `make run` and `make test`.
# Both install into .venv first; the stamp makes that idempotent.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
JOB     ?= configs/jobs/quickstart.toml

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch stays pinned below 2.14 so pip takes the CPU wheel on CPU-only hosts.
	$(BIN)/pip install -q "torch>=2.4,<2.14"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

# The main job on its embedded default: a controller and a local agent in one process
# (`infscaled up`), the quickstart job submitted through the API and driven through it.
run: $(STAMP)
	$(BIN)/infscaled up $(JOB)

# Two pytest-xdist workers, a whole test file each at a time (module fixtures are built once):
# most of a real-process test is waiting (READY handshakes, drains, timeouts), so two files
# side by side fill two cores. -x: the first failure stops both workers.
test: $(STAMP)
	$(BIN)/python -m pytest -q -x -p no:cacheprovider -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info
