# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Retention: which backup sets to keep (grandfather-father-son) and deleting the rest.

Counting follows borg's and restic's ``--keep-daily`` / ``--keep-weekly`` /
``--keep-monthly`` / ``--keep-yearly``: ``daily=7`` keeps the newest set of each of
the 7 most recent days *that have sets*, not of the last 7 calendar days.  A missed
night (or a month with the server switched off) therefore never shortens the history
that is kept; the oldest sets only go once newer periods with sets replace them.
Periods are taken in UTC from each set's ``started_at`` (days ``2026-11-29``, ISO
weeks ``2026-W48``, months ``2026-11``, years ``2026``).  The rules overlap as in
restic: one set can be the daily, weekly, monthly and yearly pick at once, so the
runbook policy (7 days, 4 weeks, 12 months, 7 years) keeps about 25 sets, not 30.

Whatever the policy, these safety rules hold for each database separately:

* the newest complete set is kept;
* the newest set whose verification is ``ok`` is kept, and so is every set newer
  than it (those are not proven restorable yet, the verified one is);
* at least ``min_keep`` complete sets are kept (the newest ones);
* the set named by the database's ``latest`` pointer is kept;
* every set a kept set builds on (the full and earlier sets of an incremental file
  set's chain, file_chain.py) is kept, "needed by" the newest set that needs it;
* a set dated after ``now`` (a host clock that was wrong) is kept and takes no slot;
* corrupt entries (a manifest that does not parse) are reported, never touched;
* a plan that would leave a database without any complete set is refused;
* a set still under S3 Object Lock is kept (reported with the date it unlocks).

Base backups (kind ``basebackup``) are sets of their cluster's name and follow the same
policy; after the sets, the cluster's WAL older than the start_wal of its earliest kept
base backup is deleted (never a segment a kept base backup needs, never a history file).

Verification ``failed`` does not by itself make a set deletable: verify also fails
sets for their age or an unusual size, which says nothing about their content.

The engine never imports Ansible: the module and the host agent both call
``apply_retention``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import datetime

from . import file_chain
from .authentication import UNSEALED
from .basebackup import prune_unneeded_wal
from .catalog import list_catalog
from .errors import BackupError, ConfigError, StoreError
from .locking import RunLock, lock_path_for
from .repository import MANIFEST, parse_time, utc_now

KEEP = "keep"
DELETE = "delete"
CORRUPT_REASON = "corrupt: left alone"
UNAUTHENTICATED_REASON = (
    "not authenticated (no MAC): left alone and not counted; delete it by hand once you know "
    "whether it is a set written before records were sealed or a planted one"
)
DELETE_REASON = "not kept by the policy"
LOCKED_REASON = "S3 Object Lock (%s) until %s: kept until it unlocks"

# (attribute, option name, period label) in the order reasons are listed.
RULES = (
    ("daily", "keep_daily", "daily"),
    ("weekly", "keep_weekly", "weekly"),
    ("monthly", "keep_monthly", "monthly"),
    ("yearly", "keep_yearly", "yearly"),
)


def period_key(rule, moment):
    """The period a UTC datetime falls in: '2026-11-29', '2026-W48', '2026-11' or '2026'."""
    if rule == "daily":
        return moment.strftime("%Y-%m-%d")
    if rule == "weekly":
        year, week, _day = moment.isocalendar()
        return "%04d-W%02d" % (year, week)
    if rule == "monthly":
        return moment.strftime("%Y-%m")
    if rule == "yearly":
        return moment.strftime("%Y")
    raise ValueError("unknown retention rule %r" % (rule,))


class RetentionPolicy(object):
    """How many daily, weekly, monthly and yearly sets to keep, plus a floor.

    The defaults are the runbook's policy: 7 days, 4 weeks, 12 months, 7 years, and never
    fewer than 3 sets.  Raises ConfigError for negative or non-integer counts and for
    a policy whose four period counts are all zero (it would delete every backup).
    """

    def __init__(self, daily=7, weekly=4, monthly=12, yearly=7, min_keep=3):
        values = {"daily": daily, "weekly": weekly, "monthly": monthly, "yearly": yearly}
        values["min_keep"] = min_keep
        names = {attr: option for attr, option, _label in RULES}
        names["min_keep"] = "min_keep"
        for attr in ("daily", "weekly", "monthly", "yearly", "min_keep"):
            value = values[attr]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(
                    "%s must be a whole number, got %r" % (names[attr], value),
                    "give a count of sets such as 7; 0 turns the rule off",
                )
            if value < 0:
                raise ConfigError(
                    "%s must not be negative (got %d)" % (names[attr], value),
                    "give a count of sets such as 7; 0 turns the rule off",
                )
        if not any(values[attr] for attr, _option, _label in RULES):
            raise ConfigError(
                "retention policy keeps no daily, weekly, monthly or yearly set:"
                " it would delete every backup but the newest",
                "set at least one of keep_daily, keep_weekly, keep_monthly, keep_yearly,"
                " e.g. the runbook's policy 7/4/12/7",
            )
        self.daily = daily
        self.weekly = weekly
        self.monthly = monthly
        self.yearly = yearly
        self.min_keep = min_keep

    def count(self, rule):
        return getattr(self, rule)

    def as_dict(self):
        return {
            "keep_daily": self.daily,
            "keep_weekly": self.weekly,
            "keep_monthly": self.monthly,
            "keep_yearly": self.yearly,
            "min_keep": self.min_keep,
        }

    def __repr__(self):
        return "RetentionPolicy(daily=%d, weekly=%d, monthly=%d, yearly=%d, min_keep=%d)" % (
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
            self.min_keep,
        )


def set_time(entry):
    """UTC start of a catalog entry: its manifest's started_at, else the time in its id."""
    try:
        return parse_time(entry["started_at"])
    except (KeyError, TypeError, ValueError):
        pass
    try:
        return datetime.datetime.strptime(entry["id"][:16], "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.timezone.utc
        )
    except (KeyError, TypeError, ValueError):
        return None


def _decision(entry, action, reasons):
    return {
        "id": entry["id"],
        "state": entry.get("state"),
        "database": entry.get("database"),
        "action": action,
        "reasons": reasons,
        "started_at": entry.get("started_at"),
        "verification": entry.get("verification"),
    }


def _plan_database(entries, policy, now, pinned):
    """Reasons to keep each complete set of one database (an empty list: delete)."""
    reasons = {e["id"]: [] for e in entries}
    dated = []
    for entry in entries:
        moment = set_time(entry)
        if moment is None:
            reasons[entry["id"]].append("unreadable start time: left alone")
        elif moment > now:
            reasons[entry["id"]].append("dated in the future: left alone")
        else:
            dated.append((moment, entry))
    # Newest first; the id (which starts with the start time) breaks ties.
    dated.sort(key=lambda item: (item[0], item[1]["id"]), reverse=True)
    for rule, _option, label in RULES:
        wanted = policy.count(rule)
        seen = set()
        for moment, entry in dated:
            key = period_key(rule, moment)
            if key in seen:
                continue
            if len(seen) >= wanted:
                break
            seen.add(key)
            reasons[entry["id"]].append("%s %s" % (label, key))
    for _moment, entry in dated[: policy.min_keep]:
        reasons[entry["id"]].append("min_keep")
    if dated:
        reasons[dated[0][1]["id"]].append("newest")
    verified = [i for i, (_m, e) in enumerate(dated) if e.get("verification") == "ok"]
    if verified:
        newest_ok = verified[0]
        reasons[dated[newest_ok][1]["id"]].append("newest verified")
        for _moment, entry in dated[:newest_ok]:
            reasons[entry["id"]].append("newer than the newest verified")
    for set_id, why in pinned.items():
        if set_id in reasons:
            reasons[set_id].append(why)
    # Newest first, so that a set kept only because a newer one needs it keeps its own chain.
    # (Ordered as the catalog orders sets: two sets of one second by their start time.)
    order = sorted(entries, key=lambda e: (e["id"][:16], e.get("started_at") or "", e["id"]))
    for entry in reversed(order):
        if reasons[entry["id"]]:
            for needed in file_chain.dependencies(entry.get("manifest")):
                if needed in reasons and not reasons[needed]:
                    reasons[needed].append("needed by %s" % entry["id"])
    return reasons


def plan(entries, policy, now=None, database=None, pinned=None, allow_unauthenticated=False):
    """Decide, without any I/O, which sets to keep and which to delete.

    ``entries``: catalog entries (``catalog.list_catalog``), in any order.
    ``database``: plan only the sets of this database (corrupt entries, whose
    database cannot be read, are always reported).
    ``pinned``: ``{set_id: reason}`` of sets that must stay (the latest pointers).
    Sets without a MAC are left alone and not counted unless ``allow_unauthenticated``.

    Returns one decision per entry, newest first: ``{"id", "state", "database",
    "action" ("keep" or "delete"), "reasons", "started_at", "verification"}``.  Raises
    ConfigError if the plan would leave a database without a complete set.
    """
    if not isinstance(policy, RetentionPolicy):
        raise ConfigError("retention needs a RetentionPolicy, got %r" % (policy,))
    now = now or utc_now()
    pinned = dict(pinned or {})
    by_database = {}
    decisions = {}
    for entry in entries:
        if entry.get("state") != "complete":
            decisions[entry["id"]] = _decision(entry, KEEP, [CORRUPT_REASON])
            continue
        if database is not None and entry.get("database") != database:
            continue
        if entry.get("authentication") == UNSEALED and not allow_unauthenticated:
            # Checked with the key and found without a MAC: written before records were
            # sealed, or planted. It takes no slot of the policy (a planted "newest"
            # must not push a real set out) and is never deleted here.
            decisions[entry["id"]] = _decision(entry, KEEP, [UNAUTHENTICATED_REASON])
            continue
        by_database.setdefault(entry["database"], []).append(entry)
    for group in by_database.values():
        reasons = _plan_database(group, policy, now, pinned)
        for entry in group:
            why = reasons[entry["id"]]
            decisions[entry["id"]] = _decision(
                entry, KEEP if why else DELETE, why or [DELETE_REASON]
            )
    ordered = [decisions[set_id] for set_id in sorted(decisions, reverse=True)]
    check_plan(ordered)
    return ordered


def check_plan(decisions):
    """Refuse (ConfigError) a plan that leaves a database with no complete set."""
    kept = set()
    databases = set()
    for decision in decisions:
        if decision["state"] != "complete":
            continue
        databases.add(decision["database"])
        if decision["action"] == KEEP:
            kept.add(decision["database"])
    lost = sorted(databases - kept, key=str)
    if lost:
        raise ConfigError(
            "refusing a retention plan that would delete every backup of %s"
            % ", ".join(repr(d) for d in lost),
            "this is a bug or a broken catalog: nothing was deleted",
        )
    return decisions


def keep_locked(repo, entries, decisions, warnings):
    """Turn the deletion of a set still under S3 Object Lock (any of its objects: a
    retention date not reached, or a legal hold) into a keep, with the date it unlocks:
    S3 would refuse the deletion, and one locked set must not fail the whole run.
    Returns [{"id", "mode", "retain_until", "legal_hold"}] of the sets kept so."""
    manifests = {e["id"]: e.get("manifest") for e in entries if e.get("state") == "complete"}
    locked = []
    for decision in decisions:
        manifest = manifests.get(decision["id"])
        if decision["action"] != DELETE or manifest is None:
            continue  # (a deletion of an incomplete set is refused right after)
        files = [MANIFEST] + [a["file"] for a in manifest["artifacts"]]
        try:
            lock = repo.object_lock_of(decision["id"], files)
        except BackupError as exc:
            # Unknown is not unlocked: keep it, and say why.
            decision["action"] = KEEP
            decision["reasons"] = ["Object Lock state unreadable (%s): left alone" % exc]
            warnings.append("could not read the Object Lock of %s: %s" % (decision["id"], exc))
            continue
        if lock is None:
            continue
        decision["action"] = KEEP
        decision["reasons"] = [
            LOCKED_REASON % (lock["mode"] or "legal hold", lock["retain_until"] or "released")
        ]
        decision["object_lock"] = lock
        locked.append(dict(lock, id=decision["id"]))
    return locked


def lock_paths_for(repositories):
    """Every lock a backup writing to any of ``repositories`` could hold.

    A backup locks the first local repository of its targets, or (S3 only) a file
    named after all of its S3 targets.  Retention takes the lock of the whole group
    and of each repository alone, so it waits for none and races none of them.
    """
    repositories = list(repositories)
    paths = [lock_path_for(repositories)] + [lock_path_for([r]) for r in repositories]
    unique = []
    for path in paths:
        if path not in unique:
            unique.append(path)
    return unique


def apply_retention(
    repo,
    policy,
    database=None,
    check_mode=False,
    now=None,
    stale_seconds=3600,
    lock_paths=None,
    key=None,
    allow_unauthenticated=False,
):
    """Apply ``policy`` to one repository (LocalRepository or S3Repository).

    ``key`` (authentication.RecordKey of the passphrase): a set whose manifest fails
    its MAC is corrupt (left alone, never counted as a kept set), a verification record
    or ``latest`` pointer that fails its MAC counts for nothing. Without it nothing is
    authenticated, and the result warns. A set without a MAC (written before records
    were sealed, or planted) is left alone and takes no slot of the policy, unless
    ``allow_unauthenticated`` (pruning the sets of older versions once).

    Holds the repository lock(s) (``lock_paths``, by default those of ``repo``) for
    the whole run, so it never races a backup: a held lock raises LockedError.  In
    check mode nothing is locked, deleted or cleaned up; the result says what a real
    run would delete.  A real run also removes leftovers of killed runs older than
    ``stale_seconds`` (staging directories, unfinished S3 uploads).

    A set the policy would delete but whose objects are still under S3 Object Lock is
    kept, with the date it unlocks (``locked``); a later run deletes it.

    Returns ``{"changed", "repository", "policy", "kept", "deleted", "corrupt", "locked",
    "decisions", "incomplete_removed", "warnings", "check_mode"}`` (set ids newest
    first; ``deleted`` lists what would be deleted in check mode).  If a deletion
    fails, the StoreError raised carries the partial result as ``exc.result``.
    """
    if not isinstance(policy, RetentionPolicy):
        raise ConfigError("retention needs a RetentionPolicy, got %r" % (policy,))
    if isinstance(stale_seconds, bool) or not isinstance(stale_seconds, int) or stale_seconds < 0:
        raise ConfigError(
            "stale_seconds must be a whole number of 0 or more, got %r" % (stale_seconds,)
        )
    now = now or utc_now()
    repo.check_writable()
    if lock_paths is None:
        lock_paths = lock_paths_for([repo])
    with contextlib.ExitStack() as stack:
        if not check_mode:
            # No lock in check mode: it changes nothing, and holding the lock even
            # briefly could make a backup starting at that moment fail.
            for path in lock_paths:
                stack.enter_context(RunLock(path))
        return _apply_locked(
            repo, policy, database, check_mode, now, stale_seconds, key, allow_unauthenticated
        )


def _apply_locked(
    repo, policy, database, check_mode, now, stale_seconds, key, allow_unauthenticated
):
    entries = list_catalog(repo, key=key)
    databases = sorted(
        {
            e["database"]
            for e in entries
            if e.get("state") == "complete" and database in (None, e["database"])
        }
    )
    pinned = {}
    for name in databases:
        pointer = repo.read_latest(name, key)
        if pointer:
            pinned[pointer] = "latest pointer"
    decisions = plan(
        entries,
        policy,
        now=now,
        database=database,
        pinned=pinned,
        allow_unauthenticated=allow_unauthenticated,
    )
    warnings = []
    if database is not None and not databases:
        warnings.append("no complete backup set of database %r in %s" % (database, repo.url))
    for name in databases:
        if not any(d["database"] == name and d["verification"] == "ok" for d in decisions):
            warnings.append(
                "no set of database %r in %s is verified: retention kept sets by date only"
                % (name, repo.url)
            )
    corrupt = [d["id"] for d in decisions if d["state"] != "complete"]
    if corrupt:
        warnings.append(
            "%d corrupt set(s) in %s left alone: %s" % (len(corrupt), repo.url, ", ".join(corrupt))
        )
    unsealed = [d["id"] for d in decisions if d["reasons"] == [UNAUTHENTICATED_REASON]]
    if unsealed:
        warnings.append(
            "%d set(s) in %s carry no MAC and were left alone, not counted by the policy: %s"
            % (len(unsealed), repo.url, ", ".join(unsealed))
        )
    if key is None:
        warnings.append(
            "sets in %s were not authenticated (no passphrase_file): a planted or altered set "
            "would count like a real one" % repo.url
        )
    complete_ids = {e["id"] for e in entries if e.get("state") == "complete"}
    locked = keep_locked(repo, entries, decisions, warnings)
    to_delete = [d["id"] for d in decisions if d["action"] == DELETE]
    if not set(to_delete) <= complete_ids:
        # plan() only ever deletes complete sets; never act on a plan that does not.
        raise BackupError("retention plan names sets that are not complete: nothing deleted")
    result = {
        "changed": bool(to_delete),
        "repository": repo.url,
        "policy": policy.as_dict(),
        "kept": [d["id"] for d in decisions if d["action"] == KEEP and d["id"] in complete_ids],
        "deleted": list(to_delete),
        "corrupt": corrupt,
        "locked": locked,
        "decisions": decisions,
        "incomplete_removed": [],
        "warnings": warnings,
        "check_mode": bool(check_mode),
    }
    kept_ids = set(result["kept"])
    kept_manifests = [
        e["manifest"]
        for e in entries
        if e["id"] in kept_ids and database in (None, e.get("database"))
    ]
    if check_mode:
        result["wal"] = prune_unneeded_wal(repo, kept_manifests, key, check_mode=True)
        result["changed"] = result["changed"] or any(w["deleted"] for w in result["wal"])
        return result
    done = []
    try:
        # Oldest first: if a run dies half-way, the newer sets are the ones still there.
        for set_id in reversed(to_delete):
            repo.delete_set(set_id)
            if repo.read_file(set_id, MANIFEST) is not None:
                raise StoreError(
                    "backup set %s in %s still has its manifest after deletion"
                    % (set_id, repo.url),
                    "check that the backup user may delete there",
                )
            done.append(set_id)
    except BackupError as exc:
        result["deleted"] = sorted(done, reverse=True)
        result["changed"] = bool(done)
        exc.result = result
        raise
    result["incomplete_removed"] = list(
        repo.cleanup_incomplete(older_than_seconds=stale_seconds) or []
    )
    # Sets first, then the WAL only the deleted base backups needed: a run that dies
    # in between leaves WAL nobody needs, never a base backup without its WAL.
    result["wal"] = prune_unneeded_wal(repo, kept_manifests, key)
    result["changed"] = bool(
        to_delete or result["incomplete_removed"] or any(w["deleted"] for w in result["wal"])
    )
    return result
