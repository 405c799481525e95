# The two commands of the README. Each builds (or reuses) the pinned environment first:
# a venv outside the clone, keyed by requirements/dev.txt (tools/env.sh).
.PHONY: test bench
ARGS ?=

test:
	@bin=$$(bash tools/env.sh) && "$$bin/python" -m pytest $(ARGS)

bench:
	@bin=$$(bash tools/env.sh) && "$$bin/mmkernels-bench" $(ARGS)
