"""Fault 4: a stored artifact or manifest is damaged (bit rot, a truncated copy, a hand edit).

Two good sets of clinic_db are taken once; every case works on a fresh copy of that
repository and damages the *newer* set. Then every set is verified (and the outcome
recorded, as the daily verify does): the damaged set must fail naming the artifact or
the manifest, the older set must still verify, and
``catalog.newest_complete(repo, require_verified=True)`` must pick the older set.

Randomised damage (bit flips, truncation) is repeated FAULT_REPEAT times at different
offsets; the deterministic manifest edits run once each.

The same damage is then met by a restore rehearsal with no verify run before it: the
restore must notice on its own (missing manifest, sha256, missing artifact), pass over
the damaged set, restore the older one with every row count matching, and leave no
database behind.
"""

from __future__ import annotations

import json
import random
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from testbed.files import write_passphrase_file

from ansible_collections.clinic.backup.plugins.module_utils import catalog
from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.pgsource import PgConnection
from ansible_collections.clinic.backup.plugins.module_utils.restore import (
    RestoreOptions,
    run_restore,
)
from ansible_collections.clinic.backup.plugins.module_utils.verify import verify_set

from . import faultlib
from .faultlib import agent_config, helpers


@pytest.fixture(scope="module")
def template(pg, collections_path, tmp_path_factory) -> dict[str, Any]:
    """A repository with two complete, verified sets of clinic_db (older, newer)."""
    work = tmp_path_factory.mktemp("corruption")
    passphrase = write_passphrase_file(work / "passphrase")
    repo_dir = work / "template"
    repo_dir.mkdir(mode=0o700)
    config = agent_config(work, pg, pg.clinic_db, passphrase, repository=repo_dir)
    ids = []
    for _round in range(2):
        result = faultlib.run_agent(collections_path, config)
        assert result.rc == 0, result.text()
        ids.append(result.doc["set_id"])
    for set_id in ids:
        assert faultlib.verify_ok(faultlib.local_repository(repo_dir), set_id, passphrase)[0]
    return {
        "repo": repo_dir,
        "older": ids[0],
        "newer": ids[1],
        "passphrase": passphrase,
        "config": config,
        "work": work,
    }


def _artifact(repo: Path, set_id: str, name: str) -> tuple[Path, dict[str, Any]]:
    manifest = helpers.manifest(repo, set_id)
    entry = next(a for a in manifest["artifacts"] if a["name"] == name)
    return repo / "sets" / set_id / entry["file"], entry


def _edit_manifest(repo: Path, set_id: str, edit: Callable[[dict[str, Any]], None]) -> None:
    path = repo / "sets" / set_id / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# Each damage: (repo, set_id, other_id, rng) -> (words the failure must contain,
# the artifact or manifest it must name)
def flip_bit(name: str):
    def damage(repo, set_id, _other, rng):
        path, _entry = _artifact(repo, set_id, name)
        data = bytearray(path.read_bytes())
        offset = rng.randrange(len(data))
        data[offset] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        return ["sha256", path.name], path.name

    return damage


def truncate(repo, set_id, _other, rng):
    path, entry = _artifact(repo, set_id, "database")
    keep = rng.randrange(1, entry["size"])
    with open(path, "r+b") as fh:
        fh.truncate(keep)
    return ["%d bytes, manifest says %d" % (keep, entry["size"]), path.name], path.name


def delete_manifest(repo, set_id, _other, _rng):
    (repo / "sets" / set_id / "manifest.json").unlink()
    return ["has no manifest"], "manifest"


def wrong_sha256(repo, set_id, _other, _rng):
    path, entry = _artifact(repo, set_id, "database")
    bad = ("0" if entry["sha256"][0] != "0" else "1") + entry["sha256"][1:]

    def edit(data):
        next(a for a in data["artifacts"] if a["name"] == "database")["sha256"] = bad

    _edit_manifest(repo, set_id, edit)
    # The manifest's MAC no longer holds: the edit is caught before any byte is read.
    return ["fails its authentication check", "altered after it was written"], "manifest"


def names_other_set(repo, set_id, other, _rng):
    _edit_manifest(repo, set_id, lambda data: data.update(id=other))
    return ["names another set", other], "manifest"


