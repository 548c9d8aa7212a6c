"""Fault 5: PostgreSQL stops in the middle of pg_dump.

A dedicated cluster (never the shared ``pg``): pg_dump is frozen mid-stream (SIGSTOP once
it wrote 256 KiB), the server is taken down - alternately SIGKILL of the postmaster and its
children (a crash) and an immediate shutdown (SIGQUIT, what ``pg_ctl stop -m immediate``
sends) - and pg_dump is let go. The run must fail naming pg_dump and the lost connection,
count nothing (no set, latest unchanged, metrics status 1 with the last success kept) and
clean its staging area itself. After the cluster restarts (crash recovery), the next run
succeeds and verifies.

The agent connects over the cluster's unix socket on purpose: its kernel buffers hold a
few hundred KiB, so the server is certainly still streaming the multi-MB ``scans`` table
when it dies. Over loopback TCP the receive buffer autotunes up to ``tcp_rmem`` (32 MiB
here), the dying server's last rows could all be in flight already, and pg_dump would
then rightly finish a complete dump - a real success, but no fault injected.
"""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Iterator

import pytest
from testbed.netutil import wait_until
from testbed.pg import PostgresCluster

from . import faultlib
from .faultlib import agent_config

CONNECTION_WORDS = (
    "server closed the connection",
    "terminating connection",
    "connection to server",
    "could not receive data",
    "PQgetCopyData",
)


@pytest.fixture(scope="module")
def crash_pg() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.start()
        password = secrets.token_urlsafe(24)
        cluster.create_role("clinic_user", password)
        cluster.create_database("crash_db", owner="clinic_user")
        faultlib.load_fault_data(cluster, "crash_db", "clinic_user", blob_mb=3)
        cluster.clinic_user = "clinic_user"
        cluster.clinic_password = password
        cluster.clinic_db = "crash_db"
        yield cluster
    finally:
        cluster.destroy()


def _stop_server(cluster: PostgresCluster, how: str) -> None:
    if how == "crash (SIGKILL)":
        cluster.kill()
        return
    pid = cluster.postmaster_pid()
    assert pid is not None
    os.kill(pid, signal.SIGQUIT)  # immediate shutdown
    wait_until(lambda: not cluster.is_running(), timeout=30, what="immediate shutdown")


def test_server_stopping_mid_dump_fails_clearly_and_counts_nothing(
    crash_pg, collections_path, passphrase_file, repo_dir, tmp_path, fault_repeat, summary_row
):
    metrics_dir = tmp_path / "metrics"
    config = agent_config(
        tmp_path,
        crash_pg,
        "crash_db",
        passphrase_file,
        repository=repo_dir,
        login_host=crash_pg.socket_dir,
    )
    repo = faultlib.local_repository(repo_dir)
    first = faultlib.run_agent(collections_path, config, metrics_dir=metrics_dir)
    assert first.rc == 0, first.text()
    known_good = [first.doc["set_id"]]
    last_success = faultlib.read_metrics(metrics_dir, "crash_db")[
        "clinic_backup_last_success_timestamp_seconds"
    ]

    for attempt in range(fault_repeat):
        how = ("crash (SIGKILL)", "immediate shutdown (SIGQUIT)")[attempt % 2]
        row = summary_row("PostgreSQL stops mid-dump: " + how)
        proc = faultlib.start_agent(collections_path, config, metrics_dir=metrics_dir)
        try:
            pid = faultlib.wait_for_child(proc, "pg_dump", argv_contains="--format=")
            faultlib.freeze_mid_stream(pid, 256 * 1024)
            _stop_server(crash_pg, how)
            os.kill(pid, signal.SIGCONT)
            result = faultlib.finish(proc, timeout=120)
        finally:
            if proc.poll() is None:
                faultlib.kill_session(proc)
        row.run()
        state = faultlib.catalog_state(repo)
        metrics = faultlib.read_metrics(metrics_dir, "crash_db")
        set_id = result.doc.get("set_id")
        row.reported(result.reported_ok, bool(set_id) and set_id in state["complete"])
        row.reported(metrics.get("clinic_backup_last_status") == 0.0, False)
        row.add("incomplete_listed", len(set(state["complete"] + state["other"]) - set(known_good)))
        row.add("sets_lost", len([s for s in known_good if s not in state["complete"]]))
        left = faultlib.leftovers(repo_dir=repo_dir)
        row.add("leftovers", len(left))
        clear = "pg_dump failed" in result.msg and any(w in result.msg for w in CONNECTION_WORDS)
        row.note("error (%s): %s" % (how, result.msg[:200]))

        assert result.rc == 1, result.text()
        assert clear, result.msg
        assert state == {"complete": faultlib.newest_first(known_good), "other": []}, state
        assert repo.read_latest("crash_db") == known_good[-1]
        assert left == [], left
        assert metrics["clinic_backup_last_status"] == 1.0, metrics
        assert metrics["clinic_backup_last_success_timestamp_seconds"] == last_success

        crash_pg.start()  # crash recovery
        again = faultlib.run_agent(collections_path, config, metrics_dir=metrics_dir)
        again_id = again.doc.get("set_id")
        again_ok = (
            again.rc == 0
            and faultlib.verify_ok(
                repo, again_id, passphrase_file, deep=attempt == fault_repeat - 1
            )[0]
        )
        row.reported(again.reported_ok, again_ok)
        row.add("recovered", again_ok)
        assert again_ok, again.text()
        known_good.append(again_id)
        last_success = faultlib.read_metrics(metrics_dir, "crash_db")[
            "clinic_backup_last_success_timestamp_seconds"
        ]
