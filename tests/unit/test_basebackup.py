"""basebackup.py without a server: LSN and segment arithmetic, the tar watcher that
follows pg_basebackup's stream, backup_label / backup_manifest parsing, the stall
watchdog, the recovery window and the restore options' refusals."""

from __future__ import annotations

import io
import json
import sys
import tarfile

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import authentication, basebackup, wal
from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.basebackup import (
    BaseRestoreOptions,
    PgBaseBackupSource,
    TarWatcher,
    check_cluster_name,
    format_lsn,
    parse_backup_label,
    parse_lsn,
    parse_wal_ranges,
    prepare_data_dir,
    recovery_window,
    restore_base_backup,
    wal_file_name,
)
from ansible_collections.clinic.backup.plugins.module_utils.catalog import list_catalog
from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError, SourceError
from ansible_collections.clinic.backup.plugins.module_utils.repository import LocalRepository

LABEL = (
    "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
    "CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n"
    "START TIME: 2026-12-03 12:19:21 UTC\nLABEL: pg_basebackup base backup\nSTART TIMELINE: 1\n"
)
MANIFEST = (
    '{ "PostgreSQL-Backup-Manifest-Version": 1,\n"Files": [\n],\n"WAL-Ranges": [\n'
    '{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }\n],\n'
    '"Manifest-Checksum": "00"}\n'
)


def tar_of(members: list[tuple[str, bytes | None]], fmt=tarfile.USTAR_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def watch(data: bytes, chunk: int) -> TarWatcher:
    watcher = TarWatcher()
    for start in range(0, len(data), chunk):
        watcher.feed(data[start : start + chunk])
    return watcher


@pytest.mark.parametrize("chunk", [1, 7, 512, 513, 65536])
def test_watcher_follows_the_stream_in_any_chunking(chunk):
    data = tar_of(
        [
            ("backup_label", LABEL.encode()),
            ("base", None),
            ("base/1/1259", b"x" * 9000),
            ("PG_VERSION", b"15\n"),
            ("backup_manifest", MANIFEST.encode()),
        ]
    )
    watcher = watch(data, chunk)
    assert watcher.ended and watcher.error is None and watcher.unsafe is None
    assert (watcher.members, watcher.files, watcher.bytes) == (
        5,
        4,
        len(LABEL) + 9000 + 3 + len(MANIFEST),
    )
    assert watcher.label == LABEL and watcher.manifest_tail == MANIFEST
    assert watcher.manifest_size == len(MANIFEST)


def test_watcher_names_unsafe_members_long_names_and_links():
    long_name = "base/" + "d" * 120 + "/../../etc/passwd"
    data = tar_of([(long_name, b"x"), ("backup_label", LABEL.encode())], fmt=tarfile.GNU_FORMAT)
    watcher = watch(data, 100)
    assert watcher.unsafe and "parent directory" in watcher.unsafe
    assert watcher.label == LABEL  # the long-name header did not derail the parser
    pax = tar_of([("/abs/" + "p" * 120, b"y")], fmt=tarfile.PAX_FORMAT)
    assert "absolute" in watch(pax, 512).unsafe
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        link = tarfile.TarInfo("pg_tblspc/16384")
        link.type, link.linkname = tarfile.SYMTYPE, "/srv/tablespace"
        archive.addfile(link)
    assert watch(out.getvalue(), 512).links == ["pg_tblspc/16384"]


def test_watcher_keeps_only_the_manifest_tail(monkeypatch):
    monkeypatch.setattr(basebackup, "MANIFEST_TAIL", 1024)
    big = ("x" * 10000 + MANIFEST).encode()
    watcher = watch(tar_of([("backup_manifest", big)]), 300)
    assert watcher.manifest_tail.endswith(MANIFEST) and len(watcher.manifest_tail) == 1024
    assert parse_wal_ranges(watcher.manifest_tail) == [(1, 0x2000028, 0x2000100)]


def test_label_manifest_and_segment_arithmetic():
    label = parse_backup_label(LABEL)
    assert label["start_lsn"] == "0/2000028" and label["timeline"] == 1
    assert label["start_wal"] == "000000010000000000000002"
    assert label["start_time"].startswith("2026-12-03T12:19:21")
    with pytest.raises(SourceError):
        parse_backup_label("garbage")
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("16/b374d848")) == "16/B374D848"
    with pytest.raises(ConfigError, match="not a PostgreSQL LSN"):
        parse_lsn("16-B374D848")
    # pg_walfile_name: an end position on a segment boundary belongs to the segment before.
    assert wal_file_name(1, 0x3000000, previous=True) == "000000010000000000000002"
    assert wal_file_name(1, 0x3000000) == "000000010000000000000003"
    assert wal_file_name(2, (5 << 32) | 0xFF000000) == "0000000200000005000000FF"
    assert wal_file_name(1, 0x300000, segment_size=1024 * 1024) == "000000010000000000000003"
    assert parse_wal_ranges("no ranges here") == []


