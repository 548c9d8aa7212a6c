"""The host agent's retention and file-group commands, and the audit log every command
appends to."""

from __future__ import annotations

import json
import os

import pytest
from testbed.ansible import run_playbook
from testbed.dataset import make_uploads

from ansible_collections.clinic.backup.plugins.module_utils.audit import verify_chain
from tests.faults import faultlib
from tests.integration import helpers
from tests.integration.test_interrupted import agent_config

pytestmark = pytest.mark.integration


def audit_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_backups_and_retention_are_audited_and_prune_to_policy(
    collections_path, pg, passphrase_file, repo_dir, tmp_path
):
    audit = tmp_path / "audit" / "audit.log"
    config = agent_config(
        tmp_path,
        pg,
        pg.clinic_db,
        passphrase_file,
        repository=str(repo_dir),
        audit_log=str(audit),
        retention={
            "keep_daily": 1,
            "keep_weekly": 0,
            "keep_monthly": 0,
            "keep_yearly": 0,
            "min_keep": 2,
        },
    )
    ids = []
    for _round in range(4):
        result = faultlib.run_agent(collections_path, config)
        assert result.rc == 0, result.text()
        ids.append(result.doc["set_id"])
    pruned = faultlib.run_agent(collections_path, config, command="retention")
    assert pruned.rc == 0, pruned.text()
    assert sorted(pruned.doc["deleted"]) == sorted(ids[:2])
    assert helpers.local_sets(repo_dir) == sorted(ids[2:])
    lines = audit_lines(audit)
    assert [(r["action"], r["outcome"]) for r in lines] == [("backup", "ok")] * 4 + [
        ("retention", "ok")
    ]
    assert [r["set_id"] for r in lines[:4]] == ids
    assert sorted(lines[4]["deleted"]) == sorted(ids[:2])
    assert all(r["repositories"] == [str(repo_dir)] for r in lines)
    assert verify_chain(str(audit)) == (True, None)
    assert audit.stat().st_mode & 0o777 == 0o600
    text = audit.read_text()
    assert pg.clinic_password not in text
    assert passphrase_file.read_text().strip() not in text


