"""The restore-test and disaster-recovery playbooks, run as an operator runs them.

Each playbook under playbooks/ runs with the real ``ansible-playbook -i inventories/local``;
``-e @vars.json`` points the inventory's settings at the test cluster, as
``scripts/demo.py`` does. Backups are taken as clinic_user (password in a passfile);
restores run as the cluster's superuser over loopback (trusted in the test bed), into
fresh database names that are dropped afterwards; clinic_db itself is only ever read.
The server failure and ransomware cases restore onto a second, empty cluster.
"""

from __future__ import annotations

import datetime
import json
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
from testbed.ansible import ansible_env, run_playbook, venv_bin
from testbed.dataset import FAKE_SECRETS, make_config_files, make_uploads, table_fingerprints
from testbed.files import write_passphrase_file, write_private
from testbed.nginx import Nginx, site
from testbed.pg import PostgresCluster, quote_literal

from tests.integration import helpers
from tests.integration.test_interrupted import AGENT, agent_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
INVENTORY = REPO_ROOT / "inventories" / "local"
PLAYBOOKS = REPO_ROOT / "playbooks"

# Task names the tests read results from.
REHEARSE = "Rehearse restoring the newest set (scratch database, checked, dropped)"
REPLACE = "Restore the newest good set in place of the damaged database"
SAFETY = "Take a safety backup of the current state (label pre-restore)"
CLEAN_RESTORE = "Restore the newest verified set from before the intrusion into a new database"
SERVER_RESTORE = "Restore the newest set with the cluster's roles into a new database"
PLACE = "Put the configuration groups back in place (validate, then reload)"


@dataclass
class DR:
    """What every playbook run shares: the environment, the base vars, one set of clinic_db."""

    env: dict[str, str]
    base_vars: dict[str, object]
    work: Path
    set_id: str

    def vars(self, **overrides: object) -> dict[str, object]:
        merged = dict(self.base_vars)
        merged.update(overrides)
        return merged

    def play(self, name: str, **overrides: object):
        """ansible-playbook -i inventories/local playbooks/<name> -e @vars.json (JSON results)."""
        return run_playbook(
            PLAYBOOKS / name, self.env, extra_vars=self.vars(**overrides), inventory=str(INVENTORY)
        )

    def play_tasks(self, tasks: list[dict[str, object]]):
        """A one-off play of ``tasks`` on localhost (setting up what a scenario starts from)."""
        path = self.work / ("setup-%s.yml" % secrets.token_hex(3))
        path.write_text(
            json.dumps([{"hosts": "all", "gather_facts": False, "tasks": tasks}], default=str)
        )
        return run_playbook(path, self.env)


def fresh_name(stem: str) -> str:
    return "%s_%s" % (stem, secrets.token_hex(3))


def databases(cluster: PostgresCluster) -> list[str]:
    return cluster.psql("SELECT datname FROM pg_database ORDER BY 1").split()


def drop_like(cluster: PostgresCluster, prefix: str) -> None:
    for name in databases(cluster):
        if name.startswith(prefix):
            cluster.drop_database(name)


def messages(run, task: str) -> str:
    """The text a debug/assert/fail task showed."""
    result = run.result(task)
    msg = result.get("msg")
    return "\n".join(msg) if isinstance(msg, list) else str(msg)


