"""Faults of WAL archiving (issue #7 step 2): a real cluster whose archive_command is the
agent's wal-push into a local repository and S3 behind the fault proxy.

- S3 down while PostgreSQL archives: the local copy lands, the command fails, PostgreSQL
  counts nothing archived that S3 does not hold; once S3 is back its own retry succeeds
  and no segment is missing in either repository.
- The push worker SIGKILLed while a segment's upload is parked mid-request: nothing half
  stored is counted (no record, not .done); the retry stores it whole.
- A bit-flipped and a deleted segment: found by check_continuity (deep), refused by
  wal-fetch naming them (exit 126, nothing written); a copy damaged in one repository
  only is served from the other.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testbed.faultproxy import FaultProxy
from testbed.netutil import pid_alive
from testbed.s3 import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY
from testbed.walbed import AGENT_MODULE, WalBed

from ansible_collections.clinic.backup.plugins.module_utils import wal
from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.repository import (
    LocalRepository,
    S3Repository,
)

from . import faultlib

BUCKET = "wal-faults"


@pytest.fixture(scope="module")
def archiving(s3: Any) -> Iterator[tuple[WalBed, FaultProxy]]:
    """One archiving cluster for the module's two live faults (each starts healed)."""
    s3.create_bucket(BUCKET)
    with (
        FaultProxy(s3.port) as proxy,
        WalBed(s3_endpoint=proxy.url, bucket=BUCKET, wal={"push_timeout": 30}, s3_retries=1) as bed,
    ):
        yield bed, proxy


def s3_copy(s3: Any) -> S3Repository:
    return S3Repository(faultlib.s3_client(s3.endpoint_url), BUCKET, "clinic")


def stored_names(repo: Any, key: Any, deep: bool = False) -> set[str]:
    return {r.name for r in wal.list_wal(repo, "main", key, deep=deep) if r.problem is None}


def counted_but_not_stored(bed: WalBed, repos: list[Any]) -> list[str]:
    """Files PostgreSQL counts as archived (.done) that a repository does not hold whole."""
    key = bed.record_key()
    done = set(bed.done_names())
    return sorted(n for repo in repos for n in done - stored_names(repo, key))


def wait(predicate: Any, timeout: float, what: str, bed: WalBed) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("%s: %s\n%s" % (what, bed.worker_log(), bed.cluster.log_tail()))
        time.sleep(0.05)


def test_s3_down_during_archiving_then_back(archiving, s3, summary_row):
    bed, proxy = archiving
    row = summary_row("WAL archiving: S3 down while PostgreSQL archives, then back")
    local = LocalRepository(str(bed.repo))
    bed.wait_archived(bed.make_wal(0.5, table="before"))
    failed_before = bed.archiver()["failed_count"]
    proxy.down()
    row.run()
    during = bed.make_wal(1.0, table="during")
    wait(
        lambda: bed.archiver()["failed_count"] > failed_before,
        60,
        "archive_command never failed while S3 was down",
        bed,
    )
    key = bed.record_key()
    # The local copy landed; PostgreSQL counts nothing archived that S3 lacks.
    wait(lambda: during in stored_names(local, key), 30, "no local copy during the outage", bed)
    false = counted_but_not_stored(bed, [local, s3_copy(s3)])
    row.add("false_successes", len(false))
    assert false == []
    assert during not in bed.done_names()
    failure = bed.cluster.log_tail(200)
    assert "wal-push" in failure and "not archived in every repository" in failure

    proxy.heal()
    last = bed.make_wal(0.3, table="after")  # a new segment wakes the archiver up
    bed.wait_archived(last, timeout=90)
    segments = [n for n in bed.done_names() if wal.parse_wal_name(n).kind == "segment"]
    lost = counted_but_not_stored(bed, [local, s3_copy(s3)])
    row.add("sets_lost", len(lost))
    assert lost == []
    remote = wal.list_wal(s3_copy(s3), "main", key)
    assert wal.check_continuity(remote, segments[0], segments[-1]) == []
    row.add("recovered")


def _worker_pid(bed: WalBed) -> int:
    found = re.findall(r"push worker (\d+) started", bed.worker_log())
    assert found, bed.worker_log()
    return int(found[-1])