def manifest_not_json(repo, set_id, _other, _rng):
    path = repo / "sets" / set_id / "manifest.json"
    path.write_bytes(path.read_bytes()[:100])
    return ["not valid JSON"], "manifest"


def delete_artifact(repo, set_id, _other, _rng):
    path, _entry = _artifact(repo, set_id, "globals")
    path.unlink()
    return ["is missing", path.name], path.name


def drop_database_entry(repo, set_id, _other, _rng):
    _edit_manifest(
        repo,
        set_id,
        lambda data: data.update(
            artifacts=[a for a in data["artifacts"] if a["name"] != "database"]
        ),
    )
    return ["database"], "manifest"


RANDOMISED = {
    "bit flip in the database artifact": flip_bit("database"),
    "bit flip in the globals artifact": flip_bit("globals"),
    "truncated database artifact": truncate,
}
DETERMINISTIC = {
    "deleted manifest": delete_manifest,
    "manifest with a wrong sha256": wrong_sha256,
    "manifest naming a different set": names_other_set,
    "manifest that is not JSON": manifest_not_json,
    "deleted artifact": delete_artifact,
}


def run_case(
    name: str,
    damage: Callable[..., Any],
    template: dict[str, Any],
    tmp_path: Path,
    row: Any,
    attempt: int,
) -> list[str]:
    repo_dir = tmp_path / ("repo-%d" % attempt)
    shutil.copytree(template["repo"], repo_dir, symlinks=True)
    older, newer = template["older"], template["newer"]
    rng = random.Random("%s-%d" % (name, attempt))
    words, named = damage(repo_dir, newer, older, rng)
    repo = faultlib.local_repository(repo_dir)
    row.run()
    outcomes = {}
    for set_id in sorted(set(repo.set_ids()) | {older, newer}):
        # The older set was deep-verified in the template; its bytes are re-checked here.
        outcomes[set_id] = verify_set(
            repo,
            set_id=set_id,
            passphrase_file=str(template["passphrase"]),
            deep=set_id != older,
            max_age_hours=0,
            size_tolerance_percent=0,
            record=True,
        )
    bad, good = outcomes[newer], outcomes[older]
    text = "; ".join(bad["failures"])
    row.reported(bad["ok"], False)  # verify said ok on a damaged set
    row.add("sets_lost", not good["ok"])
    chosen = catalog.newest_complete(repo, require_verified=True)
    chosen_id = chosen["id"] if chosen else None
    row.reported(chosen_id == newer, False)  # the catalog would restore the damaged set
    row.bad_input(not bad["ok"] and all(w in text for w in words) and named in text)
    if bad["ok"]:
        row.note("verify reported ok for the damaged set (%s)" % name)
    if chosen_id == newer:
        row.note("newest_complete(require_verified=True) picked the damaged set (%s)" % name)
    problems = []
    if bad["ok"]:
        problems.append("verify passed the damaged set")
    missing = [w for w in words + [named] if w not in text]
    if missing:
        problems.append("failure text lacks %s: %s" % (missing, text))
    if not good["ok"]:
        problems.append("older set no longer verifies: %s" % good["failures"])
    if chosen_id != older:
        problems.append("newest verified set is %s, not the older %s" % (chosen_id, older))
    return problems


@pytest.mark.parametrize("name", list(RANDOMISED))
def test_randomised_damage_fails_verify_and_catalog_falls_back(
    name, template, tmp_path, fault_repeat, summary_row
):
    row = summary_row("corrupted: " + name)
    for attempt in range(fault_repeat):
        problems = run_case(name, RANDOMISED[name], template, tmp_path, row, attempt)
        assert not problems, "attempt %d: %s" % (attempt, problems)


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_manifest_damage_fails_verify_and_catalog_falls_back(name, template, tmp_path, summary_row):
    row = summary_row("corrupted: " + name)
    problems = run_case(name, DETERMINISTIC[name], template, tmp_path, row, 0)
    assert not problems, problems


def test_manifest_without_database_artifact_fails_verify(template, tmp_path, summary_row):
    row = summary_row("corrupted: manifest lists no database artifact")
    problems = run_case("no database entry", drop_database_entry, template, tmp_path, row, 0)
    assert not problems, problems