def test_retention_refuses_a_policy_that_keeps_nothing(
    collections_path, pg, passphrase_file, repo_dir, tmp_path
):
    audit = tmp_path / "audit.log"
    base = {"repository": str(repo_dir), "audit_log": str(audit)}
    config = agent_config(tmp_path, pg, pg.clinic_db, passphrase_file, **base)
    assert faultlib.run_agent(collections_path, config).rc == 0
    before = faultlib.tree_digest(repo_dir)
    zero = agent_config(
        tmp_path,
        pg,
        pg.clinic_db,
        passphrase_file,
        retention={"keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0, "keep_yearly": 0},
        **base,
    )
    result = faultlib.run_agent(collections_path, zero, command="retention")
    assert result.rc == 2, result.text()
    assert "would delete every backup" in result.msg
    assert faultlib.tree_digest(repo_dir) == before
    assert audit_lines(audit)[-1]["outcome"] == "refused"


def test_an_unwritable_audit_log_fails_the_run_but_keeps_the_backup(
    collections_path, pg, passphrase_file, repo_dir, tmp_path
):
    audit = tmp_path / "loose.log"
    audit.write_text("")
    os.chmod(audit, 0o644)
    config = agent_config(
        tmp_path, pg, pg.clinic_db, passphrase_file, repository=str(repo_dir), audit_log=str(audit)
    )
    result = faultlib.run_agent(collections_path, config)
    assert result.rc == 1, result.text()
    assert "audit record could not be written" in result.msg
    assert result.doc["set_id"] in helpers.local_sets(repo_dir)


def test_modules_append_to_the_audit_log_except_in_check_mode(
    ansible_environ, pg, passphrase_file, repo_dir, tmp_path
):
    audit = tmp_path / "module-audit.log"
    args = {
        "database": pg.clinic_db,
        "login_host": pg.host,
        "login_port": pg.port,
        "login_user": pg.clinic_user,
        "login_password": pg.clinic_password,
        "passphrase_file": str(passphrase_file),
        "repository": str(repo_dir),
        "audit_log": str(audit),
    }
    verify = {k: args[k] for k in ("repository", "passphrase_file", "audit_log")}
    backup_task = {"name": "backup", "clinic.backup.pg_dump": args}
    verify_task = {"name": "verify", "clinic.backup.backup_verify": verify}

    def play(name, tasks):
        path = tmp_path / name
        path.write_text(json.dumps([{"hosts": "all", "gather_facts": False, "tasks": tasks}]))
        return path

    run_playbook(play("check.yml", [backup_task]), ansible_environ, check=True).assert_ok()
    assert not audit.exists()
    run_playbook(play("run.yml", [backup_task, verify_task]), ansible_environ).assert_ok()
    lines = audit_lines(audit)
    assert [(r["action"], r["outcome"]) for r in lines] == [("backup", "ok"), ("verify", "ok")]
    assert lines[0]["set_id"] == lines[1]["set_id"] == helpers.local_sets(repo_dir)[0]
    assert pg.clinic_password not in audit.read_text()


def test_agent_backs_up_and_rehearses_a_file_group(collections_path, passphrase_file, tmp_path):
    """The hourly uploads job and its restore test, from cron's side."""
    uploads = tmp_path / "uploads"
    files = make_uploads(uploads, count=12)
    repo = tmp_path / "files-repo"
    audit = tmp_path / "audit.log"
    metrics_dir = tmp_path / "metrics"
    config = faultlib.write_config(
        tmp_path / "uploads.json",
        {
            "name": "uploads",
            "paths": [str(uploads)],
            "repository": str(repo),
            "passphrase_file": str(passphrase_file),
            "audit_log": str(audit),
            "restore_test": {"target_dir": str(tmp_path / "rehearsal")},
        },
    )
    backup = faultlib.run_agent(
        collections_path, config, command="files-backup", metrics_dir=metrics_dir
    )
    assert backup.rc == 0, backup.text()
    rehearsal = faultlib.run_agent(
        collections_path, config, command="files-restore-test", metrics_dir=metrics_dir
    )
    assert rehearsal.rc == 0, rehearsal.text()
    assert rehearsal.doc["set_id"] == backup.doc["set_id"]
    assert not (tmp_path / "rehearsal").exists()
    manifest = helpers.manifest(repo, backup.doc["set_id"])
    assert manifest["kind"] == "files" and manifest["files"]["count"] == len(files)
    assert (
        faultlib.read_metrics(metrics_dir, "uploads", job="restore_test")[
            "clinic_backup_last_status"
        ]
        == 0.0
    )
    assert [(r["action"], r["outcome"]) for r in audit_lines(audit)] == [
        ("backup", "ok"),
        ("restore_test", "ok"),
    ]


def test_audit_verify_checks_the_chain_and_names_the_first_edited_line(
    collections_path, pg, passphrase_file, repo_dir, tmp_path
):
    audit = tmp_path / "audit" / "audit.log"
    config = agent_config(
        tmp_path, pg, pg.clinic_db, passphrase_file, repository=str(repo_dir), audit_log=str(audit)
    )
    for _run in range(2):
        assert faultlib.run_agent(collections_path, config).rc == 0
    before = audit.read_bytes()
    intact = faultlib.run_agent(collections_path, config, command="audit-verify")
    assert intact.rc == 0 and intact.doc["intact"] is True and intact.doc["lines"] == 2
    assert audit.read_bytes() == before  # a check appends nothing
    lines = before.decode().splitlines()
    assert '"ok"' in lines[0]
    lines[0] = lines[0].replace('"ok"', '"failed"', 1)  # an edited outcome
    audit.write_text("\n".join(lines) + "\n")
    broken = faultlib.run_agent(collections_path, config, command="audit-verify")
    assert broken.rc == 1 and broken.doc["first_bad_line"] == 1
    assert "not intact from line 1" in broken.msg