@pytest.fixture(scope="module")
def dr(pg, s3, collections_path, tmp_path_factory) -> DR:
    """Settings as an operator's -e @vars.json would give them, and one backup set of
    clinic_db taken with playbooks/backup.yml into a local repository and an S3 bucket."""
    work = tmp_path_factory.mktemp("dr")
    bucket = "clinic-dr-" + secrets.token_hex(4)
    s3.create_bucket(bucket)
    pgpass = write_private(
        work / "pgpass", "%s:%d:*:%s:%s\n" % (pg.host, pg.port, pg.clinic_user, pg.clinic_password)
    )
    base_vars = {
        "clinic_backup_database": pg.clinic_db,
        "clinic_backup_login_host": pg.host,
        "clinic_backup_login_port": pg.port,
        "clinic_backup_login_user": pg.clinic_user,
        "clinic_backup_passfile": str(pgpass),
        "clinic_backup_passphrase_file": str(write_passphrase_file(work / "passphrase")),
        "clinic_backup_repository": str(work / "repo"),
        "clinic_backup_s3_targets": [
            {"bucket": bucket, "prefix": "db/clinic-main", "endpoint_url": s3.endpoint_url}
        ],
        # Restores: the superuser, trusted over loopback in the test bed (no password).
        "clinic_backup_restore_login_user": pg.superuser,
        "clinic_backup_audit_log": str(work / "audit" / "audit.log"),
    }
    env = ansible_env(collections_path, s3.env())
    dr = DR(env=env, base_vars=base_vars, work=work, set_id="")
    run = dr.play("backup.yml").assert_ok()
    dr.set_id = run.result("Take an encrypted backup set")["set_id"]
    # Evidence by default: the backup and the verification of each copy are on record.
    records = [
        json.loads(line)
        for line in Path(base_vars["clinic_backup_audit_log"]).read_text().splitlines()
    ]
    assert [(r["action"], r["outcome"]) for r in records] == [
        ("backup", "ok"),
        ("verify", "ok"),
        ("verify", "ok"),
    ]
    return dr


@pytest.fixture(scope="module")
def clean_server() -> Iterator[PostgresCluster]:
    """A second, empty cluster: the replacement / clean server. It logs every statement,
    so a password sent in clear SQL would show in its log."""
    cluster = PostgresCluster(settings={"log_statement": "all"})
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


def on_server(cluster: PostgresCluster) -> dict[str, object]:
    """Overrides that point the restore connection at ``cluster``."""
    return {
        "clinic_backup_restore_login_host": cluster.host,
        "clinic_backup_restore_login_port": cluster.port,
        "clinic_backup_restore_login_user": cluster.superuser,
    }


def test_backup_playbook_in_check_mode_on_a_fresh_host_writes_nothing(dr):
    fresh = dr.work / ("fresh-" + secrets.token_hex(3))
    run = run_playbook(
        PLAYBOOKS / "backup.yml",
        dr.env,
        extra_vars=dr.vars(clinic_backup_repository=str(fresh)),
        inventory=str(INVENTORY),
        check=True,
    ).assert_ok()
    assert run.result("Take an encrypted backup set")["check_mode"] is True
    assert not fresh.exists()


# ---------------------------------------------------------------- monthly restore test
def test_restore_test_rehearses_the_newest_set_and_meets_the_objectives(dr, pg, tmp_path):
    before = databases(pg)
    log = tmp_path / "restore-tests.jsonl"
    run = dr.play(
        "restore_test.yml",
        clinic_backup_restore_test_database=fresh_name("rt"),
        clinic_backup_restore_test_log=str(log),
    ).assert_ok()
    rehearsal = run.result(REHEARSE)
    assert rehearsal["set_id"] == dr.set_id
    assert rehearsal["row_counts"] and all(
        r["restored"] == r["expected"] for r in rehearsal["row_counts"]
    )
    report = messages(run, "Report the restore test")
    assert "PASSED" in report and dr.set_id in report
    assert "Tables checked: %d" % len(rehearsal["row_counts"]) in report
    assert "RTO measured: %s s" % rehearsal["duration_seconds"] in report
    assert "objective 3600.0 s" in report and "RPO measured" in report
    record = json.loads(log.read_text().splitlines()[-1])
    assert record["outcome"] == "passed" and record["set_id"] == dr.set_id
    assert databases(pg) == before


