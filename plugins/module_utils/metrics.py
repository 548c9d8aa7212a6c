# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Prometheus textfile metrics (node_exporter's textfile collector).

One file per database and job; written atomically so the collector never
reads half a file.  The seed's alert rules use ``*_last_success_timestamp``
and ``*_last_status``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import time

from .repository import atomic_write, safe_name


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


def write_job_metrics(directory, job, database, ok, duration=None, size=None, rpo=None, now=None):
    """Write ``clinic_backup_<job>.<database>.prom``; returns its path."""
    now = time.time() if now is None else now
    path = os.path.join(directory, "clinic_backup_%s.%s.prom" % (job, safe_name(database)))
    previous = read_previous(path)
    # "operation", not "job": Prometheus owns "job" (the scrape job) and would rename ours.
    labels = '{database="%s",operation="%s"}' % (_escape(database), _escape(job))
    last_success = now if ok else previous.get("clinic_backup_last_success_timestamp_seconds", 0)
    rows = [
        (
            "clinic_backup_last_status",
            "0 when the last run succeeded, 1 when it failed",
            0 if ok else 1,
        ),
        ("clinic_backup_last_run_timestamp_seconds", "Unix time the last run ended", now),
        (
            "clinic_backup_last_success_timestamp_seconds",
            "Unix time of the last successful run",
            last_success,
        ),
    ]
    if duration is not None:
        rows.append(("clinic_backup_last_duration_seconds", "Wall time of the last run", duration))
    if size is not None:
        rows.append(("clinic_backup_last_size_bytes", "Stored bytes of the last backup set", size))
    if rpo is not None:
        rows.append(
            (
                "clinic_backup_restore_test_rpo_seconds",
                "Age of the data the last successful restore test brought back",
                rpo,
            )
        )
    lines = []
    for name, help_text, value in rows:
        lines.append("# HELP %s %s" % (name, help_text))
        lines.append("# TYPE %s gauge" % name)
        lines.append("%s%s %s" % (name, labels, repr(float(value))))
    os.makedirs(directory, exist_ok=True)
    atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"), mode=0o644)
    return path
