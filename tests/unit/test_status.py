"""The status table's rules without files: human forms, copies, restore-test records,
overdue thresholds, rendering."""

from __future__ import annotations

import datetime

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import status as st
from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError

UTC = datetime.UTC
NOW = datetime.datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
LOCAL = "/var/backups/clinic/db"
S3 = "s3://clinic-backups/db/main"


def iso(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry(
    hours_ago,
    repository=LOCAL,
    suffix="aaaaaa",
    verification="ok",
    verified_hours_ago=1,
    authentication="ok",
    database="clinic_db",
    manifest_extra=None,
):
    finished = NOW - datetime.timedelta(hours=hours_ago)
    started = finished - datetime.timedelta(minutes=3, seconds=12)
    set_id = "%s-%s-%s" % (started.strftime("%Y%m%dT%H%M%SZ"), database, suffix)
    manifest = {"id": set_id, "database": database, "duration_seconds": 192.0}
    manifest.update(manifest_extra or {})
    return {
        "id": set_id,
        "state": "complete",
        "repository": repository,
        "database": database,
        "format": "custom",
        "started_at": iso(started),
        "finished_at": iso(finished),
        "size": int(28.5 * 1024 * 1024),
        "encrypted": True,
        "authentication": authentication,
        "verification": verification,
        "verified_at": iso(NOW - datetime.timedelta(hours=verified_hours_ago))
        if verification == "ok"
        else None,
        "manifest": manifest,
    }


def both(hours_ago, **kwargs):
    return [entry(hours_ago, **kwargs), entry(hours_ago, repository=S3, **kwargs)]


def ok_test(days_ago, rto=63.0, rpo=3 * 3600.0 + 120, source="metrics", set_id=None):
    return {
        "at": NOW - datetime.timedelta(days=days_ago),
        "ok": True,
        "rto_seconds": rto,
        "rpo_seconds": rpo,
        "set_id": set_id,
        "source": source,
    }


def group(entries, tests=(), **kwargs):
    kwargs.setdefault("tz", UTC)
    return st.group_status("clinic_db", [LOCAL, S3], entries, list(tests), NOW, **kwargs)


# ---------------------------------------------------------------------- human forms
@pytest.mark.parametrize(
    ("size", "text"),
    [
        (None, "-"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (int(28.5 * 1024 * 1024), "28.5 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (5 * 1024**5, "5.0 PiB"),
    ],
)
def test_human_size(size, text):
    assert st.human_size(size) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0.42, "0.4 s"),
        (9.96, "10.0 s"),
        (45, "45 s"),
        (192, "3 min 12 s"),
        (180, "3 min"),
        (3600, "1 h"),
        (2 * 3600 + 5 * 60 + 7, "2 h 5 min"),
        (25 * 3600, "1 d 1 h"),
        (8 * 86400, "8 d"),
    ],
)
def test_human_duration(seconds, text):
    assert st.human_duration(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "never"),
        (-5, "in the future"),
        (12, "12 s ago"),
        (119 * 60, "1 h ago"),
        (2 * 3600, "2 h ago"),
        (3 * 86400 + 5, "3 d ago"),
    ],
)
def test_human_age(seconds, text):
    assert st.human_age(seconds) == text


def test_when_is_local_time_and_age():
    moment = NOW - datetime.timedelta(hours=2)
    assert st.when(moment, NOW, UTC) == "2026-11-22 10:00 (2 h ago)"
    plus_one = datetime.timezone(datetime.timedelta(hours=1))
    assert st.when(moment, NOW, plus_one) == "2026-11-22 11:00 (2 h ago)"
    assert st.when(None, NOW) == "never"