def test_cluster_names():
    assert check_cluster_name("main") == "main"
    for bad in ("", "../x", "a b", ".hidden", "x" * 49, None):
        with pytest.raises(ConfigError):
            check_cluster_name(bad)


def _records(names, archived="2026-12-03T13:00:00.000000Z"):
    return [
        wal.WalRecord(wal.parse_wal_name(n), "wal/main/x/%s.json" % n, {"archived_at": archived})
        for n in names
    ]


def test_recovery_window_stops_at_the_first_gap():
    manifest = {
        "start_wal": "000000010000000000000002",
        "stop_wal": "000000010000000000000003",
        "stop_time": "2026-12-03T12:00:00.000000Z",
        "wal_segment_size": 16 * 1024 * 1024,
    }
    names = ["000000010000000000000002", "000000010000000000000003", "000000010000000000000004"]
    window = recovery_window(manifest, _records(names + ["000000010000000000000006"]))
    assert window["earliest"] == manifest["stop_time"]
    assert window["latest_wal"] == "000000010000000000000004"
    assert window["latest"].startswith("2026-12-03T13:00:00")
    broken = recovery_window(manifest, _records(names[:1]))
    assert broken["latest"] is None and "000000010000000000000003" in broken["problem"]


def test_restore_options_refuse_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="absolute"):
        BaseRestoreOptions("relative/dir")
    with pytest.raises(ConfigError, match="no UTC offset"):
        BaseRestoreOptions(str(tmp_path / "d"), target_time="2026-12-03 14:31")
    with pytest.raises(ConfigError, match="not both"):
        BaseRestoreOptions(str(tmp_path / "d"), target_time="2026-12-03T14:31Z", target_lsn="0/1")
    with pytest.raises(ConfigError, match="not a user"):
        BaseRestoreOptions(str(tmp_path / "d"), owner="no-such-user-here")
    options = BaseRestoreOptions(str(tmp_path / "d"), target_time="2026-12-03T14:31:00+01:00")
    assert options.target_time.hour == 13
    entry = {"manifest": {"stop_time": "2026-12-03T13:40:00.000000Z", "finished_at": "x"}}
    assert "after the target time" in options.accept(entry)
    entry["manifest"]["stop_time"] = "2026-12-03T13:20:00.000000Z"
    assert options.accept(entry) is None


def test_data_dir_must_be_new_or_empty(tmp_path):
    target = tmp_path / "data"
    assert prepare_data_dir(str(target)) is True
    assert oct(target.stat().st_mode & 0o777) == "0o700"
    assert prepare_data_dir(str(target)) is False  # empty: used as it is
    (target / "PG_VERSION").write_text("15\n")
    with pytest.raises(ConfigError, match="not empty"):
        prepare_data_dir(str(target))
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        prepare_data_dir(str(link))
    with pytest.raises(ConfigError, match="parent directory"):
        prepare_data_dir(str(tmp_path / "missing" / "data"))


def test_watchdog_stops_a_backup_waiting_for_archiving():
    """pg_basebackup -X none waits for archiving forever: the server's notice stops it."""
    script = (
        "import sys, time\n"
        "sys.stdout.buffer.write(b'x' * 1024); sys.stdout.flush()\n"
        "sys.stderr.write('NOTICE:  base backup done, waiting for required WAL segments to be"
        " archived\\nWARNING:  still waiting for all required WAL segments to be archived"
        " (60 seconds elapsed)\\n'); sys.stderr.flush()\n"
        "time.sleep(60)\n"
    )
    source = PgBaseBackupSource([sys.executable, "-c", script], {}, TarWatcher(), poll_seconds=0.1)
    try:
        with pytest.raises(SourceError, match="WAL archiving stalled") as caught:
            for _chunk in source:
                pass
        assert "60 seconds elapsed" in str(caught.value)
    finally:
        source.close()


def test_watchdog_asks_pg_stat_archiver_when_the_stream_is_idle():
    script = "import time\ntime.sleep(60)\n"
    source = PgBaseBackupSource(
        [sys.executable, "-c", script],
        {},
        TarWatcher(),
        archiver_probe=lambda: "segment 000000010000000000000003 failed to archive",
        poll_seconds=0.05,
        idle_seconds=0.2,
    )
    try:
        with pytest.raises(SourceError, match="000000010000000000000003"):
            for _chunk in source:
                pass
    finally:
        source.close()


