"""Fault 1: the agent is SIGKILLed (OOM killer, power cut of a VM, kill -9) at chosen points.

Points, each reached deterministically before the kill:

* during pg_dump:    pg_dump is found in the agent's session, SIGSTOPped at once and let
                     run in 3 ms slices until it wrote >= 1 MiB: it is frozen mid-stream.
* during S3 upload:  the fault proxy lets UploadPart 1 through and parks the next one;
                     the kill comes while a multipart upload is open with a part stored.
* before manifest:   the test holds an ACCESS EXCLUSIVE lock on ``fault_blocker``, a table
                     the dump excludes but the row counter (same snapshot) counts: both
                     artifacts are complete in staging and in S3, and the run waits for its
                     row counts, which are needed for the manifest. No manifest exists yet.

After each kill: the catalog (local and S3) lists only the earlier good sets,
``latest/<db>.json`` still names a complete set whose sha256s match, and the next run
(stale_seconds=0) succeeds, verifies, and removes the staging directory, the open
multipart uploads and the manifest-less S3 objects.

SIGTERM (cron timeout, systemd stop) is handled by the agent itself: it must clean up on
the way out, without waiting for the next run.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from testbed.faultproxy import FaultProxy
from testbed.files import write_passphrase_file

from . import faultlib
from .faultlib import agent_config, helpers

POINTS = ("during pg_dump", "during S3 upload", "before manifest")
MiB = 1024 * 1024


def _staged_set(repo_dir: Any) -> Path | None:
    staging = Path(repo_dir) / ".staging"
    entries = [p for p in staging.iterdir() if p.is_dir()] if staging.exists() else []
    return entries[0] if len(entries) == 1 else None


def _lock_blocker(pg: Any, dbname: str) -> Any:
    conn = psycopg2.connect(host=pg.socket_dir, port=pg.port, user=pg.superuser, dbname=dbname)
    # psycopg2 opens a transaction: the lock is held until the connection is closed.
    conn.cursor().execute("LOCK TABLE fault_blocker IN ACCESS EXCLUSIVE MODE")
    return conn


def _waiting_on_blocker(conn: Any, dbname: str) -> bool:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock' "
            "AND query LIKE '%%fault_blocker%%' AND pid <> pg_backend_pid()",
            (dbname,),
        )
        return cur.fetchone()[0] > 0


def bring_to_point(point: str, proc: Any, ctx: dict[str, Any]) -> str:
    """Block until the running agent ``proc`` is at ``point``; return a description of the state."""
    if point == "during pg_dump":
        pid = faultlib.wait_for_child(proc, "pg_dump", argv_contains="--format=")
        written = faultlib.freeze_mid_stream(pid, 1 * MiB)
        return "pg_dump %d frozen after writing %d bytes" % (pid, written)
    if point == "during S3 upload":
        proxy: FaultProxy = ctx["proxy"]
        proxy.wait_for(
            lambda: proxy.held >= 1 and proxy.ops()["UploadPart"] >= 1,
            timeout=120,
            what="UploadPart 1 stored and UploadPart 2 parked",
        )
        uploads = helpers.open_multipart_uploads(ctx["direct_s3"], ctx["bucket"])
        assert uploads, "no open multipart upload while a part is parked"
        return "multipart upload of %s open, %d part(s) stored" % (
            uploads[0],
            proxy.ops()["UploadPart"],
        )
    if point == "before manifest":
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before reaching its manifest"
            staged = _staged_set(ctx["repo_dir"])
            names = sorted(p.name for p in staged.iterdir()) if staged else []
            busy = [
                n
                for _p, n, _s in faultlib.session_processes(proc.pid)
                if n in ("pg_dump", "pg_dumpall", "zstd", "gzip", "gpg", "tar")
            ]
            if staged and len([n for n in names if n.endswith(".gpg")]) == 2 and not busy:
                keys = helpers.s3_keys(ctx["direct_s3"], ctx["bucket"], "k/sets/%s/" % staged.name)
                stored = [k for k in keys if k.endswith(".gpg")]
                if len(stored) == 2 and _waiting_on_blocker(ctx["lock"], ctx["dbname"]):
                    assert "manifest.json" not in names and not any(
                        k.endswith("manifest.json") for k in keys
                    )
                    return (
                        "artifacts %s staged and uploaded, run waiting for its row counts" % names
                    )
            time.sleep(0.005)
        raise TimeoutError("the run never reached the point just before its manifest")
    raise ValueError(point)


def observe_after_fault(
    row: Any, repos: dict[str, Any], known_good: list[str], database: str, passphrase_file: Any
) -> list[str]:
    """Count what a killed run left visible; return problems (empty when all is well)."""
    problems = []
    for label, repo in repos.items():
        state = faultlib.catalog_state(repo)
        listed = state["complete"] + state["other"]
        extra = sorted(set(listed) - set(known_good))
        if extra:
            row.add("incomplete_listed", len(extra))
            problems.append("%s catalog lists %s" % (label, extra))
        lost = [s for s in known_good if s not in state["complete"]]
        latest = repo.read_latest(database)
        latest_ok = (
            latest in state["complete"]
            and faultlib.verify_ok(repo, latest, passphrase_file, deep=False)[0]
        )
        if lost or not latest_ok:
            row.add("sets_lost", len(lost) + (0 if latest_ok else 1))
            problems.append("%s lost %s, latest=%s ok=%s" % (label, lost, latest, latest_ok))
        if latest != known_good[-1]:
            problems.append("%s latest pointer moved to %s" % (label, latest))
    return problems


def recovery_run(
    row: Any,
    collections_path: str,
    config: str,
    env: dict[str, str],
    repos: dict[str, Any],
    passphrase_file: Any,
    leftover_args: dict[str, Any],
    deep: bool = True,
) -> tuple[faultlib.AgentResult, list[str]]:
    """The next (cron) run: must succeed, verify, and leave no leftovers of the killed run."""
    result = faultlib.run_agent(collections_path, config, env=env)
    set_id = result.doc.get("set_id")
    good = result.rc == 0 and bool(set_id)
    if good:
        good = faultlib.verify_ok(repos["local"], set_id, passphrase_file, deep=deep)[0]
        for label, repo in repos.items():
            if label != "local":
                good = good and faultlib.verify_ok(repo, set_id, passphrase_file, deep=False)[0]
    row.reported(result.reported_ok, good)
    left = faultlib.leftovers(**leftover_args)
    row.add("leftovers", len(left))
    if good and not left:
        row.add("recovered")
    return result, left


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_leaves_no_set_and_next_run_cleans_up(
    point,
    pg,
    faults_db,
    s3,
    proxy,
    fresh_bucket,
    direct_s3,
    collections_path,
    passphrase_file,
    repo_dir,
    tmp_path,
    fault_repeat,
    summary_row,
):
    row = summary_row("SIGKILL %s" % point)
    target = {"bucket": fresh_bucket, "prefix": "k", "endpoint_url": proxy.url}
    extra: dict[str, Any] = {"s3_targets": [target], "s3_part_size_mb": 5, "s3_concurrency": 2}
    if point == "before manifest":
        extra["exclude_tables"] = ["fault_blocker"]
    if point == "during pg_dump":
        extra = {}  # S3 would only receive buffered bytes: local only, quicker
    config = agent_config(tmp_path, pg, faults_db, passphrase_file, repository=repo_dir, **extra)
    repos = {"local": faultlib.local_repository(repo_dir)}
    leftover_args: dict[str, Any] = {"repo_dir": repo_dir}
    if extra:
        repos["s3"] = faultlib.s3_repository(s3.endpoint_url, fresh_bucket, "k")
        leftover_args.update(client=direct_s3, bucket=fresh_bucket, prefix="k")
    env = s3.env()

    first = faultlib.run_agent(collections_path, config, env=env)
    assert first.rc == 0, first.text()
    known_good = [first.doc["set_id"]]
    ctx = {
        "proxy": proxy,
        "direct_s3": direct_s3,
        "bucket": fresh_bucket,
        "repo_dir": repo_dir,
        "dbname": faults_db,
    }
    for attempt in range(fault_repeat):
        lock = None
        if point == "during S3 upload":
            proxy.add("hold", ops={"UploadPart"}, skip=1)
        if point == "before manifest":
            lock = ctx["lock"] = _lock_blocker(pg, faults_db)
        try:
            proc = faultlib.start_agent(collections_path, config, env=env)
            try:
                state = bring_to_point(point, proc, ctx)
            finally:
                faultlib.kill_session(proc, signal.SIGKILL)
        finally:
            if lock is not None:
                lock.close()
            proxy.heal()
        row.run()
        assert proc.returncode == -signal.SIGKILL
        mid_run_traces = faultlib.leftovers(**leftover_args)
        assert mid_run_traces, "the kill left no trace at all: was it really mid-run? (%s)" % state
        row.note(
            "killed with %s"
            % {
                "during pg_dump": "pg_dump frozen mid-stream",
                "during S3 upload": "a multipart upload open",
                "before manifest": "all artifacts stored, no manifest",
            }[point]
        )

        problems = observe_after_fault(row, repos, known_good, faults_db, passphrase_file)
        assert not problems, "attempt %d (%s): %s" % (attempt, state, problems)

        result, left = recovery_run(
            row,
            collections_path,
            config,
            env,
            repos,
            passphrase_file,
            leftover_args,
            deep=attempt == fault_repeat - 1,
        )
        assert result.rc == 0, result.text()
        assert not left, "attempt %d: the next run left %s (killed run left %s)" % (
            attempt,
            left,
            mid_run_traces,
        )
        known_good.append(result.doc["set_id"])
        assert faultlib.catalog_state(repos["local"])["complete"] == faultlib.newest_first(
            known_good
        )


# ---------------------------------------------------------------------- SIGTERM
@pytest.fixture(scope="module")
def sigterm_runs(pg, faults_db, s3, collections_path, tmp_path_factory, fault_summary):
    """SIGTERM (to the agent process, as `timeout` and cron do) while a part upload is in flight.

    Runs light_repeat() times (the point is fixed by the proxy); returns one observation per run.
    """
    import secrets as _secrets

    work = tmp_path_factory.mktemp("sigterm")
    passphrase = write_passphrase_file(work / "passphrase")
    repo_dir = work / "repo"
    repo_dir.mkdir(mode=0o700)
    metrics_dir = work / "metrics"
    bucket = "f-sigterm-%s" % _secrets.token_hex(3)
    s3.create_bucket(bucket)
    client = faultlib.s3_client(s3.endpoint_url)
    row = fault_summary.row("SIGTERM during S3 upload")
    observations = []
    with FaultProxy(s3.port) as proxy:
        target = {"bucket": bucket, "prefix": "k", "endpoint_url": proxy.url}
        config = agent_config(
            work,
            pg,
            faults_db,
            passphrase,
            repository=repo_dir,
            s3_targets=[target],
            s3_part_size_mb=5,
            s3_concurrency=2,
        )
        first = faultlib.run_agent(collections_path, config, env=s3.env(), metrics_dir=metrics_dir)
        assert first.rc == 0, first.text()
        good = first.doc["set_id"]
        for _attempt in range(faultlib.light_repeat()):
            before = faultlib.read_metrics(metrics_dir, faults_db)
            proxy.add("hold", ops={"UploadPart"}, skip=1)
            proc = faultlib.start_agent(
                collections_path, config, env=s3.env(), metrics_dir=metrics_dir
            )
            try:
                proxy.wait_for(lambda: proxy.held >= 1, timeout=120, what="a parked UploadPart")
                os.kill(proc.pid, signal.SIGTERM)
                proxy.heal()  # the parked request is reset; the agent's abort path runs
                result = faultlib.finish(proc, timeout=120)
            finally:
                if proc.poll() is None:
                    faultlib.kill_session(proc)
            row.run()
            local_state = faultlib.catalog_state(faultlib.local_repository(repo_dir))
            left = faultlib.leftovers(repo_dir, client, bucket, "k")
            row.add("leftovers", len(left))
            row.add(
                "incomplete_listed",
                len(set(local_state["complete"] + local_state["other"]) - {good}),
            )
            row.reported(result.reported_ok, False)  # a terminated run never produced a set
            observations.append(
                {
                    "rc": result.rc,
                    "left": left,
                    "listed": local_state,
                    "good": good,
                    "metrics_before": before,
                    "metrics_after": faultlib.read_metrics(metrics_dir, faults_db),
                    "stdout": result.stdout,
                    "stderr": result.stderr[-2000:],
                }
            )
    return observations


def test_sigterm_aborts_cleanly_on_the_way_out(sigterm_runs):
    """No next run needed: staging removed and the multipart upload aborted by the dying agent."""
    for obs in sigterm_runs:
        assert obs["rc"] == 128 + signal.SIGTERM, obs
        assert obs["left"] == [], obs
        assert obs["listed"]["complete"] == [obs["good"]] and obs["listed"]["other"] == [], obs


def test_sigterm_run_is_reported_as_failed_in_metrics(sigterm_runs, fault_summary):
    row = fault_summary.row("SIGTERM during S3 upload")
    for obs in sigterm_runs:
        status = obs["metrics_after"].get("clinic_backup_last_status")
        if status == 0.0 and obs["metrics_after"] == obs["metrics_before"]:
            row.note("metrics after SIGTERM unchanged: last_status 0 from the previous success")
        assert status == 1.0, obs["metrics_after"]
        assert (
            obs["metrics_after"]["clinic_backup_last_success_timestamp_seconds"]
            == obs["metrics_before"]["clinic_backup_last_success_timestamp_seconds"]
        )
