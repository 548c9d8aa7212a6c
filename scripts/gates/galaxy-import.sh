#!/usr/bin/env bash
# Gate: build the collection artifact and run galaxy-importer on it, offline.
#
# 1. Copies the git-tracked + untracked-but-not-ignored files
#    (`git ls-files -co --exclude-standard`) to a temp dir, so no local junk
#    (venvs, tests/output, results) can leak into the artifact, then runs
#    `ansible-galaxy collection build` there (galaxy.yml's build_ignore applies on top).
# 2. Runs `python -m galaxy_importer.main <tarball>` with a config file passed via
#    GALAXY_IMPORTER_CONFIG:
#      run_ansible_test = False  galaxy-importer can only run ansible-test in a container
#                                (`ansible-test sanity --docker`, or a local image / OpenShift
#                                job); there is no docker daemon here. ansible-test sanity is
#                                its own gate: scripts/gates/sanity.sh.
#      run_ansible_lint = True + offline_ansible_lint = True
#                                ansible-lint runs locally from $VENV (production profile),
#                                with --offline: no Galaxy downloads, no schema refresh.
#      run_ansible_doc = True, check_changelog = True (importer defaults, kept explicit).
# 3. galaxy-importer exits 0 even when ansible-lint or its own checks report problems: they
#    are only logged (as "WARNING: ..." / "ERROR: ..." lines, ansible-lint findings included).
#    So this script fails if the importer exits non-zero, if its output lacks
#    "Importer processing completed successfully", or if it logged any ERROR/CRITICAL line
#    or any WARNING line not matched by ALLOWED_WARNINGS below.
#
# Usage: scripts/gates/galaxy-import.sh
# Env:   VENV (default $REPO/.venv) - venv holding ansible-core, ansible-lint, galaxy-importer.
#        KEEP_TMP=1 keeps the temp dir (tarball, importer_result.json, log).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/gates/copy-checkout.sh
source "$REPO/scripts/gates/copy-checkout.sh"
VENV="${VENV:-$REPO/.venv}"

# Importer warnings that are not findings (extended regex, matched against the whole line
# after "WARNING: "). Empty on purpose. Note: the importer warns about ANY
# tests/sanity/ignore-*.txt file, even an empty one ("Ignore files skip ansible-test sanity
# tests, found ignore-2.19.txt with 0 statement(s)"), so this gate also fails when such a
# file exists: add a pattern here only together with a justified ignore line.
ALLOWED_WARNINGS=()

for tool in python ansible-galaxy ansible-lint ansible-doc; do
  if [[ ! -x "$VENV/bin/$tool" ]]; then
    echo "ERROR: $VENV/bin/$tool not found; run scripts/bootstrap.sh or set VENV=/path/to/venv" >&2
    exit 2
  fi
done
# The importer finds ansible-lint / ansible-doc / ansible-galaxy through PATH.
export PATH="$VENV/bin:$PATH"
export NO_COLOR=1 ANSIBLE_NOCOLOR=1

TMP="$(mktemp -d "${TMPDIR:-/tmp}/clinic-galaxy-import.XXXXXX")"
# shellcheck disable=SC2317,SC2329  # invoked via trap (SC2317 on shellcheck < 0.10)
cleanup() {
  if [[ "${KEEP_TMP:-0}" == 1 ]]; then
    echo "KEEP_TMP=1: leaving $TMP" >&2
  else
    rm -rf "$TMP"
  fi
}
trap cleanup EXIT
log() { printf '+ %s\n' "$*" >&2; }
start=$SECONDS

# --- 1. build --------------------------------------------------------------------------
SRC="$TMP/src"
mkdir -p "$SRC" "$TMP/dist" "$TMP/work" "$TMP/ansible-tmp"
log "copying git ls-files -co --exclude-standard into $SRC"
copy_checkout "$REPO" "$SRC"

export ANSIBLE_LOCAL_TEMP="$TMP/ansible-tmp"
log "ansible-galaxy collection build --output-path $TMP/dist $SRC"
ansible-galaxy collection build --output-path "$TMP/dist" "$SRC"
shopt -s nullglob
tarballs=("$TMP"/dist/*.tar.gz)
shopt -u nullglob
if ((${#tarballs[@]} != 1)); then
  echo "ERROR: expected exactly one tarball in $TMP/dist, found ${#tarballs[@]}" >&2
  exit 1
fi
TARBALL="${tarballs[0]}"
echo "galaxy-import: built $(basename "$TARBALL") ($(du -k "$TARBALL" | cut -f1) KiB)" >&2

# --- 2. import -------------------------------------------------------------------------
cat >"$TMP/galaxy-importer.cfg" <<EOF
[galaxy-importer]
log_level_main = INFO
tmp_root_dir = $TMP/work
ansible_local_tmp = $TMP/ansible-tmp
run_ansible_doc = True
run_ansible_lint = True
offline_ansible_lint = True
run_ansible_test = False
ansible_test_local_image = False
local_image_docker = False
infra_osd = False
check_changelog = True
run_flake8 = False
EOF
export GALAXY_IMPORTER_CONFIG="$TMP/galaxy-importer.cfg"
log "GALAXY_IMPORTER_CONFIG=$GALAXY_IMPORTER_CONFIG python -m galaxy_importer.main $TARBALL"
# cwd: the importer writes importer_result.json into the current directory.
set +e
(cd "$TMP/work" && python -m galaxy_importer.main "$TARBALL") 2>&1 | tee "$TMP/importer.log"
status=${PIPESTATUS[0]}
set -e

# --- 3. verdict --------------------------------------------------------------------------
problems=()
if ((status != 0)); then
  problems+=("galaxy-importer exited $status")
fi
if ! grep -q '^Importer processing completed successfully' "$TMP/importer.log"; then
  problems+=("importer did not report 'Importer processing completed successfully'")
fi
mapfile -t errors < <(grep -E '^(ERROR|CRITICAL):' "$TMP/importer.log" || true)
mapfile -t warnings < <(grep -E '^WARNING:' "$TMP/importer.log" || true)
findings=("${errors[@]}")
for w in "${warnings[@]}"; do
  allowed=0
  for re in "${ALLOWED_WARNINGS[@]}"; do
    if [[ "$w" =~ ^WARNING:\ ${re}$ ]]; then allowed=1; fi
  done
  if ((!allowed)); then findings+=("$w"); fi
done
if ((${#findings[@]})); then
  problems+=("${#findings[@]} error/warning line(s) from the importer")
fi

echo "galaxy-import: finished in $((SECONDS - start))s" >&2
if ((${#problems[@]})); then
  if ((${#findings[@]})); then
    echo "---- importer findings ----" >&2
    printf '%s\n' "${findings[@]}" >&2
  fi
  printf 'galaxy-import: FAILED: %s\n' "${problems[@]}" >&2
  exit 1
fi
echo "galaxy-import: OK ($(basename "$TARBALL") imports cleanly)" >&2
