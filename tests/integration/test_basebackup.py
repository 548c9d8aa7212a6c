"""Base backups as sets (basebackup.py, agent ``basebackup``) against a real cluster that
archives its WAL through the agent's wal-push into a local repository and moto S3.

Proved here: ``clinic-backup basebackup`` (run as the server's account, as cron would)
stores a sealed base backup set in both repositories with the contract's manifest
fields, the server's backup_manifest riding inside it; verify checks it and the WAL
from its start_wal to the newest archived segment, naming a gap; the catalog gives it
a recovery window; restore_base_backup from S3 extracts a data directory that
pg_verifybackup accepts and that starts, replays WAL archived after the backup through
wal-fetch, and promotes; a non-empty data_dir is refused without a change; a server
without archiving is refused; retention keeps the WAL a kept base backup needs and
prunes the older WAL.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from testbed.files import write_passphrase_file
from testbed.pg import PostgresCluster, PostgresError
from testbed.s3 import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY
from testbed.walbed import WalBed

from ansible_collections.clinic.backup.plugins.module_utils import basebackup, wal
from ansible_collections.clinic.backup.plugins.module_utils.basebackup import (
    BaseBackupOptions,
    BaseRestoreOptions,
    add_recovery_windows,
    restore_base_backup,
    run_base_backup,
)
from ansible_collections.clinic.backup.plugins.module_utils.catalog import list_catalog
from ansible_collections.clinic.backup.plugins.module_utils.errors import (
    ConfigError,
    IntegrityError,
)
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    local_repository,
    s3_repository,
)
from ansible_collections.clinic.backup.plugins.module_utils.pgsource import PgConnection
from ansible_collections.clinic.backup.plugins.module_utils.repository import LocalRepository
from ansible_collections.clinic.backup.plugins.module_utils.retention import (
    RetentionPolicy,
    apply_retention,
)
from ansible_collections.clinic.backup.plugins.module_utils.verify import verify_set

pytestmark = pytest.mark.integration


def allow_replication(cluster: PostgresCluster) -> None:
    """The test bed's pg_hba.conf has no replication line: pg_basebackup needs one."""
    with open(os.path.join(cluster.data_dir, "pg_hba.conf"), "a") as handle:
        handle.write("local replication all trust\nhost replication postgres 127.0.0.1/32 trust\n")
    cluster.psql("SELECT pg_reload_conf();")


@pytest.fixture(scope="module")
def bed(s3):
    bucket = "basebackup-bed"
    s3.create_bucket(bucket)
    with WalBed(s3_endpoint=s3.endpoint_url, bucket=bucket) as walbed:
        allow_replication(walbed.cluster)
        walbed.cluster.psql("CREATE TABLE visits (id int PRIMARY KEY, note text);")
        walbed.cluster.psql("INSERT INTO visits VALUES (1, 'before the base backup');")
        yield walbed


@pytest.fixture(scope="module")
def root_passphrase(bed, tmp_path_factory) -> str:
    """The bed's passphrase in a file of root's own (the engine refuses another user's)."""
    path = tmp_path_factory.mktemp("secret") / "passphrase"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(bed.secret + "\n")
    return str(path)


def repositories(bed: WalBed):
    target = bed.config["s3_targets"][0]
    remote = s3_repository(
        target, {"aws_access_key": DUMMY_ACCESS_KEY, "aws_secret_key": DUMMY_SECRET_KEY}
    )
    return local_repository(str(bed.repo)), remote


def connection(cluster: PostgresCluster) -> PgConnection:
    return PgConnection(
        host=cluster.socket_dir, port=cluster.port, user="postgres", dbname="postgres"
    )


