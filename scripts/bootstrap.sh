#!/usr/bin/env bash
# Install what `make test` and `make demo` need on a fresh Debian 12 machine.
#
#   1. System packages (apt): PostgreSQL server + client, gnupg, zstd, gzip, rsync, git,
#      make, a C toolchain and headers. Skipped when every tool is already there (fast
#      reruns) or when CLINIC_SKIP_APT=1.
#   2. A virtualenv at <repo>/.venv with requirements-dev.txt. Skipped when the stamp
#      .venv/.requirements.sha256 matches requirements-dev.txt + requirements.txt.
#
# Idempotent and quiet: tool output goes to a log that is shown only on failure.
# Env: PYTHON       interpreter for the venv (default: python3 if it is 3.11-3.13, else
#                   python3.11 / 3.12 / 3.13)
#      VENV         venv location (default: <repo>/.venv)
#      CLINIC_SKIP_APT=1  never call apt-get
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
STAMP="$VENV/.requirements.sha256"
APT_PACKAGES=(
  postgresql postgresql-client gnupg zstd gzip python3-venv python3-dev gcc libpq-dev
  rsync git make ca-certificates shellcheck cron
)
# Commands those packages provide (pg_ctl is checked separately: it is not on PATH).
REQUIRED_COMMANDS=(psql pg_dump pg_restore gpg zstd gzip gcc pg_config rsync git make shellcheck crontab)

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
  py="$(pick_python)"
  if [[ -z "$py" ]]; then
    missing+=("python3.11+")
  elif ! venv_capable "$py"; then
    missing+=("python3-venv/python3-dev")
  fi
  echo "${missing[*]}"
}

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
  log "apt-get update"
  run_quiet "apt-get update" "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get -qq update
  # --no-upgrade: only add what is missing; never upgrade a PostgreSQL that is in use.
  log "apt-get install ${APT_PACKAGES[*]}"
  run_quiet "apt-get install" "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get -qq -y --no-install-recommends --no-upgrade -o Dpkg::Use-Pty=0 \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    install "${APT_PACKAGES[@]}"
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
    install_apt_packages
    absent_tools="$(missing_tools)"
    [[ -z "$absent_tools" ]] || die "still missing after apt-get install: $absent_tools"
  fi
fi

# ---------------------------------------------------------------------------- 2. venv
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

log "ready: $VENV/bin/python, PostgreSQL binaries in $(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -n1 || echo '?')"