def test_restore_test_from_s3_fails_clearly_when_the_rto_objective_is_missed(dr, pg):
    before = databases(pg)
    run = dr.play(
        "restore_test.yml",
        clinic_backup_restore_source="s3",
        clinic_backup_restore_test_database=fresh_name("rt"),
        clinic_backup_rto_objective_seconds=0.001,
    )
    assert run.rc != 0
    rehearsal = run.result(REHEARSE)
    assert rehearsal["_status"] == "ok" and rehearsal["set_id"] == dr.set_id
    check = run.result("Check the objectives")
    assert check["_status"] == "failed"
    msg = check["msg"]
    assert msg.startswith("RESTORE TEST FAILED: RTO objective missed")
    assert "clinic_backup_rto_objective_seconds" in msg and "0.001 s" in msg
    assert "took %s s" % rehearsal["duration_seconds"] in msg
    assert "RPO" not in msg
    assert "s3://" in messages(run, "Report the restore test")
    assert databases(pg) == before


# ---------------------------------------------------------------- scenario 1: corruption
@pytest.fixture
def damaged_copy(dr, pg) -> Iterator[tuple[str, str, str]]:
    """A copy of clinic_db (restored from the shared set, owned by clinic_user) and a good
    backup set of that copy in its own repository: (copy name, repository, good set id)."""
    copy = fresh_name("dr_copy")
    repo = str(dr.work / ("repo-" + copy))
    connection = {
        "login_host": pg.host,
        "login_port": pg.port,
        "passphrase_file": dr.base_vars["clinic_backup_passphrase_file"],
    }
    tasks = [
        {
            "name": "copy",
            "clinic.backup.backup_restore": dict(
                connection,
                login_user=pg.superuser,
                repository=dr.base_vars["clinic_backup_repository"],
                set_id=dr.set_id,
                target_database=copy,
                owner=pg.clinic_user,
            ),
        },
        {
            "name": "backup",
            "clinic.backup.pg_dump": dict(
                connection,
                login_user=pg.clinic_user,
                login_password=pg.clinic_password,
                database=copy,
                repository=repo,
            ),
        },
    ]
    play = work_play(dr, tasks)
    try:
        good = run_playbook(play, dr.env).assert_ok().result("backup")["set_id"]
        yield copy, repo, good
    finally:
        drop_like(pg, copy)


@dataclass
class LiveConfig:
    """The configuration of the host being recovered: a serving nginx (its site file),
    the application's .env, and one verified set of both (file group "config")."""

    web: Nginx
    env_file: Path
    repo: Path
    set_id: str
    backed_up: dict[Path, bytes]

    def group(self, name: str = "config") -> dict[str, object]:
        """The clinic_backup_file_groups entry that puts this configuration back."""
        return {
            "name": name,
            "repository": str(self.repo),
            "keep_dir": str(self.repo.parent / "kept"),
            "place": [
                {
                    "path": str(self.web.site),
                    "mode": "0644",
                    "validate": self.web.test_argv,
                    "reload": self.web.reload_argv,
                },
                {"path": str(self.env_file)},
            ],
        }

    def drift(self, body: str) -> int:
        """Change both files after the backup (the site live); returns the reload count."""
        self.web.site.write_text(site(self.web.port, body))
        self.web.proc.send_signal(1)  # SIGHUP: reload
        self.web.wait_for_body(body)
        # Edited, not emptied: a set of it must still pass verify's size check.
        self.env_file.write_bytes(self.backed_up[self.env_file] + b"DATABASE_PASSWORD=drifted\n")
        return self.web.reloads()

    def assert_restored(self) -> None:
        self.web.wait_for_body("backed-up site")
        for path, data in self.backed_up.items():
            assert path.read_bytes() == data, path
        assert self.env_file.stat().st_mode & 0o077 == 0