def agent_basebackup(bed: WalBed) -> dict:
    proc = bed.agent("basebackup", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr + bed.cluster.log_tail()
    return json.loads(proc.stdout)


def test_agent_base_backup_verify_window_restore_and_replay(bed, root_passphrase):
    result = agent_basebackup(bed)
    manifest = result["manifest"]
    assert manifest["kind"] == "basebackup" and manifest["database"] == "main"
    assert manifest["cluster"] == "main"
    assert [t["ok"] for t in result["targets"]] == [True, True]
    cluster = bed.cluster
    assert manifest["system_identifier"] == cluster.psql(
        "SELECT system_identifier FROM pg_control_system();"
    )
    assert manifest["pg_version"].split(".")[0] == str(cluster.server_version_num // 10000)
    assert manifest["timeline"] == 1
    assert manifest["wal_segment_size"] == 1024 * 1024
    for field in ("start_time", "stop_time"):
        assert manifest[field] >= manifest["started_at"][:19], field
    start, stop = (basebackup.parse_lsn(manifest[k]) for k in ("start_lsn", "stop_lsn"))
    assert start < stop
    # The server names the same segments for the same positions.
    for lsn, name in (("start_lsn", "start_wal"), ("stop_lsn", "stop_wal")):
        assert manifest[name] == cluster.psql(f"SELECT pg_walfile_name('{manifest[lsn]}');")
    # The server's backup_manifest rides inside the set (PostgreSQL 15's pg_basebackup
    # injects it into the tar it writes to stdout); verify lists it below.
    assert manifest["server_manifest"]["size"] > 0
    assert manifest["tar"]["files"] > 900
    key = bed.record_key()
    local, remote = repositories(bed)
    stored = Path(bed.repo, "sets", result["set_id"], "base.tar.zst.gpg")
    assert b"PG_VERSION" not in stored.read_bytes()  # no plaintext in the repository
    for repo in (local, remote):
        entries = [e for e in list_catalog(repo, key=key) if e["id"] == result["set_id"]]
        assert entries and entries[0]["state"] == "complete", repo.url
        assert entries[0]["authentication"] == "ok"

    # Written after the backup: reaches the restore only through the archived WAL.
    cluster.psql("INSERT INTO visits VALUES (2, 'after the base backup');")
    bed.wait_archived(bed.switch())

    outcome = verify_set(local, result["set_id"], passphrase_file=root_passphrase, record=False)
    checks = {c["name"]: c for c in outcome["checks"]}
    assert outcome["ok"], outcome["failures"]
    assert "backup_manifest" in checks["readable"]["detail"]
    assert checks["wal_continuity"]["status"] == "ok"
    window = add_recovery_windows(local, list_catalog(local, key=key), key)[0]["recovery_window"]
    assert window["earliest"] == manifest["stop_time"]
    assert window["latest"] and window["latest"] > window["earliest"]
    assert window["latest_wal"] >= manifest["stop_wal"]
    # The status table shows the cluster's base backups and how far recovery reaches.
    shown = bed.agent("status", "--json")
    assert shown.returncode in (0, 1), shown.stdout + shown.stderr
    groups = {g["name"]: g for g in json.loads(shown.stdout)["groups"]}
    assert groups["main"]["kind"] == "basebackup"
    (row,) = [r for r in groups["main"]["sets"] if r["id"] == result["set_id"]]
    assert row["recovery_window"]["earliest"] == manifest["stop_time"]
    assert not [o for o in groups["main"]["overdue"] if o["check"] == "restore_test"]
    table = bed.agent("status").stdout
    assert "main (basebackup)" in table
    assert "recovery window: %s -> " % manifest["stop_time"] in table

    # Not under tmp_path: concurrent pytest runs reset /tmp/pytest-of-root to 0700, which
    # the server's account could then no longer traverse.
    restored = PostgresCluster()
    try:
        restore = restore_base_backup(
            [remote],  # from S3: the off-site copy must be enough
            BaseRestoreOptions(
                restored.data_dir,
                cluster="main",
                owner=bed.uid,
                passphrase_file=root_passphrase,
            ),
        )
        assert restore.set_id == result["set_id"]
        assert restore.verified is True, restore.verify_output
        data = Path(restored.data_dir)
        assert (data / "backup_manifest").is_file() and (data / "PG_VERSION").is_file()
        assert oct(data.stat().st_mode & 0o777) == "0o700"
        assert data.stat().st_uid == bed.uid
        proc = subprocess.run(  # pg_verifybackup's own verdict (-n: WAL comes from the archive)
            [str(restored.bin_dir / "pg_verifybackup"), "-n", str(data)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        restored.configure(
            {
                "restore_command": "%s wal-fetch --config %s %%f %%p"
                % (shlex.quote(str(bed.wrapper)), shlex.quote(str(bed.config_path))),
                "recovery_target_action": "promote",
            }
        )
        (data / "recovery.signal").touch()
        os.chown(data / "recovery.signal", bed.uid, bed.gid)
        restored.start()
        deadline = time.monotonic() + 60
        while _in_recovery(restored):
            assert time.monotonic() < deadline, restored.log_tail()
            time.sleep(0.2)
        rows = restored.psql("SELECT id, note FROM visits ORDER BY id;")
        assert rows.splitlines() == ["1|before the base backup", "2|after the base backup"]
    finally:
        restored.destroy()


def _in_recovery(cluster: PostgresCluster) -> bool:
    try:
        return cluster.psql("SELECT pg_is_in_recovery();") != "f"
    except PostgresError as exc:
        raise AssertionError("%s\n%s" % (exc, cluster.log_tail())) from None


def test_module_check_mode_writes_nothing_then_a_real_run_stores_a_set(
    bed, ansible, root_passphrase, tmp_path
):
    repo_dir = tmp_path / "module-repo"
    task = {
        "name": "base backup",
        "clinic.backup.pg_basebackup": {
            "cluster": "main",
            "login_host": bed.cluster.socket_dir,
            "login_port": bed.cluster.port,
            "login_user": "postgres",
            "passphrase_file": root_passphrase,
            "repository": str(repo_dir),
            "label": "before the migration",
        },
    }
    check = dict(task, name="check", check_mode=True)
    # The check task's assertion runs between the two: nothing written yet.
    probe = {
        "name": "nothing written",
        "ansible.builtin.find": {"paths": str(repo_dir), "recurse": True},
    }
    run = ansible.play([check, probe, task]).assert_ok()
    checked = run.result("check")
    assert checked["changed"] and checked["check_mode"]
    assert checked["server"]["version_num"] == bed.cluster.server_version_num
    assert run.result("nothing written")["matched"] == 0
    done = run.result("base backup")
    manifest = done["manifest"]
    assert manifest["label"] == "before the migration" and manifest["kind"] == "basebackup"
    assert done["start_wal"] == manifest["start_wal"] and done["stop_wal"] == manifest["stop_wal"]
    assert (repo_dir / "sets" / done["set_id"] / "manifest.json").is_file()


def test_non_empty_data_dir_refused_and_nothing_qualifying_leaves_nothing(
    bed, root_passphrase, tmp_path
):
    local, _remote = repositories(bed)
    target = tmp_path / "data"
    target.mkdir()
    (target / "PG_VERSION").write_text("15\n")
    with pytest.raises(ConfigError, match="is not empty") as caught:
        restore_base_backup(
            [local], BaseRestoreOptions(str(target), passphrase_file=root_passphrase)
        )
    assert "never extracted over an existing cluster" in caught.value.hint
    assert sorted(os.listdir(target)) == ["PG_VERSION"]
    fresh = tmp_path / "fresh"
    with pytest.raises(IntegrityError, match="no base backup") as caught:
        restore_base_backup(
            [local],
            BaseRestoreOptions(
                str(fresh), target_time="2000-01-01T00:00:00Z", passphrase_file=root_passphrase
            ),
        )
    assert "after the target time" in caught.value.hint
    assert not fresh.exists()


def test_server_without_archiving_refused(pg, tmp_path):
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir(mode=0o700)
    passphrase = write_passphrase_file(tmp_path / "passphrase")
    with pytest.raises(ConfigError, match="archiving is off") as caught:
        run_base_backup(
            PgConnection(host=pg.host, port=pg.port, user="postgres", dbname="postgres"),
            [LocalRepository(str(repo_dir))],
            BaseBackupOptions("main", passphrase_file=str(passphrase)),
        )
    assert "pg_wal_archiving" in caught.value.hint
    assert not (repo_dir / "sets").exists() or not os.listdir(repo_dir / "sets")


def test_verify_names_a_gap_and_retention_keeps_only_needed_wal(bed, root_passphrase):
    """Last in this module: it deletes sets and WAL of the bed's repositories."""
    key = bed.record_key()
    local, remote = repositories(bed)
    newest = agent_basebackup(bed)["manifest"]
    # Two more segments archived after the backup: the loss of the first one is a gap
    # (a missing newest segment would look like one not archived yet).
    for row in (3, 4):
        bed.cluster.psql(f"INSERT INTO visits VALUES ({row}, 'after the second base backup');")
        bed.wait_archived(bed.switch())
    first_needed = newest["start_wal"]
    older = [
        r.name
        for r in wal.list_wal(local, "main", key)
        if r.kind == "segment" and r.name < first_needed
    ]
    assert older, "the first base backup's WAL precedes the newest one's"

    # A segment the newest base backup needs goes missing: verify names it.
    gap = wal.segment_after(first_needed, newest["wal_segment_size"])
    record = next(r for r in wal.list_wal(local, "main", key) if r.name == gap)
    stored = Path(bed.repo, record.stored_path)
    hidden = stored.with_name(stored.name + ".hidden")
    stored.rename(hidden)
    try:
        outcome = verify_set(local, newest["id"], passphrase_file=root_passphrase, record=False)
        failing = [c for c in outcome["checks"] if c["status"] == "fail"]
        assert [c["name"] for c in failing] == ["wal_continuity"], failing
        assert gap in failing[0]["detail"]
    finally:
        hidden.rename(stored)

    # The agent, as cron runs it on the cluster's config: the cluster's base backups only.
    config = bed.write_config(
        dict(
            bed.config,
            verify={"deep": False},  # sha256 and WAL continuity; the decrypt ran above
            retention={
                "keep_daily": 1,
                "keep_weekly": 0,
                "keep_monthly": 0,
                "keep_yearly": 0,
                "min_keep": 1,
            },
        ),
        path=bed.home / "retention.json",
    )
    policy = RetentionPolicy(daily=1, weekly=0, monthly=0, yearly=0, min_keep=1)
    preview = apply_retention(local, policy, database="main", key=key, check_mode=True)
    proc = bed.agent("retention", config=config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout)["repositories"]
    assert len(results) == 2
    for repo, result in zip((local, remote), results, strict=True):
        assert result["kept"] == [newest["id"]], result
        assert result["deleted"], repo.url
        assert result["wal"][0]["first_needed"] == first_needed
        left = list(wal.list_wal(repo, "main", key))
        assert not {r.name for r in left} & set(older), repo.url
        # Everything from the kept base backup's start_wal on is still there, usable.
        missing, _first, _last = basebackup.wal_continuity(newest, left)
        assert missing == [], missing
    assert set(preview["wal"][0]["deleted"]) == set(results[0]["wal"][0]["deleted"])
    proc = bed.agent("verify", config=config)  # every copy, WAL included, recorded
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verified = json.loads(proc.stdout)
    assert verified["set_id"] == newest["id"] and len(verified["repositories"]) == 2
