"""Base backups as sets (basebackup.py) against a real cluster that archives its WAL.

One module-scoped cluster runs with archive_mode on. Until the agent's wal-push is
wired in here, its archive_command is a plain copy into a temporary directory: test
set-up only, it is what restore_command reads back below.

Proved here: a base backup set lands in a local repository and in (moto) S3 with the
contract's manifest fields, and the server's backup_manifest rides inside it;
restore_base_backup extracts a data directory that pg_verifybackup accepts and that
starts, replays archived WAL written after the backup, and promotes; a non-empty
data_dir is refused without a change; a server without archiving is refused.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from testbed.pg import PostgresCluster

from ansible_collections.clinic.backup.plugins.module_utils import basebackup
from ansible_collections.clinic.backup.plugins.module_utils.basebackup import (
    BaseBackupOptions,
    BaseRestoreOptions,
    restore_base_backup,
    run_base_backup,
)
from ansible_collections.clinic.backup.plugins.module_utils.catalog import list_catalog
from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError
from ansible_collections.clinic.backup.plugins.module_utils.pgsource import PgConnection
from ansible_collections.clinic.backup.plugins.module_utils.repository import (
    LocalRepository,
    S3Repository,
)
from ansible_collections.clinic.backup.plugins.module_utils.s3 import make_client

pytestmark = pytest.mark.integration

HBA_REPLICATION = "local replication all trust\nhost replication postgres 127.0.0.1/32 trust\n"


def allow_replication(cluster: PostgresCluster) -> None:
    """The test bed's pg_hba.conf has no replication lines: pg_basebackup needs one."""
    with open(os.path.join(cluster.data_dir, "pg_hba.conf"), "a") as handle:
        handle.write(HBA_REPLICATION)
    cluster.psql("SELECT pg_reload_conf();")


@pytest.fixture(scope="module")
def archiving_pg() -> PostgresCluster:
    cluster = PostgresCluster()
    # Inside the cluster's own directory: the server's account can reach it.
    archive = Path(cluster.base, "archive")
    archive.mkdir()
    archive.chmod(0o777)
    cluster.archive_dir = archive
    cluster.settings.update(
        {
            "archive_mode": True,
            "archive_command": f"test ! -f {archive}/%f && cp %p {archive}/%f",
        }
    )
    try:
        cluster.start()
        allow_replication(cluster)
        cluster.psql("CREATE TABLE visits (id int PRIMARY KEY, note text);")
        cluster.psql("INSERT INTO visits VALUES (1, 'before the base backup');")
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def archive_dir(archiving_pg) -> Path:
    return archiving_pg.archive_dir


def connection(cluster: PostgresCluster) -> PgConnection:
    return PgConnection(host=cluster.host, port=cluster.port, user="postgres", dbname="postgres")


@pytest.fixture
def repos(tmp_path, s3, s3_bucket):
    local = tmp_path / "repo"
    local.mkdir(mode=0o700)
    client = make_client(endpoint_url=s3.endpoint_url, region="us-east-1", **_keys(s3))
    return [LocalRepository(str(local)), S3Repository(client, s3_bucket, "pitr")]


def _keys(s3) -> dict[str, str]:
    env = s3.env()
    return {"access_key": env["AWS_ACCESS_KEY_ID"], "secret_key": env["AWS_SECRET_ACCESS_KEY"]}


def wait_archived(cluster: PostgresCluster, archive_dir: Path) -> str:
    """Switch to a new segment and wait until the finished one is in the archive."""
    name = cluster.psql("SELECT pg_walfile_name(pg_switch_wal());")
    deadline = time.monotonic() + 30
    while not (archive_dir / name).exists():
        assert time.monotonic() < deadline, f"{name} never archived: {cluster.log_tail()}"
        time.sleep(0.1)
    return name


