#!/usr/bin/env bash
# Install what `make test` and `make demo` need on a fresh Debian 12 machine.
#
#   1. System packages (apt): PostgreSQL server + client, gnupg, zstd, gzip, rsync, git,
#      make, a C toolchain and headers. Skipped when every tool is already there (fast
#      reruns) or when CLINIC_SKIP_APT=1.
#   2. The tools of the test hosts (tests/hosts, tests/testbed/hosts.py): rootful podman
#      with runc and netavark, catatonit, mmdebstrap (builds the images from Debian's
#      mirror), iptables, openssh-client. Skipped when present or CLINIC_SKIP_TEST_HOSTS=1;
#      if they cannot be installed, a warning says so and the host tests skip with the reason.
#   3. A virtualenv at <repo>/.venv with requirements-dev.txt. Skipped when the stamp
#      .venv/.requirements.sha256 matches requirements-dev.txt + requirements.txt.
#
# Idempotent and quiet: tool output goes to a log that is shown only on failure.
# Env: PYTHON       interpreter for the venv (default: python3 if it is 3.11-3.13, else
#                   python3.11 / 3.12 / 3.13)
#      VENV         venv location (default: <repo>/.venv)
#      CLINIC_SKIP_APT=1  never call apt-get
#      CLINIC_SKIP_TEST_HOSTS=1  do not install the test host tools
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
STAMP="$VENV/.requirements.sha256"
APT_PACKAGES=(
  postgresql postgresql-client gnupg zstd gzip python3-venv python3-dev gcc libpq-dev
  rsync git make ca-certificates shellcheck cron nginx-light logrotate
  # The agent as PostgreSQL's archive_command/restore_command runs it: the server's OS
  # user, the system Python (as on a host with the backup_agent role).
  python3-psycopg2 python3-boto3
)
# Commands those packages provide (pg_ctl is checked separately: it is not on PATH).
REQUIRED_COMMANDS=(psql pg_dump pg_restore gpg zstd gzip gcc pg_config rsync git make shellcheck crontab)
# Test hosts: rootful podman (runc: crun fails on setrlimit on some kernels; netavark for
# the internal networks; catatonit as the hosts' init), mmdebstrap for the images, ssh
# for Ansible. No slirp4netns or uidmap: the hosts are rootful and have no route out.
TEST_HOST_PACKAGES=(podman runc netavark catatonit iptables mmdebstrap openssh-client)
TEST_HOST_COMMANDS=(podman runc catatonit iptables mmdebstrap ssh ssh-keygen)
# Optional test tools, "package:command" each: installed when missing, and a failure to
# install is a warning (the tests that need the tool skip, saying why), never fatal.
#   chromium: renders the compliance report (tests/integration/test_playbook_status.py)
#   radosgw, ceph-mon, ceph-osd, ceph-common, ceph-base: a single-node
#   Ceph with radosgw, the S3 endpoint that enforces Object Lock (tests/testbed/radosgw.py)
OPTIONAL_TEST_TOOLS=(
  chromium:chromium
  radosgw:radosgw ceph-mon:ceph-mon ceph-osd:ceph-osd ceph-common:radosgw-admin ceph-base:monmaptool
)
APT_UPDATED=0

log() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: ERROR: %s\n' "$*" >&2; exit 1; }

LOG="$(mktemp -t clinic-bootstrap.XXXXXX)"
cleanup() { rm -f "$LOG"; }
trap cleanup EXIT

# run_quiet DESCRIPTION CMD...: run CMD with its output in $LOG; print the log on failure.
run_quiet() {
  local what="$1"
  shift
  if ! "$@" >>"$LOG" 2>&1; then
    printf 'bootstrap: ERROR: %s failed; output follows\n' "$what" >&2
    tail -n 60 "$LOG" >&2
    exit 1
  fi
}