@pytest.fixture(scope="module")
def live_config(dr) -> Iterator[LiveConfig]:
    # Not a skip: the scenario tests themselves would vanish with it.
    if not Nginx.available():
        pytest.fail("nginx is not installed: run scripts/bootstrap.sh (it installs nginx-light)")
    root = dr.work / "live-config"
    web = Nginx(root / "nginx")
    web.write_config("backed-up site")
    env_file = make_config_files(root / "etc")["env"]
    repo = root / "config-repo"
    passphrase = dr.base_vars["clinic_backup_passphrase_file"]
    web.start()
    try:
        run = dr.play_tasks(
            [
                {
                    "name": "config backup",
                    "clinic.backup.files_backup": {
                        "name": "config",
                        "paths": [str(web.site), str(env_file)],
                        "repository": str(repo),
                        "passphrase_file": passphrase,
                    },
                },
                {
                    "name": "verify",
                    "clinic.backup.backup_verify": {
                        "repository": str(repo),
                        "passphrase_file": passphrase,
                    },
                },
            ]
        ).assert_ok()
        backed_up = {p: p.read_bytes() for p in (web.site, env_file)}
        yield LiveConfig(web, env_file, repo, run.result("config backup")["set_id"], backed_up)
    finally:
        web.stop()


def placed_groups(run) -> list[dict]:
    return [r for r in run.result(PLACE).get("results", []) if "item" in r]


def work_play(dr: DR, tasks: list[dict]) -> Path:
    path = dr.work / ("setup-%s.yml" % secrets.token_hex(3))
    path.write_text(
        json.dumps([{"name": "setup", "hosts": "all", "gather_facts": False, "tasks": tasks}])
    )
    return path


def corrupt(pg: PostgresCluster, dbname: str, user: str | None = None) -> None:
    """Empty a table and add a stray one, as ``user`` (default clinic_user, who can still
    dump it; a table only the superuser can read makes every backup as clinic_user fail)."""
    pg.psql(
        "DELETE FROM medical_records; CREATE TABLE ransom_note (x int);",
        dbname=dbname,
        user=user or pg.clinic_user,
    )


def test_corruption_swaps_in_the_newest_good_set_and_keeps_the_damaged_database(
    dr, pg, pg_fingerprints, damaged_copy, live_config
):
    copy, _repo, _good = damaged_copy
    corrupt(pg, copy)
    reloads = live_config.drift("drifted site")
    # The copy stands in for the live database; the sets to restore are clinic_db's.
    run = dr.play(
        "dr_database_corruption.yml",
        clinic_backup_database=copy,
        clinic_backup_restore_source_database=pg.clinic_db,
        clinic_backup_file_groups=[live_config.group()],
        clinic_backup_restore_file_groups=["config"],
    ).assert_ok()
    # The configuration is back, validated by nginx -t, and the live server reloaded once.
    live_config.assert_restored()
    assert live_config.web.reloads() == reloads + 1
    [placed] = placed_groups(run)
    assert placed["set_id"] == live_config.set_id and placed["changed"] is True
    assert "Configuration put back in place: config" in messages(run, "Report the recovery")
    assert run.result("Stop the application")["_status"] == "skipped"
    assert run.result("Start the application again")["_status"] == "skipped"
    safety = run.result(SAFETY)
    # In a repository of its own: no later restore can take the damaged state for the newest set.
    safety_repo = dr.base_vars["clinic_backup_repository"] + "-pre-restore"
    assert helpers.manifest(safety_repo, safety["set_id"])["label"] == "pre-restore"
    assert helpers.local_sets(dr.base_vars["clinic_backup_repository"]) == [dr.set_id]
    restore = run.result(REPLACE)
    assert restore["set_id"] == dr.set_id
    previous = restore["previous_database"]
    assert previous.startswith(copy + "__pre_restore_")
    assert table_fingerprints(pg, copy) == pg_fingerprints
    kept = table_fingerprints(pg, previous)
    assert kept["medical_records"]["rows"] == 0 and "ransom_note" in kept
    owner = pg.psql(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s" % quote_literal(copy)
    )
    assert owner == pg.clinic_user
    report = messages(run, "Report the recovery")
    assert dr.set_id in report and safety["set_id"] in report
    assert 'DROP DATABASE "%s";' % previous in report


