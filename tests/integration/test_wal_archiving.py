"""WAL archiving through the agent (issue #7 step 2), with a real PostgreSQL cluster whose
archive_command is ``clinic-backup wal-push`` into a local repository and moto S3.

Proves: every file PostgreSQL counts as archived is in BOTH repositories with a sealed
record; the archive is continuous; ``wal-fetch`` returns byte-identical files (from the
prefetch spool too) and answers 1 for a file never archived, writing nothing;
``wal-status`` writes the monitoring metrics from pg_stat_archiver and the repository.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from testbed.pg import PostgresCluster
from testbed.s3 import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY
from testbed.walbed import SEGMENT_SIZE, WalBed

from ansible_collections.clinic.backup.plugins.module_utils import wal
from ansible_collections.clinic.backup.plugins.module_utils.metrics import read_previous
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    local_repository,
    s3_repository,
)

pytestmark = [pytest.mark.integration]


def repositories(bed: WalBed):
    local = local_repository(str(bed.repo))
    target = bed.config["s3_targets"][0]
    remote = s3_repository(
        target, {"aws_access_key": DUMMY_ACCESS_KEY, "aws_secret_key": DUMMY_SECRET_KEY}
    )
    return local, remote


def take_base_backup(bed: WalBed, target: Path) -> Path:
    """A plain base backup without WAL (-X none): recovery must fetch it all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST=bed.cluster.socket_dir, PGPORT=str(bed.cluster.port), PGUSER="postgres")
    subprocess.run(
        [str(bed.cluster.bin_dir / "pg_basebackup"), "-D", str(target), "-X", "none", "-c", "fast"],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return target


def recover(bed: WalBed, base_dir: Path) -> PostgresCluster:
    """A second cluster started from the base backup with restore_command = wal-fetch
    (from the local repository: the S3 copy is read back in-process above)."""
    local_only = {k: v for k, v in bed.config.items() if not k.startswith(("s3_", "aws_"))}
    config = bed.write_config(local_only, Path(bed.home) / "fetch-local.json")
    restored = PostgresCluster()
    shutil.copytree(base_dir, restored.data_dir)
    Path(restored.data_dir, "recovery.signal").touch()
    for path in [Path(restored.data_dir), *Path(restored.data_dir).rglob("*")]:
        os.lchown(path, bed.uid, bed.gid)
    os.chmod(restored.data_dir, 0o700)
    restored.settings.update(
        {
            "archive_mode": False,
            "restore_command": "%s wal-fetch --config %s %%f %%p"
            % (shlex.quote(str(bed.wrapper)), shlex.quote(str(config))),
        }
    )
    restored.start()
    deadline = time.monotonic() + 120
    while restored.psql("SELECT pg_is_in_recovery();") != "f":
        assert time.monotonic() < deadline, restored.log_tail()
        time.sleep(0.1)
    return restored


def test_archive_to_local_and_s3_then_fetch_identical(s3, s3_bucket, tmp_path):
    with WalBed(s3_endpoint=s3.endpoint_url, bucket=s3_bucket) as bed:
        base_dir = take_base_backup(bed, tmp_path / "base")
        last = None
        for index in range(4):
            last = bed.make_wal(1.5, table="t%d" % index)
        archiver = bed.wait_archived(last)
        assert archiver["failed_count"] == 0, bed.cluster.log_tail()
        done = [n for n in bed.done_names() if wal.parse_wal_name(n).kind == "segment"]
        assert len(done) >= 6
        key = bed.record_key()
        local, remote = repositories(bed)
        for repo in (local, remote):
            # deep: every stored file's sha256 too (the local copy; S3 is read below).
            deep = repo is local
            records = {r.name: r for r in wal.list_wal(repo, "main", key, deep=deep)}
            # Nothing counted archived that is not stored, sealed and intact in BOTH.
            assert set(done) <= set(records), repo.url
            assert all(records[n].problem is None for n in done), [
                records[n] for n in done if records[n].problem
            ]
            assert {records[n].authentication for n in done} == {"ok"}
            assert wal.check_continuity(list(records.values()), done[0], done[-1]) == []
        # The fast path: one background worker pushed ahead, not one process per file.
        starts = bed.worker_log().count("push worker")
        assert 1 <= starts < len(done), bed.worker_log()

        # wal-fetch (restore_command) returns each file byte for byte; segments still
        # in pg_wal are the reference.
        present = [n for n in done if bed.wal_file(n).exists()][-4:]
        assert len(present) >= 2
        out = Path(bed.home) / "restored"
        out.mkdir(mode=0o700)
        os.chown(out, bed.uid, bed.gid)
        first = present[0]
        result = bed.agent("wal-fetch", first, str(out / "RECOVERYXLOG"))
        assert result.returncode == 0, result.stderr
        assert (out / "RECOVERYXLOG").read_bytes() == bed.wal_file(first).read_bytes()
        # The prefetch worker fills the spool with the next files, verified.
        spooled = bed.spool / "fetch" / present[1]
        deadline = time.monotonic() + 30
        while not spooled.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spooled.exists(), bed.worker_log()
        result = bed.agent("wal-fetch", present[1], str(out / "RECOVERYXLOG"))
        assert result.returncode == 0, result.stderr
        assert not spooled.exists()  # served from the spool (moved, not fetched again)
        assert (out / "RECOVERYXLOG").read_bytes() == bed.wal_file(present[1]).read_bytes()

        # Not archived: exit 1 and nothing written (PostgreSQL: "not available").
        result = bed.agent("wal-fetch", "0000000100000000000000FE", str(out / "missing"))
        assert result.returncode == 1, result.stderr
        assert "not archived" in result.stderr
        assert not (out / "missing").exists()

        # The S3 copy alone restores too (the local disk lost).
        with wal.WalSession(key, "main") as session:
            wal.fetch_wal([remote], "main", present[-1], str(tmp_path / "from-s3"), session)
        assert (tmp_path / "from-s3").read_bytes() == bed.wal_file(present[-1]).read_bytes()
        assert len((tmp_path / "from-s3").read_bytes()) == SEGMENT_SIZE

        # Monitoring: pg_stat_archiver and the repositories' newest segment.
        result = bed.agent("wal-status", "--metrics-dir", str(bed.metrics))
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["archiver"]["failed_count"] == 0
        assert {r["newest"] for r in report["repositories"]} == {done[-1]}
        values = read_previous(str(bed.metrics / "clinic_backup_wal.main.prom"))
        assert values["clinic_backup_wal_failed_count"] == 0
        assert 0 <= values["clinic_backup_wal_last_archived_age_seconds"] < 600
        assert values["clinic_backup_wal_repository_files"] >= len(done)

        # A real recovery: the base backup replayed to the end of the archive through
        # restore_command = wal-fetch (prefetching), then promoted, holding every row.
        expected = {t: bed.cluster.psql("SELECT count(*) FROM t%d" % t) for t in range(4)}
        recovered = recover(bed, base_dir)
        try:
            for table, count in expected.items():
                assert recovered.psql("SELECT count(*) FROM t%d" % table) == count
        finally:
            recovered.destroy()

        # History, .backup and .partial files take the same path (the synchronous one
        # here: no archive_status beside them).
        with wal.WalSession(key, "main") as session:
            for name, data in (
                ("00000002.history", b"1\t0/5000000\tno recovery target specified\n"),
                (done[-1] + ".00000028.backup", b"START WAL LOCATION: 0/5000028\n"),
                (done[-1] + ".partial", bed.wal_file(present[-1]).read_bytes()),
            ):
                path = tmp_path / "push" / name
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(data)
                wal.push_wal([local, remote], "main", str(path), session)
                wal.fetch_wal([remote], "main", name, str(tmp_path / name), session)
                assert (tmp_path / name).read_bytes() == data
        records = {r.name: r for r in wal.list_wal(local, "main", key)}
        assert records["00000002.history"].history == [[1, "0/5000000"]]
        # Pushing the history file again with other content is refused loudly.
        other = Path(bed.home) / "00000002.history"
        other.write_text("1\t0/6000000\tother\n")
        os.chown(other, bed.uid, bed.gid)
        result = bed.agent("wal-push", str(other))
        assert result.returncode == 1 and "different content" in result.stderr