def test_push_worker_sigkilled_mid_segment(archiving, s3, summary_row):
    bed, proxy = archiving
    row = summary_row("WAL archiving: push worker SIGKILLed mid-segment upload")
    local = LocalRepository(str(bed.repo))
    key = bed.record_key()
    bed.wait_archived(bed.make_wal(0.3, table="calm"))
    # Park every segment upload to S3: the worker is stopped inside a PutObject.
    parked = proxy.add("hold", ops={"PutObject"}, key_suffix=".zst.gpg")
    target = bed.make_wal(0.5, table="killed")
    proxy.wait_for(lambda: parked.fired > 0, timeout=60, what="a parked segment upload")
    pid = _worker_pid(bed)
    assert pid_alive(pid)
    os.kill(pid, signal.SIGKILL)
    row.run()
    wait(lambda: not pid_alive(pid), 30, "the killed worker to exit", bed)
    # Nothing of the parked segment counts: no S3 record, not .done for PostgreSQL.
    remote_names = stored_names(s3_copy(s3), key)
    assert target not in remote_names
    false = counted_but_not_stored(bed, [local, s3_copy(s3)])
    row.add("false_successes", len(false))
    assert false == []

    proxy.heal()
    last = bed.make_wal(0.3, table="after_kill")
    bed.wait_archived(last, timeout=90)
    lost = counted_but_not_stored(bed, [local, s3_copy(s3)])
    row.add("sets_lost", len(lost))
    assert lost == [] and target in bed.done_names()
    # Whole and intact: every stored file read back against its record.
    assert target in stored_names(local, key, deep=True)
    assert target in stored_names(s3_copy(s3), key, deep=True)
    temps = [p for p in Path(bed.repo).rglob(".*") if ".tmp-" in p.name]
    row.add("leftovers", len(temps))
    if temps:
        row.note("temp files of the killed worker left in the repository: %s" % temps)
    row.add("recovered")


# ------------------------------------------------------------------ damage, met by fetch


def run_agent(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "AWS_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run(
        [sys.executable, "-m", AGENT_MODULE, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_bit_flipped_and_deleted_segments_are_named(s3, fresh_bucket, tmp_path, summary_row):
    row = summary_row("WAL archive: bit-flipped / deleted segment, met by continuity and wal-fetch")
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir(mode=0o700)
    secret = tmp_path / "passphrase"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(24).hex().encode() + b"\n")
    os.close(fd)
    config = {
        "cluster": "main",
        "repository": str(repo_dir),
        "passphrase_file": str(secret),
        "s3_targets": [
            {"bucket": fresh_bucket, "prefix": "clinic", "endpoint_url": s3.endpoint_url}
        ],
        "aws_access_key": DUMMY_ACCESS_KEY,
        "aws_secret_key": DUMMY_SECRET_KEY,
        "wal": {"spool_dir": str(tmp_path / "spool"), "async": False},
    }
    config_path = tmp_path / "agent.json"
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps(config).encode())
    os.close(fd)
    source = tmp_path / "pg_wal"  # no archive_status: the synchronous path
    source.mkdir()
    names = wal.segments_between("000000010000000000000001", "000000010000000000000006")
    key = RecordKey.from_file(str(secret))
    local, remote = LocalRepository(str(repo_dir)), s3_copy_for(s3, fresh_bucket)
    # Archived by the engine in-process (the agent's own path is the live tests' business).
    with wal.WalSession(key, "main") as session:
        for index, name in enumerate(names):
            (source / name).write_bytes(os.urandom(4096) + bytes([index]) * (1024 * 1024 - 4096))
            wal.push_wal([local, remote], "main", str(source / name), session)
    records = {r.name: r for r in wal.list_wal(local, "main", key)}
    flipped_both, flipped_local, deleted = names[1], names[2], names[3]

    def flip(repo: Any, record: Any) -> None:
        data = bytearray(repo.read_object(record.stored_path))
        data[len(data) // 3] ^= 0x04
        repo.write_object(record.stored_path, bytes(data))

    flip(local, records[flipped_both])
    flip(remote, records[flipped_both])
    flip(local, records[flipped_local])
    for repo in (local, remote):
        repo.delete_objects([records[deleted].record_path, records[deleted].stored_path])

    # Verify side: continuity over the deep listing names exactly the damage.
    row.run()
    local_missing = wal.check_continuity(
        wal.list_wal(local, "main", key, deep=True), names[0], names[-1]
    )
    remote_missing = wal.check_continuity(
        wal.list_wal(remote, "main", key, deep=True), names[0], names[-1]
    )
    for found, expected in (
        (local_missing, [flipped_both, flipped_local, deleted]),
        (remote_missing, [flipped_both, deleted]),
    ):
        for name in expected:
            row.bad_input(clear=name in found)
        assert found == expected

    # Recovery side: restore_command refuses each damaged file by name, writes nothing.
    out = tmp_path / "restore"
    out.mkdir()
    for name in (flipped_both, deleted):
        row.run()
        dest = out / "RECOVERYXLOG"
        result = run_agent("wal-fetch", "--config", str(config_path), name, str(dest), cwd=out)
        row.reported(result.returncode == 0, False)
        row.bad_input(clear=result.returncode == 126 and name in result.stderr)
        assert result.returncode == 126, result.stderr
        assert name in result.stderr
        assert not dest.exists() and list(out.iterdir()) == []
    # Damaged in one repository only: served from the other, byte for byte.
    row.run()
    dest = out / "RECOVERYXLOG"
    result = run_agent("wal-fetch", "--config", str(config_path), flipped_local, str(dest), cwd=out)
    assert result.returncode == 0, result.stderr
    assert dest.read_bytes() == (source / flipped_local).read_bytes()
    row.add("recovered")


def s3_copy_for(s3: Any, bucket: str) -> S3Repository:
    return S3Repository(faultlib.s3_client(s3.endpoint_url), bucket, "clinic")
