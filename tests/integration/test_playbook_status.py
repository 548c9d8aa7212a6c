"""playbooks/status.yml through ansible-playbook -i inventories/local, after backup.yml
(the ``dr`` fixture: one set, local + S3, both verified) and restore_test.yml."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from testbed import browser
from testbed.ansible import run_playbook

from tests.integration import test_playbooks_dr
from tests.integration.test_playbooks_dr import INVENTORY, PLAYBOOKS

# The DR tests' fixture (settings + one backup.yml set, local and S3), shared.
dr = test_playbooks_dr.dr

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHOW = "Show the status of the database"
READ = "Read the status of the database"
CHECK = "Check that nothing is overdue"


def test_status_playbook_shows_copies_restore_test_and_overdue(dr):  # pylint: disable=redefined-outer-name
    log = dr.work / "restore-test.log"
    dr.play("restore_test.yml", clinic_backup_restore_test_log=str(log)).assert_ok()
    run = dr.play(
        "status.yml",
        clinic_backup_restore_test_log=str(log),
        clinic_backup_status_fail_when_overdue=True,
    ).assert_ok()
    table = "\n".join(run.result(SHOW)["msg"])
    row = next(line for line in table.splitlines() if line.startswith(dr.set_id))
    assert row.count("verified") == 2, table  # the local copy and the S3 copy
    assert "last restore test: ok" in table and "RTO " in table and "RPO " in table
    assert "overdue: nothing" in table
    status = run.result(READ)["status"]
    assert [c["where"] for c in status["sets"][0]["copies"]] == ["local", "s3"]
    # The playbooks audit by default: the same test is on record in both places.
    # and the set's own sealed restore_test.json, whichever path ran the test.
    assert status["restore_test"]["sources"] == ["restore test log", "audit log", "catalog"]
    assert run.result(READ)["changed"] is False

    tiny = dr.play(
        "status.yml",
        clinic_backup_restore_test_log=str(log),
        clinic_backup_max_age_hours=0.00001,
        clinic_backup_status_fail_when_overdue=True,
    )
    assert tiny.failed
    assert "OVERDUE: no backup in" in "\n".join(tiny.result(SHOW)["msg"])
    assert "OVERDUE: no backup in" in tiny.result(CHECK)["msg"]

    # Check mode reads the same; without the restore-test log the audit log still has it.
    check = run_playbook(
        PLAYBOOKS / "status.yml", dr.env, extra_vars=dr.vars(), inventory=str(INVENTORY), check=True
    ).assert_ok()
    assert "last restore test: ok" in "\n".join(check.result(SHOW)["msg"])
    assert dr.set_id in "\n".join(check.result(SHOW)["msg"])


REPORT = "Write the report on the controller"


def test_compliance_report_proves_the_checklist_and_renders(dr, tmp_path):  # pylint: disable=redefined-outer-name
    """playbooks/compliance_report.yml after backup.yml (local + S3, verified) and a restore
    test: every checklist line proven, the page renders in headless Chromium with its
    charts and no console message, and the reads that made it are in the audit log."""
    dr.play("restore_test.yml").assert_ok()
    cron = tmp_path / "clinic-backup.cron"
    config = "/etc/clinic-backup/%s.json" % dr.base_vars["clinic_backup_database"]
    cron.write_text(
        "15 2 * * * root /usr/local/bin/clinic-backup backup --config %s\n"
        "30 4 1 * * root /usr/local/bin/clinic-backup restore-test --config %s\n" % (config, config)
    )
    page = tmp_path / "report.html"
    run = dr.play(
        "compliance_report.yml",
        clinic_backup_report_dest=str(page),
        clinic_backup_report_cron_file=str(cron),
    ).assert_ok()
    result = run.result(REPORT)
    states = {item["key"]: item["state"] for item in result["checklist"]}
    assert states == dict.fromkeys(states, "pass"), result["checklist"]
    assert len(states) == 7
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["state"] == "pass"
    series = report["hosts"][0]["groups"][0]["series"]
    assert series["rto"] and series["size"] and series["verification"]
    assert oct(page.stat().st_mode & 0o777) == "0o600"
    records = [
        json.loads(line)
        for line in Path(dr.base_vars["clinic_backup_audit_log"]).read_text().splitlines()
    ]
    assert records[-1]["action"] == "read" and records[-1]["outcome"] == "ok"

    # Without the cron schedule the daily line can only warn: evidence, not assumption.
    unscheduled = dr.play(
        "compliance_report.yml",
        clinic_backup_report_dest=str(tmp_path / "unscheduled.html"),
        clinic_backup_report_cron_file=str(tmp_path / "absent"),
    ).assert_ok()
    lines = {i["key"]: i for i in unscheduled.result(REPORT)["checklist"]}
    assert lines["daily_backups"]["state"] == "warn"
    assert "NO cron schedule" in lines["daily_backups"]["evidence"][0]["text"]

    if browser.chromium() is None:
        pytest.skip("chromium is not installed (scripts/bootstrap.sh installs Debian's chromium)")
    shot = tmp_path / "report.png"
    rendered = browser.render(page, shot, width=1100, height=1400)
    assert rendered.console == [], rendered.console
    assert rendered.dom.count('class="chart"') == 4, rendered.dom[:2000]
    assert "<polyline" in rendered.dom or "<circle" in rendered.dom
    assert "HIPAA compliance checklist" in rendered.dom
    width, height, _rows = browser.png_pixels(shot)
    assert (width, height) == (1100, 1400)
    seen = browser.colours(shot)
    # Rendered, not blank: many colours, and the pass badge's green among them.
    assert len(seen) > 20, len(seen)
    assert any(abs(r - 0x2F) < 12 and abs(g - 0x85) < 12 and abs(b - 0x5A) < 12 for r, g, b in seen)
    if os.environ.get("CLINIC_REPORT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["CLINIC_REPORT_SCREENSHOT"])
