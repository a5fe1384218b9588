# respawn: the commands a newcomer needs. Linux only.
CARGO ?= cargo
ARGS ?=

.PHONY: run test lint doc bench build-demo linux-only

# Build in release mode and start the demo on 127.0.0.1:8080 (make run ARGS='--workers 2').
run: linux-only
	$(CARGO) run --release -p respawn-master --features demo --bin respawn -- $(ARGS)

# Every test: unit tests of each crate, then the end-to-end tests, which
# run the real binary (built first: the tests crate cannot build it itself).
test: linux-only build-demo
	$(CARGO) test --workspace --all-features

build-demo:
	$(CARGO) build -p respawn-master --features demo --bin respawn

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

doc:
	$(CARGO) doc --workspace --no-deps

# Load and fault benchmarks, respawn beside a Node.js cluster server; writes
# docs/benchmarks.md and docs/benchmarks.svg. Installs wrk from Debian's
# packages if it is missing. Takes about 9 minutes on an idle machine, more
# when others use its cores; never part of make test.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
bench: linux-only
	@command -v wrk >/dev/null || { echo "bench: installing wrk from Debian's packages"; \
		$(SUDO) apt-get install -y wrk || { $(SUDO) apt-get update && $(SUDO) apt-get install -y wrk; }; }
	@command -v node >/dev/null || echo "bench: node not found: the baseline column will say so"
	$(CARGO) build --release -p respawn-master --features demo --bin respawn
	python3 bench/run.py

linux-only:
	@[ "$$(uname -s)" = Linux ] || { echo "respawn runs on Linux only (signalfd, epoll, prctl, /proc); this is $$(uname -s)" >&2; exit 1; }
