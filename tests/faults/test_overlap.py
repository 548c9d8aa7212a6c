"""Fault 6: two agent runs overlap for real (a slow backup and the next cron tick).

Run 1 is started and its pg_dump frozen once it wrote 256 KiB, so run 1 is guaranteed to be
mid-backup, holding the repository lock, with its staging directory in place. Run 2 (same
config) must exit 75 "already running" naming run 1's pid, leave run 1's staging untouched
and not touch the metrics. Run 1 is then let go and must complete with a verified set.
"""

from __future__ import annotations

import os
import signal

from . import faultlib
from .faultlib import agent_config


def test_second_run_exits_75_while_first_completes(
    pg, faults_db, collections_path, passphrase_file, repo_dir, tmp_path, fault_repeat, summary_row
):
    row = summary_row("overlapping runs")
    metrics_dir = tmp_path / "metrics"
    config = agent_config(tmp_path, pg, faults_db, passphrase_file, repository=repo_dir)
    repo = faultlib.local_repository(repo_dir)
    known_good: list[str] = []
    for attempt in range(fault_repeat):
        first = faultlib.start_agent(collections_path, config, metrics_dir=metrics_dir)
        try:
            pid = faultlib.wait_for_child(first, "pg_dump", argv_contains="--format=")
            faultlib.freeze_mid_stream(pid, 256 * 1024)
            # The globals artifact streams alongside the dump: let it finish first.
            faultlib.wait_globals_done(first, repo_dir)
            staging_before = faultlib.stable_digest(repo_dir / ".staging", quiet=0.2)
            metrics_before = faultlib.read_metrics(metrics_dir, faults_db)
            second = faultlib.run_agent(
                collections_path, config, metrics_dir=metrics_dir, timeout=120
            )
            staging_after = faultlib.tree_digest(repo_dir / ".staging")
            metrics_after = faultlib.read_metrics(metrics_dir, faults_db)
            os.kill(pid, signal.SIGCONT)
            result = faultlib.finish(first, timeout=300)
        finally:
            if first.poll() is None:
                faultlib.kill_session(first)
        row.run()
        set_id = result.doc.get("set_id")
        ok = (
            result.rc == 0
            and faultlib.verify_ok(repo, set_id, passphrase_file, deep=attempt == fault_repeat - 1)[
                0
            ]
        )
        row.reported(second.reported_ok, False)  # run 2 did not back anything up
        row.reported(result.reported_ok, ok)
        row.add("sets_lost", not ok)
        row.add("recovered", ok and second.rc == 75)
        if attempt == 0:
            row.note("run 2: %s" % second.msg)

        assert second.rc == 75, second.text()
        assert "already running" in second.msg and "pid %d" % first.pid in second.msg, second.msg
        assert staging_after == staging_before and staging_before, (
            "run 2 touched run 1's staging area"
        )
        assert metrics_after == metrics_before, "the locked-out run rewrote the metrics"
        assert result.rc == 0, result.text()
        assert ok
        known_good.append(set_id)
        assert faultlib.catalog_state(repo)["complete"] == faultlib.newest_first(known_good)
        assert faultlib.read_metrics(metrics_dir, faults_db)["clinic_backup_last_status"] == 0.0