python_ok() {
  # 3.11-3.13: ansible-core 2.19's controller range; requirements-dev.txt targets 3.11.
  "$1" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 13) else 1)' \
    >/dev/null 2>&1
}

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON not found"
    python_ok "$PYTHON" || die "PYTHON=$PYTHON is not Python 3.11-3.13"
    echo "$PYTHON"
    return
  fi
  local candidate
  for candidate in python3 python3.11 python3.12 python3.13; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
      echo "$candidate"
      return
    fi
  done
  echo ""
}

# venv_capable PY: can PY create a venv with pip (Debian splits this into python3-venv)
# and build C extensions (headers from python3-dev)?
venv_capable() {
  "$1" - <<'EOF' >/dev/null 2>&1
import ensurepip, os, sysconfig, venv  # noqa: F401
raise SystemExit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
EOF
}

missing_tools() {
  local missing=() cmd py
  for cmd in "${REQUIRED_COMMANDS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || missing+=("pg_ctl")
  [[ -e /etc/ssl/certs/ca-certificates.crt ]] || missing+=("ca-certificates")
  # nginx: the live web server the configuration restore tests validate and reload
  # (run unprivileged on loopback; policy-rc.d keeps the package from starting its own).
  [[ -x /usr/sbin/nginx ]] || missing+=("nginx")
  py="$(pick_python)"
  if [[ -z "$py" ]]; then
    missing+=("python3.11+")
  elif ! venv_capable "$py"; then
    missing+=("python3-venv/python3-dev")
  fi
  echo "${missing[*]}"
}

missing_test_host_tools() {
  local missing=() cmd
  for cmd in "${TEST_HOST_COMMANDS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 ||
      missing+=("$cmd")
  done
  [[ -x /usr/lib/podman/netavark ]] || missing+=("netavark")
  echo "${missing[*]}"
}

# install_apt_packages PACKAGE...: apt-get update (once) and install PACKAGE...
install_apt_packages() {
  local sudo=() created_policy=0
  if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "not root and sudo is missing; install: ${APT_PACKAGES[*]}"
    sudo=(sudo)
  fi
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found (this script targets Debian 12)"
  # Without systemd (containers), the postgresql package's attempt to start its service
  # can fail the install. policy-rc.d exit 101 tells invoke-rc.d not to start services;
  # the tests start their own throwaway clusters anyway.
  if [[ ! -e /usr/sbin/policy-rc.d ]] && ! [[ -d /run/systemd/system ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${sudo[@]}" chmod 0755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  if [[ "$APT_UPDATED" -eq 0 ]]; then
    log "apt-get update"
    run_quiet "apt-get update" "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get -qq update
    APT_UPDATED=1
  fi
  # --no-upgrade: only add what is missing; never upgrade a PostgreSQL that is in use.
  log "apt-get install $*"
  run_quiet "apt-get install" "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get -qq -y --no-install-recommends --no-upgrade -o Dpkg::Use-Pty=0 \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    install "$@"
  if [[ "$created_policy" -eq 1 ]]; then
    "${sudo[@]}" rm -f /usr/sbin/policy-rc.d
  fi
}

# ---------------------------------------------------------------------------- 1. apt
if [[ "${CLINIC_SKIP_APT:-0}" == "1" ]]; then
  log "CLINIC_SKIP_APT=1: skipping system packages"
else
  absent_tools="$(missing_tools)"
  if [[ -z "$absent_tools" ]]; then
    log "system packages: all present"
  else
    log "system packages missing: $absent_tools"
    install_apt_packages "${APT_PACKAGES[@]}"
    absent_tools="$(missing_tools)"
    [[ -z "$absent_tools" ]] || die "still missing after apt-get install: $absent_tools"
  fi
fi

# ---------------------------------------------------------------------------- 2. test hosts
if [[ "${CLINIC_SKIP_APT:-0}" == "1" || "${CLINIC_SKIP_TEST_HOSTS:-0}" == "1" ]]; then
  log "test host tools: skipped (CLINIC_SKIP_APT / CLINIC_SKIP_TEST_HOSTS)"
else
  absent_tools="$(missing_test_host_tools)"
  if [[ -z "$absent_tools" ]]; then
    log "test host tools: all present"
  else
    log "test host tools missing: $absent_tools"
    # Not fatal: on a machine that cannot have podman the host tests skip, saying why.
    if (install_apt_packages "${TEST_HOST_PACKAGES[@]}"); then
      absent_tools="$(missing_test_host_tools)"
      [[ -z "$absent_tools" ]] ||
        log "WARNING: still missing after apt-get install: $absent_tools (tests/hosts will skip)"
    else
      log "WARNING: could not install ${TEST_HOST_PACKAGES[*]} (tests/hosts will skip)"
    fi
  fi
fi

# ---------------------------------------------------------------------------- 2b. optional tools
if [[ "${CLINIC_SKIP_APT:-0}" == "1" ]]; then
  log "optional test tools: skipped (CLINIC_SKIP_APT)"
else
  for entry in "${OPTIONAL_TEST_TOOLS[@]}"; do
    package="${entry%%:*}" cmd="${entry#*:}"
    if command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1; then
      continue
    fi
    log "optional test tool missing: $cmd"
    (install_apt_packages "$package") ||
      log "WARNING: could not install $package (the tests that need $cmd will skip)"
  done
fi

# ---------------------------------------------------------------------------- 3. venv
PY="$(pick_python)"
[[ -n "$PY" ]] || die "no Python 3.11-3.13 found (set PYTHON=/path/to/python3.11)"

if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  # e.g. the interpreter it was made from is gone: rebuild rather than half-work.
  log "$VENV is broken; recreating"
  rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  run_quiet "python -m venv" "$PY" -m venv "$VENV"
fi

want="$(cat "$REPO/requirements-dev.txt" "$REPO/requirements.txt" | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" == "$have" ]]; then
  log "python requirements: up to date ($VENV)"
