# respawn: the commands a newcomer needs. Linux only.
CARGO ?= cargo
ARGS ?=

.PHONY: run test skips lint doc man bench bench-upgrade bench-upgrade-scale bench-any build-demo mutants linux-only release install install-files uninstall static

# Build in release mode and start the demo on 127.0.0.1:8080 (make run ARGS='--workers 2').
run: linux-only
	$(CARGO) run --release -p respawn-master --features demo --bin respawn -- $(ARGS)

# Every test: unit tests of each crate, then the end-to-end tests, which run
# the demo binary. `cargo test --workspace` builds it too (tests/Cargo.toml
# says how); build-demo also writes the list of its sources (respawn.d) that
# the harness checks it against. TEST=name runs the tests whose name holds it.
# A test that cannot run here passes, but is listed at the end: the harness
# appends each skip to $(SKIPS) (docs/testing.md, skips), emptied first, and
# the list is printed whether the tests passed or not.
TEST ?=
SKIPS = $(abspath $(TARGET_DIR))/skips.txt
#
# The end-to-end tests that wait on programs in other languages (their
# interpreters start slowly, and some install frameworks from a registry)
# run beside the rest rather than after them: they mostly wait, and the
# suite must fit in 5 minutes on 2 cores. Their output comes after the
# rest's. With TEST set, everything runs in one cargo test, in order.
WAITING_TESTS = python_apps node_apps other_servers any_language marks clients
OTHER_TESTS = $(filter-out $(WAITING_TESTS),$(basename $(notdir $(wildcard tests/tests/*.rs))))
WAITING_LOG = $(abspath $(TARGET_DIR))/waiting-tests.log
test: linux-only build-demo
	@: > $(SKIPS)
	@$(CARGO) test --workspace --all-features --no-run -q
ifneq ($(TEST),)
	@echo "RESPAWN_SKIPS=$(SKIPS) $(CARGO) test --workspace --all-features -- $(TEST)"
	@RESPAWN_SKIPS=$(SKIPS) $(CARGO) test --workspace --all-features -- $(TEST); \
		status=$$?; $(MAKE) --no-print-directory skips; exit $$status
else
	@echo "RESPAWN_SKIPS=$(SKIPS) $(CARGO) test --workspace --all-features (in two parts at once; see the Makefile)"
	@rm -f $(WAITING_LOG).status; \
		( RESPAWN_SKIPS=$(SKIPS) $(CARGO) test -p respawn-tests --all-features $(addprefix --test ,$(WAITING_TESTS)) \
			> $(WAITING_LOG) 2>&1; echo $$? > $(WAITING_LOG).status ) & \
		RESPAWN_SKIPS=$(SKIPS) $(CARGO) test --workspace --exclude respawn-tests --all-features; s1=$$?; \
		RESPAWN_SKIPS=$(SKIPS) $(CARGO) test -p respawn-tests --all-features --lib $(addprefix --test ,$(OTHER_TESTS)); s2=$$?; \
		wait; cat $(WAITING_LOG); s3=$$(cat $(WAITING_LOG).status 2>/dev/null || echo 1); \
		$(MAKE) --no-print-directory skips; \
		[ $$s1 = 0 ] && [ $$s2 = 0 ] && [ $$s3 = 0 ]
endif

# The tests the last make test skipped, with the kind and the reason.
skips:
	@if [ ! -e $(SKIPS) ]; then echo "no list of skips ($(SKIPS)): run make test"; \
	elif [ ! -s $(SKIPS) ]; then echo "no test skipped"; \
	else n=$$(wc -l < $(SKIPS)); [ "$$n" = 1 ] && echo "1 test skipped:" || echo "$$n tests skipped:"; \
		awk -F '\t' '{ printf "  %s (%s): %s\n", $$2, $$1, $$3 }' $(SKIPS) | sort; fi

build-demo:
	$(CARGO) build -p respawn-master --features demo --bin respawn

# Installing: `make install PREFIX=/usr/local DESTDIR=` builds the demo in
# release mode, then copies it to $(DESTDIR)$(PREFIX)/bin/respawn (mode 0755),
# the manual pages respawn(1) and respawn-ctl(1) to share/man/man1, and the
# documents to $(DESTDIR)$(PREFIX)/share/doc/respawn, laid out as in the
# source (README.md, docs/, deploy/) so that their links to each other
# work there. DESTDIR stages the tree for a package. install-files does the
# copying alone, of BIN:
# `make install-files BIN=target/x86_64-unknown-linux-gnu/release/respawn`
# installs the binary `make static` built.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
DOCDIR ?= $(PREFIX)/share/doc/respawn
MANDIR ?= $(PREFIX)/share/man
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
BIN ?= $(TARGET_DIR)/release/respawn
DOCS := README.md $(wildcard docs/*.md) docs/benchmarks.svg $(wildcard deploy/*)
MANPAGES := docs/man/respawn.1 docs/man/respawn-ctl.1

release: linux-only
	$(CARGO) build --release -p respawn-master --features demo --bin respawn

install: release
	$(MAKE) --no-print-directory install-files

install-files:
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/respawn
	for page in $(MANPAGES); do install -D -m 0644 "$$page" "$(DESTDIR)$(MANDIR)/man1/$${page##*/}" || exit 1; done
	for doc in $(DOCS); do install -D -m 0644 "$$doc" "$(DESTDIR)$(DOCDIR)/$$doc" || exit 1; done

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/respawn
	rm -f $(addprefix $(DESTDIR)$(MANDIR)/man1/,$(notdir $(MANPAGES)))
	rm -rf $(DESTDIR)$(DOCDIR)

# The manual pages, made by the binary from its table of flags
# (master/src/bin/respawn/args.rs): run after changing a flag. A test
# (tests/tests/flags.rs) fails while the pages in the tree differ from what
# the binary prints.
man: build-demo
	$(TARGET_DIR)/debug/respawn --man > docs/man/respawn.1.new
	$(TARGET_DIR)/debug/respawn ctl --man > docs/man/respawn-ctl.1.new
	mv docs/man/respawn.1.new docs/man/respawn.1
	mv docs/man/respawn-ctl.1.new docs/man/respawn-ctl.1

# A statically linked binary, for a host or container without the glibc it
# was built against (FROM scratch, say). The installed gnu target with
# crt-static: no musl target needed. Built for an explicit --target, so the
# flag reaches only this binary, not build scripts, and lands in its own
# directory. glibc's NSS cannot be linked statically: a user or group name
# (--user, --group) found in /etc/passwd or /etc/group is resolved (glibc
# 2.34+ has the files source built in), but a name that is not makes glibc
# load the next source of /etc/nsswitch.conf (systemd, sss, ldap) as a
# shared library, which a static binary survives only with the very glibc it
# was linked with, if at all (on Debian 12, glibc 2.36, it dies of SIGSEGV).
# The linker's warning about it is not shown: rust-lld ignores it.
STATIC_TARGET ?= $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
STATIC_BIN = $(TARGET_DIR)/$(STATIC_TARGET)/release/respawn
static: linux-only
	RUSTFLAGS="$$RUSTFLAGS -C target-feature=+crt-static" $(CARGO) build --release \
		-p respawn-master --features demo --bin respawn --target $(STATIC_TARGET)
	@echo "static: $(STATIC_BIN), $$(stat -c %s $(STATIC_BIN)) bytes (not stripped)"

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

doc:
	$(CARGO) doc --workspace --no-deps

# Load and fault benchmarks, respawn beside a Node.js cluster server; writes
# docs/benchmarks.md and docs/benchmarks.svg. Installs wrk from Debian's
# packages if it is missing. The respawn gap and the start are measured
# beside the C limit (bench/fork_limit.c, which it compiles with cc), and,
# where perf can record the kernel's tracepoints, each step of a replacement
# (bench/gap_trace.py, alone: python3 bench/gap_trace.py --show-child).
# Takes about 16 minutes on an idle machine, more
# when others use its cores; never part of make test. Two of its parts run
# alone: bench-upgrade, the upgrade under load (USR2) beside a plain restart
# (under a minute); bench-any, the example Node and Python servers under
# respawn beside Node's cluster (about 6 minutes), then respawn beside PM2
# and gunicorn, installed from npm and PyPI into a temporary directory for
# the run (about 6 minutes more; make bench carries that section over).
# Each writes its sections to target/bench/upgrade.md or
# target/bench/anylang.md, leaving the tree as it was; UPDATE_DOCS=1 writes
# them into docs/benchmarks.md instead, in place of the sections there.
# PORTS=LOW-HIGH makes their masters listen on free ports of that range
# (make bench-upgrade PORTS=20000-20099); by default, on any free port.
# bench-upgrade-scale runs alone only (make bench carries its section over):
# an upgrade (USR2) of 4,096 workers under load, and the state the master
# hands down (4 to 5 minutes; `python3 bench/upgrade_scale.py --workers 512
# --print` tries fewer without touching the docs).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
bench: linux-only
	@command -v wrk >/dev/null || { echo "bench: installing wrk from Debian's packages"; \
		$(SUDO) apt-get install -y wrk || { $(SUDO) apt-get update && $(SUDO) apt-get install -y wrk; }; }
	@command -v node >/dev/null || echo "bench: node not found: the baseline column will say so"
	$(CARGO) build --release -p respawn-master --features demo --bin respawn
	python3 bench/run.py

UPDATE_DOCS ?=
PORTS ?=
BENCH_PART_FLAGS = $(if $(UPDATE_DOCS),--update-docs) $(if $(PORTS),--ports $(PORTS))
bench-upgrade: linux-only
	$(CARGO) build --release -p respawn-master --features demo --bin respawn
	python3 bench/upgrade.py $(BENCH_PART_FLAGS)

bench-upgrade-scale: linux-only
	$(CARGO) build --release -p respawn-master --features demo --bin respawn
	python3 bench/upgrade_scale.py

bench-any: linux-only
	@command -v wrk >/dev/null || { echo "bench-any: installing wrk from Debian's packages"; \
		$(SUDO) apt-get install -y wrk || { $(SUDO) apt-get update && $(SUDO) apt-get install -y wrk; }; }
	@command -v node >/dev/null || echo "bench-any: node not found: its columns will say so"
	$(CARGO) build --release -p respawn-master --features demo --bin respawn
	python3 bench/anylang.py $(BENCH_PART_FLAGS)

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
	master/src/limits.rs worker/src/lib.rs worker/src/stop.rs worker/src/accept.rs \
	master/src/master/settle.rs master/src/master/deploy.rs master/src/master/strays.rs \
	master/src/handdown.rs master/src/upgrade.rs master/src/control.rs master/src/status.rs \
	master/src/exec.rs master/src/listen.rs master/src/activation.rs master/src/notify.rs \
	master/src/notified.rs master/src/pidfile.rs master/src/privileges.rs master/src/title.rs
# cargo-mutants' own baseline runs only the mutated crate's tests: make test
# first proves the whole suite passes on the unmutated tree.
mutants: linux-only test
	@$(CARGO) mutants --version >/dev/null 2>&1 || $(CARGO) install --locked cargo-mutants
	env -u RESPAWN_BIN -u CARGO_TARGET_DIR $(CARGO) mutants --test-workspace true \
		--all-features --jobserver false --minimum-test-timeout 60 \
		--output target $(addprefix --file ,$(MUTATE)) $(MUTANTS_ARGS)

linux-only:
	@[ "$$(uname -s)" = Linux ] || { echo "respawn runs on Linux only (signalfd, epoll, prctl, /proc); this is $$(uname -s)" >&2; exit 1; }
