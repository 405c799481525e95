# The two commands of the README. Each builds (or reuses) the pinned environment first:
# a venv outside the clone, keyed by requirements/dev.txt (tools/env.sh).
.PHONY: test bench
ARGS ?=
# test workers (pytest-xdist): one per core; each takes whole test files (module fixtures built once)
WORKERS ?= auto

test:
	@bin=$$(bash tools/env.sh) && "$$bin/python" -m pytest -n $(WORKERS) --dist loadfile $(ARGS)

bench:
	@bin=$$(bash tools/env.sh) && "$$bin/mmkernels-bench" $(ARGS)
