"""backup_info's report over catalog entries: ordering, filters, newest, staleness."""

from __future__ import annotations

import datetime

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import catalog_report as cr
from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError

NOW = datetime.datetime(2026, 11, 22, 12, 0, 0, tzinfo=datetime.UTC)
LOCAL = "/var/backups/clinic/db"
S3 = "s3://clinic-backups/db/main"


def entry(
    hours_ago,
    database="clinic_db",
    suffix="aaaaaa",
    verification="unverified",
    repository=LOCAL,
    row_counts=None,
):
    """A complete catalog entry (as catalog.catalog_entry builds it) finished hours_ago."""
    finished = NOW - datetime.timedelta(hours=hours_ago)
    started = finished - datetime.timedelta(minutes=5)
    set_id = "%s-%s-%s" % (started.strftime("%Y%m%dT%H%M%SZ"), database, suffix)
    manifest = {"id": set_id, "database": database, "artifacts": [{"name": "database"}]}
    if row_counts is not None:
        manifest["row_counts"] = row_counts
    return {
        "id": set_id,
        "state": "complete",
        "repository": repository,
        "database": database,
        "format": "custom",
        "started_at": started.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "finished_at": finished.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "size": 1000,
        "encrypted": True,
        "verification": verification,
        "verified_at": "2026-11-22T11:00:00.000000Z" if verification != "unverified" else None,
        "manifest": manifest,
    }


def corrupt(set_id, repository=LOCAL):
    return {
        "id": set_id,
        "state": "corrupt",
        "error": "manifest of %s is not valid JSON" % set_id,
        "repository": repository,
    }


def ids(items):
    return [item["id"] for item in items]


def test_summary_drops_the_manifest_and_keeps_row_count_summary():
    item = entry(2, row_counts={"public.patients": 10, "public.visits": 32, "public.x": 0})
    report = cr.build_report([item], NOW)
    (listed,) = report["sets"]
    assert "manifest" not in listed
    assert listed["row_counts"] == {"tables": 3, "rows": 42}
    assert listed["age_hours"] == 2.0
    assert {k: listed[k] for k in ("id", "database", "format", "size", "encrypted")} == {
        "id": item["id"],
        "database": "clinic_db",
        "format": "custom",
        "size": 1000,
        "encrypted": True,
    }
    assert set(listed) >= set(cr.SUMMARY_FIELDS)
    with_manifest = cr.build_report([item], NOW, include_manifest=True)["sets"][0]
    assert with_manifest["manifest"] == item["manifest"]


def test_row_counts_absent_or_disabled_is_null():
    assert cr.row_count_summary({"row_counts": None}) is None
    assert cr.row_count_summary({}) is None
    assert cr.row_count_summary(None) is None


def test_merge_is_newest_first_and_keeps_local_before_s3_for_the_same_set():
    old, new = entry(30, suffix="000001"), entry(2, suffix="000002")
    remote_new = dict(new, repository=S3)
    merged = cr.merge_entries([old, new], [remote_new])
    assert [(e["id"], e["repository"]) for e in merged] == [
        (new["id"], LOCAL),
        (new["id"], S3),
        (old["id"], LOCAL),
    ]
    # One set in two places counts once per database.
    assert cr.build_report(merged, NOW)["databases"]["clinic_db"]["count"] == 2


def test_corrupt_entries_are_listed_with_their_error_and_never_newest():
    good = entry(10, suffix="000001")
    bad = corrupt("20261122T110000Z-clinic_db-0000ff")
    report = cr.build_report([bad, good], NOW)
    assert ids(report["sets"]) == [bad["id"], good["id"]]
    assert report["sets"][0] == {
        "id": bad["id"],
        "state": "corrupt",
        "repository": LOCAL,
        "error": bad["error"],
    }
    assert report["newest"]["id"] == good["id"]
    assert report["warnings"] == [
        "backup set %s in %s is corrupt: %s" % (bad["id"], LOCAL, bad["error"])
    ]


