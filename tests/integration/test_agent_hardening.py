"""Issue #10 (hostile security pass), the host agent's side, with real agent processes,
real flock, real files and a real tmpfs:

2.  two databases on one repository at one cron minute: the second run waits for the
    lock (--lock-wait / lock_wait); a run still skipped exits 75 but leaves an audit
    record (outcome skipped) and skipped-run metrics;
7.  a database_url-only config's metrics carry the database of the URL, not "unknown";
14. a --metrics-dir that is a file, a full disk under the audit log and the metrics, and
    nested config values of the wrong type end in a JSON result and a clear error, never
    in a traceback;
15. a config that holds a secret must not be readable by others; a FIFO is no config.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testbed.files import write_private

from ansible_collections.clinic.backup.plugins.module_utils.locking import RunLock
from ansible_collections.clinic.backup.plugins.module_utils.metrics import read_previous
from tests.faults import faultlib
from tests.integration import helpers
from tests.integration.test_interrupted import AGENT, agent_config

pytestmark = pytest.mark.integration

SECOND_DB = "hardening_db"


def start(collections_path: str, config: str, *extra: str, command: str = "backup"):
    """The agent as cron starts it, with extra command-line arguments."""
    argv = [sys.executable, "-m", AGENT, command, "--config", str(config), *extra]
    env = dict(os.environ, PYTHONPATH=collections_path)
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )


def run(collections_path: str, config: str, *extra: str, command: str = "backup", timeout=240):
    return faultlib.finish(start(collections_path, config, *extra, command=command), timeout)


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def no_traceback(result) -> None:
    assert "Traceback" not in result.stderr, result.text()
    assert result.doc, "no JSON result on stdout:\n" + result.text()


@pytest.fixture
def second_db(pg) -> Iterator[str]:
    pg.create_database(SECOND_DB, owner=pg.clinic_user)
    try:
        pg.psql(
            "SET ROLE %s; CREATE TABLE notes (id int PRIMARY KEY, body text);"
            "INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 500) g;"
            % pg.clinic_user,
            dbname=SECOND_DB,
        )
        yield SECOND_DB
    finally:
        pg.drop_database(SECOND_DB)


# ------------------------------------------------------------------ 2: queue, or say so
def test_two_databases_on_one_repository_at_one_minute_both_get_backed_up(
    collections_path, pg, second_db, passphrase_file, repo_dir, tmp_path
):
    """The backup_agent role's cron: same repository, same minute, lock_wait 1800."""
    audit = tmp_path / "audit.log"
    metrics_dir = tmp_path / "metrics"
    configs = [
        agent_config(
            tmp_path,
            pg,
            database,
            passphrase_file,
            repository=repo_dir,
            audit_log=str(audit),
            lock_wait=1800,
        )
        for database in (pg.clinic_db, second_db)
    ]
    procs = [start(collections_path, c, "--metrics-dir", str(metrics_dir)) for c in configs]
    results = [faultlib.finish(p, timeout=300) for p in procs]
    for result in results:
        assert result.rc == 0, result.text()
        # Progress for the job's log (stderr), in human units; the result says per phase.
        dump = result.doc["artifacts"][0]["file"]
        assert re.search(r"%s done: [\d.]+ (B|KiB|MiB) in " % re.escape(dump), result.stderr)
        phases = result.doc["phases"]
        assert set(phases) == {
            "preflight_seconds",
            "lock_seconds",
            "stream_seconds",
            "commit_seconds",
        }
        assert dump in phases["stream_seconds"] and phases["commit_seconds"] >= 0
        assert result.doc["summary"].startswith("backup set %s - " % result.doc["set_id"])
    assert sorted(helpers.local_sets(repo_dir)) == sorted(r.doc["set_id"] for r in results)
    assert sorted((r["database"], r["outcome"]) for r in audit_lines(audit)) == sorted(
        [(pg.clinic_db, "ok"), (second_db, "ok")]
    )
    for database in (pg.clinic_db, second_db):
        values = faultlib.read_metrics(metrics_dir, database)
        assert values["clinic_backup_last_status"] == 0.0


