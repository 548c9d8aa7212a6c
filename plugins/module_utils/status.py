# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Status at a glance: one table per database and file group (``clinic-backup status``,
the backup_status module).

Pure functions, like catalog_report: they take catalog entries already read from
every repository of a config (catalog.list_catalog, authenticated with the
passphrase's key), the restore-test facts already read from the metrics file, the
audit log and the restore-test log, and the current time, and never touch a file,
so every rule is unit-tested without files or S3.

Rules:
- A set is one row; its copies (one per repository of the config, local first) are
  columns, each with its verification state and, when it is not ``ok``, its
  authentication ("NOT AUTHENTICATED", "forged"), so a planted copy is never
  mistaken for a real one.
- Overdue (each threshold 0 or None disables its check): no authenticated backup
  finished within ``backup_max_age_hours`` (25); in any repository, no copy verified
  ok within ``verify_max_age_days`` (8); no successful restore test within
  ``restore_test_max_age_days`` (32), "never" when there is no record at all.
- The restore test is the newest record of any source; one test seen by two sources
  (the agent's metrics and its audit record) is one test, the measurements of each
  filling the other's gaps.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime

from .authentication import AUTHENTICATED, NOT_CHECKED
from .catalog_report import age_hours, id_database_name, matches_database, newest_entry
from .errors import ConfigError
from .repository import parse_time, safe_name
from .units import human_duration, human_size

DEFAULT_BACKUP_MAX_AGE_HOURS = 25.0
DEFAULT_VERIFY_MAX_AGE_DAYS = 8.0
DEFAULT_RESTORE_TEST_MAX_AGE_DAYS = 32.0
DEFAULT_LIMIT = 10
# Records of one restore test written by different sources (the agent writes its audit
# record, then its metrics) are at most this many seconds apart.
SAME_TEST_SECONDS = 120.0
# Restore tests listed per group (newest first): a year of monthly tests and then some.
RESTORE_TEST_HISTORY = 50
_UTC = datetime.timezone.utc


class Thresholds(object):
    """When a database is overdue; 0 or None disables a check."""

    def __init__(
        self,
        backup_max_age_hours=DEFAULT_BACKUP_MAX_AGE_HOURS,
        verify_max_age_days=DEFAULT_VERIFY_MAX_AGE_DAYS,
        restore_test_max_age_days=DEFAULT_RESTORE_TEST_MAX_AGE_DAYS,
    ):
        for name, value in (
            ("backup_max_age_hours", backup_max_age_hours),
            ("verify_max_age_days", verify_max_age_days),
            ("restore_test_max_age_days", restore_test_max_age_days),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
            ):
                raise ConfigError(
                    "%s must be a number, 0 or more (got %r)" % (name, value),
                    "the runbook's: 25 hours, 8 days, 32 days; 0 disables the check",
                )
        self.backup_max_age_hours = backup_max_age_hours
        self.verify_max_age_days = verify_max_age_days
        self.restore_test_max_age_days = restore_test_max_age_days

    def as_dict(self):
        return {
            "backup_max_age_hours": self.backup_max_age_hours,
            "verify_max_age_days": self.verify_max_age_days,
            "restore_test_max_age_days": self.restore_test_max_age_days,
        }


# ---------------------------------------------------------------------- human forms
def human_age(seconds):
    """``2 h ago``: the largest whole unit (floor: 119 minutes is ``1 h ago``)."""
    if seconds is None:
        return "never"
    if seconds < 0:
        # A clock ahead of this host's: say so rather than print a negative age.
        return "in the future"
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return "%d %s ago" % (seconds // length, unit)
    return "%d s ago" % seconds


def local_time(moment, tz=None):
    """``2026-11-22 02:00`` in ``tz`` (default: this host's zone), for an aware datetime."""
    if moment is None:
        return "-"
    return moment.astimezone(tz).strftime("%Y-%m-%d %H:%M")


def when(moment, now, tz=None):
    """``2026-11-22 02:00 (2 h ago)``, or ``never``."""
    if moment is None:
        return "never"
    return "%s (%s)" % (local_time(moment, tz), human_age((now - moment).total_seconds()))


def _time(text, naive_utc=False):
    """An aware datetime from a catalog time or an ISO 8601 time with a zone (or, with
    ``naive_utc``, without one: taken as UTC), else None."""
    if isinstance(text, datetime.datetime):
        return text
    if not isinstance(text, str) or not text:
        return None
    try:
        return parse_time(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=_UTC) if naive_utc else None
    return moment


def _from_epoch(value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        return None
    return datetime.datetime.fromtimestamp(value, _UTC)


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# ---------------------------------------------------------------------- sets
def set_duration(manifest):
    """Seconds the backup took: the manifest's own measure, else finish minus start."""
    measured = _number(manifest.get("duration_seconds"))
    if measured is not None:
        return measured
    started, finished = _time(manifest.get("started_at")), _time(manifest.get("finished_at"))
    if started is None or finished is None:
        return None
    return (finished - started).total_seconds()


def source_bytes(manifest):
    """Bytes before compression, where the manifest records them (file sets: the files'
    bytes), else None: database manifests do not record pg_dump's output size."""
    files = manifest.get("files") if manifest.get("kind") == "files" else None
    if isinstance(files, dict):
        value = _number(files.get("bytes"))
        return int(value) if value is not None else None
    return None


def compression_ratio(manifest, stored):
    """Source bytes over stored bytes (``5.3``), or None when unknown."""
    source = source_bytes(manifest)
    if source is None or not stored:
        return None
    return round(float(source) / stored, 1)


def repository_kind(url):
    return "s3" if url.startswith("s3://") else "local"


def copy_state(entry):
    """One copy of a set as shown: verification and authentication, in words and data."""
    if entry is None:
        return {"present": False, "text": "missing"}
    if entry.get("state") != "complete":
        return {
            "present": True,
            "state": "corrupt",
            "error": entry.get("error"),
            "text": "CORRUPT",
        }
    verification = entry.get("verification") or "unverified"
    authentication = entry.get("authentication")
    copy = {
        "present": True,
        "state": "complete",
        "verification": verification,
        "verified_at": entry.get("verified_at"),
        "authentication": authentication,
    }
    if entry.get("verification_detail"):
        copy["verification_detail"] = entry["verification_detail"]
    words = {
        "ok": "verified",
        "failed": "VERIFY FAILED",
        "forged": "verification FORGED",
        "unknown": "verification unreadable",
    }.get(verification, verification)
    if verification == "ok" and entry.get("verified_at"):
        copy["_verified"] = _time(entry["verified_at"])
    if authentication != AUTHENTICATED:
        words += ", NOT AUTHENTICATED"
    copy["text"] = words
    return copy


def set_rows(entries, urls, now, tz=None):
    """One row per set id (newest first) with a copy per repository url."""
    by_id = {}
    order = []
    for entry in sorted(entries, key=lambda e: e.get("id", ""), reverse=True):
        if entry.get("id") not in by_id:
            order.append(entry.get("id"))
        by_id.setdefault(entry.get("id"), {})[entry.get("repository")] = entry
    rows = []
    for set_id in order:
        copies = by_id[set_id]
        complete = [e for e in copies.values() if e.get("state") == "complete"]
        row = {"id": set_id}
        if complete:
            first = complete[0]
            manifest = first.get("manifest") or {}
            finished = _time(first.get("finished_at"))
            hours = age_hours(first, now)
            row.update(
                finished_at=first.get("finished_at"),
                finished=when(finished, now, tz),
                age_seconds=round(hours * 3600.0) if hours is not None else None,
                duration_seconds=set_duration(dict(manifest, **first)),
                size=first.get("size"),
                ratio=compression_ratio(manifest, first.get("size")),
                kind=manifest.get("kind", "database"),
                encrypted=(manifest.get("encryption") or {}).get("method", "none") != "none",
            )
            if first.get("recovery_window"):
                row["recovery_window"] = first["recovery_window"]
        row["copies"] = []
        for url in urls:
            copy = copy_state(copies.get(url))
            copy["repository"] = url
            copy["where"] = repository_kind(url)
            if copy.get("_verified") is not None:
                copy["text"] += " " + human_age((now - copy.pop("_verified")).total_seconds())
            copy.pop("_verified", None)
            row["copies"].append(copy)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- restore tests
def restore_tests_from_metrics(values):
    """Restore-test records from the agent's metrics (metrics.read_previous of
    ``clinic_backup_restore_test.<name>.prom``): the last run, and the last success
    when the last run failed (its time is kept; its measurements are not)."""
    if not values:
        return []
    last_run = _from_epoch(values.get("clinic_backup_last_run_timestamp_seconds"))
    if last_run is None:
        return []
    ok = values.get("clinic_backup_last_status") == 0
    records = [
        {
            "at": last_run,
            "ok": ok,
            "rto_seconds": _number(values.get("clinic_backup_last_duration_seconds"))
            if ok
            else None,
            "rpo_seconds": _number(values.get("clinic_backup_restore_test_rpo_seconds"))
            if ok
            else None,
            "source": "metrics",
        }
    ]
    last_success = _from_epoch(values.get("clinic_backup_last_success_timestamp_seconds"))
    if not ok and last_success is not None:
        records.append({"at": last_success, "ok": True, "source": "metrics"})
    return records


def restore_tests_from_audit(records, name):
    """Restore-test records of ``name`` from audit log lines (dicts): the agent's and
    backup_restore's rehearsals. A run skipped on the lock tested nothing."""
    found = []
    for record in records:
        if not isinstance(record, dict) or record.get("action") != "restore_test":
            continue
        if record.get("database") != name or record.get("outcome") == "skipped":
            continue
        moment = _time(record.get("time"))
        if moment is None:
            continue
        found.append(
            _test_record(
                moment,
                record.get("outcome") == "ok",
                record.get("set_id"),
                record.get("duration_seconds"),
                record.get("rpo_seconds"),
                "audit log",
                record.get("detail"),
            )
        )
    return found


def _test_record(at, ok, set_id, rto, rpo, source, error=None):
    return {
        "at": at,
        "ok": ok,
        "set_id": set_id,
        "rto_seconds": _number(rto),
        "rpo_seconds": _number(rpo),
        "source": source,
        "error": error,
    }


def restore_tests_from_catalog(entries, name):
    """Restore-test records of ``name`` from the sets' own sealed restore_test.json
    (the catalog reads and authenticates them): present whichever path ran the test,
    even when the audit log and the metrics are elsewhere."""
    found = []
    for entry in entries:
        if not matches_database(entry, name) or entry.get("state") != "complete":
            continue
        moment = _time(entry.get("restore_tested_at"))
        if moment is None:
            continue
        found.append(
            _test_record(
                moment,
                True,
                entry.get("id"),
                entry.get("restore_test_rto_seconds"),
                entry.get("restore_test_rpo_seconds"),
                "catalog",
            )
        )
    return found


def restore_tests_from_log(records, name, urls=()):
    """Restore-test records of ``name`` from playbooks/restore_test.yml's log
    (clinic_backup_restore_test_log): by the set id's database, or for a failure that
    chose no set, by the location it read."""
    found = []
    for record in records:
        if not isinstance(record, dict):
            continue
        set_id = record.get("set_id")
        if isinstance(set_id, str) and set_id:
            if id_database_name(set_id) != safe_name(name):
                continue
        elif record.get("location") not in urls:
            continue
        # restore_test.yml writes now(utc=true), which some ansible-core versions
        # give without a zone.
        moment = _time(record.get("time"), naive_utc=True)
        if moment is None:
            continue
        problems = record.get("problems") or []
        found.append(
            {
                "at": moment,
                "ok": record.get("outcome") == "passed",
                "set_id": set_id,
                "rto_seconds": _number(record.get("rto_seconds")),
                "rpo_seconds": _number(record.get("rpo_seconds")),
                "source": "restore test log",
                "error": record.get("error") or ("; ".join(problems) if problems else None),
            }
        )
    return found


def merge_tests(records):
    """Newest first, one record per test: records of one outcome within SAME_TEST_SECONDS
    are one test seen by two sources, each filling the other's missing fields."""
    merged = []
    for record in sorted(records, key=lambda r: r["at"], reverse=True):
        for test in merged:
            if (
                test["ok"] == record["ok"]
                and abs((test["at"] - record["at"]).total_seconds()) <= SAME_TEST_SECONDS
                and (
                    not test.get("set_id")
                    or not record.get("set_id")
                    or test["set_id"] == record["set_id"]
                )
            ):
                for key, value in record.items():
                    if key == "source":
                        if value not in test["sources"]:
                            test["sources"].append(value)
                    elif test.get(key) is None:
                        test[key] = value
                break
        else:
            test = {k: v for k, v in record.items() if k != "source"}
            test["sources"] = [record.get("source")]
            merged.append(test)
    return merged


def _derive_rpo(test, entries):
    """A record without an RPO (older audit records): the test's time minus the start
    of the set it restored, which is how the restore measures it (to within its RTO)."""
    if test.get("rpo_seconds") is not None or not test.get("set_id"):
        return test
    for entry in entries:
        if entry.get("id") == test["set_id"] and entry.get("state") == "complete":
            started = _time(entry.get("started_at"))
            if started is not None:
                test = dict(test, rpo_seconds=round((test["at"] - started).total_seconds(), 1))
                test["rpo_derived"] = True
            break
    return test


def describe_test(test, now, tz=None):
    if test is None:
        return "never"
    parts = [
        "%s %s" % ("ok" if test["ok"] else "FAILED", when(test["at"], now, tz)),
    ]
    if test.get("set_id"):
        parts.append("set %s" % test["set_id"])
    if test["ok"]:
        parts.append("RTO %s" % human_duration(test.get("rto_seconds")))
        parts.append(
            "RPO %s%s"
            % ("~" if test.get("rpo_derived") else "", human_duration(test.get("rpo_seconds")))
        )
    elif test.get("error"):
        parts.append(str(test["error"])[:200])
    return ", ".join(parts)


def _test_out(test):
    if test is None:
        return None
    out = {k: v for k, v in test.items() if k != "at"}
    out["at"] = test["at"].astimezone(_UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return out


# ---------------------------------------------------------------------- overdue
def overdue(entries, urls, last_ok_test, now, thresholds):
    """What is overdue, each ``{"check", "message"}`` (see the module's rules)."""
    found = []
    limit = thresholds.backup_max_age_hours
    if limit:
        newest = newest_entry(
            [e for e in entries if e.get("authentication") in (AUTHENTICATED, NOT_CHECKED)]
        )
        # Seconds, not age_hours(): its rounding to 0.01 h would hide a tiny threshold.
        finished = _time(newest.get("finished_at")) if newest is not None else None
        age = (now - finished).total_seconds() if finished is not None else None
        if age is None or age > limit * 3600.0:
            found.append(
                {
                    "check": "backup",
                    "message": "no backup in %s (newest: %s)"
                    % (
                        human_duration(limit * 3600.0),
                        human_age(age) if age is not None else "none",
                    ),
                }
            )
    limit = thresholds.verify_max_age_days
    if limit:
        for url in urls:
            times = [
                _time(e.get("verified_at"))
                for e in entries
                if e.get("repository") == url
                and e.get("verification") == "ok"
                and e.get("authentication") in (AUTHENTICATED, NOT_CHECKED)
            ]
            times = [t for t in times if t is not None]
            last = max(times) if times else None
            if last is None or (now - last).total_seconds() > limit * 86400.0:
                found.append(
                    {
                        "check": "verify",
                        "repository": url,
                        "message": "no verify in %s in %s (last: %s)"
                        % (
                            human_duration(limit * 86400.0),
                            url,
                            human_age((now - last).total_seconds()) if last else "never",
                        ),
                    }
                )
    limit = thresholds.restore_test_max_age_days
    if limit:
        age = (now - last_ok_test["at"]).total_seconds() if last_ok_test else None
        if age is None or age > limit * 86400.0:
            found.append(
                {
                    "check": "restore_test",
                    "message": "no restore test in %s (last successful: %s)"
                    % (human_duration(limit * 86400.0), human_age(age)),
                }
            )
    return found


# ---------------------------------------------------------------------- groups
def group_status(
    name,
    urls,
    entries,
    tests,
    now,
    thresholds=None,
    limit=DEFAULT_LIMIT,
    authenticated=True,
    errors=(),
    tz=None,
):
    """The status of one database or file group.

    ``urls``: the config's repositories (local first); ``entries``: catalog entries of
    all of them (any name: filtered here); ``tests``: restore-test records from
    restore_tests_from_metrics / _audit / _log; ``authenticated``: whether
    the entries were read with the passphrase's key; ``errors``: texts of what could
    not be read (a repository, the audit log).
    """
    thresholds = thresholds or Thresholds()
    if limit is not None and limit < 1:
        raise ConfigError("limit must be at least 1, not %s" % limit, "omit it for 10 sets")
    selected = [e for e in entries if matches_database(e, name)]
    kinds = {
        (e.get("manifest") or {}).get("kind", "database")
        for e in selected
        if e.get("state") == "complete"
    }
    rows = set_rows(selected, list(urls), now, tz)
    merged = [
        _derive_rpo(t, selected)
        for t in merge_tests(list(tests) + restore_tests_from_catalog(selected, name))
    ]
    last_test = merged[0] if merged else None
    last_ok = next((t for t in merged if t["ok"]), None)
    problems = list(errors)
    if not authenticated:
        problems.append(
            "records NOT AUTHENTICATED: the config has no passphrase_file, so a set planted "
            "by someone who can write to the repository would be listed like a real one"
        )
    for entry in selected:
        if entry.get("state") == "corrupt":
            problems.append(
                "set %s in %s is corrupt: %s"
                % (entry.get("id"), entry.get("repository"), entry.get("error"))
            )
        elif entry.get("verification") == "forged":
            problems.append(
                "set %s in %s: verification record forged (%s)"
                % (entry.get("id"), entry.get("repository"), entry.get("verification_detail"))
            )
        elif authenticated and entry.get("authentication") != AUTHENTICATED:
            problems.append(
                "set %s in %s is NOT AUTHENTICATED (it carries no MAC: written before records "
                "were sealed, or planted)" % (entry.get("id"), entry.get("repository"))
            )
    if last_test is not None and not last_test["ok"]:
        problems.append("the last restore test FAILED: %s" % describe_test(last_test, now, tz))
    return {
        "name": name,
        "kind": next(iter(kinds)) if len(kinds) == 1 else "database",
        "repositories": list(urls),
        "authenticated": bool(authenticated),
        "sets": rows[:limit] if limit else rows,
        "older_sets": max(len(rows) - limit, 0) if limit else 0,
        "restore_test": _test_out(last_test),
        "last_successful_restore_test": _test_out(last_ok),
        "restore_test_text": describe_test(last_test, now, tz),
        "restore_tests": [_test_out(t) for t in merged[:RESTORE_TEST_HISTORY]],
        "overdue": overdue(selected, list(urls), last_ok, now, thresholds),
        "problems": problems,
        "errors": list(errors),
    }


def error_group(name, message):
    """A group whose config or repositories could not be read at all."""
    return {
        "name": name,
        "kind": None,
        "repositories": [],
        "authenticated": False,
        "sets": [],
        "older_sets": 0,
        "restore_test": None,
        "last_successful_restore_test": None,
        "restore_test_text": "unknown",
        "restore_tests": [],
        "overdue": [],
        "problems": [message],
        "errors": [message],
        "error": message,
    }


# ---------------------------------------------------------------------- text
def _columns(urls):
    """Column titles of the copies: LOCAL, S3 (S3 #2... when there are several)."""
    titles, count = [], {}
    for url in urls:
        kind = repository_kind(url)
        count[kind] = count.get(kind, 0) + 1
        titles.append(kind.upper() if count[kind] == 1 else "%s #%d" % (kind.upper(), count[kind]))
    return titles


def _table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return [
        "  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [header] + rows
    ]


def recovery_window_text(rows):
    """Where point-in-time recovery can reach (base backups + archived WAL): from the
    oldest listed base backup's consistent point to the newest archived segment."""
    windows = [r["recovery_window"] for r in rows if r.get("recovery_window")]
    if not windows:
        return None
    earliest = min((w["earliest"] for w in windows if w.get("earliest")), default=None)
    latest = max((w["latest"] for w in windows if w.get("latest")), default=None)
    text = "%s -> %s" % (earliest or "?", latest or "?")
    problems = [w["problem"] for w in windows[:1] if w.get("problem")]
    if problems:
        text += " (newest base backup: %s)" % problems[0]
    return text


def render_group(group):
    """The lines of one group's table."""
    title = "%s (%s)" % (group["name"], group["kind"] or "unreadable")
    lines = [title, "=" * len(title)]
    if group.get("error"):
        return lines + ["ERROR: %s" % group["error"], ""]
    titles = _columns(group["repositories"])
    lines.extend("%s = %s" % (t, url) for t, url in zip(titles, group["repositories"]))
    if group["sets"]:
        header = ["SET", "FINISHED", "DURATION", "SIZE", "RATIO"] + titles
        rows = []
        for row in group["sets"]:
            rows.append(
                [
                    row["id"],
                    row.get("finished", "-"),
                    human_duration(row.get("duration_seconds")),
                    human_size(row.get("size")),
                    "%.1fx" % row["ratio"] if row.get("ratio") else "-",
                ]
                + [c["text"] for c in row["copies"]]
            )
        lines.extend(_table(header, rows))
        if group["older_sets"]:
            lines.append("... and %d older set(s) (--limit)" % group["older_sets"])
    else:
        lines.append("no backup sets")
    window = recovery_window_text(group["sets"])
    if window:
        lines.append("recovery window: %s" % window)
    lines.append("last restore test: %s" % group["restore_test_text"])
    if group["overdue"]:
        lines.extend("OVERDUE: %s" % item["message"] for item in group["overdue"])
    else:
        lines.append("overdue: nothing")
    lines.extend("PROBLEM: %s" % p for p in group["problems"])
    lines.append("")
    return lines


def render(report):
    """The whole status as text (one table per group)."""
    lines = ["clinic.backup status at %s" % report["generated_local"], ""]
    for group in report["groups"]:
        lines.extend(render_group(group))
    return "\n".join(lines).rstrip("\n") + "\n"


def build_status(groups, now, thresholds=None, tz=None):
    """The JSON form: ``{"generated_at", "generated_local", "thresholds", "groups",
    "overdue"}``; ``overdue`` is true when any group is overdue or unreadable."""
    thresholds = thresholds or Thresholds()
    return {
        "generated_at": now.astimezone(_UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "generated_local": local_time(now, tz),
        "thresholds": thresholds.as_dict(),
        "groups": list(groups),
        "overdue": any(g["overdue"] or g.get("error") for g in groups),
    }
