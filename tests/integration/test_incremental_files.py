"""Incremental file sets (file_chain.py) with real files, real gpg and moto S3: a chain
of a full set and two incremental sets, with files added, modified and deleted, links
and modes changed and a directory turned into a file, each set restored to the exact
tree of its moment by files_restore and by the README's by-hand procedure; what an
incremental set stores; retention and a target missing part of the chain."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import file_backup, file_restore
from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.catalog import list_catalog
from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError
from ansible_collections.clinic.backup.plugins.module_utils.repository import LocalRepository
from ansible_collections.clinic.backup.plugins.module_utils.retention import (
    RetentionPolicy,
    apply_retention,
)
from ansible_collections.clinic.backup.plugins.module_utils.verify import verify_set

ROOT = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict[str, tuple]:
    """The exact tree: every entry's type, mode, mtime (seconds) and bytes or link target."""
    out = {}
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(current) / name
            info = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                out[rel] = ("dir", stat.S_IMODE(info.st_mode), int(info.st_mtime))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(info.st_mode), int(info.st_mtime), digest)
    info = root.lstat()
    out["."] = ("dir", stat.S_IMODE(info.st_mode), int(info.st_mtime))
    return out


def write(path: Path, data: bytes, mtime: int | None = None) -> None:
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def settle_dirs(root: Path, moment: int) -> None:
    """Give every directory a fixed mtime (as an application writing hourly would leave
    them different from the restore's own): restore must put exactly these back."""
    for current, dirs, _files in os.walk(root, topdown=False):
        for name in dirs:
            os.utime(Path(current) / name, (moment, moment), follow_symlinks=False)
    os.utime(root, (moment, moment))


def build(tmp_path: Path) -> Path:
    root = tmp_path / "uploads"
    (root / "scans" / "2024").mkdir(parents=True)
    (root / "letters").mkdir()
    (root / "old").mkdir()
    write(root / "scans" / "2024" / "a.dcm", os.urandom(70_000), 1_700_000_000)
    write(root / "scans" / "2024" / "b.dcm", os.urandom(30_000), 1_700_000_100)
    write(root / "letters" / "l1.pdf", b"%PDF letter one\n" * 50, 1_700_000_200)
    write(root / "letters" / "unchanged.pdf", b"%PDF stays\n" * 400, 1_700_000_300)
    write(root / "old" / "gone.txt", b"deleted later", 1_700_000_400)
    write(root / "empty", b"")
    os.chmod(root / "letters" / "l1.pdf", 0o640)
    os.symlink("scans/2024", root / "latest")
    settle_dirs(root, 1_700_001_000)
    return root


def change_once(root: Path) -> None:
    """Add, modify (same size, same mtime: only ctime tells), delete, relink, chmod, and
    turn a directory into a file."""
    write(root / "scans" / "2024" / "c.dcm", os.urandom(12_345), 1_700_002_000)
    data = bytearray((root / "scans" / "2024" / "b.dcm").read_bytes())
    data[100] ^= 0xFF
    write(root / "scans" / "2024" / "b.dcm", bytes(data), 1_700_000_100)  # same size and mtime
    os.chmod(root / "letters" / "l1.pdf", 0o600)
    (root / "old" / "gone.txt").unlink()
    (root / "old").rmdir()
    write(root / "old", b"a file where a directory was", 1_700_002_100)
    (root / "latest").unlink()
    os.symlink("letters", root / "latest")
    os.chmod(root / "scans", 0o750)
    settle_dirs(root, 1_700_003_000)


def change_twice(root: Path) -> None:
    """Delete a file, turn a file into a directory, add a link, modify a file again."""
    (root / "scans" / "2024" / "a.dcm").unlink()
    (root / "empty").unlink()
    (root / "empty").mkdir()
    write(root / "empty" / "inside.txt", b"now a directory", 1_700_004_000)
    os.symlink("../letters/l1.pdf", root / "scans" / "l1-link")
    write(root / "scans" / "2024" / "c.dcm", os.urandom(5_000), 1_700_004_100)
    settle_dirs(root, 1_700_005_000)


# gpg is exercised by the chain test above and the agent test; where the chain's logic is
# what is tested, sets stay unencrypted (the passphrase still seals their records).
PLAIN = {"encrypt": False}


def options(root: Path, passphrase: Path, **extra) -> file_backup.FileBackupOptions:
    return file_backup.FileBackupOptions(
        "uploads", [str(root)], passphrase_file=str(passphrase), incremental=True, **extra
    )


def restore(repo, target: Path, set_id: str, passphrase: Path, **extra) -> dict:
    return file_restore.restore_files(
        repo,
        file_restore.FileRestoreOptions(
            str(target), set_id=set_id, passphrase_file=str(passphrase), **extra
        ),
    )


HAND_MARK = "<!-- incremental-hand-restore -->"