def test_corruption_never_restores_its_own_safety_backup(dr, pg, pg_fingerprints, damaged_copy):
    """Source and target are the same database, as in production, and the safety backup
    goes into the repository restored from: it is then the newest set of that database
    (the damaged state) and must not be chosen."""
    copy, repo, good = damaged_copy
    corrupt(pg, copy)
    run = dr.play(
        "dr_database_corruption.yml",
        clinic_backup_database=copy,
        clinic_backup_repository=repo,
        clinic_backup_safety_repository=repo,
    ).assert_ok()
    safety = run.result(SAFETY)["set_id"]
    assert helpers.local_sets(repo) == sorted([good, safety])
    restore = run.result(REPLACE)
    assert restore["set_id"] == good
    assert safety in [p["set_id"] for p in restore["passed_over"]]
    assert table_fingerprints(pg, copy) == pg_fingerprints


def test_corruption_failed_safety_backup_warns_and_failed_restore_changes_nothing(
    dr, pg, damaged_copy
):
    copy, repo, good = damaged_copy
    corrupt(pg, copy, user=pg.superuser)  # too damaged for clinic_user to dump
    damaged = table_fingerprints(pg, copy)
    before = databases(pg)
    run = dr.play(
        "dr_database_corruption.yml",
        clinic_backup_database=copy,
        clinic_backup_repository=repo,
        clinic_backup_restore_set_id="20200101T000000Z-%s-abcdef" % copy,
    )
    assert run.rc != 0
    assert run.result(SAFETY)["_status"] == "failed"
    assert "WARNING: the safety backup of %s failed" % copy in messages(
        run, "Warn that there is no safety backup"
    )
    assert helpers.local_sets(repo) == [good]
    assert helpers.local_sets(repo + "-pre-restore") == []
    assert run.task_results("Report the recovery") == []
    assert run.result(REPLACE)["_status"] == "failed"
    failure = run.result("Report the failed recovery")
    assert "RESTORE FAILED" in failure["msg"] and "was NOT replaced" in failure["msg"]
    assert run.result("Start the application again")["_status"] == "skipped"  # reached
    assert databases(pg) == before
    assert table_fingerprints(pg, copy) == damaged


