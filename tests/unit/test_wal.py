"""WAL archiving engine (issue #7 step 2): names, continuity, push/fetch through a local
repository with real gpg and zstd, tampering refused by name, pruning, the spool's
status files."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from testbed.files import write_passphrase_file

from ansible_collections.clinic.backup.plugins.module_utils import wal, walspool
from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.errors import (
    ConfigError,
    IntegrityError,
)
from ansible_collections.clinic.backup.plugins.module_utils.metrics import (
    read_previous,
    write_wal_metrics,
)
from ansible_collections.clinic.backup.plugins.module_utils.repository import LocalRepository

MiB = 1024 * 1024
SEG = "000000010000000A000000FF"


def test_parse_wal_name_kinds():
    assert wal.parse_wal_name(SEG) == wal.WalName(1, 0xA, 0xFF, "segment", SEG)
    assert wal.parse_wal_name(SEG + ".partial").kind == "partial"
    backup = wal.parse_wal_name("000000020000000000000003.00000028.backup")
    assert (backup.kind, backup.timeline, backup.seg) == ("backup", 2, 3)
    assert wal.parse_wal_name("0000000A.history") == wal.WalName(
        10, 0, 0, "history", "0000000A.history"
    )
    for bad in (
        "",
        "00000001000000000000000",
        "../000000010000000000000001",
        "0000000100000000000000zz",
        "000000010000000000000001.gz",
        None,
    ):
        with pytest.raises(ConfigError):
            wal.parse_wal_name(bad)


def test_segment_arithmetic():
    assert wal.segment_after(SEG) == "000000010000000B00000000"
    assert wal.segment_after("000000010000000000000001") == "000000010000000000000002"
    # 64 MiB segments: 64 per log file.
    assert wal.segment_after("00000001000000000000003F", 64 * MiB) == "000000010000000100000000"
    assert wal.segments_between("000000010000000A000000FE", "000000010000000B00000001") == [
        "000000010000000A000000FE",
        "000000010000000A000000FF",
        "000000010000000B00000000",
        "000000010000000B00000001",
    ]
    with pytest.raises(ConfigError):
        wal.segments_between("000000010000000000000001", "000000020000000000000003")
    assert (
        wal.segment_name(3, wal.parse_lsn("1/2000060") // (16 * MiB)) == "000000030000000100000002"
    )


@pytest.fixture
def archive(tmp_path):
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir(mode=0o700)
    passphrase = write_passphrase_file(tmp_path / "passphrase")
    key = RecordKey.from_file(str(passphrase))
    session = wal.WalSession(key, "main")
    yield LocalRepository(str(repo_dir)), session, tmp_path
    session.close()


def make_segment(folder: Path, name: str, seed: int, size: int = 1 * MiB) -> Path:
    path = folder / name
    # Half random (incompressible), half zeros: like a segment filled halfway.
    path.write_bytes(os.urandom(size // 2) + bytes([seed]) * (size - size // 2))
    return path


def test_push_fetch_roundtrip_and_records(archive):
    repo, session, tmp = archive
    src = tmp / "src"
    src.mkdir()
    names = wal.segments_between("000000010000000000000001", "000000010000000000000004")
    for index, name in enumerate(names):
        wal.push_wal([repo], "main", str(make_segment(src, name, index)), session)
    records = wal.list_wal(repo, "main", session.key)
    assert [r.name for r in records] == names
    assert all(r.problem is None and r.authentication == "ok" for r in records)
    assert len({r.key_id for r in records}) == 1  # one data key, created once
    assert wal.check_continuity(records, names[0], names[-1]) == []
    out = tmp / "out"
    wal.fetch_wal([repo], "main", names[2], str(out), session)
    assert out.read_bytes() == (src / names[2]).read_bytes()
    # The stored file holds neither the plaintext nor its zeros in the clear.
    stored = Path(repo.object_location(records[2].stored_path)).read_bytes()
    assert (src / names[2]).read_bytes()[:4096] not in stored
    status = wal.wal_status(repo, "main", session.key)
    assert (status["newest"], status["count"], status["newest_problem"]) == (names[-1], 4, None)


def test_same_content_again_succeeds_other_content_fails_loudly(archive):
    repo, session, tmp = archive
    path = make_segment(tmp, "000000010000000000000001", 1)
    wal.push_wal([repo], "main", str(path), session)
    again = wal.push_wal([repo], "main", str(path), session)
    assert again["already_archived"] == [repo.url]
    # A record whose stored file is gone is not "already archived": the file is stored again.
    record = wal.list_wal(repo, "main", session.key)[0]
    Path(repo.object_location(record.stored_path)).unlink()
    third = wal.push_wal([repo], "main", str(path), session)
    assert third["already_archived"] == [] and third["stored_in"] == [repo.url]
    assert wal.list_wal(repo, "main", session.key, deep=True)[0].problem is None
    make_segment(tmp, "000000010000000000000001", 2)
    with pytest.raises(IntegrityError, match="different content"):
        wal.push_wal([repo], "main", str(path), session)
    # The first copy is untouched.
    out = tmp / "out"
    wal.fetch_wal([repo], "main", "000000010000000000000001", str(out), session)
    assert out.read_bytes() != path.read_bytes()


def test_half_segment_is_refused(archive):
    repo, session, tmp = archive
    path = tmp / "000000010000000000000001"
    path.write_bytes(b"x" * (MiB + 10))
    with pytest.raises(IntegrityError, match="not a whole segment"):
        wal.push_wal([repo], "main", str(path), session)
    assert wal.list_wal(repo, "main", session.key) == []


def test_bit_flip_deleted_and_forged_segments_are_named(archive):
    repo, session, tmp = archive
    names = wal.segments_between("000000010000000000000001", "000000010000000000000005")
    for index, name in enumerate(names):
        wal.push_wal([repo], "main", str(make_segment(tmp, name, index)), session)
    records = {r.name: r for r in wal.list_wal(repo, "main", session.key)}
    # 2: a bit flipped in the stored file; 3: deleted; 4: its record's size edited.
    flipped = Path(repo.object_location(records[names[1]].stored_path))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    Path(repo.object_location(records[names[2]].stored_path)).unlink()
    forged_path = Path(repo.object_location(records[names[3]].record_path))
    forged = json.loads(forged_path.read_text())
    forged["size"] += 1
    forged_path.write_text(json.dumps(forged))
    listed = wal.list_wal(repo, "main", session.key)
    problems = {r.name: r.problem for r in listed if r.problem}
    assert set(problems) == {names[2], names[3]}  # the flip is caught by its sha256 on read
    assert wal.check_continuity(listed, names[0], names[-1]) == [names[2], names[3]]
    deep = wal.list_wal(repo, "main", session.key, deep=True)
    assert wal.check_continuity(deep, names[0], names[-1]) == names[1:4]
    for name in (names[1], names[2], names[3]):
        dest = tmp / ("restored-" + name)
        with pytest.raises(wal.WalRefused, match=name):
            wal.fetch_wal([repo], "main", name, str(dest), session)
        assert not dest.exists()
        assert not [p for p in tmp.iterdir() if p.name.startswith(".restored-")]
    with pytest.raises(wal.WalNotArchived):
        wal.fetch_wal([repo], "main", "000000010000000000000009", str(tmp / "nine"), session)
    assert not (tmp / "nine").exists()


def test_other_passphrase_cannot_read_and_rotation_keeps_old_keys(archive):
    repo, session, tmp = archive
    name = "000000010000000000000001"
    path = make_segment(tmp, name, 7)
    wal.push_wal([repo], "main", str(path), session)
    stranger = RecordKey.from_file(str(write_passphrase_file(tmp / "other")))
    with wal.WalSession(stranger, "main") as other:
        assert wal.list_wal(repo, "main", stranger)[0].problem
        with pytest.raises(wal.WalRefused):
            wal.fetch_wal([repo], "main", name, str(tmp / "x"), other)
    # Rotation: a new passphrase, the old one kept as an old passphrase file.
    rotated = RecordKey.from_file(
        str(write_passphrase_file(tmp / "new")), [str(tmp / "passphrase")]
    )
    with wal.WalSession(rotated, "main") as new:
        second = make_segment(tmp, "000000010000000000000002", 8)
        wal.push_wal([repo], "main", str(second), new)
        records = wal.list_wal(repo, "main", rotated)
        assert [r.problem for r in records] == [None, None]
        assert records[0].key_id != records[1].key_id  # a new data key for the new passphrase
        for record in records:
            out = tmp / ("out-" + record.name)
            wal.fetch_wal([repo], "main", record.name, str(out), new)
            assert out.read_bytes() == (tmp / record.name).read_bytes()


def test_history_files_and_timeline_switch(archive):
    repo, session, tmp = archive
    # Timeline 2 branched off timeline 1 at 0/300060 (inside segment 3 of 1 MiB).
    history = tmp / "00000002.history"
    history.write_text("1\t0/300060\tno recovery target specified\n")
    wal.push_wal([repo], "main", str(history), session)
    for name in (
        "000000010000000000000001",
        "000000010000000000000002",
        "000000020000000000000003",
        "000000020000000000000004",
    ):
        wal.push_wal([repo], "main", str(make_segment(tmp, name, 1)), session)
    records = wal.list_wal(repo, "main", session.key)
    history_record = [r for r in records if r.kind == "history"]
    assert history_record[0].history == [[1, "0/300060"]]
    assert (
        wal.check_continuity(records, "000000010000000000000001", "000000020000000000000004") == []
    )
    assert wal.check_continuity(
        records, "000000010000000000000001", "000000020000000000000005"
    ) == ["000000020000000000000005"]
    assert wal.check_continuity(
        records, "000000010000000000000001", "000000030000000000000005"
    ) == ["00000003.history"]
    deleted, kept = wal.prune_wal_before(repo, "main", "000000020000000000000003", check_mode=True)
    assert deleted == ["000000010000000000000001", "000000010000000000000002"]
    assert len(wal.list_wal(repo, "main", session.key)) == 5  # check mode deleted nothing
    deleted, kept = wal.prune_wal_before(repo, "main", "000000020000000000000003")
    left = [r.name for r in wal.list_wal(repo, "main", session.key)]
    assert left == ["00000002.history", "000000020000000000000003", "000000020000000000000004"]
    assert kept == 2


def test_spool_fast_argv_and_identity(tmp_path):
    assert walspool.parse_fast_argv(["wal-push", "--config", "c.json", "pg_wal/X"]) == (
        "wal-push",
        "c.json",
        ["pg_wal/X"],
    )
    assert walspool.parse_fast_argv(["wal-fetch", "--config=c", "N", "D"]) == (
        "wal-fetch",
        "c",
        ["N", "D"],
    )
    # Anything else goes to the full agent (which reports the mistake).
    assert (
        walspool.parse_fast_argv(["wal-push", "--config", "c", "--metrics-dir", "m", "p"]) is None
    )
    assert walspool.parse_fast_argv(["wal-fetch", "--config", "c", "N"]) is None
    assert walspool.parse_fast_argv(["backup", "--config", "c"]) is None
    # No archive_status beside the file: the engine pushes synchronously.
    config = {"cluster": "main", "wal": {"spool_dir": str(tmp_path / "spool")}}
    lone = tmp_path / "000000010000000000000001"
    lone.write_bytes(b"x")
    assert walspool.push_foreground("c.json", config, str(lone)) is None
    # A status file of another file of that name is not taken for this one's.
    pg_wal = tmp_path / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    seg = pg_wal / "000000010000000000000001"
    seg.write_bytes(b"y" * 10)
    walspool.make_spool(str(tmp_path / "spool"))
    stale = dict(walspool.file_identity(seg.stat()), size=11)
    walspool.write_status(str(tmp_path / "spool"), seg.name, "ok", stale)
    walspool.write_status(str(tmp_path / "spool"), seg.name, "error", {"msg": "S3 down"})
    assert walspool.push_foreground("c.json", config, str(seg)) == 1
    assert not Path(walspool.status_path(str(tmp_path / "spool"), seg.name, "ok")).exists()
    walspool.write_status(
        str(tmp_path / "spool"), seg.name, "ok", walspool.file_identity(seg.stat())
    )
    assert walspool.push_foreground("c.json", config, str(seg)) == 0


def test_wal_metrics(tmp_path):
    archiver = {
        "archived_count": 12,
        "failed_count": 3,
        "last_archived_time": 1000.0,
        "last_failed_time": 1100.0,
        "server_time": 1200.0,
        "pending": 4,
    }
    repos = [
        {
            "repository": "/r",
            "count": 5,
            "bytes": 99,
            "newest_archived_at": "2026-01-01T00:00:00.000000Z",
        }
    ]
    path = write_wal_metrics(str(tmp_path), "main", archiver, repos, now=1300.0)
    values = read_previous(path)
    assert values["clinic_backup_wal_last_archived_age_seconds"] == 200.0
    assert values["clinic_backup_wal_failed_count"] == 3.0
    assert values["clinic_backup_wal_pending_segments"] == 4.0
    assert values["clinic_backup_wal_repository_files"] == 5.0
    text = Path(path).read_text()
    # Every metric's samples are together, after its one HELP/TYPE.
    assert text.count("# TYPE clinic_backup_wal_repository_files") == 1


def test_push_worker_pushes_every_ready_file_and_stops(tmp_path, monkeypatch):
    """The background worker: every .ready file stored and marked .ok (with its identity),
    an orphan .ready (file gone) marked .error instead of being retried forever, status files
    of files PostgreSQL already marked .done removed, and the worker exits when idle."""
    monkeypatch.setattr(wal, "PUSH_LINGER_SECONDS", 0.2)
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir(mode=0o700)
    passphrase = write_passphrase_file(tmp_path / "passphrase")
    spool = tmp_path / "spool"
    config = {
        "cluster": "main",
        "repository": str(repo_dir),
        "passphrase_file": str(passphrase),
        "wal": {"spool_dir": str(spool), "workers": 2},
    }
    config_path = tmp_path / "agent.json"
    config_path.write_text(json.dumps(config))
    pg_wal = tmp_path / "pg_wal"
    status = pg_wal / "archive_status"
    status.mkdir(parents=True)
    names = wal.segments_between("000000010000000000000001", "000000010000000000000003")
    for index, name in enumerate(names):
        make_segment(pg_wal, name, index)
        (status / (name + ".ready")).touch()
    (status / "000000010000000000000009.ready").touch()  # orphan: no file
    walspool.make_spool(str(spool))
    walspool.write_status(str(spool), "000000010000000000000000", "ok", {})  # already .done
    assert wal.run_push_worker(str(config_path), str(pg_wal)) == 0
    for name in names:
        done = walspool.read_status(walspool.status_path(str(spool), name, "ok"))
        assert done == walspool.file_identity((pg_wal / name).stat())
    orphan = walspool.read_status(
        walspool.status_path(str(spool), "000000010000000000000009", "error")
    )
    assert "gone" in orphan["msg"]
    assert (
        walspool.read_status(walspool.status_path(str(spool), "000000010000000000000000", "ok"))
        is None
    )
    key = RecordKey.from_file(str(passphrase))
    assert [r.name for r in wal.list_wal(LocalRepository(str(repo_dir)), "main", key)] == names
    # The foreground answers from the spool: 0 for each file, without pushing anything.
    for name in names:
        assert walspool.push_foreground(str(config_path), config, str(pg_wal / name)) == 0


def test_fetch_waits_for_the_worker_and_serves_a_segment_asked_again(archive, monkeypatch):
    """wal-fetch's fast path with a real worker process: a cold call waits for the worker
    to fetch its own segment (no second fetch beside it), the next ones come prefetched, a
    segment recovery asks for again after it was served is fetched again at once (not
    after fetch_timeout), and one never archived is left to the engine without waiting."""
    repo, session, tmp = archive
    # The worker runs as `python -m ...walspool`: it needs the engine on its path.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    src = tmp / "src"
    src.mkdir()
    names = wal.segments_between("000000010000000000000001", "000000010000000000000004")
    for index, name in enumerate(names):
        wal.push_wal([repo], "main", str(make_segment(src, name, index)), session)
    spool = tmp / "spool"
    config = {
        "cluster": "main",
        "repository": repo.path,
        "passphrase_file": str(tmp / "passphrase"),
        "wal": {"spool_dir": str(spool), "fetch_prefetch": 2, "fetch_timeout": 30},
    }
    config_path = tmp / "agent.json"
    config_path.write_text(json.dumps(config))
    config_path.chmod(0o600)
    dest = tmp / "RECOVERYXLOG"

    def fetch(name):
        started = time.monotonic()
        code = walspool.fetch_foreground(str(config_path), config, name, str(dest))
        return code, time.monotonic() - started

    for name in [*names[:3], names[1]]:  # names[1] asked again after it was served
        code, seconds = fetch(name)
        assert code == walspool.EXIT_OK and seconds < 15, (name, seconds)
        assert dest.read_bytes() == (src / name).read_bytes()
    code, seconds = fetch("000000010000000000000009")
    assert code is None and seconds < 15  # the engine answers "not archived"
    log = (spool / walspool.WORKER_LOG).read_text()
    assert log.count("fetch worker") == 1, log
    assert "failed" not in log, log
