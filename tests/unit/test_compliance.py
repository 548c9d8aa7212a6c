"""compliance.evaluate / render_html on status data shaped as backup_status returns it."""

from __future__ import annotations

import datetime

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import compliance
from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError

NOW = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.UTC)
AGENT = "root /usr/local/bin/clinic-backup"
CRON = (
    "15 2 * * * %s backup --config /etc/clinic-backup/clinic_db.json\n"
    "0 5 1 * * %s restore-test --config /etc/clinic-backup/clinic_db.json\n" % (AGENT, AGENT)
)


def stamp(days=0.0, hours=0.0):
    return (NOW - datetime.timedelta(days=days, hours=hours)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def copy(where, verification="ok", verified_hours=1.0):
    repo = "s3://bucket/db" if where == "s3" else "/var/backups/clinic/db"
    return {
        "repository": repo,
        "where": where,
        "present": True,
        "state": "complete",
        "verification": verification,
        "verified_at": stamp(hours=verified_hours),
    }


def group(days=3, encrypted=True, s3=True, test_days=2.0, rto=120.0, name="clinic_db"):
    sets = [
        {
            "id": "2026120%dT021500Z-%s-abcdef" % (3 - day, name),
            "finished_at": stamp(days=day, hours=1),
            "size": 1000 + day,
            "duration_seconds": 30.0,
            "encrypted": encrypted,
            "copies": [copy("local")] + ([copy("s3")] if s3 else []),
        }
        for day in range(days)
    ]
    test = (
        {"at": stamp(days=test_days), "ok": True, "rto_seconds": rto, "rpo_seconds": 3600.0}
        if test_days is not None
        else None
    )
    return {
        "name": name,
        "kind": "database",
        "repositories": ["/var/backups/clinic/db"] + (["s3://bucket/db"] if s3 else []),
        "sets": sets,
        "last_successful_restore_test": test,
        "restore_tests": [test] if test else [],
        "restore_test_text": "ok",
        "overdue": [],
        "problems": [],
    }


AUDIT = {
    "present": True,
    "intact": True,
    "path": "/var/log/clinic-backup/audit.log",
    "records": 9,
    "actions": {"backup": 3, "read": 2, "restore_test": 1, "verify": 3},
    "first_at": stamp(days=3),
}
DOCS = [
    {"kind": "procedures", "title": "runbook", "bytes": 10, "sha256": "ab" * 32},
    {"kind": "dr_plan", "title": "dr", "bytes": 10, "sha256": "cd" * 32},
]


def evaluate(groups, schedule=CRON, audit="healthy", documents=None, **objectives):
    audit = AUDIT if audit == "healthy" else audit
    documents = DOCS if documents is None else documents
    hosts = [{"host": "db1", "groups": groups, "schedule": schedule, "audit": audit}]
    return compliance.evaluate(hosts, documents, compliance.Objectives(**objectives), NOW)


def states(report):
    return {item["key"]: item["state"] for item in report["checklist"]}


def test_a_healthy_history_passes_every_line():
    report = evaluate([group()])
    assert states(report) == dict.fromkeys(states(report), "pass")
    assert report["state"] == "pass"


@pytest.mark.parametrize(
    ("change", "key", "state", "words"),
    [
        ({"groups": [group(days=0)]}, "daily_backups", "fail", "no complete backup set"),
        ({"groups": [group(encrypted=False)]}, "encrypted", "fail", "NOT encrypted"),
        ({"groups": [group(s3=False)]}, "offsite", "fail", "no off-site"),
        ({"groups": [group(test_days=None)]}, "restore_testing", "fail", "no successful"),
        ({"groups": [group(test_days=40)]}, "restore_testing", "fail", "older than"),
        ({"groups": [group(rto=7200.0)]}, "restore_testing", "warn", "RTO above"),
        ({"schedule": None}, "daily_backups", "warn", "NO cron schedule"),
        ({"audit": None}, "access_logged", "fail", "no audit log"),
        ({"audit": dict(AUDIT, intact=False, first_bad_line=4)}, "access_logged", "fail", "line 4"),
        ({"audit": dict(AUDIT, actions={"backup": 1})}, "access_logged", "warn", "backup 1"),
        ({"documents": []}, "procedures", "fail", "no restore procedures"),
    ],
)
def test_each_line_fails_on_its_own_evidence(change, key, state, words):
    arguments = {"groups": [group()]}
    arguments.update(change)
    report = evaluate(**arguments)
    item = next(i for i in report["checklist"] if i["key"] == key)
    assert item["state"] == state, item
    assert any(words in line["text"] for line in item["evidence"]), item
    assert report["state"] in (state, "fail")


def test_a_missing_day_in_the_window_is_named():
    history = group(days=4)
    del history["sets"][2]
    item = evaluate([history])["checklist"][0]
    assert item["state"] == "warn"
    assert "3 of 4 days" in item["evidence"][0]["text"]
    assert (NOW - datetime.timedelta(days=2)).date().isoformat() in item["evidence"][0]["text"]


def test_an_old_newest_set_fails_the_daily_line():
    history = group(days=3)
    for row in history["sets"]:
        row["finished_at"] = stamp(days=2 + history["sets"].index(row))
    assert states(evaluate([history]))["daily_backups"] == "fail"


def test_bad_objectives_and_no_hosts_are_refused():
    with pytest.raises(ConfigError, match="rto_hours"):
        compliance.Objectives(rto_hours=0)
    with pytest.raises(ConfigError, match="at least one host"):
        compliance.evaluate([], DOCS, compliance.Objectives(), NOW)


def test_the_page_is_self_contained_and_escapes_names():
    hostile = group(name='<script>alert("x")</script>')
    page = compliance.render_html(evaluate([hostile]), title="Report <b>")
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert page.count('<svg class="chart"') == 4
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "RTO objective" in page


def test_charts_without_data_say_so():
    page = compliance.render_html(evaluate([group(days=0, test_days=None)]))
    assert page.count("no data yet") == 4