else
  log "pip install -r requirements-dev.txt into $VENV (a few minutes on a fresh machine)"
  run_quiet "pip install --upgrade pip" "$VENV/bin/python" -m pip install -q \
    --disable-pip-version-check --upgrade pip
  run_quiet "pip install -r requirements-dev.txt" "$VENV/bin/python" -m pip install -q \
    --disable-pip-version-check -r "$REPO/requirements-dev.txt"
  echo "$want" >"$STAMP"
fi

# ---------------------------------------------------------------------------- 4. promtool
# molecule's default scenario checks the rendered alert rules with `promtool check rules`.
# Only the promtool binary is taken out of Debian's prometheus package (apt-get download,
# dpkg-deb): no Prometheus service is installed or started on this machine. Without it
# the scenario says the rules were not checked.
if [[ -x "$VENV/bin/promtool" ]] || command -v promtool >/dev/null 2>&1; then
  log "promtool: present"
elif [[ "${CLINIC_SKIP_APT:-0}" == "1" ]]; then
  log "promtool: skipped (CLINIC_SKIP_APT)"
else
  promtool_dir="$(mktemp -d -t clinic-promtool.XXXXXX)"
  if (cd "$promtool_dir" && apt-get download -q prometheus >/dev/null 2>&1) &&
    dpkg-deb --fsys-tarfile "$promtool_dir"/prometheus_*.deb |
    tar -x -O ./usr/bin/promtool >"$promtool_dir/promtool" && [[ -s "$promtool_dir/promtool" ]]; then
    install -m 0755 "$promtool_dir/promtool" "$VENV/bin/promtool"
    log "promtool: $VENV/bin/promtool (from Debian's prometheus package)"
  else
    log "WARNING: could not fetch Debian's prometheus package: molecule will not check the alert rules with promtool"
  fi
  rm -rf "$promtool_dir"
fi

log "ready: $VENV/bin/python, PostgreSQL binaries in $(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -n1 || echo '?')"