@pytest.mark.parametrize("how", ["--lock-wait", "config lock_wait"])
def test_a_run_waits_for_the_lock_and_then_backs_up(
    collections_path, pg, passphrase_file, repo_dir, tmp_path, how
):
    extra = {"lock_wait": 120} if how == "config lock_wait" else {}
    config = agent_config(tmp_path, pg, pg.clinic_db, passphrase_file, repository=repo_dir, **extra)
    args = ("--lock-wait", "120") if how == "--lock-wait" else ()
    with RunLock(str(repo_dir / ".lock")):
        proc = start(collections_path, config, *args)
        time.sleep(3)
        waiting = proc.poll() is None
    result = faultlib.finish(proc, timeout=300)
    assert waiting, "the run did not wait for the lock:\n" + result.text()
    assert result.rc == 0, result.text()
    assert "waiting up to 120 seconds" in result.stderr
    assert helpers.local_sets(repo_dir) == [result.doc["set_id"]]


@pytest.mark.parametrize("wait", [None, "1"], ids=["no-wait", "wait-1s"])
def test_a_skipped_run_exits_75_and_leaves_an_audit_record_and_metrics(
    collections_path, pg, passphrase_file, repo_dir, tmp_path, wait
):
    audit = tmp_path / "audit.log"
    metrics_dir = tmp_path / "metrics"
    config = agent_config(
        tmp_path, pg, pg.clinic_db, passphrase_file, repository=repo_dir, audit_log=str(audit)
    )
    args = ["--metrics-dir", str(metrics_dir)] + (["--lock-wait", wait] if wait else [])
    with RunLock(str(repo_dir / ".lock")):
        first = run(collections_path, config, *args, timeout=120)
        second = run(collections_path, config, *args, timeout=120)
    for result in (first, second):
        assert result.rc == 75, result.text()
        assert "already running" in result.msg and result.doc["ok"] is False
        no_traceback(result)
    if wait:
        assert "gave up after waiting 1 seconds" in first.msg
    records = audit_lines(audit)
    assert [(r["action"], r["outcome"], r["database"]) for r in records] == [
        ("backup", "skipped", pg.clinic_db)
    ] * 2
    assert records[0]["error_type"] == "LockedError" and "already running" in records[0]["detail"]
    assert records[0]["repositories"] == [str(repo_dir)]
    skipped = read_previous(
        str(metrics_dir / ("clinic_backup_skipped_backup.%s.prom" % pg.clinic_db))
    )
    assert skipped["clinic_backup_skipped_total"] == 2.0
    assert skipped["clinic_backup_last_skipped_timestamp_seconds"] > time.time() - 300
    # The lock holder's own metrics file is not the skipped run's to write.
    assert faultlib.read_metrics(metrics_dir, pg.clinic_db) == {}
    assert helpers.local_sets(repo_dir) == []


@pytest.mark.parametrize("value", ["-5", "soon"])
def test_a_bad_lock_wait_is_refused(collections_path, repo_dir, tmp_path, value):
    config = faultlib.write_config(tmp_path / "c.json", {"repository": str(repo_dir)})
    result = run(collections_path, config, "--lock-wait", value, command="list")
    assert result.rc == 2 and "--lock-wait" in result.stderr, result.text()


