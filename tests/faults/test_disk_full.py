"""Fault 3: the local repository's filesystem fills up mid-backup.

A 3 MB tmpfs is the repository. It holds an older, small, complete set of ``fault_tiny``;
then the database grows by 4 MB of incompressible data and the next backups cannot fit.
Each failing run must: fail with an error that says the disk is full, remove its partial
files (no staging leftovers, free space back to what it was), keep the older set intact
and verifiable, keep ``latest`` on it, and record the failure in the metrics. With an S3
target as well, the S3 copy must still complete (targets are isolated). Once the database
shrinks again the same repository takes a new set.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import faultlib
from .faultlib import agent_config

TINY_DB = "fault_tiny"


@pytest.fixture
def tmpfs_repo(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the disk-full test needs root")
    mount_point = tmp_path / "repo"
    mount_point.mkdir(mode=0o700)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % proc.stderr.strip())
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def tiny_db(pg) -> Iterator[str]:
    pg.create_database(TINY_DB, owner=pg.clinic_user)
    try:
        pg.psql(
            "SET ROLE %s; CREATE TABLE visits (id int PRIMARY KEY, note text, scan bytea);"
            "ALTER TABLE visits ALTER COLUMN scan SET STORAGE EXTERNAL;"
            "INSERT INTO visits SELECT g, 'visit ' || g, NULL FROM generate_series(1, 200) g;"
            % pg.clinic_user,
            dbname=TINY_DB,
        )
        yield TINY_DB
    finally:
        pg.drop_database(TINY_DB)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def test_full_repository_fails_clearly_and_keeps_older_sets(
    pg,
    tiny_db,
    s3,
    fresh_bucket,
    direct_s3,
    tmpfs_repo,
    collections_path,
    passphrase_file,
    tmp_path,
    fault_repeat,
    summary_row,
):
    row = summary_row("repository disk full (3 MB tmpfs)")
    metrics_dir = tmp_path / "metrics"
    local_only = agent_config(tmp_path, pg, tiny_db, passphrase_file, repository=tmpfs_repo)
    target = {"bucket": fresh_bucket, "prefix": "full", "endpoint_url": s3.endpoint_url}
    with_s3 = agent_config(
        tmp_path,
        pg,
        tiny_db,
        passphrase_file,
        repository=tmpfs_repo,
        s3_targets=[target],
        s3_part_size_mb=5,
    )
    repo = faultlib.local_repository(tmpfs_repo)
    remote = faultlib.s3_repository(s3.endpoint_url, fresh_bucket, "full")

    older = faultlib.run_agent(collections_path, local_only, metrics_dir=metrics_dir)
    assert older.rc == 0, older.text()
    older_id = older.doc["set_id"]
    last_success = faultlib.read_metrics(metrics_dir, tiny_db)[
        "clinic_backup_last_success_timestamp_seconds"
    ]
    # The database grows by 4 MB of incompressible data: no longer fits in what is left.
    pg.psql(
        "UPDATE visits SET scan = (SELECT decode(string_agg("
        "md5(id::text || ':' || s::text || random()::text),"
        " ''), 'hex') FROM generate_series(1, 4096) s) WHERE id <= 64",
        dbname=tiny_db,
    )
    free_before = _free_bytes(tmpfs_repo)

    for attempt in range(fault_repeat):
        both = attempt % 2 == 1  # alternate: local only, local + S3
        result = faultlib.run_agent(
            collections_path, with_s3 if both else local_only, env=s3.env(), metrics_dir=metrics_dir
        )
        row.run()
        set_id = result.doc.get("set_id")
        state = faultlib.catalog_state(repo)
        older_ok = (
            older_id in state["complete"] and faultlib.verify_ok(repo, older_id, passphrase_file)[0]
        )
        row.add("sets_lost", not older_ok)
        row.reported(result.reported_ok, bool(set_id) and set_id in state["complete"])
        row.add("incomplete_listed", len(set(state["complete"] + state["other"]) - {older_id}))
        left = faultlib.leftovers(repo_dir=tmpfs_repo)
        freed = _free_bytes(tmpfs_repo) >= free_before
        row.add("leftovers", len(left) + (0 if freed else 1))
        metrics = faultlib.read_metrics(metrics_dir, tiny_db)
        row.reported(metrics.get("clinic_backup_last_status") == 0.0, False)
        clear = "No space left on device" in result.msg and "full" in result.msg
        if attempt == 0:
            row.note("error: %s" % result.msg[:240])

        assert result.rc == 1, result.text()
        assert clear, result.msg
        assert str(tmpfs_repo) in result.msg
        assert left == [] and freed, (left, free_before, _free_bytes(tmpfs_repo))
        assert older_ok and state == {"complete": [older_id], "other": []}, state
        assert repo.read_latest(tiny_db) == older_id
        assert metrics["clinic_backup_last_status"] == 1.0
        assert metrics["clinic_backup_last_success_timestamp_seconds"] == last_success
        if both:
            # Targets are isolated: the S3 copy is complete although the local disk is full.
            s3_ok = faultlib.verify_ok(remote, set_id, passphrase_file)[0]
            row.add("sets_lost", not s3_ok)
            assert s3_ok and "not stored in %s" % tmpfs_repo in result.msg, result.msg
            assert faultlib.leftovers(client=direct_s3, bucket=fresh_bucket, prefix="full") == []

    # Space is the only problem: once the data shrinks, the same repository works again.
    pg.psql("UPDATE visits SET scan = NULL", dbname=tiny_db)
    again = faultlib.run_agent(collections_path, local_only, metrics_dir=metrics_dir)
    again_ok = (
        again.rc == 0 and faultlib.verify_ok(repo, again.doc.get("set_id"), passphrase_file)[0]
    )
    row.add("recovered", again_ok)
    assert again_ok, again.text()
    assert faultlib.catalog_state(repo)["complete"] == faultlib.newest_first(
        [older_id, again.doc["set_id"]]
    )