def test_agent_verify_names_the_flipped_artifact(template, collections_path, tmp_path, summary_row):
    """The cron path: `agent verify` exits 1 and names the artifact."""
    row = summary_row("corrupted: bit flip in the database artifact")
    repo_dir = tmp_path / "repo"
    shutil.copytree(template["repo"], repo_dir, symlinks=True)
    path, _entry = _artifact(repo_dir, template["newer"], "database")
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    config = faultlib.write_config(
        tmp_path / "verify.json",
        {
            "repository": str(repo_dir),
            "passphrase_file": str(template["passphrase"]),
            "database": "clinic_db",
            "verify": {"max_age_hours": 0, "size_tolerance_percent": 0},
        },
    )
    result = faultlib.run_agent(
        collections_path, config, command="verify", set_id=template["newer"]
    )
    row.run()
    row.reported(result.reported_ok, False)
    row.bad_input(result.rc == 1 and path.name in result.msg and "sha256" in result.msg)
    assert result.rc == 1, result.text()
    assert (
        path.name in result.msg and "sha256" in result.msg and "failed verification" in result.msg
    )


# ---------------------------------------------------------------------- restore picks the good set
def restore_case(
    name: str,
    damage: Callable[..., Any],
    template: dict[str, Any],
    tmp_path: Path,
    row: Any,
    attempt: int,
    pg: Any,
) -> list[str]:
    """Damage the newer set and rehearse a restore without any verify run before: the
    restore itself must notice, pass over the damaged set and bring back the older one."""
    repo_dir = tmp_path / ("restore-repo-%d" % attempt)
    shutil.copytree(template["repo"], repo_dir, symlinks=True)
    older, newer = template["older"], template["newer"]
    words, named = damage(repo_dir, newer, older, random.Random("restore-%s-%d" % (name, attempt)))
    before = set(pg.psql("SELECT datname FROM pg_database").split())
    row.run()
    options = RestoreOptions(
        mode="rehearse",
        database=pg.clinic_db,
        target_database="corruption_%d_%s" % (attempt, secrets.token_hex(3)),
        passphrase_file=str(template["passphrase"]),
    )
    server = PgConnection(host=pg.host, port=pg.port, user=pg.superuser, dbname="postgres")
    try:
        result = run_restore(faultlib.local_repository(repo_dir), server, options)
    except BackupError as exc:
        row.add("sets_lost", 1)
        return ["restore failed instead of falling back to %s: %s" % (older, exc)]
    restored = result["set_id"]
    row.reported(restored == newer, False)  # "restored" from the damaged set
    row.add("sets_lost", restored != older)
    reasons = "; ".join(d["reason"] for d in result["damaged"])
    passed = [p["set_id"] for p in result["passed_over"]]
    exists = newer in faultlib.local_repository(repo_dir).set_ids()
    # A set without its manifest does not exist: there is nothing to name.
    named_ok = (
        not exists
        or newer in passed
        or ([d["set_id"] for d in result["damaged"]] == [newer] and named in reasons)
    )
    row.bad_input(named_ok)
    problems = []
    if restored != older:
        problems.append("restored %s, not the older good set %s" % (restored, older))
    if not named_ok:
        problems.append("the damaged set is not reported with its artifact: %s" % result)
    if not all(r["restored"] == r["expected"] for r in result["row_counts"]):
        problems.append("row counts differ: %s" % result["row_counts"])
    after = set(pg.psql("SELECT datname FROM pg_database").split())
    if after != before:
        problems.append("databases left behind: %s" % sorted(after ^ before))
    return problems


@pytest.mark.parametrize("name", list(RANDOMISED))
def test_randomised_damage_makes_restore_fall_back(
    name, template, tmp_path, fault_repeat, summary_row, pg
):
    row = summary_row("corrupted: %s, then restore" % name)
    for attempt in range(fault_repeat):
        problems = restore_case(name, RANDOMISED[name], template, tmp_path, row, attempt, pg)
        assert not problems, "attempt %d: %s" % (attempt, problems)


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_manifest_damage_makes_restore_fall_back(name, template, tmp_path, summary_row, pg):
    row = summary_row("corrupted: %s, then restore" % name)
    problems = restore_case(name, DETERMINISTIC[name], template, tmp_path, row, 0, pg)
    assert not problems, problems