# ---------------------------------------------------------------------- sets and copies
def test_a_set_in_both_repositories_is_one_row_with_two_verified_copies():
    result = group(both(2))
    (row,) = result["sets"]
    assert row["finished"] == "2026-11-22 10:00 (2 h ago)"
    assert row["duration_seconds"] == 192.0
    assert row["size"] == int(28.5 * 1024 * 1024)
    assert row["ratio"] is None  # database manifests do not record pg_dump's output size
    assert [c["where"] for c in row["copies"]] == ["local", "s3"]
    assert [c["text"] for c in row["copies"]] == ["verified 1 h ago", "verified 1 h ago"]
    assert result["overdue"] == [
        {
            "check": "restore_test",
            "message": "no restore test in 32 d (last successful: never)",
        }
    ]
    assert result["restore_test_text"] == "never"


def test_copies_show_missing_failed_forged_and_not_authenticated():
    entries = [
        entry(2, verification="failed"),
        dict(entry(2, repository=S3), verification="forged", verification_detail="MAC fails"),
        entry(30, suffix="bbbbbb", authentication="none", verification="unverified"),
    ]
    result = group(entries)
    newest, older = result["sets"]
    assert [c["text"] for c in newest["copies"]] == ["VERIFY FAILED", "verification FORGED"]
    assert [c["text"] for c in older["copies"]] == ["unverified, NOT AUTHENTICATED", "missing"]
    assert older["copies"][1]["present"] is False
    problems = "\n".join(result["problems"])
    assert "verification record forged (MAC fails)" in problems
    assert "%s in %s is NOT AUTHENTICATED" % (older["id"], LOCAL) in problems
    text = "\n".join(st.render_group(result))
    assert "NOT AUTHENTICATED" in text and "FORGED" in text


def test_corrupt_copy_is_listed_and_named():
    good = entry(2)
    broken = {"id": good["id"], "state": "corrupt", "error": "not valid JSON", "repository": S3}
    result = group([good, broken])
    (row,) = result["sets"]
    assert [c["text"] for c in row["copies"]] == ["verified 1 h ago", "CORRUPT"]
    assert any("is corrupt: not valid JSON" in p for p in result["problems"])


def test_without_a_key_every_copy_says_not_authenticated():
    result = group(both(2, authentication="not checked"), authenticated=False)
    assert all("NOT AUTHENTICATED" in c["text"] for c in result["sets"][0]["copies"])
    assert "no passphrase_file" in result["problems"][0]


def test_file_sets_show_their_compression_ratio():
    files = {"kind": "files", "files": {"bytes": 10 * 28.5 * 1024 * 1024, "count": 4}}
    result = st.group_status(
        "uploads", [LOCAL], [entry(2, database="uploads", manifest_extra=files)], [], NOW
    )
    assert result["kind"] == "files"
    assert result["sets"][0]["ratio"] == 10.0
    assert "10.0x" in "\n".join(st.render_group(result))


def test_limit_shortens_the_table_and_says_so():
    entries = [entry(h, suffix="%06d" % h) for h in range(1, 15)]
    result = group(entries, limit=3)
    assert len(result["sets"]) == 3 and result["older_sets"] == 11
    assert "... and 11 older set(s)" in "\n".join(st.render_group(result))
    with pytest.raises(ConfigError):
        group(entries, limit=0)


# ---------------------------------------------------------------------- overdue
def test_nothing_overdue_when_everything_is_recent():
    result = group(both(2), [ok_test(3)])
    assert result["overdue"] == []
    assert "overdue: nothing" in st.render_group(result)


def test_backup_overdue_after_25_hours_and_a_planted_newer_set_does_not_hide_it():
    planted = entry(1, suffix="ffffff", authentication="none", verification="unverified")
    result = group(both(26) + [planted], [ok_test(3)])
    assert [o["check"] for o in result["overdue"]] == ["backup"]
    assert result["overdue"][0]["message"] == "no backup in 1 d 1 h (newest: 1 d ago)"


def test_no_sets_at_all_is_overdue_everywhere():
    result = group([], [])
    assert [(o["check"], o.get("repository")) for o in result["overdue"]] == [
        ("backup", None),
        ("verify", LOCAL),
        ("verify", S3),
        ("restore_test", None),
    ]
    assert "never" in result["overdue"][1]["message"]
    assert "no backup sets" in st.render_group(result)


