"""The host agent's monthly restore test (``restore-test``): a rehearsal of the newest
set on the database server, with its outcome, RTO and RPO in the textfile metrics."""

from __future__ import annotations

import json

import pytest

from tests.faults import faultlib
from tests.integration.test_interrupted import agent_config

pytestmark = pytest.mark.integration


def test_restore_test_rehearses_newest_set_and_writes_metrics(
    collections_path, pg, passphrase_file, repo_dir, tmp_path
):
    metrics_dir = tmp_path / "metrics"
    audit = tmp_path / "audit.log"
    config = agent_config(
        tmp_path,
        pg,
        pg.clinic_db,
        passphrase_file,
        repository=str(repo_dir),
        restore_test={"login_user": pg.superuser, "login_password": None},
        audit_log=str(audit),
    )
    backup = faultlib.run_agent(collections_path, config, metrics_dir=metrics_dir)
    assert backup.rc == 0, backup.text()
    rehearsal = faultlib.run_agent(
        collections_path, config, command="restore-test", metrics_dir=metrics_dir
    )
    assert rehearsal.rc == 0, rehearsal.text()
    assert rehearsal.doc["set_id"] == backup.doc["set_id"]
    assert rehearsal.doc["mode"] == "rehearse"
    assert all(r["restored"] == r["expected"] for r in rehearsal.doc["row_counts"])
    metrics = faultlib.read_metrics(metrics_dir, pg.clinic_db, job="restore_test")
    assert metrics["clinic_backup_last_status"] == 0.0
    assert 0 <= metrics["clinic_backup_restore_test_rpo_seconds"] < 600
    assert metrics["clinic_backup_last_duration_seconds"] > 0
    assert pg.clinic_db + "_restore_test" not in pg.psql("SELECT datname FROM pg_database")
    # The evidence a review asks for: the measured RTO and RPO are in the audit record.
    record = json.loads(audit.read_text().splitlines()[-1])
    assert record["action"] == "restore_test" and record["outcome"] == "ok"
    assert record["duration_seconds"] == rehearsal.doc["duration_seconds"]
    assert record["rpo_seconds"] == rehearsal.doc["rpo_seconds"]


def test_restore_test_as_a_role_without_createdb_is_a_config_error(
    collections_path, pg, passphrase_file, repo_dir, tmp_path
):
    metrics_dir = tmp_path / "metrics"
    config = agent_config(tmp_path, pg, pg.clinic_db, passphrase_file, repository=str(repo_dir))
    assert faultlib.run_agent(collections_path, config).rc == 0
    rehearsal = faultlib.run_agent(
        collections_path, config, command="restore-test", metrics_dir=metrics_dir
    )
    assert rehearsal.rc == 2, rehearsal.text()
    assert "may not create databases" in rehearsal.msg
    metrics = faultlib.read_metrics(metrics_dir, pg.clinic_db, job="restore_test")
    assert metrics["clinic_backup_last_status"] == 1.0


def test_restore_test_rejects_unknown_keys(collections_path, pg, passphrase_file, tmp_path):
    config = agent_config(
        tmp_path,
        pg,
        pg.clinic_db,
        passphrase_file,
        repository=str(tmp_path),
        restore_test={"target_databse": "typo"},
    )
    result = faultlib.run_agent(collections_path, config, command="restore-test")
    assert result.rc == 2
    assert "restore_test has unknown key(s): target_databse" in result.msg
    json.dumps(result.doc)