# ---------------------------------------------------------------- scenario 2: server failure
def test_server_failure_rebuilds_from_s3_with_roles_and_vault_passwords(
    dr, pg_fingerprints, clean_server, tmp_path, live_config
):
    # Quotes and a backslash: the SQL quoting must hold.
    password = "N3w'pa\\ss\"" + secrets.token_urlsafe(12)
    # The uploads, backed up on the old server into their own repository.
    uploads, files_repo = tmp_path / "uploads", tmp_path / "files-repo"
    originals = {p.relative_to(uploads): p.read_bytes() for p in make_uploads(uploads, count=8)}
    dr.play_tasks(
        [
            {
                "name": "uploads backup",
                "clinic.backup.files_backup": {
                    "name": "uploads",
                    "paths": [str(uploads)],
                    "repository": str(files_repo),
                    "passphrase_file": dr.base_vars["clinic_backup_passphrase_file"],
                },
            }
        ]
    ).assert_ok()
    restored = tmp_path / "new-server" / "uploads"
    restored.parent.mkdir()
    extra = dr.vars(
        **on_server(clean_server),
        clinic_backup_app_roles=[
            {"name": dr.base_vars["clinic_backup_login_user"], "password": password}
        ],
        # No clinic_backup_restore_file_groups: a server failure restores every group.
        clinic_backup_file_groups=[
            {"name": "uploads", "repository": str(files_repo), "target_dir": str(restored)},
            live_config.group(),
        ],
    )
    reloads = live_config.drift("drifted site")
    vars_file = write_private(tmp_path / "vars.json", json.dumps(extra))
    log = tmp_path / "ansible.log"
    # The operator's view: the default callback at -vvv, and Ansible's own log file.
    proc = subprocess.run(
        [
            str(venv_bin() / "ansible-playbook"),
            "-i",
            str(INVENTORY),
            str(PLAYBOOKS / "dr_server_failure.yml"),
            "-e",
            "@" + str(vars_file),
            "-vvv",
        ],
        env=dict(dr.env, ANSIBLE_LOG_PATH=str(log)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Database clinic_db created from set %s (s3://" % dr.set_id in output
    assert table_fingerprints(clean_server, "clinic_db") == pg_fingerprints
    assert {
        p.relative_to(restored): p.read_bytes() for p in restored.rglob("*") if p.is_file()
    } == (originals)
    assert "File groups restored: uploads" in output
    assert "Configuration put back in place: config; reloaded: %s" % " ".join(
        live_config.web.reload_argv
    ) in " ".join(output.split())
    live_config.assert_restored()
    assert live_config.web.reloads() == reloads + 1
    user = dr.base_vars["clinic_backup_login_user"]
    conn = psycopg2.connect(
        host=clean_server.host,
        port=clean_server.port,
        user=user,
        password=password,
        dbname="clinic_db",
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM patients")
            assert cur.fetchone()[0] == pg_fingerprints["patients"]["rows"]
    finally:
        conn.close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(
            host=clean_server.host,
            port=clean_server.port,
            user=user,
            password="wrong",
            dbname="clinic_db",
        ).close()
    server_log = Path(clean_server.log_file).read_text()
    # The cluster logs every statement: the ALTER ROLE is there, carrying a verifier only.
    assert "PASSWORD 'SCRAM-SHA-256$4096:" in server_log
    for where, text in (
        ("ansible-playbook -vvv output", output),
        ("ansible log", log.read_text()),
        ("server log", server_log),
    ):
        assert password not in text, where
        assert password.replace("'", "''") not in text, where
        for secret in FAKE_SECRETS.values():  # the restored .env's contents
            assert secret not in text, where


def test_server_failure_runs_again_with_mode_replace(dr, pg_fingerprints, clean_server):
    """A second run after success fails saying how to go on; following that works and
    keeps the first run's database aside."""
    target = fresh_name("rerun")
    overrides = dict(on_server(clean_server), clinic_backup_restore_target=target)
    try:
        dr.play("dr_server_failure.yml", **overrides).assert_ok()
        again = dr.play("dr_server_failure.yml", **overrides)
        assert again.rc != 0
        hint = again.result("Say how to run the restore again")["msg"]
        assert "already exists" in hint and "-e clinic_backup_restore_mode=replace" in hint
        third = dr.play(
            "dr_server_failure.yml", **overrides, clinic_backup_restore_mode="replace"
        ).assert_ok()
        restore = third.result(SERVER_RESTORE)
        assert restore["previous_database"].startswith(target + "__pre_restore_")
        assert table_fingerprints(clean_server, target) == pg_fingerprints
        assert "replaced from set" in messages(third, "Report the recovery")
    finally:
        drop_like(clean_server, target)


# ---------------------------------------------------------------- scenario 3: ransomware
@pytest.fixture(scope="module")
def two_sets(dr, pg) -> tuple[str, str, str, str]:
    """A repository with two sets of clinic_db, only the older one verified:
    (repository, older, newer, a moment between them)."""
    repo = str(dr.work / "repo-ransomware")
    connection = {
        "database": pg.clinic_db,
        "login_host": pg.host,
        "login_port": pg.port,
        "login_user": pg.clinic_user,
        "login_password": pg.clinic_password,
        "passphrase_file": dr.base_vars["clinic_backup_passphrase_file"],
        "repository": repo,
    }
    tasks = [
        {"name": "older", "clinic.backup.pg_dump": connection, "register": "older"},
        {
            "name": "verify",
            "clinic.backup.backup_verify": {
                "repository": repo,
                "set_id": "{{ older.set_id }}",
                "passphrase_file": connection["passphrase_file"],
            },
        },
        {"name": "newer", "clinic.backup.pg_dump": connection},
    ]
    run = run_playbook(work_play(dr, tasks), dr.env).assert_ok()
    older, newer = run.result("older")["set_id"], run.result("newer")["set_id"]
    between = helpers.manifest(repo, newer)["started_at"]
    assert helpers.manifest(repo, older)["finished_at"] < between
    return repo, older, newer, between


def test_ransomware_restores_the_verified_set_from_before_the_intrusion(
    dr, pg_fingerprints, clean_server, live_config, two_sets
):
    repo, older, newer, clean_before = two_sets
    target = fresh_name("clinic_db_clean")
    password = "Rotated'" + secrets.token_urlsafe(16)
    assert helpers.manifest(live_config.repo, live_config.set_id)["finished_at"] < clean_before
    # The intruder's configuration, backed up (and verified) after the intrusion: never used.
    reloads = live_config.drift("intruder site")
    intruder = (
        dr.play_tasks(
            [
                {
                    "name": "intruder config",
                    "clinic.backup.files_backup": {
                        "name": "config",
                        "paths": [str(live_config.web.site), str(live_config.env_file)],
                        "repository": str(live_config.repo),
                        "passphrase_file": dr.base_vars["clinic_backup_passphrase_file"],
                    },
                },
                {
                    "name": "verify",
                    "clinic.backup.backup_verify": {
                        "repository": str(live_config.repo),
                        "passphrase_file": dr.base_vars["clinic_backup_passphrase_file"],
                    },
                },
            ]
        )
        .assert_ok()
        .result("intruder config")["set_id"]
    )
    # "Change all credentials" includes the backup passphrase: rotated on a copy of the
    # shared passphrase file (the other tests keep theirs), the old one kept in a keyring.
    old_passphrase = Path(str(dr.base_vars["clinic_backup_passphrase_file"])).read_bytes()
    rotated_file = write_private(dr.work / ("passphrase-%s" % secrets.token_hex(3)), old_passphrase)
    keyring = dr.work / ("keyring-%s" % secrets.token_hex(3))
    new_passphrase = "2027 " + secrets.token_urlsafe(32)
    try:
        run = dr.play(
            "dr_ransomware.yml",
            **on_server(clean_server),
            clinic_backup_restore_source="local",
            clinic_backup_repository=repo,
            clinic_backup_clean_before=clean_before,
            clinic_backup_restore_target=target,
            clinic_backup_app_roles=[
                {"name": dr.base_vars["clinic_backup_login_user"], "password": password}
            ],
            clinic_backup_file_groups=[live_config.group()],
            clinic_backup_restore_file_groups=["config"],
            clinic_backup_passphrase_file=str(rotated_file),
            clinic_backup_passphrase_keyring_dir=str(keyring),
            clinic_backup_rotate_passphrase=True,
            clinic_backup_new_passphrase=new_passphrase,
        ).assert_ok()
        [placed] = placed_groups(run)
        assert placed["set_id"] == live_config.set_id
        assert intruder in [p["set_id"] for p in placed["passed_over"]]
        live_config.assert_restored()
        assert live_config.web.reloads() == reloads + 1
        assert rotated_file.read_text() == new_passphrase + "\n"
        (kept,) = keyring.iterdir()
        assert kept.read_bytes() == old_passphrase
        assert stat.S_IMODE(kept.stat().st_mode) == 0o400
        assert stat.S_IMODE(keyring.stat().st_mode) == 0o700
        output = json.dumps(run.results) + run.stdout + run.stderr
        assert new_passphrase not in output
        assert old_passphrase.rstrip(b"\n").decode() not in output
        restore = run.result(CLEAN_RESTORE)
        assert restore["set_id"] == older
        assert newer in [p["set_id"] for p in restore["passed_over"]]
        assert restore["globals"]["applied"] is True
        assert table_fingerprints(clean_server, target) == pg_fingerprints
        conn = psycopg2.connect(
            host=clean_server.host,
            port=clean_server.port,
            user=dr.base_vars["clinic_backup_login_user"],
            password=password,
            dbname=target,
        )
        conn.close()
        assert password not in json.dumps(run.results) + run.stdout + run.stderr
        checklist = messages(run, "Print what this playbook cannot do")
        for words in (
            "isolated",
            "S3 / IAM",
            "[x] Backup passphrase rotated: new sets use key",
            "kept as %s" % kept,
            "KEEP the old",
            "audit",
        ):
            assert words in checklist
    finally:
        clean_server.drop_database(target)


def test_backup_playbook_verifies_the_s3_copy_so_a_ransomware_restore_from_s3_works(
    dr, pg_fingerprints, clean_server
):
    """backup.yml alone (no separate verify run) must leave the S3 copy verified: the
    ransomware playbook restores from S3 and takes only verified sets."""
    target = fresh_name("clinic_db_s3")
    clean_before = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        run = dr.play(
            "dr_ransomware.yml",
            **on_server(clean_server),
            clinic_backup_clean_before=clean_before,
            clinic_backup_restore_target=target,
        ).assert_ok()
        restore = run.result(CLEAN_RESTORE)
        assert restore["set_id"] == dr.set_id
        assert table_fingerprints(clean_server, target) == pg_fingerprints
    finally:
        clean_server.drop_database(target)


def test_ransomware_restores_from_s3_after_a_history_made_only_by_the_cron_agent(
    dr, pg, s3, collections_path, pg_fingerprints, clean_server
):
    """What cron runs (the agent's backup, then its weekly verify), nothing else: the
    S3 copy must be verified where it is, so the ransomware playbook takes it."""
    bucket = "clinic-cron-" + secrets.token_hex(4)
    s3.create_bucket(bucket)
    target_s3 = {"bucket": bucket, "prefix": "db/cron", "endpoint_url": s3.endpoint_url}
    config = agent_config(
        dr.work,
        pg,
        pg.clinic_db,
        dr.base_vars["clinic_backup_passphrase_file"],
        repository=str(dr.work / ("cron-repo-" + secrets.token_hex(3))),
        s3_targets=[target_s3],
    )
    env = dict(dr.env, PYTHONPATH=collections_path)
    for command in ("backup", "verify"):
        proc = subprocess.run(
            [sys.executable, "-m", AGENT, command, "--config", config],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if command == "backup":
            set_id = json.loads(proc.stdout)["set_id"]
        else:
            copies = json.loads(proc.stdout)["repositories"]
            assert [c["state"] for c in copies] == ["ok", "ok"]
            assert copies[1]["repository"].startswith("s3://" + bucket)
    target = fresh_name("clinic_db_cron")
    clean_before = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        run = dr.play(
            "dr_ransomware.yml",
            **on_server(clean_server),
            clinic_backup_s3_targets=[target_s3],
            clinic_backup_clean_before=clean_before,
            clinic_backup_restore_target=target,
        ).assert_ok()
        assert run.result(CLEAN_RESTORE)["set_id"] == set_id
        assert table_fingerprints(clean_server, target) == pg_fingerprints
    finally:
        clean_server.drop_database(target)


@pytest.mark.parametrize("clean_before", [None, "2026-11-29 22:00"], ids=["missing", "no-zone"])
def test_ransomware_refuses_without_a_clean_moment_and_changes_nothing(
    dr, clean_server, two_sets, clean_before
):
    repo = two_sets[0]
    before = databases(clean_server)
    overrides = dict(
        on_server(clean_server), clinic_backup_restore_source="local", clinic_backup_repository=repo
    )
    if clean_before is not None:
        overrides["clinic_backup_clean_before"] = clean_before
    run = dr.play("dr_ransomware.yml", **overrides)
    assert run.rc != 0
    refused = run.result("Refuse to run without the last moment known to be clean")
    assert refused["_status"] == "failed"
    assert "REFUSING TO RESTORE: set clinic_backup_clean_before" in refused["msg"]
    assert "Nothing was changed" in refused["msg"]
    assert run.task_results(CLEAN_RESTORE) == []
    assert databases(clean_server) == before
