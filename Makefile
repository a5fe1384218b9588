# respawn: the commands a newcomer needs. Linux only.
CARGO ?= cargo
ARGS ?=

.PHONY: run test lint doc bench build-demo mutants linux-only

# Build in release mode and start the demo on 127.0.0.1:8080 (make run ARGS='--workers 2').
run: linux-only
	$(CARGO) run --release -p respawn-master --features demo --bin respawn -- $(ARGS)

# Every test: unit tests of each crate, then the end-to-end tests, which run
# the demo binary. `cargo test --workspace` builds it too (tests/Cargo.toml
# says how); build-demo also writes the list of its sources (respawn.d) that
# the harness checks it against. TEST=name runs the tests whose name holds it.
TEST ?=
test: linux-only build-demo
	$(CARGO) test --workspace --all-features $(if $(TEST),-- $(TEST))

build-demo:
	$(CARGO) build -p respawn-master --features demo --bin respawn

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

doc:
	$(CARGO) doc --workspace --no-deps

# Load and fault benchmarks, respawn beside a Node.js cluster server; writes
# docs/benchmarks.md and docs/benchmarks.svg. Installs wrk from Debian's
# packages if it is missing. Takes about 12 minutes on an idle machine, more
# when others use its cores; never part of make test.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
bench: linux-only
	@command -v wrk >/dev/null || { echo "bench: installing wrk from Debian's packages"; \
		$(SUDO) apt-get install -y wrk || { $(SUDO) apt-get update && $(SUDO) apt-get install -y wrk; }; }
	@command -v node >/dev/null || echo "bench: node not found: the baseline column will say so"
	$(CARGO) build --release -p respawn-master --features demo --bin respawn
	python3 bench/run.py

# Mutation testing of the files where the logic lives: each mutant is built
# and judged by every test, in a scratch copy; results in
# target/mutants.out/ (missed.txt, caught.txt, timeout.txt, outcomes.json).
# Installs cargo-mutants if missing. Slow (an hour or more): never part of
# make test or CI. One file: make mutants MUTATE=ipc/src/message.rs
# Every mutant is judged by every test of the workspace (a mutant in ipc/
# is mostly caught by what the master and workers do), with all features, so
# that the scratch copy builds the mutated demo binary the end-to-end tests
# run. A test that waits out its 20 s deadline needs time to fail rather than
# time out. No jobserver: its pipe would be inherited by every process the
# tests start. RESPAWN_BIN would test one fixed binary instead of the
# mutants, and a shared CARGO_TARGET_DIR would be rebuilt by each copy.
MUTATE ?= ipc/src/message.rs ipc/src/scoreboard.rs ipc/src/channel.rs \
	master/src/table.rs master/src/policy.rs master/src/hung.rs \
	master/src/master.rs master/src/logbuf.rs master/src/signals.rs \
	master/src/limits.rs worker/src/lib.rs worker/src/stop.rs worker/src/accept.rs
# cargo-mutants' own baseline runs only the mutated crate's tests: make test
# first proves the whole suite passes on the unmutated tree.
mutants: linux-only test
	@$(CARGO) mutants --version >/dev/null 2>&1 || $(CARGO) install --locked cargo-mutants
	env -u RESPAWN_BIN -u CARGO_TARGET_DIR $(CARGO) mutants --test-workspace true \
		--all-features --jobserver false --minimum-test-timeout 60 \
		--output target $(addprefix --file ,$(MUTATE)) $(MUTANTS_ARGS)

linux-only:
	@[ "$$(uname -s)" = Linux ] || { echo "respawn runs on Linux only (signalfd, epoll, prctl, /proc); this is $$(uname -s)" >&2; exit 1; }
