#!/usr/bin/env bash
# Gate: ansible-lint (production profile) on roles/ + playbooks/ (+ galaxy.yml, meta/),
# then ruff check and ruff format --check on plugins/ tests/ bench/, then
# antsibull-changelog lint.
#
# - ansible-lint is configured by .ansible-lint (profile: production, offline: true).
#   Offline mode means ansible-lint neither installs requirements from Galaxy nor
#   refreshes its schemas, and it also does not "install" the collection being linted
#   into its cache. So that `clinic.backup.*` modules and roles resolve during
#   ansible-lint's syntax-check, a temp dir holding
#   ansible_collections/clinic/backup -> <repo> (symlink) is put first on
#   ANSIBLE_COLLECTIONS_PATH.
# - ruff is configured by pyproject.toml ([tool.ruff]); it never fixes anything here
#   (run `ruff format plugins tests bench && ruff check --fix plugins tests bench` to fix).
# - antsibull-changelog lint checks changelogs/fragments/*.yml and changelogs/config.yaml.
# All steps run even if an earlier one fails; the script exits non-zero if any failed.
#
# Usage: scripts/gates/lint.sh
# Env:   VENV (default $REPO/.venv) - venv holding ansible-lint and ruff.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"

for tool in ansible-lint ruff antsibull-changelog; do
  if [[ ! -x "$VENV/bin/$tool" ]]; then
    echo "ERROR: $VENV/bin/$tool not found; run scripts/bootstrap.sh or set VENV=/path/to/venv" >&2
    exit 2
  fi
done
# ansible-lint warns (and may pick the wrong ansible) if its venv's bin is not on PATH.
export PATH="$VENV/bin:$PATH"
export NO_COLOR=1 ANSIBLE_NOCOLOR=1 ANSIBLE_LINT_SKIP_SCHEMA_UPDATE=1

TMP="$(mktemp -d "${TMPDIR:-/tmp}/clinic-lint.XXXXXX")"
# shellcheck disable=SC2317,SC2329  # invoked via trap (SC2317 on shellcheck < 0.10)
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT

cd "$REPO"
failed=()

run() {
  local name="$1"
  shift
  printf '+ %s\n' "$*" >&2
  if "$@"; then
    echo "lint: $name OK" >&2
  else
    echo "lint: $name FAILED" >&2
    failed+=("$name")
  fi
}

existing() {
  local d
  for d in "$@"; do
    if [[ -d "$d" ]]; then printf '%s\n' "$d"; fi
  done
}

# --- ansible-lint ------------------------------------------------------------------
mkdir -p "$TMP/collections/ansible_collections/clinic"
ln -s "$REPO" "$TMP/collections/ansible_collections/clinic/backup"
export ANSIBLE_COLLECTIONS_PATH="$TMP/collections${ANSIBLE_COLLECTIONS_PATH:+:$ANSIBLE_COLLECTIONS_PATH}"
# Keep ansible-lint's own cache/tmp out of the work tree and of $HOME.
export ANSIBLE_LOCAL_TEMP="$TMP/ansible-tmp"
# An installed copy of clinic.backup in ~/.ansible/collections (e.g. from a molecule or
# galaxy run) would shadow this checkout: ansible-lint sees a private, empty HOME.
mkdir -p "$TMP/home"

# roles/ and playbooks/ are the content; galaxy.yml and meta/ (runtime.yml,
# execution-environment.yml) are added because the `galaxy`, `meta-runtime` and `schema`
# rules check them, and galaxy-importer's own ansible-lint run never sees galaxy.yml (the
# built artifact carries MANIFEST.json instead).
# molecule/ (the scenarios' playbooks) is linted like the content it tests.
mapfile -t lint_targets < <(existing roles playbooks molecule)
if ((${#lint_targets[@]})); then
  run ansible-lint env HOME="$TMP/home" ansible-lint --profile production --offline -c "$REPO/.ansible-lint" \
    "${lint_targets[@]}" galaxy.yml meta
else
  echo "lint: no roles/ or playbooks/ directory: nothing for ansible-lint" >&2
fi

# --- ruff ----------------------------------------------------------------------------
mapfile -t py_targets < <(existing plugins tests bench)
if ((${#py_targets[@]})); then
  run "ruff check" ruff check --no-fix --output-format concise "${py_targets[@]}"
  run "ruff format" ruff format --check --diff "${py_targets[@]}"
else
  echo "lint: no plugins/ tests/ bench/: nothing for ruff" >&2
fi

# --- changelog ---------------------------------------------------------------------------
# Same checks as ansible-test's "changelog" sanity test, with the project's (newer)
# antsibull-changelog: fragments + config, and the changes file.
if [[ -f changelogs/config.yaml ]]; then
  run "antsibull-changelog lint" antsibull-changelog lint
  if [[ -f changelogs/changelog.yaml ]]; then
    run "changelog.yaml" antsibull-changelog lint-changelog-yaml changelogs/changelog.yaml
  fi
fi

if ((${#failed[@]})); then
  echo "lint: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "lint: all checks passed" >&2