def readme_procedure() -> str:
    """The bash block after HAND_MARK in the README, without its example assignments."""
    text = (ROOT / "README.md").read_text()
    block = text.split(HAND_MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if not line.startswith(("P=", "S=", "SET=", "R="))]
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def by_hand(repo_path: Path, set_id: str, passphrase: Path, target: Path, home: Path) -> None:
    """The README's emergency procedure, run as written with bash, gpg, zstd, tar, python3."""
    home.mkdir(mode=0o700)
    env = dict(
        os.environ,
        P=str(passphrase),
        S=str(repo_path / "sets"),
        SET=set_id,
        R=str(target),
        GNUPGHOME=str(home),
    )
    subprocess.run(
        ["bash", "-c", readme_procedure()], env=env, check=True, capture_output=True, timeout=120
    )


def test_full_and_two_incrementals_each_restore_their_exact_tree(tmp_path, passphrase_file):
    root = build(tmp_path)
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    taken, trees = [], []
    first = file_backup.run_file_backup([repo], options(root, passphrase_file))
    taken.append(first)
    trees.append(snapshot(root))
    assert first["files"]["chain"]["level"] == "full" and first["files"]["count"] == 6
    change_once(root)
    second = file_backup.run_file_backup([repo], options(root, passphrase_file))
    taken.append(second)
    trees.append(snapshot(root))
    change_twice(root)
    third = file_backup.run_file_backup([repo], options(root, passphrase_file))
    taken.append(third)
    trees.append(snapshot(root))
    # What each incremental stored: only the changed files (b.dcm caught by its ctime).
    assert second["files"]["chain"]["sets"] == [first["set_id"]]
    assert (second["files"]["count"], second["files"]["deleted"]) == (4, 2)  # c, b, l1, old
    assert second["files"]["reused"] == 3 and second["files"]["tree"]["count"] == 7
    assert third["files"]["chain"]["sets"] == [first["set_id"], second["set_id"]]
    assert (third["files"]["count"], third["files"]["reused"]) == (2, 4)
    assert third["files"]["deleted"] == 2  # a.dcm, and "empty" as a file
    assert all(not w.startswith("a full set") for r in taken for w in r["warnings"])

    for number, (result, tree) in enumerate(zip(taken, trees, strict=True)):
        target = tmp_path / ("restored-%d" % number)
        restored = restore(repo, target, result["set_id"], passphrase_file)
        assert restored["chain"][-1] == result["set_id"]
        assert snapshot(target) == tree, "set %d" % number
        if number == 2:  # verify the set that builds on two others
            outcome = verify_set(
                repo,
                set_id=result["set_id"],
                passphrase_file=str(passphrase_file),
                size_tolerance_percent=0,
                max_age_hours=0,
            )
            assert outcome["ok"], outcome["failures"]
            assert [c["status"] for c in outcome["checks"] if c["name"] == "chain"] == ["ok"]

    # Nothing changed: the next set is its index alone, no archive.
    fourth = file_backup.run_file_backup([repo], options(root, passphrase_file))
    assert (fourth["files"]["count"], fourth["files"]["reused"]) == (0, 6)
    assert [a["name"] for a in fourth["artifacts"]] == ["index"]
    # ... the third set's index as stored: no file opened, no gpg run (its fingerprint matched).
    assert fourth["files"]["chain"]["index_from"] == third["set_id"]
    assert fourth["artifacts"][0]["sha256"] == third["artifacts"][1]["sha256"]
    restored = restore(repo, tmp_path / "restored-3", fourth["set_id"], passphrase_file)
    assert snapshot(tmp_path / "restored-3") == trees[2] and len(restored["chain"]) == 4
    outcome = verify_set(
        repo,
        set_id=fourth["set_id"],
        passphrase_file=str(passphrase_file),
        size_tolerance_percent=50,
        max_age_hours=0,
    )
    assert outcome["ok"], outcome["failures"]
    # The README's by-hand procedure gives the same tree (under the archive's root name).
    hand = tmp_path / "by-hand"
    by_hand(tmp_path / "repo", fourth["set_id"], passphrase_file, hand, tmp_path / "gnupg")
    assert snapshot(hand / "0-uploads") == trees[2]