def _planted_set(repo_dir, key, set_id, cluster):
    """A sealed base backup manifest (no archive: the choice is refused before reading it)."""
    manifest = {
        "format_version": 1,
        "id": set_id,
        "kind": "basebackup",
        "database": cluster,
        "cluster": cluster,
        "format": "tar",
        "compression": {"algorithm": "zstd", "level": 3},
        "encryption": {"method": "gpg-symmetric", "cipher": "AES256"},
        "artifacts": [
            {
                "name": "base",
                "file": "base.tar.zst.gpg",
                "content": "pg_basebackup-tar",
                "size": 1,
                "sha256": "0" * 64,
            }
        ],
        "started_at": "2026-12-03T01:00:00.000000Z",
        "finished_at": "2026-12-03T01:01:00.000000Z",
        "stop_time": "2026-12-03T01:01:00.000000Z",
    }
    folder = repo_dir / "sets" / set_id
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(
        json.dumps(authentication.seal(manifest, key, "manifest"))
    )


def test_restore_refuses_to_guess_between_clusters_and_checks_the_parent(
    repo_dir, passphrase_file, tmp_path
):
    key = RecordKey.from_file(str(passphrase_file))
    _planted_set(repo_dir, key, "20261203T010000Z-main-1a2b3c", "main")
    _planted_set(repo_dir, key, "20261203T020000Z-other-1a2b3c", "other")
    repo = LocalRepository(str(repo_dir))
    target = tmp_path / "data"
    with pytest.raises(ConfigError, match="several clusters") as caught:
        restore_base_backup(
            [repo], BaseRestoreOptions(str(target), passphrase_file=str(passphrase_file))
        )
    assert "main, other" in str(caught.value)
    assert not target.exists()
    planned = restore_base_backup(
        [repo],
        BaseRestoreOptions(str(target), cluster="main", passphrase_file=str(passphrase_file)),
        check_mode=True,
    )
    assert planned.set_id == "20261203T010000Z-main-1a2b3c" and not target.exists()
    with pytest.raises(ConfigError, match="parent directory"):
        restore_base_backup(
            [repo],
            BaseRestoreOptions(
                str(tmp_path / "missing" / "data"), passphrase_file=str(passphrase_file)
            ),
            check_mode=True,
        )


def _archived(repo_dir, key, name, sealed=True):
    """A WAL file as wal-push stores it: the stored file, then its record."""
    folder = repo_dir / "wal" / "main" / name[:16]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / (name + ".zst.gpg")).write_bytes(b"ciphertext")
    record = {
        "format_version": 1,
        "kind": "wal",
        "cluster": "main",
        "name": name,
        "size": 16 * 1024 * 1024,
        "sha256_plain": "1" * 64,
        "stored": {"file": name + ".zst.gpg", "size": 10, "sha256": "2" * 64},
        "compression": {"method": "zstd", "level": 1},
        "encryption": {"method": "gpg-symmetric", "cipher": "AES256", "key_id": "0123456789abcdef"},
        "archived_at": "2026-12-03T13:%02d:00.000000Z" % int(name[-2:], 16),
        "timeline": 1,
    }
    if sealed:
        record = authentication.seal(record, key, "wal")
    (folder / (name + ".json")).write_text(json.dumps(record))


def test_catalog_window_from_one_listing_and_the_last_record(repo_dir, passphrase_file):
    key = RecordKey.from_file(str(passphrase_file))
    for seg in (2, 3, 4, 6):
        _archived(repo_dir, key, "0000000100000000000000%02X" % seg)
    _planted_set(repo_dir, key, "20261203T010000Z-main-1a2b3c", "main")
    manifest_path = repo_dir / "sets" / "20261203T010000Z-main-1a2b3c" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(start_wal="000000010000000000000002", stop_wal="000000010000000000000003")
    manifest_path.write_text(json.dumps(authentication.seal(manifest, key, "manifest")))
    repo = LocalRepository(str(repo_dir))
    entry = basebackup.add_recovery_windows(repo, list_catalog(repo, key=key), key)[0]
    window = entry["recovery_window"]
    assert window["latest_wal"] == "000000010000000000000004"  # 5 is missing: the run ends
    assert window["latest"].startswith("2026-12-03T13:04:00")
    # The record at the end of the window is checked: an unsealed one is not trusted.
    _archived(repo_dir, key, "000000010000000000000004", sealed=False)
    entry = basebackup.add_recovery_windows(repo, list_catalog(repo, key=key), key)[0]
    assert entry["recovery_window"]["latest"] is None
    assert entry["recovery_window"]["problem"]
