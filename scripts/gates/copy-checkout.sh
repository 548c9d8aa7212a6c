#!/usr/bin/env bash
# Sourced by the gate scripts: copy_checkout REPO DEST copies exactly the files git
# would ship (tracked + untracked-but-not-ignored, still present in the work tree)
# into DEST, so venvs, caches and tests/output never leak into what is checked.
copy_checkout() {
  local repo="$1" dest="$2"
  mkdir -p "$dest"
  (
    cd "$repo" || exit 1
    # Tracked files deleted from the work tree are still listed: keep only existing paths.
    git ls-files -co --exclude-standard -z |
      while IFS= read -r -d '' f; do
        if [[ -e "$f" || -L "$f" ]]; then printf '%s\0' "$f"; fi
      done |
      tar --null --no-recursion -T - -cf -
  ) | tar -C "$dest" -xpf -
}