def test_verify_overdue_per_copy():
    entries = [entry(2, verified_hours_ago=2), entry(2, repository=S3, verified_hours_ago=9 * 24)]
    result = group(entries, [ok_test(3)])
    assert [(o["check"], o.get("repository")) for o in result["overdue"]] == [("verify", S3)]
    assert result["overdue"][0]["message"] == "no verify in 8 d in %s (last: 9 d ago)" % S3


def test_restore_test_overdue_after_32_days_and_thresholds_are_options():
    assert [o["check"] for o in group(both(2), [ok_test(33)])["overdue"]] == ["restore_test"]
    tiny = st.Thresholds(0.001, 0.00001, 0.00001)
    assert [o["check"] for o in group(both(2), [ok_test(3)], thresholds=tiny)["overdue"]] == [
        "backup",
        "verify",
        "verify",
        "restore_test",
    ]
    off = st.Thresholds(0, 0, None)
    assert group([], [], thresholds=off)["overdue"] == []
    with pytest.raises(ConfigError, match="verify_max_age_days"):
        st.Thresholds(verify_max_age_days=-1)
    with pytest.raises(ConfigError):
        st.Thresholds(backup_max_age_hours="25")


# ---------------------------------------------------------------------- restore tests
METRICS_OK = {
    "clinic_backup_last_status": 0.0,
    "clinic_backup_last_run_timestamp_seconds": (NOW - datetime.timedelta(days=2)).timestamp(),
    "clinic_backup_last_success_timestamp_seconds": (NOW - datetime.timedelta(days=2)).timestamp(),
    "clinic_backup_last_duration_seconds": 192.0,
    "clinic_backup_restore_test_rpo_seconds": 10920.0,
}


def test_restore_test_from_metrics_shows_rto_and_rpo():
    tests = st.restore_tests_from_metrics(METRICS_OK)
    result = group(both(2), tests)
    assert result["restore_test"]["rto_seconds"] == 192.0
    assert result["restore_test_text"] == (
        "ok 2026-11-20 12:00 (2 d ago), RTO 3 min 12 s, RPO 3 h 2 min"
    )
    assert st.restore_tests_from_metrics({}) == []


def test_failed_last_run_keeps_the_last_success_time():
    values = dict(
        METRICS_OK,
        clinic_backup_last_status=1.0,
        clinic_backup_last_run_timestamp_seconds=(NOW - datetime.timedelta(days=1)).timestamp(),
        clinic_backup_last_success_timestamp_seconds=(
            NOW - datetime.timedelta(days=40)
        ).timestamp(),
    )
    result = group(both(2), st.restore_tests_from_metrics(values))
    assert result["restore_test"]["ok"] is False
    assert result["last_successful_restore_test"]["at"] == "2026-10-13T12:00:00Z"
    assert [o["check"] for o in result["overdue"]] == ["restore_test"]
    assert any("last restore test FAILED" in p for p in result["problems"])


def test_audit_and_metrics_of_one_test_merge_and_fill_each_other():
    sets = both(2)
    set_id = sets[0]["id"]
    audit = [
        {
            "action": "restore_test",
            "outcome": "ok",
            "database": "clinic_db",
            "set_id": set_id,
            "time": iso(NOW - datetime.timedelta(days=2, seconds=3)),
        },
        {"action": "restore_test", "outcome": "ok", "database": "other_db", "time": iso(NOW)},
        {"action": "restore_test", "outcome": "skipped", "database": "clinic_db", "time": iso(NOW)},
        {"action": "backup", "outcome": "ok", "database": "clinic_db", "time": iso(NOW)},
    ]
    tests = st.restore_tests_from_audit(audit, "clinic_db") + st.restore_tests_from_metrics(
        METRICS_OK
    )
    result = group(sets, tests)
    last = result["restore_test"]
    assert last["set_id"] == set_id and last["rto_seconds"] == 192.0
    assert sorted(last["sources"]) == ["audit log", "metrics"]


