"""Issue #7 end to end, through ansible-playbook: the pg_wal_archiving role applied to a
cluster archives to a local repository and S3 (moto) through the agent; a base backup
by the agent; transaction A, the time noted, transaction B; dr_point_in_time.yml to that
time on a second, empty cluster gives A and not B, matching the fingerprint (schema,
every table's rows, sequences) taken at that moment; "latest" from S3 loses nothing
committed before the last archived segment.

The agent runs as PostgreSQL's OS user from archive_command/restore_command, with the
system Python (as on a host: python3-psycopg2, python3-boto3), from this checkout.
One converge, a second that must change nothing, and two recoveries share one
module-scoped site (check mode of the settings: test_pitr_engine.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from testbed.ansible import (
    REPO_ROOT,
    PlaybookResult,
    ansible_env,
    make_collection_path,
    run_playbook,
)
from testbed.dataset import load_clinic_dataset, table_fingerprints
from testbed.files import write_passphrase_file
from testbed.netutil import wait_until
from testbed.pg import PostgresCluster
from testbed.s3 import DEFAULT_REGION, DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY

from ansible_collections.clinic.backup.plugins.module_utils import keyring

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROLE_PLAYBOOK = REPO_ROOT / "playbooks" / "wal_archiving.yml"
PITR_PLAYBOOK = REPO_ROOT / "playbooks" / "dr_point_in_time.yml"
AGENT_MODULE = "ansible_collections.clinic.backup.plugins.module_utils.agent"
SYSTEM_PYTHON = "/usr/bin/python3"
DB = "clinic_db"
OWNER = "clinic_user"

AGENT_WRAPPER = """#!/bin/sh
# The clinic-backup agent of this checkout, as the backup_agent role installs it.
PYTHONPATH={import_root} PYTHONDONTWRITEBYTECODE=1 exec {python} -m {module} "$@"
"""

FINGERPRINT_SQL = r"""
SELECT json_build_object(
  'schema', (SELECT json_agg(json_build_array(table_schema, table_name, column_name, data_type,
                                              is_nullable, column_default)
                             ORDER BY table_schema, table_name, ordinal_position)
             FROM information_schema.columns
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema')),
  'constraints', (SELECT json_agg(conname || ' ' || pg_get_constraintdef(oid) ORDER BY conname)
                  FROM pg_constraint WHERE connamespace = 'public'::regnamespace),
  'sequences', (SELECT json_object_agg(schemaname || '.' || sequencename, last_value)
                FROM pg_sequences));
"""


def fingerprint(cluster: PostgresCluster, dbname: str = DB) -> dict[str, Any]:
    """Schema, every table's rows (count + md5) and every sequence of the database."""
    found = json.loads(cluster.psql(FINGERPRINT_SQL, dbname=dbname))
    found["tables"] = table_fingerprints(cluster, dbname)
    return found


def patient_sql(mrn: str, name: str) -> str:
    """One transaction: a patient, and the identity sequence moved past it."""
    return (
        "BEGIN; INSERT INTO patients (patient_id, mrn, first_name, last_name, date_of_birth, sex, "
        "status, created_at, updated_at) SELECT max(patient_id) + 1, "
        f"'{mrn}', '{name}', 'Pitr', '1970-01-01', 'F', 'active', now(), now() FROM patients; "
        "SELECT setval(pg_get_serial_sequence('patients', 'patient_id'), max(patient_id)) "
        "FROM patients; COMMIT;"
    )


def result_set(run: PlaybookResult) -> str:
    return run.result("Restore the base backup, replay the WAL to the target, promote and check")[
        "set_id"
    ]


def server_account_name(cluster: PostgresCluster) -> str:
    account = cluster._account  # the test bed's unprivileged server account
    return account.pw_name if account else os.environ.get("USER", "postgres")


def chown_to_server(path: Path, cluster: PostgresCluster) -> None:
    account = cluster._account
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)


