"""Retention planner (pure, synthetic catalogs) and apply_retention on a local repository."""

from __future__ import annotations

import datetime
import functools
import hashlib
import itertools
import os
import time

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import authentication, retention
from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError, LockedError
from ansible_collections.clinic.backup.plugins.module_utils.locking import RunLock, lock_path_for
from ansible_collections.clinic.backup.plugins.module_utils.repository import (
    LocalRepository,
    atomic_write,
)
from ansible_collections.clinic.backup.plugins.module_utils.retention import (
    RetentionPolicy,
    check_plan,
    plan,
)

# Sets written by this file are sealed, as the engine seals them, and retention runs
# with the key: the behaviour a passphrase-configured clinic gets.
KEY = RecordKey(b"retention test passphrase")
apply_retention = functools.partial(retention.apply_retention, key=KEY)

UTC = datetime.UTC
NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
_serial = itertools.count(1)


def at(text):
    """'2026-11-29' or '2026-11-29T13:00' -> aware UTC datetime."""
    if "T" not in text:
        text += "T01:00"
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)


def entry(when, db="clinic_db", verification="unverified", state="complete"):
    moment = at(when) if isinstance(when, str) else when
    set_id = "%s-%s-%06x" % (moment.strftime("%Y%m%dT%H%M%SZ"), db, next(_serial))
    if state != "complete":
        return {"id": set_id, "state": state, "error": "manifest is not valid JSON"}
    return {
        "id": set_id,
        "state": "complete",
        "database": db,
        "started_at": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "finished_at": (moment + datetime.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "verification": verification,
    }


def days(first, last, **kwargs):
    day = datetime.date.fromisoformat(first)
    end = datetime.date.fromisoformat(last)
    out = []
    while day <= end:
        out.append(entry(day.isoformat(), **kwargs))
        day += datetime.timedelta(days=1)
    return out


def by_id(decisions):
    return {d["id"]: d for d in decisions}


def kept_days(decisions, entries):
    """Start days (YYYY-MM-DD) of the entries kept, newest first."""
    keep = {d["id"] for d in decisions if d["action"] == "keep"}
    return [
        e["started_at"][:10]
        for e in sorted(entries, key=lambda e: e["id"], reverse=True)
        if e["id"] in keep
    ]


def policy(daily=0, weekly=0, monthly=0, yearly=0, min_keep=0):
    return RetentionPolicy(
        daily=daily, weekly=weekly, monthly=monthly, yearly=yearly, min_keep=min_keep
    )


# ---------------------------------------------------------------- the policy itself


def test_default_policy_is_the_seed_policy():
    assert RetentionPolicy().as_dict() == {
        "keep_daily": 7,
        "keep_weekly": 4,
        "keep_monthly": 12,
        "keep_yearly": 7,
        "min_keep": 3,
    }


@pytest.mark.parametrize("name", ["daily", "weekly", "monthly", "yearly", "min_keep"])
def test_negative_counts_are_refused_naming_the_option(name):
    with pytest.raises(ConfigError) as info:
        RetentionPolicy(**{name: -1})
    option = name if name == "min_keep" else "keep_" + name
    assert option in str(info.value) and "negative" in str(info.value)
    assert info.value.hint


@pytest.mark.parametrize("bad", ["7", 7.0, 2.5, True, None, [7]])
def test_non_integer_counts_are_refused(bad):
    with pytest.raises(ConfigError, match="keep_weekly must be a whole number") as info:
        RetentionPolicy(weekly=bad)
    assert info.value.hint


def test_policy_keeping_nothing_is_refused():
    with pytest.raises(ConfigError, match="would delete every backup") as info:
        RetentionPolicy(daily=0, weekly=0, monthly=0, yearly=0, min_keep=3)
    assert "keep_daily" in info.value.hint


def test_a_single_rule_is_a_valid_policy():
    assert RetentionPolicy(daily=0, weekly=0, monthly=0, yearly=1, min_keep=0).yearly == 1


# ---------------------------------------------------------------- grandfather-father-son


def test_a_year_of_daily_sets_under_the_seed_policy():
    entries = days("2025-11-30", "2026-11-29", verification="ok")
    for e in entries[-2:]:
        e["verification"] = "unverified"
    decisions = plan(entries, RetentionPolicy(), now=NOW)
    expected = [
        # 7 daily
        "2026-11-29",
        "2026-11-28",
        "2026-11-27",
        "2026-11-26",
        "2026-11-25",
        "2026-11-24",
        "2026-11-23",
        # weekly: the Sundays of ISO weeks 47, 46, 45 (week 48's is 11-29, already daily)
        "2026-11-22",
        "2026-11-15",
        "2026-11-08",
        # monthly: the last day of each month back to December 2025
        "2026-10-31",
        "2026-09-30",
        "2026-08-31",
        "2026-07-31",
        "2026-06-30",
        "2026-05-31",
        "2026-04-30",
        "2026-03-31",
        "2026-02-28",
        "2026-01-31",
        "2025-12-31",
    ]
    assert kept_days(decisions, entries) == expected
    assert len(decisions) == 365
    assert sum(d["action"] == "delete" for d in decisions) == 344
    newest = decisions[0]
    assert newest["reasons"] == [
        "daily 2026-11-29",
        "weekly 2026-W48",
        "monthly 2026-11",
        "yearly 2026",
        "min_keep",
        "newest",
        "newer than the newest verified",
    ]
    reasons = {d["started_at"][:10]: d["reasons"] for d in decisions}
    assert reasons["2026-11-22"] == ["weekly 2026-W47"]
    assert reasons["2025-12-31"] == ["monthly 2025-12", "yearly 2025"]
    assert reasons["2026-11-27"] == ["daily 2026-11-27", "min_keep", "newest verified"]
    assert reasons["2025-11-30"] == ["not kept by the policy"]  # the 13th month


def test_decisions_are_newest_first_and_say_what_happens():
    entries = days("2026-11-01", "2026-11-10")
    decisions = plan(entries, policy(daily=2), now=NOW)
    assert [d["id"] for d in decisions] == sorted((e["id"] for e in entries), reverse=True)
    assert [d["action"] for d in decisions] == ["keep"] * 2 + ["delete"] * 8
    assert {d["database"] for d in decisions} == {"clinic_db"}


def test_missed_days_do_not_shorten_the_history_kept():
    sets_on = ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-05"]
    sets_on += ["2026-11-08", "2026-11-09", "2026-11-10", "2026-11-12"]
    entries = [entry(d) for d in sets_on]
    decisions = plan(entries, policy(daily=5), now=NOW)
    # The 5 most recent days THAT HAVE SETS, not the 5 calendar days before the newest.
    assert kept_days(decisions, entries) == [
        "2026-11-12",
        "2026-11-10",
        "2026-11-09",
        "2026-11-08",
        "2026-11-05",
    ]


def test_a_long_outage_keeps_the_old_sets():
    # The server was off from March to November: the March sets are still the history.
    entries = days("2026-03-01", "2026-03-10") + [entry("2026-11-29")]
    decisions = plan(entries, policy(daily=4, monthly=2), now=NOW)
    assert kept_days(decisions, entries) == [
        "2026-11-29",
        "2026-03-10",
        "2026-03-09",
        "2026-03-08",
    ]


def test_newest_set_of_a_day_is_the_daily_pick():
    entries = [
        entry("2026-11-29T01:00"),
        entry("2026-11-29T13:00"),
        entry("2026-11-29T07:00"),
        entry("2026-11-28T23:59"),
    ]
    decisions = by_id(plan(entries, policy(daily=2), now=NOW))
    assert decisions[entries[1]["id"]]["reasons"] == ["daily 2026-11-29", "newest"]
    assert decisions[entries[3]["id"]]["reasons"] == ["daily 2026-11-28"]
    assert decisions[entries[0]["id"]]["action"] == "delete"
    assert decisions[entries[2]["id"]]["action"] == "delete"


def test_days_are_utc_from_started_at():
    # 23:30 UTC on the 28th is the 28th whatever the local time zone says; and the
    # time in the manifest wins over the time in the id.
    late = entry("2026-11-28T23:30")
    early = entry("2026-11-29T00:30")
    early["started_at"] = "2026-11-28T22:00:00.000000Z"
    decisions = by_id(plan([late, early], policy(daily=5), now=NOW))
    assert decisions[late["id"]]["reasons"][0] == "daily 2026-11-28"
    assert decisions[early["id"]]["action"] == "delete"


def test_iso_weeks_cross_the_new_year():
    entries = [entry("2025-12-28"), entry("2025-12-29"), entry("2026-01-04"), entry("2026-01-05")]
    decisions = by_id(plan(entries, policy(weekly=3), now=NOW))
    assert decisions[entries[3]["id"]]["reasons"][0] == "weekly 2026-W02"
    # 2025-12-29 is in ISO week 1 of 2026; the newest set of that week is 2026-01-04.
    assert decisions[entries[2]["id"]]["reasons"] == ["weekly 2026-W01"]
    assert decisions[entries[1]["id"]]["action"] == "delete"
    assert decisions[entries[0]["id"]]["reasons"] == ["weekly 2025-W52"]


def test_yearly_keeps_the_newest_set_of_each_year():
    entries = [
        entry("%d-%02d-15" % (year, month)) for year in range(2018, 2027) for month in (3, 9)
    ]
    decisions = plan(entries, policy(yearly=7), now=NOW)
    assert kept_days(decisions, entries) == ["%d-09-15" % y for y in range(2026, 2019, -1)]


# ---------------------------------------------------------------- safety rules


def test_min_keep_keeps_the_newest_sets_whatever_the_policy():
    entries = [entry("2026-11-29T%02d:00" % hour) for hour in range(10)]
    decisions = plan(entries, policy(daily=1, min_keep=5), now=NOW)
    kept = [d for d in decisions if d["action"] == "keep"]
    assert [d["started_at"][11:13] for d in kept] == ["09", "08", "07", "06", "05"]
    assert all("min_keep" in d["reasons"] for d in kept)


def test_newest_set_is_kept_even_when_only_an_old_period_is_wanted():
    entries = days("2026-11-20", "2026-11-29")
    decisions = by_id(plan(entries, policy(yearly=1), now=NOW))
    assert decisions[entries[-1]["id"]]["reasons"] == ["yearly 2026", "newest"]
    assert [d["action"] for d in decisions.values()].count("keep") == 1


def test_unverified_newest_sets_keep_everything_back_to_the_newest_verified():
    entries = days("2026-11-20", "2026-11-29")
    entries[4]["verification"] = "ok"  # 2026-11-24
    for e in entries[5:]:
        e["verification"] = "failed"  # e.g. an age check; not proven good
    decisions = plan(entries, policy(daily=1), now=NOW)
    assert kept_days(decisions, entries) == [
        "2026-11-29",
        "2026-11-28",
        "2026-11-27",
        "2026-11-26",
        "2026-11-25",
        "2026-11-24",
    ]
    reasons = by_id(decisions)
    assert reasons[entries[4]["id"]]["reasons"] == ["newest verified"]
    assert reasons[entries[6]["id"]]["reasons"] == ["newer than the newest verified"]
    # The older verified set is not protected: only the newest verified one is.
    entries[0]["verification"] = "ok"
    assert by_id(plan(entries, policy(daily=1), now=NOW))[entries[0]["id"]]["action"] == "delete"


def test_without_any_verified_set_the_policy_alone_decides():
    entries = days("2026-11-20", "2026-11-29")
    decisions = plan(entries, policy(daily=3), now=NOW)
    assert kept_days(decisions, entries) == ["2026-11-29", "2026-11-28", "2026-11-27"]


def test_latest_pointer_is_never_deleted():
    entries = days("2026-11-20", "2026-11-29")
    pinned = {entries[2]["id"]: "latest pointer"}
    decisions = by_id(plan(entries, policy(daily=1), now=NOW, pinned=pinned))
    assert decisions[entries[2]["id"]] == dict(
        decisions[entries[2]["id"]], action="keep", reasons=["latest pointer"]
    )
    assert decisions[entries[3]["id"]]["action"] == "delete"


def test_sets_dated_in_the_future_are_kept_and_take_no_slot():
    entries = days("2026-11-25", "2026-11-29") + [entry("2031-01-01")]
    decisions = by_id(plan(entries, policy(daily=2, yearly=1), now=NOW))
    assert decisions[entries[-1]["id"]]["reasons"] == ["dated in the future: left alone"]
    assert decisions[entries[-2]["id"]]["reasons"] == [
        "daily 2026-11-29",
        "yearly 2026",
        "newest",
    ]
    assert decisions[entries[-3]["id"]]["reasons"] == ["daily 2026-11-28"]
    assert sum(d["action"] == "keep" for d in decisions.values()) == 3


def test_a_start_time_that_does_not_parse_falls_back_to_the_id_or_keeps_the_set():
    entries = days("2026-11-25", "2026-11-29")
    entries[0]["started_at"] = "yesterday-ish"  # 2026-11-25 by its id
    entries[1]["started_at"] = None
    entries[1]["id"] = "20261399T010000Z-clinic_db-00ffee"  # no such date either
    decisions = by_id(plan(entries, policy(daily=5), now=NOW))
    assert decisions[entries[0]["id"]]["reasons"] == ["daily 2026-11-25"]
    assert decisions[entries[1]["id"]]["reasons"] == ["unreadable start time: left alone"]


def test_corrupt_entries_are_reported_and_never_touched():
    entries = days("2026-11-20", "2026-11-29")
    broken_old = entry("2020-01-01", state="corrupt")
    broken_new = entry("2026-11-30T01:00", state="corrupt")
    decisions = by_id(plan(entries + [broken_old, broken_new], policy(daily=2), now=NOW))
    for broken in (broken_old, broken_new):
        assert decisions[broken["id"]]["action"] == "keep"
        assert decisions[broken["id"]]["reasons"] == ["corrupt: left alone"]
        assert decisions[broken["id"]]["state"] == "corrupt"
    # A corrupt newest entry takes no slot and is not "the newest".
    assert decisions[entries[-1]["id"]]["reasons"] == ["daily 2026-11-29", "newest"]
    assert decisions[entries[-2]["id"]]["reasons"] == ["daily 2026-11-28"]
    assert decisions[entries[-3]["id"]]["action"] == "delete"


def test_each_database_is_planned_separately():
    big = days("2026-11-01", "2026-11-29", db="clinic_db")
    small = [entry("2025-06-01", db="billing"), entry("2025-06-02", db="billing")]
    decisions = by_id(plan(big + small, policy(daily=2), now=NOW))
    assert [decisions[e["id"]]["action"] for e in small] == ["keep", "keep"]
    assert decisions[small[1]["id"]]["reasons"] == ["daily 2025-06-02", "newest"]
    assert sum(decisions[e["id"]]["action"] == "keep" for e in big) == 2
    only_billing = plan(big + small, policy(daily=1), now=NOW, database="billing")
    assert sorted(d["id"] for d in only_billing) == sorted(e["id"] for e in small)
    assert [d["action"] for d in only_billing] == ["keep", "delete"]


def test_database_filter_still_reports_corrupt_entries():
    entries = days("2026-11-27", "2026-11-29") + [entry("2026-01-01", state="corrupt")]
    decisions = plan(entries, policy(daily=1), now=NOW, database="other_db")
    assert [(d["state"], d["action"]) for d in decisions] == [("corrupt", "keep")]


def test_a_plan_deleting_every_set_of_a_database_is_refused():
    entries = days("2026-11-27", "2026-11-29") + [entry("2026-11-29", db="billing")]
    decisions = plan(entries, policy(daily=1), now=NOW)
    for decision in decisions:
        if decision["database"] == "clinic_db":
            decision["action"] = "delete"
    with pytest.raises(ConfigError, match="would delete every backup of 'clinic_db'"):
        check_plan(decisions)


def test_plan_refuses_when_its_rules_keep_nothing(monkeypatch):
    # Should a rule ever break, plan() refuses instead of returning a total loss.
    monkeypatch.setattr(
        retention, "_plan_database", lambda group, *args: {e["id"]: [] for e in group}
    )
    with pytest.raises(ConfigError, match="would delete every backup"):
        plan(days("2026-11-27", "2026-11-29"), RetentionPolicy(), now=NOW)


def test_an_empty_catalog_plans_nothing():
    assert plan([], RetentionPolicy(), now=NOW) == []


# ---------------------------------------------------------------- apply_retention


def write_set(repo, when, db="clinic_db", verification=None):
    moment = at(when)
    set_id = "%s-%s-%06x" % (moment.strftime("%Y%m%dT%H%M%SZ"), db, next(_serial))
    payload = b"dump of " + set_id.encode()
    writer = repo.begin(set_id)
    sink = writer.sink("db.dump")
    sink.write(payload)
    sink.close()
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    manifest = authentication.seal(
        {
            "format_version": 1,
            "id": set_id,
            "database": db,
            "format": "custom",
            "compression": {"algorithm": "none"},
            "encryption": {"method": "none"},
            "artifacts": [
                {
                    "name": "database",
                    "file": "db.dump",
                    "content": "pg_dump-custom",
                    "size": len(payload),
                    "sha256": hashlib.sha256(payload).hexdigest(),
                }
            ],
            "started_at": stamp,
            "finished_at": stamp,
        },
        KEY,
        "manifest",
    )
    writer.commit(manifest)
    if verification:
        record = {
            "state": verification,
            "verified_at": when,
            "set_id": set_id,
            "manifest_mac": authentication.record_mac(manifest),
        }
        repo.write_verification(set_id, authentication.seal(record, KEY, "verification"))
    return set_id


def point(repo, database, set_id):
    """A sealed latest pointer, as a backup writes it."""
    pointer = {"database": database, "set_id": set_id}
    repo.write_latest(database, set_id, authentication.seal(pointer, KEY, "pointer"))


@pytest.fixture
def repo(tmp_path):
    repository = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    repository.ensure_layout()
    return repository


def test_apply_deletes_only_in_a_real_run(repo):
    ids = [write_set(repo, "2026-11-%02d" % day) for day in range(20, 30)]
    point(repo, "clinic_db", ids[-1])
    before = repo.set_ids()
    check = apply_retention(repo, policy(daily=3), check_mode=True, now=NOW)
    assert check["changed"] is True and check["check_mode"] is True
    assert check["deleted"] == ids[:7][::-1] and check["kept"] == ids[7:][::-1]
    assert repo.set_ids() == before
    real = apply_retention(repo, policy(daily=3), now=NOW)
    assert real["deleted"] == check["deleted"] and real["changed"] is True
    assert repo.set_ids() == ids[7:][::-1]
    assert os.listdir(os.path.join(repo.path, ".staging")) == []
    again = apply_retention(repo, policy(daily=3), now=NOW)
    assert again["changed"] is False and again["deleted"] == []
    assert any("is verified" in w for w in real["warnings"])


def test_apply_keeps_the_set_the_latest_pointer_names(repo):
    ids = [write_set(repo, "2026-11-%02d" % day) for day in range(20, 25)]
    point(repo, "clinic_db", ids[1])
    result = apply_retention(repo, policy(daily=1), now=NOW)
    assert repo.set_ids() == [ids[4], ids[1]]
    assert by_id(result["decisions"])[ids[1]]["reasons"] == ["latest pointer"]


def test_apply_refuses_while_a_backup_holds_the_lock(repo):
    ids = [write_set(repo, "2026-11-%02d" % day) for day in range(20, 25)]
    with RunLock(lock_path_for([repo])), pytest.raises(LockedError, match="already running"):
        apply_retention(repo, policy(daily=1), now=NOW)
    assert repo.set_ids() == ids[::-1]


def test_check_mode_neither_takes_nor_waits_for_the_lock(repo):
    ids = [write_set(repo, "2026-11-%02d" % day) for day in range(20, 25)]
    lock = lock_path_for([repo])
    with RunLock(lock):
        result = apply_retention(repo, policy(daily=1), check_mode=True, now=NOW)
    assert result["deleted"] == ids[:4][::-1] and repo.set_ids() == ids[::-1]
    # Released again: the check run did not steal it (a fresh acquire works).
    with RunLock(lock):
        pass


def test_apply_takes_every_lock_it_is_given(repo, tmp_path):
    write_set(repo, "2026-11-20")
    write_set(repo, "2026-11-21")
    other = str(tmp_path / "s3-group.lock")
    with RunLock(other), pytest.raises(LockedError):
        apply_retention(repo, policy(daily=1), now=NOW, lock_paths=[lock_path_for([repo]), other])
    assert len(repo.set_ids()) == 2


def test_apply_leaves_corrupt_sets_and_reports_them(repo):
    ids = [write_set(repo, "2026-11-%02d" % day) for day in range(20, 25)]
    atomic_write(repo.location(ids[0], "manifest.json"), b"{not json")
    result = apply_retention(repo, policy(daily=1), now=NOW)
    assert result["corrupt"] == [ids[0]]
    assert repo.set_ids() == [ids[4], ids[0]]
    assert any("corrupt" in w for w in result["warnings"])


def test_apply_cleans_stale_leftovers_only_in_a_real_run(repo):
    write_set(repo, "2026-11-20")
    stale = os.path.join(repo.path, ".staging", "20261101T010000Z-clinic_db-abcdef")
    fresh = os.path.join(repo.path, ".staging", "20261130T010000Z-clinic_db-fedcba")
    for path in (stale, fresh):
        os.makedirs(path)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    check = apply_retention(repo, policy(daily=1), check_mode=True, now=NOW)
    assert check["changed"] is False and os.path.isdir(stale)
    real = apply_retention(repo, policy(daily=1), now=NOW, stale_seconds=3600)
    assert real["incomplete_removed"] == [os.path.basename(stale)] and real["changed"] is True
    assert not os.path.exists(stale) and os.path.isdir(fresh)


def test_apply_plans_one_database_when_asked(repo):
    a = [write_set(repo, "2026-11-%02d" % day, db="clinic_db") for day in range(20, 23)]
    b = [write_set(repo, "2026-11-%02d" % day, db="billing") for day in range(20, 23)]
    result = apply_retention(repo, policy(daily=1), database="billing", now=NOW)
    assert result["deleted"] == b[:2][::-1]
    assert sorted(repo.set_ids()) == sorted(a + b[2:])
    missing = apply_retention(repo, policy(daily=1), database="nope", now=NOW)
    assert missing["changed"] is False and "no complete backup set" in missing["warnings"][0]


def test_apply_validates_its_inputs(repo):
    with pytest.raises(ConfigError, match="RetentionPolicy"):
        apply_retention(repo, {"keep_daily": 7})
    with pytest.raises(ConfigError, match="stale_seconds"):
        apply_retention(repo, RetentionPolicy(), stale_seconds=-1)


def test_a_set_without_a_mac_takes_no_slot_and_is_never_deleted(repo):
    """A planted "newest" set (no MAC, an unsealed "ok" record) must not push the real
    newest set out of the policy's slots."""
    real = [write_set(repo, "2026-11-%02d" % day, verification="ok") for day in (27, 28)]
    planted = "20261129T010000Z-clinic_db-ffffff"
    writer = repo.begin(planted)
    sink = writer.sink("db.dump")
    sink.write(b"planted")
    sink.close()
    writer.commit(
        {
            "format_version": 1,
            "id": planted,
            "database": "clinic_db",
            "format": "custom",
            "compression": {"algorithm": "none"},
            "encryption": {"method": "none"},
            "artifacts": [
                {
                    "name": "database",
                    "file": "db.dump",
                    "content": "pg_dump-custom",
                    "size": 7,
                    "sha256": hashlib.sha256(b"planted").hexdigest(),
                }
            ],
            "started_at": "2026-11-29T01:00:00.000000Z",
            "finished_at": "2026-11-29T01:00:00.000000Z",
        }
    )
    repo.write_verification(planted, {"state": "ok", "verified_at": "2026-11-29T02:00:00Z"})
    point(repo, "clinic_db", real[0])  # a replayed older pointer
    result = apply_retention(repo, policy(daily=1, min_keep=1), now=NOW)
    assert real[1] in repo.set_ids() and planted in repo.set_ids()
    assert result["deleted"] == [] or result["deleted"] == [real[0]]
    assert any("carry no MAC" in w and planted in w for w in result["warnings"])
    counted = apply_retention(
        repo, policy(daily=1, min_keep=1), now=NOW, allow_unauthenticated=True
    )
    assert planted in counted["kept"]