def test_database_filter_keeps_corrupt_sets_named_after_that_database():
    mine, other = entry(3, "clinic_db"), entry(4, "billing")
    mine_bad = corrupt("20261122T110000Z-clinic_db-0000ff")
    other_bad = corrupt("20261122T110000Z-billing-0000ee")
    entries = cr.merge_entries([mine, other, mine_bad, other_bad])
    report = cr.build_report(entries, NOW, database="clinic_db")
    assert ids(report["sets"]) == [mine_bad["id"], mine["id"]]
    assert list(report["databases"]) == ["clinic_db"]
    # safe_name() of a database with odd characters is what the id carries.
    odd = corrupt("20261122T110000Z-clinic_db_2-0000dd")
    assert cr.matches_database(odd, "clinic db;2")


def test_limit_shortens_sets_only():
    entries = [
        entry(1, suffix="000003"),
        entry(2, suffix="000002", verification="ok"),
        entry(3, suffix="000001"),
    ]
    report = cr.build_report(entries, NOW, limit=1)
    assert ids(report["sets"]) == [entries[0]["id"]]
    summary = report["databases"]["clinic_db"]
    assert summary["count"] == 3
    assert summary["newest"] == entries[0]["id"]
    assert summary["newest_verified"] == entries[1]["id"]
    assert summary["age_hours"] == 1.0


def test_newest_only_and_require_verified():
    newest, verified, failed = (
        entry(1, suffix="000003"),
        entry(26, suffix="000002", verification="ok"),
        entry(2, suffix="000004", verification="failed"),
    )
    entries = cr.merge_entries([newest, verified, failed])
    assert ids(cr.build_report(entries, NOW, newest_only=True)["sets"]) == [newest["id"]]
    report = cr.build_report(entries, NOW, newest_only=True, require_verified=True)
    assert ids(report["sets"]) == [verified["id"]]
    assert report["newest"]["id"] == verified["id"]
    # Without newest_only, require_verified changes only `newest`.
    report = cr.build_report(entries, NOW, require_verified=True)
    assert len(report["sets"]) == 3 and report["newest"]["id"] == verified["id"]


def test_nothing_verified_gives_no_newest_and_empty_sets():
    report = cr.build_report([entry(1)], NOW, newest_only=True, require_verified=True)
    assert report["sets"] == [] and report["newest"] is None
    assert report["databases"]["clinic_db"]["newest_verified"] is None


def test_empty_catalog():
    assert cr.build_report([], NOW, max_age_hours=25) == {
        "sets": [],
        "newest": None,
        "databases": {},
        "warnings": [],
    }


def test_stale_marks_the_newest_complete_set_of_each_database():
    clinic_new, clinic_old = entry(30, suffix="000002"), entry(50, suffix="000001")
    billing = entry(2, database="billing")
    entries = cr.merge_entries([clinic_new, clinic_old, billing])
    report = cr.build_report(entries, NOW, max_age_hours=25)
    stale = {item["id"]: item.get("stale") for item in report["sets"]}
    assert stale == {clinic_new["id"]: True, clinic_old["id"]: None, billing["id"]: False}
    assert report["databases"]["clinic_db"]["stale"] is True
    assert report["databases"]["billing"]["stale"] is False
    assert report["newest"]["id"] == billing["id"] and report["newest"]["stale"] is False


def test_stale_on_a_verified_newest_that_is_older_than_the_newest():
    entries = [entry(2, suffix="000002"), entry(40, suffix="000001", verification="ok")]
    report = cr.build_report(entries, NOW, require_verified=True, max_age_hours=25)
    assert report["newest"]["id"] == entries[1]["id"] and report["newest"]["stale"] is True
    assert report["databases"]["clinic_db"]["stale"] is False


@pytest.mark.parametrize("max_age", [None, 0])
def test_no_max_age_no_stale_key(max_age):
    report = cr.build_report([entry(100)], NOW, max_age_hours=max_age)
    assert "stale" not in report["sets"][0] and "stale" not in report["newest"]
    assert "stale" not in report["databases"]["clinic_db"]


def test_unparsable_finish_time_has_no_age_and_counts_as_stale():
    item = dict(entry(1), finished_at="yesterday")
    report = cr.build_report([item], NOW, max_age_hours=25)
    assert report["sets"][0]["age_hours"] is None and report["sets"][0]["stale"] is True


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"limit": 0}, "limit must be at least 1"),
        ({"limit": -3}, "limit must be at least 1"),
        ({"max_age_hours": -1}, "must not be negative"),
    ],
)
def test_bad_options(options, words):
    with pytest.raises(ConfigError, match=words):
        cr.build_report([entry(1)], NOW, **options)
