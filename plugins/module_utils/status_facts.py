# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the status report reads (the I/O half of status.py): the catalog of every
repository of a config, and the restore-test records the agent and the playbooks
leave behind (the agent's restore-test metrics file, the audit log,
playbooks/restore_test.yml's log).

Read-only: nothing here writes, locks or creates anything. One repository that cannot
be read (a NAS not mounted, S3 unreachable) is reported in its group and the others
are still shown: a status that stops at the first error hides the rest.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import json
import os
import stat

from . import status
from .basebackup import add_recovery_windows
from .catalog import list_catalog
from .errors import BackupError, ConfigError, StoreError
from .metrics import read_job_metrics
from .module_support import local_repository, s3_repository

# Lines of a JSON-lines log that can hold a restore test (the rest are not parsed).
_RESTORE_MARKERS = (b"restore", b"rto_seconds")


def read_json_lines(path, what):
    """The JSON objects of a JSON-lines file (audit log, restore-test log); [] when it
    does not exist. Lines that do not parse are skipped (a torn last line after a crash
    must not hide the others). Raises StoreError when it cannot be read."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise StoreError(
            "cannot read %s %s: %s" % (what, path, exc.strerror),
            "run status as the user that runs the backups (the file is 0600)"
            if exc.errno in (errno.EACCES, errno.EPERM)
            else "symlinks are refused: give the file itself"
            if exc.errno == errno.ELOOP
            else None,
        ) from exc
    records = []
    with os.fdopen(fd, "rb") as handle:
        # O_NONBLOCK: a FIFO planted as the log must be refused, not waited on.
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ConfigError("%s %s is not a regular file" % (what, path))
        try:
            for line in handle:
                if not any(marker in line for marker in _RESTORE_MARKERS):
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
        except OSError as exc:
            raise StoreError("cannot read %s %s: %s" % (what, path, exc.strerror)) from exc
    return records


def locations_of(params):
    """``(label, open)`` of every repository of an agent config or module parameters
    (``repository``, ``s3_targets`` and the AWS credentials): opened lazily, so one
    that cannot be opened is reported by gather_group instead of ending the status."""
    locations = []
    if params.get("repository"):
        locations.append((params["repository"], lambda: local_repository(params["repository"])))
    for target in params.get("s3_targets") or []:
        locations.append(
            (
                "s3://%s/%s" % (target["bucket"], target.get("prefix") or ""),
                lambda target=target: s3_repository(target, params),
            )
        )
    if not locations:
        raise ConfigError("the config names no repository and no s3_targets")
    return locations


def gather_group(
    name,
    locations,
    key,
    now,
    audit_log=None,
    metrics_dir=None,
    restore_test_log=None,
    thresholds=None,
    limit=status.DEFAULT_LIMIT,
    tz=None,
):
    """status.group_status() of one database or file group.

    ``locations``: ``(label, open)`` pairs, one per repository of the config, local
    first; ``open()`` returns the repository (it may raise: the label then names it in
    the report). ``key``: the passphrase's RecordKey, or None.
    """
    entries, urls, errors, tests = [], [], [], []
    for label, open_repository in locations:
        try:
            repo = open_repository()
        except BackupError as exc:
            urls.append(label)
            errors.append("repository %s cannot be read: %s" % (label, exc))
            continue
        urls.append(repo.url)
        try:
            # Base backups carry how far their archived WAL reaches.
            entries.extend(add_recovery_windows(repo, list_catalog(repo, key=key), key))
        except BackupError as exc:
            errors.append("repository %s cannot be read: %s" % (repo.url, exc))
    if metrics_dir:
        tests.extend(
            status.restore_tests_from_metrics(read_job_metrics(metrics_dir, "restore_test", name))
        )
    for path, what, parse in (
        (audit_log, "audit log", lambda rows: status.restore_tests_from_audit(rows, name)),
        (
            restore_test_log,
            "restore test log",
            lambda rows: status.restore_tests_from_log(rows, name, urls),
        ),
    ):
        if not path:
            continue
        try:
            tests.extend(parse(read_json_lines(path, what)))
        except BackupError as exc:
            errors.append(str(exc))
    return status.group_status(
        name,
        urls,
        entries,
        tests,
        now,
        thresholds=thresholds,
        limit=limit,
        authenticated=key is not None,
        errors=errors,
        tz=tz,
    )
