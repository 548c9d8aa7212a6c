# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Prometheus textfile metrics (node_exporter's textfile collector).

One file per database and job, ``clinic_backup_<job>.<name>.prom``, written
atomically so the collector never reads half a file.  ``<name>`` is the database's
file-safe name plus a short hash of the real name when the two differ, so that
``clinic db`` and ``clinic_db`` never share (and inherit each other's) metrics; the
``database`` label holds the real name.  The runbook's alert rules use
``*_last_success_timestamp`` and ``*_last_status``.

A run that found the repository locked and gave up (exit 75) writes
``clinic_backup_skipped_<job>.<name>.prom`` instead: the job's own file belongs to
the run that holds the lock, and a skip must not overwrite its outcome.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import hashlib
import os
import time

from .errors import StoreError
from .repository import atomic_write, parse_time, safe_name


def _escape(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def read_previous(path):
    """Metric values of an earlier run (to keep the last success time on failure)."""
    values = {}
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("#") or not line.strip():
                    continue
                name_labels, _sep, value = line.rpartition(" ")
                values[name_labels.split("{")[0]] = float(value)
    except (OSError, ValueError):
        pass
    return values


def file_stem(database):
    """The database's part of a metrics file name: one per distinct database name."""
    name = safe_name(database)
    if name != database:
        name += "-" + hashlib.sha256(database.encode("utf-8")).hexdigest()[:8]
    return name


def metrics_path(directory, job, database, skipped=False):
    prefix = "clinic_backup_skipped_" if skipped else "clinic_backup_"
    return os.path.join(directory, "%s%s.%s.prom" % (prefix, job, file_stem(database)))


def read_job_metrics(directory, job, database):
    """The values of ``clinic_backup_<job>.<name>.prom`` as the last run wrote them
    ({} when there is none): what the status report knows of the agent's runs."""
    return read_previous(metrics_path(directory, job, database))


def _write(directory, path, rows, labels):
    lines = []
    for name, kind, help_text, value in rows:
        lines.append("# HELP %s %s" % (name, help_text))
        lines.append("# TYPE %s %s" % (name, kind))
        lines.append("%s%s %s" % (name, labels, repr(float(value))))
    try:
        if os.path.lexists(directory) and not os.path.isdir(directory):
            raise StoreError(
                "metrics directory %s is not a directory" % directory,
                "point --metrics-dir at node_exporter's textfile directory",
            )
        os.makedirs(directory, exist_ok=True)
        atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"), mode=0o644)
    except OSError as exc:
        hint = "the filesystem holding it is full" if exc.errno == errno.ENOSPC else None
        raise StoreError(
            "cannot write metrics file %s: %s" % (path, exc.strerror or exc), hint
        ) from exc
    return path


def write_job_metrics(directory, job, database, ok, duration=None, size=None, rpo=None, now=None):
    """Write ``clinic_backup_<job>.<name>.prom``; returns its path.

    Raises StoreError (naming the file) when it cannot be written.
    """
    now = time.time() if now is None else now
    path = metrics_path(directory, job, database)
    previous = read_previous(path)
    # "operation", not "job": Prometheus owns "job" (the scrape job) and would rename ours.
    labels = '{database="%s",operation="%s"}' % (_escape(database), _escape(job))
    last_success = now if ok else previous.get("clinic_backup_last_success_timestamp_seconds", 0)
    rows = [
        (
            "clinic_backup_last_status",
            "gauge",
            "0 when the last run succeeded, 1 when it failed",
            0 if ok else 1,
        ),
        ("clinic_backup_last_run_timestamp_seconds", "gauge", "Unix time the last run ended", now),
        (
            "clinic_backup_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last successful run",
            last_success,
        ),
    ]
    if duration is not None:
        rows.append(
            ("clinic_backup_last_duration_seconds", "gauge", "Wall time of the last run", duration)
        )
    if size is not None:
        rows.append(
            ("clinic_backup_last_size_bytes", "gauge", "Stored bytes of the last backup set", size)
        )
    if rpo is not None:
        rows.append(
            (
                "clinic_backup_restore_test_rpo_seconds",
                "gauge",
                "Age of the data the last successful restore test brought back",
                rpo,
            )
        )
    return _write(directory, path, rows, labels)


def write_skipped_metrics(directory, job, database, now=None):
    """Record a run that gave up waiting for the repository lock (nothing was done):
    ``clinic_backup_skipped_<job>.<name>.prom``; returns its path. Raises StoreError."""
    now = time.time() if now is None else now
    path = metrics_path(directory, job, database, skipped=True)
    previous = read_previous(path)
    labels = '{database="%s",operation="%s"}' % (_escape(database), _escape(job))
    rows = [
        (
            "clinic_backup_skipped_total",
            "counter",
            "Runs that found the repository locked and did nothing",
            previous.get("clinic_backup_skipped_total", 0) + 1,
        ),
        (
            "clinic_backup_last_skipped_timestamp_seconds",
            "gauge",
            "Unix time of the last run that found the repository locked and did nothing",
            now,
        ),
    ]
    return _write(directory, path, rows, labels)


def write_wal_metrics(directory, cluster, archiver, repositories, now=None):
    """Write ``clinic_backup_wal.<cluster>.prom`` (``wal-status``): pg_stat_archiver's
    view (``archiver``: a dict from wal.read_archiver, or None when the server was not
    read) and each repository's newest archived segment (wal.wal_status dicts). The
    alerts ClinicWalArchiveStalled / ClinicWalArchiveFailing use them."""
    now = time.time() if now is None else now
    path = metrics_path(directory, "wal", cluster)
    base = 'cluster="%s",operation="wal"' % _escape(cluster)
    rows = [
        (
            "clinic_backup_wal_status_timestamp_seconds",
            "gauge",
            "Unix time wal-status last looked at the archiver",
            base,
            now,
        )
    ]
    if archiver:
        for name, help_text, value in (
            ("archived_count", "Files PostgreSQL archived since its stats reset", "archived_count"),
            ("failed_count", "Failed archive_command runs since the stats reset", "failed_count"),
            (
                "last_archived_timestamp_seconds",
                "Unix time PostgreSQL last archived a file",
                "last_archived_time",
            ),
            (
                "last_failed_timestamp_seconds",
                "Unix time an archive_command run last failed",
                "last_failed_time",
            ),
            ("pending_segments", "WAL files waiting to be archived (.ready)", "pending"),
        ):
            if archiver.get(value) is not None:
                kind = "counter" if name.endswith("_count") else "gauge"
                rows.append(("clinic_backup_wal_" + name, kind, help_text, base, archiver[value]))
        if archiver.get("last_archived_time") is not None:
            rows.append(
                (
                    "clinic_backup_wal_last_archived_age_seconds",
                    "gauge",
                    "Seconds since PostgreSQL last archived a file",
                    base,
                    max(0.0, (archiver.get("server_time") or now) - archiver["last_archived_time"]),
                )
            )
    for repo in repositories:
        labels = '%s,repository="%s"' % (base, _escape(repo.get("repository")))
        rows.append(
            (
                "clinic_backup_wal_repository_files",
                "gauge",
                "Archived WAL files in the repository",
                labels,
                repo.get("count") or 0,
            )
        )
        rows.append(
            (
                "clinic_backup_wal_repository_bytes",
                "gauge",
                "Stored bytes of the WAL archive in the repository",
                labels,
                repo.get("bytes") or 0,
            )
        )
        newest = repo.get("newest_archived_at")
        if newest:
            rows.append(
                (
                    "clinic_backup_wal_repository_newest_timestamp_seconds",
                    "gauge",
                    "Unix time the repository's newest segment was archived",
                    labels,
                    parse_time(newest).timestamp(),
                )
            )
    lines, seen = [], set()
    # The text format wants every sample of a metric together.
    for name, kind, help_text, labels, value in sorted(rows, key=lambda row: row[0]):
        if name not in seen:
            lines.append("# HELP %s %s" % (name, help_text))
            lines.append("# TYPE %s %s" % (name, kind))
            seen.add(name)
        lines.append("%s{%s} %s" % (name, labels, repr(float(value))))
    try:
        os.makedirs(directory, exist_ok=True)
        atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"), mode=0o644)
    except OSError as exc:
        raise StoreError("cannot write metrics file %s: %s" % (path, exc.strerror or exc)) from exc
    return path
