"""Fault 2: S3 misbehaves, through the fault proxy (tests/testbed/faultproxy.py) in front of moto.

Persistent faults (S3 goes down mid-run, throttles every part, drops every part upload
mid-body) must never end in reported success: agent exit 1 naming S3, metrics
``clinic_backup_last_status 1`` with the previous success timestamp kept, the local copy
committed and verifiable, no open multipart upload after the run or after the next one,
and the next run (proxy healed) succeeds.

Transient faults (a few 503 SlowDown, a share of throttled parts, a few connections
dropped mid-part, a lost CompleteMultipartUpload answer) must be retried into a success
whose S3 copy verifies (verify_set on S3, read straight from moto).

The database artifact is ~6-7 MB, so it goes up as a two-part multipart upload (5 MiB parts).
"""

from __future__ import annotations

from typing import Any

import pytest

from . import faultlib
from .faultlib import agent_config

WRITE_OPS = {"CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "PutObject"}

# name -> (rules as (action, kwargs), s3_retries). Persistent faults run max(2, light_repeat())
# times in a row (two failures in a row must still keep the last success timestamp);
# transient ones with a fixed request count run light_repeat() times, the seeded random
# one FAULT_REPEAT times.
PERSISTENT = {
    # The outage starts at UploadPart 2: a multipart upload is open and cannot be aborted.
    "S3 down mid-run (connection refused)": ([("down", {"ops": {"UploadPart"}, "skip": 1})], 2),
    # Every request that writes (or aborts) after UploadPart 1 gets a TCP reset.
    "connections reset after the first part": (
        [("reset", {"ops": WRITE_OPS | {"AbortMultipartUpload", "HeadObject"}, "skip": 2})],
        2,
    ),
    "503 SlowDown on every UploadPart": ([("error", {"ops": {"UploadPart"}})], 3),
    "connection dropped mid-body on every UploadPart": (
        [("drop_mid_body", {"ops": {"UploadPart"}})],
        3,
    ),
}
TRANSIENT = {
    "503 SlowDown on the first 3 writes": ([("error", {"ops": WRITE_OPS, "count": 3})], 8),
    "503 SlowDown on 50% of UploadParts": (
        [("error", {"ops": {"UploadPart"}, "fraction": 0.5, "seed": 7})],
        8,
    ),
    "connection dropped mid-body on 2 UploadParts": (
        [("drop_mid_body", {"ops": {"UploadPart"}, "count": 2})],
        8,
    ),
    "CompleteMultipartUpload answer lost once": (
        [("drop_response", {"ops": {"CompleteMultipartUpload"}, "count": 1})],
        8,
    ),
}


def _apply(proxy: Any, rules: list[tuple[str, dict[str, Any]]], attempt: int) -> None:
    for action, kwargs in rules:
        kwargs = dict(kwargs)
        if "seed" in kwargs:
            kwargs["seed"] += attempt
        proxy.add(action, **kwargs)


@pytest.mark.parametrize("mode", list(PERSISTENT))
def test_persistent_s3_fault_is_never_a_success(
    mode,
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
    summary_row,
):
    rules, retries = PERSISTENT[mode]
    row = summary_row("S3: " + mode)
    metrics_dir = tmp_path / "metrics"
    target = {"bucket": fresh_bucket, "prefix": "db", "endpoint_url": proxy.url}
    config = agent_config(
        tmp_path,
        pg,
        faults_db,
        passphrase_file,
        repository=repo_dir,
        s3_targets=[target],
        s3_part_size_mb=5,
        s3_concurrency=2,
        s3_retries=retries,
    )
    local = faultlib.local_repository(repo_dir)
    remote = faultlib.s3_repository(s3.endpoint_url, fresh_bucket, "db")
    env = s3.env()

    # The previous success (local only, quicker): its timestamp must survive the failures.
    local_only = agent_config(tmp_path, pg, faults_db, passphrase_file, repository=repo_dir)
    first = faultlib.run_agent(collections_path, local_only, metrics_dir=metrics_dir)
    assert first.rc == 0, first.text()
    s3_good: list[str] = []
    last_success = faultlib.read_metrics(metrics_dir, faults_db)[
        "clinic_backup_last_success_timestamp_seconds"
    ]
    for attempt in range(max(2, faultlib.light_repeat())):
        logged = len(proxy.log)
        _apply(proxy, rules, attempt)
        result = faultlib.run_agent(collections_path, config, env=env, metrics_dir=metrics_dir)
        injected = sum(1 for e in proxy.log[logged:] if e.action != "forwarded")
        proxy.heal()
        row.run()
        assert injected > 0, "the proxy injected nothing: %s" % proxy.log[-20:]
        set_id = result.doc.get("set_id")
        s3_state = faultlib.catalog_state(remote)
        metrics = faultlib.read_metrics(metrics_dir, faults_db)
        # What was reported: exit code, and what the monitoring will read.
        row.reported(result.reported_ok, set_id in s3_state["complete"])
        row.reported(
            metrics.get("clinic_backup_last_status") == 0.0, set_id in s3_state["complete"]
        )
        # The local copy must be complete although S3 failed.
        local_ok = bool(set_id) and faultlib.verify_ok(local, set_id, passphrase_file)[0]
        if not local_ok:
            row.add("sets_lost")
        extra = sorted(set(s3_state["complete"] + s3_state["other"]) - set(s3_good))
        row.add("incomplete_listed", len(extra))
        after_run = faultlib.leftovers(client=direct_s3, bucket=fresh_bucket, prefix="db")
        if after_run:
            row.note(
                "left right after the failed run (removed by the next run): %s"
                % sorted({x.split(":")[0] for x in after_run})
            )

        assert result.rc == 1, result.text()
        assert "s3://%s/db" % fresh_bucket in result.msg and "not stored" in result.msg, result.msg
        assert metrics["clinic_backup_last_status"] == 1.0, metrics
        assert metrics["clinic_backup_last_success_timestamp_seconds"] == last_success, metrics
        assert local_ok, "local copy %s missing or broken: %s" % (set_id, result.text())
        assert local.read_latest(faults_db) == set_id
        assert extra == [], "S3 lists sets of failed runs: %s" % extra
        assert faultlib.leftovers(repo_dir=repo_dir) == []

    healed = faultlib.run_agent(collections_path, config, env=env, metrics_dir=metrics_dir)
    set_id = healed.doc.get("set_id")
    s3_ok = healed.rc == 0 and faultlib.verify_ok(remote, set_id, passphrase_file)[0]
    row.reported(healed.reported_ok, s3_ok)
    left = faultlib.leftovers(repo_dir, direct_s3, fresh_bucket, "db")
    row.add("leftovers", len(left))
    row.add("recovered", s3_ok and not left)
    metrics = faultlib.read_metrics(metrics_dir, faults_db)
    assert healed.rc == 0, healed.text()
    assert s3_ok, "S3 copy of %s does not verify" % set_id
    assert left == [], left
    assert metrics["clinic_backup_last_status"] == 0.0
    assert metrics["clinic_backup_last_success_timestamp_seconds"] > last_success


@pytest.mark.parametrize("mode", list(TRANSIENT))
def test_transient_s3_fault_is_retried_into_a_verified_success(
    mode,
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
    rules, retries = TRANSIENT[mode]
    row = summary_row("S3: " + mode)
    target = {"bucket": fresh_bucket, "prefix": "db", "endpoint_url": proxy.url}
    config = agent_config(
        tmp_path,
        pg,
        faults_db,
        passphrase_file,
        repository=repo_dir,
        s3_targets=[target],
        s3_part_size_mb=5,
        s3_concurrency=2,
        s3_retries=retries,
    )
    remote = faultlib.s3_repository(s3.endpoint_url, fresh_bucket, "db")
    attempts = (
        fault_repeat if any("fraction" in kw for _a, kw in rules) else faultlib.light_repeat()
    )
    for attempt in range(attempts):
        before = len(proxy.log)
        _apply(proxy, rules, attempt)
        result = faultlib.run_agent(collections_path, config, env=s3.env())
        injected = sum(1 for e in proxy.log[before:] if e.action != "forwarded")
        proxy.heal()
        row.run()
        set_id = result.doc.get("set_id")
        # Deep verify (decrypt + pg_restore --list) of the S3 copy on the last attempt,
        # sha256 only on the others.
        deep = attempt == attempts - 1
        s3_ok, outcome = (
            faultlib.verify_ok(remote, set_id, passphrase_file, deep=deep)
            if set_id
            else (False, {})
        )
        row.reported(result.reported_ok, s3_ok)
        if not result.reported_ok:
            row.note("attempt %d failed: %s" % (attempt, result.msg[:200]))
        left = faultlib.leftovers(repo_dir, direct_s3, fresh_bucket, "db")
        row.add("leftovers", len(left))
        row.add("recovered", result.reported_ok and s3_ok and not left)
        assert injected > 0, "the proxy injected nothing"
        assert result.rc == 0, result.text()
        assert s3_ok, outcome
        assert left == [], left
        manifest = faultlib.helpers.manifest(repo_dir, set_id)
        for artifact in manifest["artifacts"]:
            key = "db/sets/%s/%s" % (set_id, artifact["file"])
            import hashlib

            body = direct_s3.get_object(Bucket=fresh_bucket, Key=key)["Body"].read()
            assert hashlib.sha256(body).hexdigest() == artifact["sha256"], key
