# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reports over catalog entries (see catalog.list_catalog): what backup_info returns.

Pure functions: they take entries already read from one or more repositories and
the current time, and never touch a repository themselves, so every rule here is
unit-tested without files or S3.

Rules:
- Sets are listed newest first (set ids start with their UTC start time); the same
  set in two repositories (local and S3) is listed once per repository.
- ``newest`` is the newest *complete* set (a corrupt manifest is never newest) that a
  restore would take: never one whose manifest carries no MAC (authentication
  ``none``); with ``require_verified`` the newest whose verification is ``ok``.
- A corrupt entry has no database (its manifest could not be read): under a
  ``database`` filter it is kept when its set id carries that database's name, so a
  broken set of the database asked about is never hidden.
- ``limit`` only shortens ``sets``: ``newest`` and ``databases`` always consider every
  matching set.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from .authentication import UNSEALED
from .errors import ConfigError
from .repository import parse_time, safe_name

SUMMARY_FIELDS = (
    "id",
    "state",
    "repository",
    "database",
    "format",
    "started_at",
    "finished_at",
    "size",
    "encrypted",
    "authentication",
    "verification",
    "verification_detail",
    "verified_at",
    "restore_tested_at",
    "restore_test_rto_seconds",
    "restore_test_rpo_seconds",
    "object_lock",
)
# Length of the "20261122T010000Z-" prefix and the "-1a2b3c" suffix of a set id.
_ID_TIME_PREFIX = 17
_ID_RANDOM_SUFFIX = 7


def check_options(limit=None, max_age_hours=None):
    """Raise ConfigError for option values that cannot mean anything."""
    if limit is not None and limit < 1:
        raise ConfigError("limit must be at least 1, not %s" % limit, "omit it to list every set")
    if max_age_hours is not None and max_age_hours < 0:
        raise ConfigError(
            "max_age_hours must not be negative, not %s" % max_age_hours,
            "e.g. 25 for a daily backup; 0 or omitted disables the staleness check",
        )


def id_database_name(set_id):
    """The file-name-safe database name embedded in a set id (repository.new_set_id)."""
    return set_id[_ID_TIME_PREFIX:-_ID_RANDOM_SUFFIX]


def row_count_summary(manifest):
    """``{"tables": n, "rows": total}`` from a manifest's per-table row counts, or None."""
    counts = manifest.get("row_counts") if isinstance(manifest, dict) else None
    if not isinstance(counts, dict):
        return None
    rows = [value for value in counts.values() if isinstance(value, int)]
    return {"tables": len(counts), "rows": sum(rows)}


def age_hours(entry, now):
    """Hours since the set finished, rounded to 0.01; None when unknown."""
    try:
        finished = parse_time(entry["finished_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return round((now - finished).total_seconds() / 3600.0, 2)


def summarize(entry, now, include_manifest=False):
    """A catalog entry as reported: without the manifest unless asked, with age and row counts."""
    if entry.get("state") != "complete":
        return {k: entry.get(k) for k in ("id", "state", "repository", "error")}
    out = {k: entry.get(k) for k in SUMMARY_FIELDS}
    out["age_hours"] = age_hours(entry, now)
    out["row_counts"] = row_count_summary(entry.get("manifest"))
    if "recovery_window" in entry:  # a base backup: how far its WAL reaches
        out["kind"] = "basebackup"
        out["recovery_window"] = entry["recovery_window"]
    if include_manifest:
        out["manifest"] = entry.get("manifest")
    return out


def matches_database(entry, database):
    if database is None:
        return True
    if entry.get("state") == "complete":
        return entry.get("database") == database
    return id_database_name(entry.get("id", "")) == safe_name(database)


def merge_entries(*entry_lists):
    """Entries of several repositories in one list, newest first.

    The sort is stable: the same set id in two repositories keeps the order in which
    the repositories were given (local before S3 in backup_info).
    """
    merged = []
    for entries in entry_lists:
        merged.extend(entries)
    return sorted(merged, key=lambda entry: entry.get("id", ""), reverse=True)


def newest_entry(entries, require_verified=False):
    """The first complete entry (verified ok, if asked) of a newest-first list, or None."""
    for entry in entries:
        if entry.get("state") != "complete" or entry.get("authentication") == UNSEALED:
            continue
        if require_verified and entry.get("verification") != "ok":
            continue
        return entry
    return None


def is_stale(entry, now, max_age_hours):
    """Whether a set finished longer than ``max_age_hours`` ago (unknown age counts as stale)."""
    age = age_hours(entry, now)
    return age is None or age > max_age_hours


def database_summary(entries, now, max_age_hours=None):
    """Per database: distinct complete sets, newest id, newest verified id, age, staleness."""
    by_database = {}
    for entry in entries:
        if entry.get("state") != "complete":
            continue
        by_database.setdefault(entry["database"], []).append(entry)
    summary = {}
    for database, group in by_database.items():
        # The newest set a restore would take: never one without a MAC (a planted set
        # must not keep the staleness check green).
        newest = newest_entry(group)
        verified = newest_entry(group, require_verified=True)
        item = {
            "count": len({entry["id"] for entry in group}),
            "newest": newest["id"] if newest else None,
            "newest_verified": verified["id"] if verified else None,
            "age_hours": age_hours(newest, now) if newest else None,
        }
        if max_age_hours:
            item["stale"] = newest is None or is_stale(newest, now, max_age_hours)
        summary[database] = item
    return summary


def build_report(
    entries,
    now,
    database=None,
    limit=None,
    newest_only=False,
    require_verified=False,
    include_manifest=False,
    max_age_hours=None,
):
    """``{"sets", "newest", "databases", "warnings"}`` for newest-first catalog entries.

    ``now`` is an aware UTC datetime. With ``max_age_hours`` (0 or None disables it),
    the newest complete set of each database gets ``stale`` (in ``sets`` and in
    ``databases``), and so does ``newest``. ``warnings`` names every corrupt set that
    matched, whether or not ``limit`` or ``newest_only`` left it out of ``sets``.
    """
    check_options(limit, max_age_hours)
    selected = [entry for entry in entries if matches_database(entry, database)]
    newest = newest_entry(selected, require_verified)
    newest_per_database = {}
    for entry in selected:
        if entry.get("state") == "complete":
            newest_per_database.setdefault(entry["database"], entry["id"])

    def report(entry):
        out = summarize(entry, now, include_manifest)
        if max_age_hours and (
            entry is newest or newest_per_database.get(entry.get("database")) == entry["id"]
        ):
            out["stale"] = is_stale(entry, now, max_age_hours)
        return out

    if newest_only:
        listed = [newest] if newest is not None else []
    else:
        listed = selected[:limit] if limit else selected
    return {
        "sets": [report(entry) for entry in listed],
        "newest": report(newest) if newest is not None else None,
        "databases": database_summary(selected, now, max_age_hours),
        "warnings": corrupt_warnings(selected),
    }


def corrupt_warnings(entries):
    """One operator warning per corrupt entry."""
    return [
        "backup set %s in %s is corrupt: %s"
        % (entry.get("id"), entry.get("repository"), entry.get("error"))
        for entry in entries
        if entry.get("state") == "corrupt"
    ]