@dataclass
class Site:
    root: Path
    source: PostgresCluster
    env: dict[str, str]
    vars: dict[str, Any]
    bucket: str
    s3_endpoint: str
    inventory: str = ""
    runs: dict[str, PlaybookResult] = field(default_factory=dict)
    moments: dict[str, Any] = field(default_factory=dict)

    def converge(self, check: bool = False, **overrides: Any) -> PlaybookResult:
        return run_playbook(
            ROLE_PLAYBOOK,
            self.env,
            extra_vars=dict(self.vars, **overrides),
            check=check,
            inventory=self.inventory,
        )

    def agent(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """The agent as cron runs it: as the cluster's OS user."""
        prefix = ["runuser", "-u", server_account_name(self.source), "--"]
        if os.geteuid() != 0:
            prefix = []
        return subprocess.run(
            [*prefix, self.vars["pg_wal_archiving_agent_bin"], *argv],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd="/",
        )

    def recover(
        self, new: PostgresCluster, check: bool = False, **overrides: Any
    ) -> PlaybookResult:
        extra = {
            "clinic_backup_passphrase_file": self.vars["pg_wal_archiving_passphrase_source"],
            "clinic_backup_pitr_cluster": self.vars["pg_wal_archiving_cluster"],
            "clinic_backup_pitr_repository": self.vars["pg_wal_archiving_repository"],
            "clinic_backup_pitr_agent_config": self.vars["pg_wal_archiving_config_file"],
            "clinic_backup_pitr_agent_bin": self.vars["pg_wal_archiving_agent_bin"],
            "clinic_backup_pitr_os_user": server_account_name(self.source),
            "clinic_backup_pitr_data_dir": new.data_dir,
            "clinic_backup_pitr_port": new.port,
            "clinic_backup_pitr_settings": {"unix_socket_directories": new.socket_dir},
            "clinic_backup_pitr_timeout": 180,
            "clinic_backup_audit_log": str(self.root / "var/log/clinic-backup/audit.log"),
            "clinic_backup_restore_s3_target": self.vars["pg_wal_archiving_s3_targets"][0],
        }
        extra.update(overrides)
        return run_playbook(
            PITR_PLAYBOOK, self.env, extra_vars=extra, inventory=self.inventory, check=check
        )

    def now(self) -> str:
        return self.source.psql(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
            '\'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\');'
        )

    def switch_and_wait_archived(self) -> str:
        """Close the current segment; wait until its record is in the local repository."""
        name = self.source.psql("SELECT pg_walfile_name(pg_switch_wal());")
        record = (
            Path(self.vars["pg_wal_archiving_repository"])
            / "wal"
            / self.vars["pg_wal_archiving_cluster"]
            / name[:16]
            / f"{name}.json"
        )
        wait_until(record.exists, timeout=60, what=f"{name} archived")
        return name


def site_vars(root: Path, source: PostgresCluster, bucket: str, endpoint: str) -> dict[str, Any]:
    user = server_account_name(source)
    group = source._account.pw_gid if source._account else os.getgid()
    import grp

    restart = [
        str(source.bin_dir / "pg_ctl"),
        "-D", source.data_dir, "-l", source.log_file, "-w", "-t", "60", "-s", "restart",
    ]  # fmt: skip
    if os.geteuid() == 0:
        restart = ["runuser", "-u", user, "--", *restart]
    # Its own session: the test bed ends ansible-playbook's process group after the run,
    # which must not take the restarted postmaster with it (systemd does this on a host).
    restart = ["setsid", "--wait", *restart]
    return {
        "pg_wal_archiving_cluster": "main",
        "pg_wal_archiving_os_user": user,
        "pg_wal_archiving_os_group": grp.getgrgid(group).gr_name,
        "pg_wal_archiving_login_host": source.host,
        "pg_wal_archiving_login_port": source.port,
        "pg_wal_archiving_login_user": source.superuser,
        "pg_wal_archiving_agent_bin": str(root / "usr/local/bin/clinic-backup"),
        "pg_wal_archiving_state_dir": str(root / "var/lib/postgresql/clinic-backup"),
        "pg_wal_archiving_config_file": str(root / "var/lib/postgresql/clinic-backup/main.json"),
        "pg_wal_archiving_passphrase_source": str(root / "etc/clinic-backup/passphrase"),
        "pg_wal_archiving_passphrase_file": str(
            root / "var/lib/postgresql/clinic-backup/passphrase"
        ),
        "pg_wal_archiving_keyring_source": str(root / "etc/clinic-backup/keyring"),
        "pg_wal_archiving_keyring_dir": str(root / "var/lib/postgresql/clinic-backup/keyring"),
        "pg_wal_archiving_repository": str(root / "var/backups/clinic/pitr"),
        "pg_wal_archiving_spool_dir": str(root / "var/spool/clinic-backup/main"),
        "pg_wal_archiving_s3_targets": [
            {"bucket": bucket, "prefix": "pitr", "endpoint_url": endpoint, "region": DEFAULT_REGION}
        ],
        "pg_wal_archiving_config_extra": {
            "aws_access_key": DUMMY_ACCESS_KEY,
            "aws_secret_key": DUMMY_SECRET_KEY,
            "connect_timeout": 10,
        },
        "pg_wal_archiving_restart_command": restart,
        "pg_wal_archiving_cron_file": str(root / "etc/cron.d/clinic-backup-basebackup"),
        "pg_wal_archiving_log_dir": str(root / "var/log/postgresql"),
        "pg_wal_archiving_metrics_dir": str(root / "var/lib/prometheus/node-exporter"),
        "pg_wal_archiving_audit_log": str(root / "var/log/clinic-backup/audit.log"),
        "pg_wal_archiving_prove_timeout": 60,
    }


@pytest.fixture(scope="module")
def site(collections_path, s3) -> Site:
    # Not below pytest's basetemp: any pytest run that starts meanwhile resets
    # /tmp/pytest-of-<user> to 0700, closing it to the server's user.
    root = Path(tempfile.mkdtemp(prefix="clinic-pitr-site-"))
    root.chmod(0o711)
    source = PostgresCluster(base_dir=root)
    try:
        source.start()
        source.create_role(OWNER, secrets.token_urlsafe(16))
        source.create_database(DB, owner=OWNER)
        load_clinic_dataset(source, DB, OWNER, scale=0.05)
        # pg_basebackup's replication connection (the agent's basebackup, as on a host).
        with open(Path(source.data_dir, "pg_hba.conf"), "a") as hba:
            hba.write("host replication postgres 127.0.0.1/32 trust\n")
        source.psql("SELECT pg_reload_conf();")
        # What a Debian host has: /usr/local/bin, /etc/cron.d, PostgreSQL's log directory.
        for directory in ("usr/local/bin", "etc/cron.d", "etc/clinic-backup", "var/log/postgresql"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        chown_to_server(root / "var/log/postgresql", source)
        (root / "etc/clinic-backup").chmod(0o700)
        write_passphrase_file(root / "etc/clinic-backup/passphrase")
        agent = root / "usr/local/bin/clinic-backup"
        agent.write_text(
            AGENT_WRAPPER.format(
                # Not collections_path: pytest's 0700 temp dirs are closed to the server's user.
                import_root=make_collection_path(REPO_ROOT / "tests" / "output" / "import"),
                python=SYSTEM_PYTHON,
                module=AGENT_MODULE,
            )
        )
        agent.chmod(0o755)
        bucket = "pitr-" + secrets.token_hex(4)
        s3.create_bucket(bucket)
        env = ansible_env(collections_path, {"ANSIBLE_PIPELINING": "True", **s3.env()})
        site = Site(
            root,
            source,
            env,
            site_vars(root, source, bucket, s3.endpoint_url),
            bucket,
            s3.endpoint_url,
        )
        inventory = root / "inventory.yml"
        inventory.write_text(
            json.dumps(
                {"clinic_db_servers": {"hosts": {"localhost": {"ansible_connection": "local"}}}}
            )
        )
        site.inventory = str(inventory)
        for run, kwargs in (
            ("first", {}),
            ("second", {}),
        ):
            started = time.monotonic()
            site.runs[run] = site.converge(**kwargs)
            site.moments[run + "_seconds"] = round(time.monotonic() - started, 1)
        yield site
    finally:
        source.destroy()
        shutil.rmtree(root, ignore_errors=True)


def task(name: str) -> str:
    return "clinic.backup.pg_wal_archiving : " + name


def _setting(cluster: PostgresCluster, name: str) -> str:
    return cluster.psql(f"SELECT setting FROM pg_settings WHERE name = '{name}';")


def test_role_converges_restarts_once_and_proves_the_chain(site):
    first = site.runs["first"].assert_ok()
    settings = first.result(task("Set the archiving settings (ALTER SYSTEM)"))
    assert set(settings["changed_settings"]) == {
        "archive_command", "archive_mode", "archive_timeout", "restore_command",
    }  # fmt: skip  # wal_level was already replica: left alone
    assert settings["pending_restart"] == ["archive_mode"]
    restarts = first.task_results(task("Restart PostgreSQL (pg_wal_archiving_restart_command)"))
    assert [r["_status"] for r in restarts] == ["changed"]
    assert _setting(site.source, "archive_mode") == "on"
    assert _setting(site.source, "archive_timeout") == "300"
    config = site.vars["pg_wal_archiving_config_file"]
    assert _setting(site.source, "archive_command").endswith(f"wal-push --config {config} %p")
    proof = first.result(task("Prove that a closed segment reaches every repository"))["proof"]
    segment = proof["segment"]
    local = Path(site.vars["pg_wal_archiving_repository"], "wal", "main", segment[:16])
    assert (local / f"{segment}.json").exists()
    keys = [o["Key"] for o in site_s3_objects(site)]
    assert f"pitr/wal/main/{segment[:16]}/{segment}.json" in keys
    # PHI at rest: no plaintext segment anywhere in the repository.
    assert not (local / segment).exists()
    cron = Path(site.vars["pg_wal_archiving_cron_file"]).read_text()
    assert "basebackup --config" in cron and "30 2 * * 0" in cron
    assert "wal-status --config" in cron and "--metrics-dir" in cron
    # Retention prunes the WAL no kept base backup needs; verify checks its continuity.
    assert f"retention --config {config}" in cron and "30 5 * * 0" in cron
    assert f"verify --config {config}" in cron and "30 3 * * 3" in cron


def site_s3_objects(site: Site) -> list[dict[str, Any]]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=site.s3_endpoint,
        region_name=DEFAULT_REGION,
        aws_access_key_id=DUMMY_ACCESS_KEY,
        aws_secret_access_key=DUMMY_SECRET_KEY,
    )
    return client.list_objects_v2(Bucket=site.bucket).get("Contents", [])


def test_second_converge_changes_nothing(site):
    second = site.runs["second"].assert_ok()
    assert second.stats["localhost"]["changed"] == 0
    assert not second.task_results(
        task("Restart PostgreSQL (pg_wal_archiving_restart_command)")
    ) or all(
        r["_status"] == "skipped"
        for r in second.task_results(task("Restart PostgreSQL (pg_wal_archiving_restart_command)"))
    )


def test_point_in_time_gives_a_not_b_and_latest_from_s3_loses_nothing(site):
    src = site.source
    base = site.agent("basebackup", "--config", site.vars["pg_wal_archiving_config_file"])
    assert base.returncode == 0, base.stdout + base.stderr
    time.sleep(1.1)  # the base backup stops clearly before the target
    src.psql(patient_sql("PITR-A", "Ada"), dbname=DB)
    time.sleep(1.1)  # commit times a clear second either side of the target
    target = site.now()
    at_target = fingerprint(src)
    time.sleep(1.1)
    src.psql(
        patient_sql("PITR-B", "Bob") + "DELETE FROM prescriptions WHERE prescription_id IN "
        "(SELECT prescription_id FROM prescriptions ORDER BY 1 LIMIT 3);",
        dbname=DB,
    )
    at_end = fingerprint(src)
    site.switch_and_wait_archived()

    to_time = PostgresCluster()
    to_latest = PostgresCluster()
    try:
        # Check mode names the base backup and writes nothing.
        dry = site.recover(
            to_time,
            check=True,
            clinic_backup_pitr_target="time",
            clinic_backup_pitr_target_value=target,
        ).assert_ok()
        would = dry.result(
            "Restore the base backup, replay the WAL to the target, promote and check"
        )
        assert would["set_id"] and not os.path.exists(to_time.data_dir)
        run = site.recover(
            to_time, clinic_backup_pitr_target="time", clinic_backup_pitr_target_value=target
        ).assert_ok()
        assert result_set(run) == would["set_id"]
        result = run.result(
            "Restore the base backup, replay the WAL to the target, promote and check"
        )
        mrns = to_time.psql(
            "SELECT string_agg(mrn, ',' ORDER BY mrn) FROM patients WHERE mrn LIKE 'PITR-%';",
            dbname=DB,
        )
        assert mrns == "PITR-A"
        recovered = fingerprint(to_time)
        # Schema and every row exactly as at the target. Sequences are not transactional in
        # PostgreSQL: what B's transaction took from one before its commit is WAL-logged at
        # once and replayed, so a sequence may be ahead (up to where B left it), never behind:
        # no key handed out before the target is ever handed out again.
        recovered_sequences = recovered.pop("sequences")
        wanted_sequences = dict(at_target)
        assert recovered == {k: v for k, v in at_target.items() if k != "sequences"}
        for name, value in wanted_sequences["sequences"].items():
            assert value <= recovered_sequences[name] <= at_end["sequences"][name], name
        assert result["reached_time"] > target  # stopped before B's commit, after the target
        assert "recovery stopping before commit" in result["reached_message"]
        assert result["duration_seconds"] > 0 and result["rpo_seconds"] >= 0
        report = "\n".join(run.result("Report the recovery")["msg"])
        assert f"Point reached: {result['reached_time']}" in report
        assert "RTO measured" in report and "RPO" in report

        s3_target = dict(site.vars["pg_wal_archiving_s3_targets"][0])
        run = site.recover(
            to_latest,
            clinic_backup_pitr_target="latest",
            clinic_backup_restore_source="s3",
            clinic_backup_restore_s3_target=s3_target,
        ).assert_ok()
        assert fingerprint(to_latest) == at_end
    finally:
        to_time.destroy()
        to_latest.destroy()


def test_a_rotated_passphrase_keeps_older_wal_and_base_backups_recoverable(site):
    """The runbook's "change all credentials": after a rotation the role gives the server's
    user the keyring, and a recovery that spans the rotation (a base backup and WAL under
    the old passphrase, WAL after it) still reaches the end."""
    src = site.source
    source_file = Path(site.vars["pg_wal_archiving_passphrase_source"])
    old = source_file.read_text().strip()
    rotated = keyring.install_passphrase(
        str(source_file),
        secrets.token_urlsafe(32),
        keyring_dir=site.vars["pg_wal_archiving_keyring_source"],
        rotate=True,
        uid=os.geteuid(),
        gid=os.getegid(),
    )
    assert rotated["rotated"]
    converge = site.converge().assert_ok()
    assert old not in converge.stdout
    config = json.loads(Path(site.vars["pg_wal_archiving_config_file"]).read_text())
    copy = Path(site.vars["pg_wal_archiving_keyring_dir"], rotated["retired_key_id"])
    assert config["old_passphrase_files"] == [str(copy)]
    assert copy.read_text().strip() == old
    assert stat.S_IMODE(copy.stat().st_mode) == 0o400
    assert copy.stat().st_uid == (src._account.pw_uid if src._account else os.geteuid())
    assert Path(site.vars["pg_wal_archiving_passphrase_file"]).read_text() == (
        source_file.read_text()
    )

    src.psql(patient_sql("PITR-ROTATED", "Rosa"), dbname=DB)
    site.switch_and_wait_archived()
    at_end = fingerprint(src)
    new = PostgresCluster()
    try:
        site.recover(
            new,
            clinic_backup_pitr_target="latest",
            clinic_backup_old_passphrase_files=rotated["old_passphrase_files"],
        ).assert_ok()
        assert fingerprint(new) == at_end
    finally:
        new.destroy()