def test_full_every_paths_and_a_missing_target_copy_start_a_new_full_set(
    tmp_path, passphrase_file, s3, s3_bucket
):
    from ansible_collections.clinic.backup.plugins.module_utils.repository import S3Repository
    from ansible_collections.clinic.backup.plugins.module_utils.s3 import make_client

    root = build(tmp_path)
    client = make_client(
        region="us-east-1",
        endpoint_url=s3.endpoint_url,
        access_key="testing",
        secret_key="testing",
    )
    local = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    remote = S3Repository(client, s3_bucket, "files")
    both = [local, remote]
    levels = []
    for _run in range(3):
        result = file_backup.run_file_backup(
            both, options(root, passphrase_file, full_every=2, **PLAIN)
        )
        levels.append(result["files"]["chain"]["level"])
        write(root / "letters" / "l1.pdf", os.urandom(100))
    assert levels == ["full", "incremental", "full"]
    assert any("full_every" in w for w in result["warnings"])
    newest = result["set_id"]
    # The newest set is missing from S3 only: the next set is full, naming why.
    remote.delete_set(newest)
    result = file_backup.run_file_backup(
        both, options(root, passphrase_file, full_every=5, **PLAIN)
    )
    assert result["files"]["chain"]["level"] == "full"
    assert any(newest in w and remote.url in w for w in result["warnings"]), result["warnings"]
    incremental = file_backup.run_file_backup(
        both, options(root, passphrase_file, full_every=5, **PLAIN)
    )
    assert incremental["files"]["chain"]["level"] == "incremental"
    # An incremental set restores from S3 alone, exactly.
    target = tmp_path / "from-s3"
    restore(remote, target, incremental["set_id"], passphrase_file, allow_unencrypted=True)
    assert snapshot(target) == snapshot(root)
    # Other paths: a new full set.
    other = file_backup.run_file_backup(
        both, options(root, passphrase_file, exclude=["*.tmp"], full_every=5, **PLAIN)
    )
    assert other["files"]["chain"]["level"] == "full"
    assert any("paths or exclude" in w for w in other["warnings"])
    with pytest.raises(ConfigError, match="full_every"):
        options(root, passphrase_file, full_every=0)


def test_retention_keeps_every_set_a_kept_set_builds_on(tmp_path, passphrase_file):
    root = build(tmp_path)
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    ids = []
    for _run in range(4):
        ids.append(
            file_backup.run_file_backup([repo], options(root, passphrase_file, **PLAIN))["set_id"]
        )
        write(root / "letters" / "l1.pdf", os.urandom(100))
    key = RecordKey.from_file(str(passphrase_file))
    policy = RetentionPolicy(daily=1, weekly=0, monthly=0, yearly=0, min_keep=1)
    result = apply_retention(repo, policy, key=key)
    assert result["deleted"] == [] and sorted(result["kept"]) == sorted(ids)
    reasons = {d["id"]: d["reasons"] for d in result["decisions"]}
    assert reasons[ids[0]] == ["needed by %s" % ids[3]]
    # A new full set frees the old chain.
    fresh = file_backup.run_file_backup(
        [repo], options(root, passphrase_file, full_every=1, **PLAIN)
    )
    result = apply_retention(repo, policy, key=key)
    assert sorted(result["deleted"]) == sorted(ids) and result["kept"] == [fresh["set_id"]]
    assert [e["id"] for e in list_catalog(repo, key=key)] == [fresh["set_id"]]


def test_incremental_is_off_by_default_and_the_module_documents_it(tmp_path, passphrase_file):
    root = build(tmp_path)
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    plain = file_backup.FileBackupOptions(
        "uploads", [str(root)], passphrase_file=str(passphrase_file)
    )
    result = file_backup.run_file_backup([repo], plain)
    assert "chain" not in result["files"] and len(result["manifest"]["artifacts"]) == 1
    # An incremental run after plain full sets starts its own chain with a full set.
    chained = file_backup.run_file_backup([repo], options(root, passphrase_file))
    assert chained["files"]["chain"]["level"] == "full"
    docs = (ROOT / "plugins" / "modules" / "files_backup.py").read_text()
    assert "incremental:" in docs and "full_every:" in docs
    assert json.loads(json.dumps(chained["manifest"]))["files"]["tree"]["count"] == 6


def test_agent_file_group_takes_a_chain_and_rehearses_it(
    collections_path, passphrase_file, tmp_path
):
    """cron's side: a file group config with incremental/full_every, then its restore test."""
    from tests.faults import faultlib

    root = build(tmp_path)
    repo = tmp_path / "files-repo"
    settings = {
        "name": "uploads",
        "paths": [str(root)],
        "repository": str(repo),
        "passphrase_file": str(passphrase_file),
        "incremental": True,
        "full_every": 3,
        "restore_test": {"target_dir": str(tmp_path / "rehearsal")},
    }
    config = faultlib.write_config(tmp_path / "uploads.json", settings)
    levels = []
    for _run in range(2):
        backup = faultlib.run_agent(collections_path, config, command="files-backup")
        assert backup.rc == 0, backup.text()
        levels.append(backup.doc["files"]["chain"]["level"])
        write(root / "letters" / "l1.pdf", os.urandom(64))
    assert levels == ["full", "incremental"]
    rehearsal = faultlib.run_agent(collections_path, config, command="files-restore-test")
    assert rehearsal.rc == 0, rehearsal.text()
    assert rehearsal.doc["set_id"] == backup.doc["set_id"] and len(rehearsal.doc["chain"]) == 2
    bad = faultlib.write_config(tmp_path / "bad.json", dict(settings, full_every="3"))
    refused = faultlib.run_agent(collections_path, bad, command="files-backup")
    assert refused.rc != 0 and "full_every" in refused.text()