def test_base_backup_set_in_local_and_s3_restores_and_replays(
    archiving_pg, archive_dir, repos, tmp_path, passphrase_file
):
    options = BaseBackupOptions("main", passphrase_file=str(passphrase_file))
    result = run_base_backup(connection(archiving_pg), repos, options)
    manifest = result["manifest"]
    assert manifest["kind"] == "basebackup" and manifest["database"] == "main"
    assert manifest["cluster"] == "main"
    assert [t["ok"] for t in result["targets"]] == [True, True]
    system_id = archiving_pg.psql("SELECT system_identifier FROM pg_control_system();")
    assert manifest["system_identifier"] == system_id
    assert manifest["pg_version"].split(".")[0] == str(archiving_pg.server_version_num // 10000)
    assert manifest["timeline"] == 1
    for field in ("start_time", "stop_time", "start_lsn", "stop_lsn"):
        assert manifest[field], field
    assert basebackup.parse_lsn(manifest["start_lsn"]) < basebackup.parse_lsn(manifest["stop_lsn"])
    # The server computes the same segment names from the same positions.
    assert manifest["start_wal"] == archiving_pg.psql(
        f"SELECT pg_walfile_name('{manifest['start_lsn']}');"
    )
    assert manifest["stop_wal"] == archiving_pg.psql(
        f"SELECT pg_walfile_name('{manifest['stop_lsn']}');"
    )
    assert manifest["server_manifest"]["size"] > 0
    # The same set, sealed, in both repositories.
    for repo in repos:
        entries = [e for e in list_catalog(repo) if e["id"] == result["set_id"]]
        assert entries and entries[0]["state"] == "complete"
    # No plaintext of the data directory in the local repository.
    stored = Path(repos[0].path, "sets", result["set_id"], result["artifacts"][0]["file"])
    assert stored.name == "base.tar.zst.gpg"
    assert b"PG_VERSION" not in stored.read_bytes()

    # Written after the backup: reaches the restore only through the archived WAL.
    archiving_pg.psql("INSERT INTO visits VALUES (2, 'after the base backup');")
    wait_archived(archiving_pg, archive_dir)

    restored = PostgresCluster(base_dir=tmp_path)
    try:
        restore = restore_base_backup(
            [repos[1]],  # from S3: the off-site copy must be enough
            BaseRestoreOptions(
                restored.data_dir,
                cluster="main",
                owner=_server_owner(archiving_pg),
                passphrase_file=str(passphrase_file),
            ),
        )
        assert restore.set_id == result["set_id"]
        assert restore.verified is True, restore.verify_output
        data = Path(restored.data_dir)
        assert (data / "backup_manifest").is_file() and (data / "PG_VERSION").is_file()
        assert oct(data.stat().st_mode & 0o777) == "0o700"
        # pg_verifybackup agrees on its own (-n: WAL comes from the archive).
        proc = subprocess.run(
            [str(restored.bin_dir / "pg_verifybackup"), "-n", str(data)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        restored.configure(
            {"restore_command": f"cp {archive_dir}/%f %p", "recovery_target_action": "promote"}
        )
        (data / "recovery.signal").touch()
        os.chown(data / "recovery.signal", *_server_owner(archiving_pg, ids=True))
        restored.start()
        deadline = time.monotonic() + 60
        while restored.psql("SELECT pg_is_in_recovery();") != "f":
            assert time.monotonic() < deadline, restored.log_tail()
            time.sleep(0.2)
        rows = restored.psql("SELECT id, note FROM visits ORDER BY id;")
        assert rows.splitlines() == ["1|before the base backup", "2|after the base backup"]
    finally:
        restored.destroy()


def _server_owner(cluster: PostgresCluster, ids: bool = False):
    info = os.stat(cluster.data_dir)
    return (info.st_uid, info.st_gid) if ids else info.st_uid


def test_server_manifest_rides_inside_the_set(archiving_pg, tmp_path):
    """PostgreSQL 15's pg_basebackup -D - injects backup_manifest as the last member."""
    repo_dir = tmp_path / "plain"
    repo_dir.mkdir(mode=0o700)
    result = run_base_backup(
        connection(archiving_pg),
        [LocalRepository(str(repo_dir))],
        BaseBackupOptions("main", compression="none", encrypt=False),
    )
    stored = repo_dir / "sets" / result["set_id"] / "base.tar"
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(stored.read_bytes()), mode="r|")]
    assert names[-1] == "backup_manifest" and "backup_label" in names
    assert result["manifest"]["tar"]["members"] == len(names)


def test_non_empty_data_dir_refused_and_left_alone(archiving_pg, tmp_path, passphrase_file):
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir(mode=0o700)
    repo = LocalRepository(str(repo_dir))
    run_base_backup(
        connection(archiving_pg),
        [repo],
        BaseBackupOptions("main", passphrase_file=str(passphrase_file)),
    )
    target = tmp_path / "data"
    target.mkdir()
    (target / "PG_VERSION").write_text("15\n")
    with pytest.raises(ConfigError, match="is not empty") as caught:
        restore_base_backup(
            [repo], BaseRestoreOptions(str(target), passphrase_file=str(passphrase_file))
        )
    assert "never extracted over an existing cluster" in caught.value.hint
    assert sorted(os.listdir(target)) == ["PG_VERSION"]
    # A target before every base backup: nothing qualifies, nothing is left behind.
    fresh = tmp_path / "fresh"
    with pytest.raises(Exception, match="no base backup") as caught:
        restore_base_backup(
            [repo],
            BaseRestoreOptions(
                str(fresh), target_time="2000-01-01T00:00:00Z", passphrase_file=str(passphrase_file)
            ),
        )
    assert "after the target time" in caught.value.hint
    assert not fresh.exists()


def test_server_without_archiving_refused(pg, tmp_path, passphrase_file):
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="archiving is off") as caught:
        run_base_backup(
            connection(pg),
            [LocalRepository(str(repo_dir))],
            BaseBackupOptions("main", passphrase_file=str(passphrase_file)),
        )
    assert "pg_wal_archiving" in caught.value.hint
    assert not re.search(r"\d{8}T", " ".join(os.listdir(repo_dir)))
