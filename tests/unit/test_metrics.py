"""Issue #10, defect 7: one metrics file per distinct database, with its real name.

safe_name() maps 'clinic db' and 'clinic_db' (and long names sharing 48 characters) to
one name: they shared a .prom file, so a failing database inherited the other one's last
success time. Also issue #10, defects 2 and 14: skipped runs and unwritable metrics.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import metrics
from ansible_collections.clinic.backup.plugins.module_utils.errors import StoreError
from ansible_collections.clinic.backup.plugins.module_utils.metrics import (
    read_previous,
    write_job_metrics,
)

LONG = "clinic_records_of_the_north_eastern_region_branch_"


@pytest.mark.parametrize(
    ("first", "second"),
    [("clinic_db", "clinic db"), ("clinic;db", "clinic db"), (LONG + "one", LONG + "two")],
)
def test_databases_whose_safe_names_collide_keep_their_own_files(tmp_path, first, second):
    good = write_job_metrics(str(tmp_path), "backup", first, True, now=1000.0)
    bad = write_job_metrics(str(tmp_path), "backup", second, False, now=2000.0)
    assert good != bad
    assert len(list(tmp_path.glob("*.prom"))) == 2
    # The failing database does not inherit the other one's success.
    assert read_previous(bad)["clinic_backup_last_success_timestamp_seconds"] == 0.0
    assert read_previous(good)["clinic_backup_last_success_timestamp_seconds"] == 1000.0
    assert 'database="%s"' % first in Path(good).read_text()
    assert 'database="%s"' % second in Path(bad).read_text()


def test_a_plain_name_keeps_its_file_name(tmp_path):
    path = write_job_metrics(str(tmp_path), "verify", "clinic_db", True)
    assert os.path.basename(path) == "clinic_backup_verify.clinic_db.prom"


def test_a_skipped_run_has_its_own_file_and_counts(tmp_path):
    job = write_job_metrics(str(tmp_path), "backup", "clinic_db", True, now=1000.0)
    before = Path(job).read_bytes()
    first = metrics.write_skipped_metrics(str(tmp_path), "backup", "clinic_db", now=2000.0)
    again = metrics.write_skipped_metrics(str(tmp_path), "backup", "clinic_db", now=3000.0)
    assert first == again != job
    assert Path(job).read_bytes() == before  # the lock holder's outcome stays its own
    values = read_previous(again)
    assert values["clinic_backup_skipped_total"] == 2.0
    assert values["clinic_backup_last_skipped_timestamp_seconds"] == 3000.0
    text = Path(again).read_text()
    assert "# TYPE clinic_backup_skipped_total counter" in text
    assert 'database="clinic_db",operation="backup"' in text


def test_a_metrics_dir_that_is_a_file_is_a_clear_store_error(tmp_path):
    not_a_dir = tmp_path / "metrics"
    not_a_dir.write_text("")
    with pytest.raises(StoreError, match="metrics directory .*metrics is not a directory"):
        write_job_metrics(str(not_a_dir), "backup", "clinic_db", True)
