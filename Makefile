# clinic.backup — the two set-up commands are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PYTHON := $(VENV)/bin/python
export VENV

.PHONY: help bootstrap demo test lint pytest test-unit test-integration test-faults test-hosts test-hosts-clean molecule sanity galaxy-import bench bench-restore bench-files bench-fleet clean

help:
	@echo "make demo   - back up a local PostgreSQL (throwaway sample cluster unless DATABASE_URL is set)"
	@echo "make test   - install what is needed (apt + .venv) and run every gate and test"
	@echo "make test-hosts - Debian 12 test hosts in podman (images built once, then cached)"
	@echo "make molecule - the molecule scenarios (default: site.yml; replacement: server failure) on those hosts"
	@echo "make bench  - time a backup against bare pg_dump baselines (BENCH_SCALE=...)"
	@echo "make bench-restore - time the restore rehearsal against bare pg_restore (BENCH_SCALE=...)"
	@echo "make bench-pitr - WAL archiving and point-in-time recovery against cp and pgBackRest (BENCH_LOAD_SECONDS=...)"
	@echo "make bench-files - incremental file sets: an hourly run against a full one (10,240 files, 1.1 GB)"
	@echo "make bench-fleet - backup.yml over 20 podman database hosts against one host"

bootstrap:
	bash scripts/bootstrap.sh

demo: bootstrap
	$(PYTHON) scripts/demo.py

# Cheap gates first so that a lint slip fails in seconds, the slow sanity run last.
# tests/ includes tests/hosts (podman test hosts); -rs prints why anything was skipped.
test: bootstrap
	bash scripts/gates/lint.sh
	$(PYTHON) -m pytest -rs --durations=25 tests
	bash scripts/gates/sanity.sh
	bash scripts/gates/galaxy-import.sh

lint: bootstrap
	bash scripts/gates/lint.sh

pytest: bootstrap
	$(PYTHON) -m pytest tests

test-unit: bootstrap
	$(PYTHON) -m pytest tests/unit

test-integration: bootstrap
	$(PYTHON) -m pytest tests/integration

test-faults: bootstrap
	$(PYTHON) -m pytest tests/faults

# Builds the images on first use (a few minutes), then reuses them from
# /var/cache/clinic-backup-testbed. CLINIC_TESTBED_REBUILD=1 rebuilds them.
test-hosts: bootstrap
	$(PYTHON) -m pytest -rs tests/hosts

# molecule test -s default and -s replacement (also part of `make test`, via tests/molecule).
molecule: bootstrap
	$(PYTHON) -m pytest -rs tests/molecule

# Removes the test host images, containers and networks (the whole podman storage of
# the test bed, outside the work tree); the next run builds the images again.
test-hosts-clean:
	$(PYTHON) -c 'import sys; sys.path.insert(0, "tests"); from testbed.hosts import purge_cache; purge_cache()'

sanity: bootstrap
	bash scripts/gates/sanity.sh

galaxy-import: bootstrap
	bash scripts/gates/galaxy-import.sh

bench: bootstrap
	$(PYTHON) bench/bench_backup.py

bench-restore: bootstrap
	$(PYTHON) bench/bench_restore.py

# Not part of make test: minutes of pgbench load per mode. pgBackRest's baseline needs
# the pgbackrest package (apt-get install pgbackrest); without it, it is skipped and said so.
bench-pitr: bootstrap
	$(PYTHON) bench/bench_pitr.py

bench-files: bootstrap
	$(PYTHON) bench/bench_files.py

# Not in `make test`: 20 podman hosts, a few minutes.
bench-fleet: bootstrap
	$(PYTHON) bench/bench_fleet.py

clean:
	rm -rf build .pytest_cache .ruff_cache tests/output
