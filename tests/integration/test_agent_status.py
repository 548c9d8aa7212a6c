"""``clinic-backup status``: after the agent's own backup, verify and restore test (local +
S3), the table shows the set, both copies verified, the restore test's RTO/RPO, and
what is overdue when the thresholds are tiny."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.faults import faultlib
from tests.integration.test_interrupted import AGENT, agent_config

pytestmark = pytest.mark.integration


def status(collections_path, *args, env=None):
    argv = [sys.executable, "-m", AGENT, "status", *[str(a) for a in args]]
    full_env = dict(os.environ, PYTHONPATH=collections_path, **(env or {}))
    return subprocess.run(
        argv, env=full_env, capture_output=True, text=True, timeout=120, check=False
    )


def test_status_after_backup_verify_and_restore_test(
    collections_path, pg, s3, bucket, passphrase_file, repo_dir, tmp_path
):
    metrics_dir = tmp_path / "metrics"
    audit = tmp_path / "audit" / "audit.log"
    configs = tmp_path / "etc"
    configs.mkdir()
    target = {"bucket": bucket, "prefix": "db/main", "endpoint_url": s3.endpoint_url}
    config = agent_config(
        configs,
        pg,
        pg.clinic_db,
        passphrase_file,
        repository=str(repo_dir),
        s3_targets=[target],
        audit_log=str(audit),
        restore_test={"login_user": pg.superuser, "login_password": None},
    )
    for command in ("backup", "verify", "restore-test"):
        run = faultlib.run_agent(
            collections_path, config, command=command, env=s3.env(), metrics_dir=metrics_dir
        )
        assert run.rc == 0, run.text()
        if command == "backup":
            set_id = run.doc["set_id"]
        if command == "restore-test":
            rehearsal = run.doc

    shown = status(
        collections_path, "--config-dir", configs, "--metrics-dir", metrics_dir, env=s3.env()
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    text = shown.stdout
    assert "%s (database)" % pg.clinic_db in text
    assert set_id in text
    row = next(line for line in text.splitlines() if line.startswith(set_id))
    assert row.count("verified") == 2, text  # the local and the S3 copy
    assert "MiB" in row or "KiB" in row
    assert "last restore test: ok" in text and "RTO " in text and "RPO " in text
    assert "overdue: nothing" in text
    assert "NOT AUTHENTICATED" not in text

    as_json = status(
        collections_path, "--config", config, "--metrics-dir", metrics_dir, "--json", env=s3.env()
    )
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    report = json.loads(as_json.stdout)
    (group,) = report["groups"]
    (listed,) = group["sets"]
    assert listed["id"] == set_id
    assert [(c["where"], c["verification"], c["authentication"]) for c in listed["copies"]] == [
        ("local", "ok", "ok"),
        ("s3", "ok", "ok"),
    ]
    last = group["restore_test"]
    assert last["ok"] is True and last["set_id"] == set_id
    # The set's own sealed restore_test.json is a source too.
    assert sorted(last["sources"]) == ["audit log", "catalog", "metrics"]
    assert last["rto_seconds"] >= rehearsal["duration_seconds"] > 0
    assert abs(last["rpo_seconds"] - rehearsal["rpo_seconds"]) < 60
    assert group["overdue"] == [] and report["overdue"] is False

    # Tiny thresholds: everything is overdue, and the table says so.
    tiny = status(
        collections_path,
        "--config",
        config,
        "--metrics-dir",
        metrics_dir,
        "--backup-max-age-hours",
        "0.00001",
        "--verify-max-age-days",
        "0.0000001",
        "--restore-test-max-age-days",
        "0.0000001",
        env=s3.env(),
    )
    assert tiny.returncode == 0, tiny.stdout + tiny.stderr
    assert "OVERDUE: no backup in" in tiny.stdout
    assert tiny.stdout.count("OVERDUE: no verify in") == 2
    assert "OVERDUE: no restore test in" in tiny.stdout

    # status only reads (each read on record: who looked at the backups), no metrics file.
    assert [json.loads(line)["action"] for line in audit.read_text().splitlines()] == [
        "backup",
        "verify",
        "restore_test",
        "read",
        "read",
        "read",
    ]
    assert sorted(p.name.split(".")[0] for p in metrics_dir.iterdir()) == [
        "clinic_backup_backup",
        "clinic_backup_restore_test",
        "clinic_backup_verify",
    ]


def test_status_without_passphrase_and_with_a_missing_repository(
    collections_path, pg, passphrase_file, repo_dir, tmp_path
):
    config = agent_config(tmp_path, pg, pg.clinic_db, passphrase_file, repository=str(repo_dir))
    assert faultlib.run_agent(collections_path, config).rc == 0
    unkeyed = faultlib.write_config(
        tmp_path / "unkeyed.json",
        {"database": pg.clinic_db, "repository": str(repo_dir)},
    )
    missing = faultlib.write_config(
        tmp_path / "missing.json",
        {"database": "billing", "repository": str(tmp_path / "nas" / "not-mounted")},
    )
    shown = status(collections_path, "--config", unkeyed, "--config", missing)
    assert shown.returncode == 1, shown.stdout + shown.stderr
    assert "unverified, NOT AUTHENTICATED" in shown.stdout
    assert "records NOT AUTHENTICATED: the config has no passphrase_file" in shown.stdout
    assert "billing (database)" in shown.stdout
    assert "does not exist" in shown.stdout
    assert "last restore test: never" in shown.stdout

    bad = status(collections_path, "--config-dir", tmp_path / "nowhere")
    assert bad.returncode == 2
    assert "cannot list config directory" in json.loads(bad.stdout)["msg"]
    other = subprocess.run(
        [sys.executable, "-m", AGENT, "list", "--config", config, "--config", config],
        env=dict(os.environ, PYTHONPATH=collections_path),
        capture_output=True,
        text=True,
        check=False,
    )
    assert other.returncode == 2
    assert "needs exactly one --config" in other.stderr