# ------------------------------------------------------- 7: the database of the URL
def test_a_database_url_only_config_labels_its_metrics_with_the_urls_database(
    collections_path, pg, passphrase_file, repo_dir, tmp_path
):
    metrics_dir = tmp_path / "metrics"
    audit = tmp_path / "audit.log"
    config = faultlib.write_config(
        tmp_path / "url.json",
        {
            "database_url": pg.url(pg.clinic_user, pg.clinic_password, pg.clinic_db),
            "passphrase_file": str(passphrase_file),
            "repository": str(repo_dir),
            "audit_log": str(audit),
        },
    )
    backup = run(collections_path, config, "--metrics-dir", str(metrics_dir))
    assert backup.rc == 0, backup.text()
    names = sorted(p.name for p in metrics_dir.iterdir())
    assert names == ["clinic_backup_backup.%s.prom" % pg.clinic_db], names
    text = (metrics_dir / names[0]).read_text()
    assert 'database="%s"' % pg.clinic_db in text and "unknown" not in text
    assert pg.clinic_password not in text
    # A failing run is labelled the same way (not "unknown").
    broken = faultlib.write_config(
        tmp_path / "url-missing-repo.json",
        {
            "database_url": pg.url(pg.clinic_user, pg.clinic_password, "records_db"),
            "repository": str(tmp_path / "no-such-repo"),
        },
    )
    failed = run(collections_path, broken, "--metrics-dir", str(metrics_dir), command="verify")
    assert failed.rc in (1, 2), failed.text()
    assert (
        faultlib.read_metrics(metrics_dir, "records_db", job="verify")["clinic_backup_last_status"]
        == 1.0
    )
    assert not list(metrics_dir.glob("*unknown*"))


# ------------------------------------------------------------ 14: no tracebacks
def test_a_metrics_dir_that_is_a_file_fails_clearly_after_a_good_backup(
    collections_path, pg, passphrase_file, repo_dir, tmp_path
):
    not_a_dir = tmp_path / "metrics"
    not_a_dir.write_text("")
    config = agent_config(tmp_path, pg, pg.clinic_db, passphrase_file, repository=repo_dir)
    result = run(collections_path, config, "--metrics-dir", str(not_a_dir))
    no_traceback(result)
    assert result.rc == 1, result.text()
    assert "metrics directory %s is not a directory" % not_a_dir in result.msg
    assert helpers.local_sets(repo_dir) == [result.doc["set_id"]]


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs, filled up (as in tests/faults/test_disk_full.py, needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "full"
    mount_point.mkdir(mode=0o700)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % proc.stderr.strip())
    try:
        (mount_point / "audit").mkdir(mode=0o700)
        (mount_point / "metrics").mkdir()
        with open(mount_point / "filler", "wb") as filler:
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError:
                pass
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_under_audit_log_and_metrics_still_prints_the_result(
    collections_path, pg, passphrase_file, repo_dir, tmp_path, full_tmpfs
):
    audit = full_tmpfs / "audit" / "audit.log"
    config = agent_config(
        tmp_path, pg, pg.clinic_db, passphrase_file, repository=repo_dir, audit_log=str(audit)
    )
    result = run(collections_path, config, "--metrics-dir", str(full_tmpfs / "metrics"))
    no_traceback(result)
    assert result.rc == 1, result.text()
    assert "audit record could not be written" in result.msg
    assert any("metrics could not be written" in w for w in result.doc["warnings"]), result.text()
    assert any("No space left on device" in w for w in result.doc["warnings"]), result.text()
    # The backup itself succeeded and the result says which set it took.
    assert helpers.local_sets(repo_dir) == [result.doc["set_id"]]


