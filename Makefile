# The two commands of the README. Each builds (or reuses) the pinned environment first:
# a venv outside the clone, keyed by requirements/dev.txt (tools/env.sh).
.PHONY: test bench python shell
ARGS ?=
# test workers (pytest-xdist): one per core; tests are shared out one by one, except those of an
# xdist_group (a module fixture built once: one GPU target of tests/test_aot.py), which one worker runs together
WORKERS ?= auto

test:
	@bin=$$(bash tools/env.sh) && "$$bin/python" -m pytest -n $(WORKERS) --dist loadgroup $(ARGS)

bench:
	@bin=$$(bash tools/env.sh) && "$$bin/mmkernels-bench" $(ARGS)

# a Python, or a shell with the environment's bin/ first on PATH (mmkernels-bench, mmkernels-train)
python:
	@bin=$$(bash tools/env.sh) && exec "$$bin/python" $(ARGS)

shell:
	@bin=$$(bash tools/env.sh) && PATH="$$bin:$$PATH" VIRTUAL_ENV="$$(dirname $$bin)" exec "$${SHELL:-bash}"
