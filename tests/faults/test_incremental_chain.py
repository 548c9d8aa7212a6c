"""Fault: a set deleted from the middle of an incremental file chain (by hand, by a
retention run of another tool, by an attacker with the bucket's credentials).

Verify names the missing set for every later set; a restore of a later set refuses
naming it and leaves nothing behind; every earlier set still restores to its exact
tree; a restore without set_id passes over the broken sets to the newest whole one,
reporting them; the next backup starts a new chain with a full set, saying why."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import file_backup, file_restore
from ansible_collections.clinic.backup.plugins.module_utils.errors import IntegrityError
from ansible_collections.clinic.backup.plugins.module_utils.repository import LocalRepository
from ansible_collections.clinic.backup.plugins.module_utils.verify import verify_set

ROW = "deleted incremental in the middle of a file chain"


def tree(root: Path) -> dict[str, tuple]:
    out = {}
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(current) / name
            info = path.lstat()
            key = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                out[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                out[key] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                out[key] = (
                    stat.S_IMODE(info.st_mode),
                    int(info.st_mtime),
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                )
    return out


def take_chain(tmp_path: Path, passphrase: Path):
    root = tmp_path / "uploads"
    (root / "scans").mkdir(parents=True)
    options = file_backup.FileBackupOptions(
        "uploads",
        [str(root)],
        passphrase_file=str(passphrase),  # seals the records; the chain logic is gpg-free
        encrypt=False,
        incremental=True,
    )
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    ids, trees = [], []
    for number in range(5):
        (root / "scans" / ("scan-%d.dcm" % number)).write_bytes(os.urandom(20_000 + number))
        if number == 2:
            (root / "scans" / "scan-0.dcm").unlink()
        ids.append(file_backup.run_file_backup([repo], options)["set_id"])
        trees.append(tree(root))
    return root, options, repo, ids, trees


def _delete_set(repo, set_id):
    repo.delete_set(set_id)


def _delete_archive(repo, set_id):
    for path in Path(repo.path, "sets", set_id).glob("uploads.tar.*"):
        path.unlink()


@pytest.mark.parametrize("damage", [_delete_set, _delete_archive], ids=["set", "its archive"])
def test_a_missing_middle_set_breaks_only_the_later_sets(
    damage, tmp_path, passphrase_file, summary_row
):
    row = summary_row(ROW)
    root, options, repo, ids, trees = take_chain(tmp_path, passphrase_file)
    full, second, middle, later, newest = ids
    damage(repo, middle)
    pp = str(passphrase_file)
    read = {"passphrase_file": pp, "allow_unencrypted": True}

    # verify: every later set fails naming the missing one; the full set is fine.
    for set_id in (later, newest):
        outcome = verify_set(repo, set_id=set_id, passphrase_file=pp, size_tolerance_percent=0)
        row.run()
        row.reported(outcome["ok"], False)
        text = " ".join(outcome["failures"])
        row.bad_input(middle in text)
        assert not outcome["ok"] and middle in text, outcome["failures"]
    for set_id in (full, second):
        outcome = verify_set(repo, set_id=set_id, passphrase_file=pp, size_tolerance_percent=0)
        row.run()
        if not outcome["ok"]:
            row.add("sets_lost")
        assert outcome["ok"], outcome["failures"]

    # restore of a later set: refused, naming it, nothing left behind.
    for set_id in (later, newest):
        target = tmp_path / ("refused-" + set_id)
        row.run()
        try:
            file_restore.restore_files(
                repo,
                file_restore.FileRestoreOptions(str(target), set_id=set_id, **read),
            )
        except IntegrityError as exc:
            row.bad_input(middle in str(exc))
            assert middle in str(exc)
        else:
            row.reported(True, False)
            pytest.fail("set %s restored although %s is missing" % (set_id, middle))
        leftovers = [p for p in tmp_path.iterdir() if ".restoring-" in p.name or p == target]
        row.add("leftovers", len(leftovers))
        assert leftovers == []

    # earlier sets: exact trees.
    for set_id, expected in ((full, trees[0]), (second, trees[1])):
        target = tmp_path / ("restored-" + set_id)
        row.run()
        file_restore.restore_files(
            repo, file_restore.FileRestoreOptions(str(target), set_id=set_id, **read)
        )
        if tree(target) != expected:
            row.add("sets_lost")
        assert tree(target) == expected

    # no set_id: the broken sets are passed over, reported, and the newest whole one restored.
    row.run()
    result = file_restore.restore_files(
        repo,
        file_restore.FileRestoreOptions(str(tmp_path / "newest"), **read),
    )
    assert result["set_id"] == second
    assert {d["set_id"] for d in result["damaged"]} >= {later, newest}

    # the next backup starts a new chain, saying why.
    row.run()
    fresh = file_backup.run_file_backup([repo], options)
    assert fresh["files"]["chain"]["level"] == "full"
    assert any(middle in w for w in fresh["warnings"]), fresh["warnings"]
    restored = tmp_path / "fresh"
    file_restore.restore_files(
        repo,
        file_restore.FileRestoreOptions(str(restored), set_id=fresh["set_id"], **read),
    )
    assert tree(restored) == tree(root)
    row.reported(True, tree(restored) == tree(root))
