"""Local repository layout: nothing is a set until its manifest is committed."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import catalog, repository
from ansible_collections.clinic.backup.plugins.module_utils.errors import (
    ConfigError,
    IntegrityError,
    StoreError,
)
from ansible_collections.clinic.backup.plugins.module_utils.repository import (
    LocalRepository,
    atomic_write,
    check_file_name,
    check_set_id,
    new_set_id,
)


def manifest_for(set_id, payload=b"data"):
    import hashlib

    return {
        "format_version": 1,
        "id": set_id,
        "database": "clinic_db",
        "format": "custom",
        "compression": {"algorithm": "none"},
        "encryption": {"method": "none"},
        "artifacts": [
            {
                "name": "database",
                "file": "db.dump",
                "content": "pg_dump-custom",
                "size": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
            }
        ],
        "started_at": "2026-11-22T01:00:00.000000Z",
        "finished_at": "2026-11-22T01:00:05.000000Z",
    }


def write_set(repo, set_id, payload=b"data"):
    writer = repo.begin(set_id)
    sink = writer.sink("db.dump")
    sink.write(payload)
    sink.close()
    writer.commit(manifest_for(set_id, payload))
    return writer


def test_uncommitted_set_is_invisible_and_abort_removes_it(tmp_path):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    set_id = new_set_id("clinic_db")
    writer = repo.begin(set_id)
    sink = writer.sink("db.dump")
    sink.write(b"half a dump")
    assert repo.set_ids() == []
    writer.abort()
    assert repo.set_ids() == []
    assert os.listdir(tmp_path / "repo" / ".staging") == []


def test_committed_set_is_listed_newest_first(tmp_path):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    first, second = "20261120T010000Z-clinic_db-aaaaaa", "20261121T010000Z-clinic_db-bbbbbb"
    write_set(repo, first)
    write_set(repo, second)
    assert repo.set_ids() == [second, first]
    assert [e["id"] for e in catalog.list_catalog(repo)] == [second, first]
    assert catalog.newest_complete(repo)["id"] == second


def test_sets_started_within_one_second_are_ordered_by_their_start_time(tmp_path):
    """Set ids resolve seconds only; the random suffix must not decide which is newest."""
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    earlier, later = "20261122T010000Z-clinic_db-ffffff", "20261122T010000Z-clinic_db-000000"
    for set_id, started in ((earlier, "01:00:00.100000"), (later, "01:00:00.900000")):
        writer = repo.begin(set_id)
        sink = writer.sink("db.dump")
        sink.write(b"data")
        sink.close()
        manifest = manifest_for(set_id)
        manifest["started_at"] = "2026-11-22T%sZ" % started
        writer.commit(manifest)
    assert [e["id"] for e in catalog.list_catalog(repo)] == [later, earlier]
    assert catalog.newest_complete(repo)["id"] == later


def test_repository_and_files_are_private(tmp_path):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    set_id = "20261121T010000Z-clinic_db-bbbbbb"
    write_set(repo, set_id)
    assert os.stat(repo.path).st_mode & 0o077 == 0
    for name in ("db.dump", "manifest.json"):
        assert os.stat(repo.location(set_id, name)).st_mode & 0o077 == 0


def test_corrupt_manifest_is_listed_as_corrupt_and_never_newest(tmp_path):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    good, bad = "20261120T010000Z-clinic_db-aaaaaa", "20261121T010000Z-clinic_db-bbbbbb"
    write_set(repo, good)
    write_set(repo, bad)
    with open(repo.location(bad, "manifest.json"), "w") as handle:
        handle.write("{not json")
    entries = catalog.list_catalog(repo)
    assert [(e["id"], e["state"]) for e in entries] == [(bad, "corrupt"), (good, "complete")]
    assert catalog.newest_complete(repo)["id"] == good


def test_manifest_naming_another_set_is_rejected(tmp_path):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    set_id = "20261121T010000Z-clinic_db-bbbbbb"
    write_set(repo, set_id)
    data = json.loads(open(repo.location(set_id, "manifest.json")).read())
    data["id"] = "20261120T010000Z-clinic_db-aaaaaa"
    atomic_write(repo.location(set_id, "manifest.json"), json.dumps(data).encode())
    with pytest.raises(IntegrityError, match="names another set"):
        catalog.load_manifest(repo, set_id)


def test_cleanup_removes_staging_leftovers(tmp_path):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    writer = repo.begin(new_set_id("clinic_db"))
    writer.sink("db.dump").write(b"partial")
    removed = repo.cleanup_incomplete()
    assert len(removed) == 1 and os.listdir(tmp_path / "repo" / ".staging") == []


@pytest.mark.parametrize("bad", ["../etc", "/abs", "a/b", "..", ".hidden", "x\n", ""])
def test_artifact_names_from_manifests_are_checked(bad):
    with pytest.raises(StoreError):
        check_file_name(bad)


@pytest.mark.parametrize("bad", ["../../x", "latest", "20261121T010000Z-x-zzzzzz", ""])
def test_set_ids_are_checked(bad):
    with pytest.raises(ConfigError):
        check_set_id(bad)


def test_relative_repository_path_is_refused():
    with pytest.raises(ConfigError, match="absolute"):
        LocalRepository("backups", must_exist=False)


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LocalRepository(str(tmp_path / "absent"))


def test_atomic_write_leaves_no_temp_file(tmp_path):
    target = tmp_path / "file.json"
    atomic_write(str(target), b"{}")
    assert target.read_bytes() == b"{}" and os.listdir(tmp_path) == ["file.json"]


def test_delete_set_removes_it_and_leaves_no_trace(tmp_path):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    keep, drop = "20261120T010000Z-clinic_db-aaaaaa", "20261121T010000Z-clinic_db-bbbbbb"
    write_set(repo, keep)
    write_set(repo, drop)
    repo.delete_set(drop)
    assert repo.set_ids() == [keep]
    assert sorted(os.listdir(tmp_path / "repo" / "sets")) == [keep]
    assert os.listdir(tmp_path / "repo" / ".staging") == []
    repo.delete_set(drop)  # already gone: a no-op
    assert repo.set_ids() == [keep]


def test_delete_set_interrupted_after_the_move_leaves_nothing_that_looks_complete(
    tmp_path, monkeypatch
):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    set_id = "20261121T010000Z-clinic_db-bbbbbb"
    write_set(repo, set_id)

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt("killed mid-delete")

    monkeypatch.setattr(repository.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        repo.delete_set(set_id)
    monkeypatch.undo()
    assert repo.set_ids() == [] and catalog.list_catalog(repo) == []
    assert not os.path.exists(tmp_path / "repo" / "sets" / set_id)
    # The leftover is staging debris, removed by the next cleanup.
    assert os.listdir(tmp_path / "repo" / ".staging") == [set_id + ".deleting"]
    repo.cleanup_incomplete()
    assert os.listdir(tmp_path / "repo" / ".staging") == []


def test_delete_set_that_cannot_be_moved_fails_clearly_and_stays_complete(tmp_path, monkeypatch):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    set_id = "20261121T010000Z-clinic_db-bbbbbb"
    write_set(repo, set_id)

    def denied(src, dst):
        raise OSError(errno.EACCES, "Permission denied", src)

    monkeypatch.setattr(repository.os, "rename", denied)
    with pytest.raises(StoreError, match="cannot delete backup set") as info:
        repo.delete_set(set_id)
    monkeypatch.undo()
    assert "permissions" in info.value.hint
    assert repo.set_ids() == [set_id]
    assert catalog.newest_complete(repo)["id"] == set_id


def test_delete_set_across_filesystems_drops_the_manifest_first(tmp_path, monkeypatch):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    set_id = "20261121T010000Z-clinic_db-bbbbbb"
    write_set(repo, set_id)
    seen = []

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link", src)

    real_rmtree = shutil.rmtree

    def rmtree(path, ignore_errors=False):
        seen.append(os.listdir(path))
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(repository.os, "rename", cross_device)
    monkeypatch.setattr(repository.shutil, "rmtree", rmtree)
    repo.delete_set(set_id)
    monkeypatch.undo()
    assert seen == [["db.dump"]]  # no manifest left by the time the rest goes
    assert repo.set_ids() == [] and not os.path.exists(tmp_path / "repo" / "sets" / set_id)