BAD_CONFIGS = {
    "database as a list": ({"database": ["clinic_db"]}, "backup", "database"),
    "login_host as a number": ({"login_host": 5}, "backup", "login_host"),
    "encrypt as text": ({"encrypt": "false"}, "backup", "encrypt"),
    "tables with a number": ({"tables": ["public.visits", 5]}, "backup", "tables[1]"),
    "audit_log as a number": ({"audit_log": 5}, "backup", "audit_log"),
    "verify not an object": ({"verify": "yes"}, "verify", "verify"),
    "verify.max_age_hours as text": (
        {"verify": {"max_age_hours": "25"}},
        "verify",
        "max_age_hours",
    ),
    "verify.deep as text": ({"verify": {"deep": "no"}}, "verify", "verify.deep"),
    "verify with a typo": ({"verify": {"max_age_hour": 25}}, "verify", "max_age_hour"),
    "restore_test.jobs as text": ({"restore_test": {"jobs": "four"}}, "restore-test", "jobs"),
    "restore_test.require_verified as text": (
        {"restore_test": {"require_verified": "yes"}},
        "restore-test",
        "require_verified",
    ),
    "retention.keep_daily as text": ({"retention": {"keep_daily": "7"}}, "retention", "keep_daily"),
    "s3 target prefix as a number": (
        {"s3_targets": [{"bucket": "b", "prefix": 5}]},
        "backup",
        "s3_targets[0].prefix",
    ),
    "s3 target with a typo": (
        {"s3_targets": [{"bucket": "b", "endpoint": "http://127.0.0.1:9"}]},
        "backup",
        "endpoint",
    ),
    "lock_wait as text": ({"lock_wait": "soon"}, "backup", "lock_wait"),
    "lock_wait negative": ({"lock_wait": -1}, "backup", "lock_wait"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_nested_values_of_the_wrong_type_are_a_config_error(
    collections_path, passphrase_file, repo_dir, tmp_path, name
):
    extra, command, key = BAD_CONFIGS[name]
    config = {
        "database": "clinic_db",
        "login_host": "127.0.0.1",
        "login_port": 1,
        "passphrase_file": str(passphrase_file),
        "repository": str(repo_dir),
    }
    config.update(extra)
    path = faultlib.write_config(tmp_path / "bad.json", config)
    metrics_dir = tmp_path / "metrics"
    result = run(collections_path, path, "--metrics-dir", str(metrics_dir), command=command)
    no_traceback(result)
    assert result.rc == 2, result.text()
    assert result.doc["error_type"] == "ConfigError" and key in result.msg, result.msg
    assert helpers.local_sets(repo_dir) == []


# ------------------------------------------- 15: secrets in a readable config, FIFOs
SECRETS = {
    "login_password": {"login_password": "s3cret-pw"},
    "aws_secret_key": {"aws_access_key": "AKIAEXAMPLE", "aws_secret_key": "s3cret-key"},
    "aws_session_token": {"aws_session_token": "s3cret-token"},
    "restore_test.login_password": {"restore_test": {"login_password": "s3cret-pw"}},
    "database_url": {"database_url": "postgresql://u:s3cret-pw@127.0.0.1:1/clinic_db"},
}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
@pytest.mark.parametrize("secret", list(SECRETS))
def test_a_config_with_a_secret_readable_by_others_is_refused(
    collections_path, repo_dir, tmp_path, secret, mode
):
    config = dict({"database": "clinic_db", "repository": str(repo_dir)}, **SECRETS[secret])
    path = write_private(tmp_path / "loose.json", json.dumps(config), mode=mode)
    result = run(collections_path, str(path), command="list")
    no_traceback(result)
    assert result.rc == 2, result.text()
    assert secret in result.msg and "chmod 0600 %s" % path in result.msg, result.msg
    assert "s3cret" not in result.stdout + result.stderr


def test_a_readable_config_without_secrets_is_accepted(collections_path, repo_dir, tmp_path):
    config = {"database": "clinic_db", "repository": str(repo_dir), "passfile": "/root/.pgpass"}
    path = write_private(tmp_path / "open.json", json.dumps(config), mode=0o644)
    result = run(collections_path, str(path), command="list")
    assert result.rc == 0, result.text()


def test_a_fifo_as_config_is_refused_not_waited_on(collections_path, tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo, 0o600)
    result = run(collections_path, str(fifo), command="list", timeout=30)
    no_traceback(result)
    assert result.rc == 2, result.text()
    assert "is not a regular file" in result.msg