def test_audit_only_record_derives_the_rpo_from_the_set():
    sets = both(10)
    record = {
        "action": "restore_test",
        "outcome": "ok",
        "database": "clinic_db",
        "set_id": sets[0]["id"],
        "time": iso(NOW - datetime.timedelta(hours=1)),
    }
    result = group(sets, st.restore_tests_from_audit([record], "clinic_db"))
    last = result["restore_test"]
    assert last["rpo_derived"] is True
    assert last["rpo_seconds"] == 9 * 3600 + 192
    assert "RTO -, RPO ~9 h 3 min" in result["restore_test_text"]


def test_playbook_restore_test_log_by_set_id_or_location():
    sets = both(2)
    records = [
        {
            # ansible's now(utc=true).isoformat() may carry no zone: UTC
            "time": (NOW - datetime.timedelta(days=1)).replace(tzinfo=None).isoformat(),
            "outcome": "passed",
            "location": LOCAL,
            "set_id": sets[0]["id"],
            "rto_seconds": 5.5,
            "rpo_seconds": 7300.0,
        },
        {
            "time": (NOW - datetime.timedelta(hours=1)).isoformat(),
            "outcome": "failed",
            "location": S3,
            "error": "no set",
        },
        {"time": NOW.isoformat(), "outcome": "failed", "location": "s3://elsewhere/x"},
        {"time": NOW.isoformat(), "outcome": "passed", "set_id": "20261122T000000Z-other-abcdef"},
    ]
    tests = st.restore_tests_from_log(records, "clinic_db", [LOCAL, S3])
    assert [t["ok"] for t in tests] == [True, False]
    result = group(sets, tests)
    assert result["restore_test"]["ok"] is False
    assert "no set" in result["restore_test_text"]
    assert result["last_successful_restore_test"]["rto_seconds"] == 5.5
    assert result["last_successful_restore_test"]["at"] == "2026-11-21T12:00:00Z"


# ---------------------------------------------------------------------- rendering
def test_render_has_one_table_per_group_and_json_flags_overdue():
    groups = [
        group(both(2), st.restore_tests_from_metrics(METRICS_OK)),
        st.error_group("/etc/clinic-backup/broken.json", "config is not valid JSON"),
    ]
    report = st.build_status(groups, NOW, tz=UTC)
    assert report["overdue"] is True
    text = st.render(report)
    assert "clinic_db (database)" in text
    assert "SET" in text and "LOCAL" in text and "S3" in text
    assert "28.5 MiB" in text and "3 min 12 s" in text
    assert "ERROR: config is not valid JSON" in text
    assert report["thresholds"] == {
        "backup_max_age_hours": 25.0,
        "verify_max_age_days": 8.0,
        "restore_test_max_age_days": 32.0,
    }


def test_several_s3_targets_get_numbered_columns():
    assert st._columns([LOCAL, S3, "s3://dr/db"]) == ["LOCAL", "S3", "S3 #2"]


def test_recovery_window_spans_the_listed_base_backups():
    rows = [
        {
            "id": "b",
            "recovery_window": {
                "earliest": "2026-11-29T02:00:05Z",
                "latest": None,
                "problem": "WAL 000000010000000000000009 is not archived",
            },
        },
        {
            "id": "a",
            "recovery_window": {
                "earliest": "2026-11-22T02:00:04Z",
                "latest": "2026-12-03T11:55:00.123456Z",
            },
        },
        {"id": "dump"},
    ]
    text = st.recovery_window_text(rows)
    assert text.startswith("2026-11-22T02:00:04Z -> 2026-12-03T11:55:00.123456Z")
    assert "not archived" in text
    assert st.recovery_window_text([{"id": "dump"}]) is None
