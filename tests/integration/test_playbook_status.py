"""playbooks/status.yml through ansible-playbook -i inventories/local, after backup.yml
(the ``dr`` fixture: one set, local + S3, both verified) and restore_test.yml."""

from __future__ import annotations

import pytest
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
    assert status["restore_test"]["sources"] == ["restore test log", "audit log"]
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
