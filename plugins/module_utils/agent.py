# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host agent: the same engine as the modules, run by cron.

    python3 -m ansible_collections.clinic.backup.plugins.module_utils.agent backup --config FILE

Commands: backup, basebackup (a base backup set of the config's ``cluster``, the start of
point-in-time recovery), verify, list, restore-test (a rehearsal of the newest set),
retention (prune by the config's "retention" policy), and for a file group's config
(name + paths: uploads, configuration) files-backup and files-restore-test; and
status (read-only: a table per database and file group of one or more configs,
``--config A --config B`` or ``--config-dir /etc/clinic-backup``; ``--json`` for machines).
WAL archiving (a cluster's config: ``cluster`` + ``wal``): ``wal-push --config FILE %p``
(archive_command), ``wal-fetch --config FILE %f %p`` (restore_command: 1 = not archived,
126 = damaged, forged or a gap: PostgreSQL stops recovery), ``wal-status`` (metrics).

The config file is JSON whose keys are the modules' parameters (the role
renders it from the same variables), so there is one vocabulary and one
implementation; "audit_log" names the audit log every command but list appends
to. Output is one JSON document on stdout (status: a text table unless --json); exit codes: 0 success, 1 failure
(including an operation the audit log or the metrics could not record), 2 bad
configuration, 75 another run held the lock for all of ``--lock-wait`` seconds (config
key ``lock_wait``, default 0: give up at once). A run that gives up is still recorded:
an audit record with outcome ``skipped`` and ``clinic_backup_skipped_<job>.<name>.prom``.

The config must be a regular file; one that holds a password or an AWS secret must not
be readable by group or others (the passphrase file is held to the same rule).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import sys

if __name__ == "__main__" and sys.argv[1:2] in (["wal-push"], ["wal-fetch"]):
    # PostgreSQL runs these once per WAL file: answer from the spool without importing
    # the engine (~0.2 s per call); None means the engine must handle the call.
    from .walspool import fast_main

    _FAST_EXIT = fast_main(sys.argv[1:])
    if _FAST_EXIT is not None:
        raise SystemExit(_FAST_EXIT)

import argparse
import json
import os
import signal
import stat
import tempfile
import time
import traceback

from .audit import AuditLog, verify_chain
from .authentication import RecordKey
from .backup import BackupOptions, run_backup
from .basebackup import BaseBackupOptions, add_recovery_windows, run_base_backup
from .catalog import list_catalog
from .errors import BackupError, ConfigError, LockedError
from .file_backup import FileBackupOptions, run_file_backup
from .file_restore import FileRestoreOptions, restore_files
from .metrics import write_job_metrics, write_skipped_metrics, write_wal_metrics
from .module_support import (
    AWS_CREDENTIAL_ARGS,
    CONNECTION_ARGS,
    S3_LOCATION_ARGS,
    audit_record,
    connection_from_params,
    error_result,
    local_repository,
    repository_names,
    s3_repository,
)
from .pgsource import parse_url
from .pipeline import ProgressLog, report_progress_to
from .repository import safe_name, utc_now
from .restore import RestoreOptions, run_restore
from .retention import RetentionPolicy, apply_retention, lock_paths_for
from .status import (
    DEFAULT_BACKUP_MAX_AGE_HOURS,
    DEFAULT_LIMIT,
    DEFAULT_RESTORE_TEST_MAX_AGE_DAYS,
    DEFAULT_VERIFY_MAX_AGE_DAYS,
    Thresholds,
    build_status,
    error_group,
    render,
)
from .status_facts import gather_group, locations_of
from .verify import verify_set
from .wal import (
    WalNotArchived,
    check_cluster,
    fetch_wal,
    push_wal,
    read_archiver,
    session_for,
    wal_status,
)
from .walspool import start_prefetch

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 75
# wal-fetch: a file that exists but cannot be trusted (or read). Above 125, so that
# PostgreSQL aborts recovery rather than take it for "not archived" and promote early.
EXIT_WAL_REFUSED = 126

BACKUP_OPTION_KEYS = (
    "format",
    "jobs",
    "schema_only",
    "data_only",
    "tables",
    "exclude_tables",
    "compression",
    "compression_level",
    "compression_threads",
    "encrypt",
    "passphrase_file",
    "include_globals",
    "row_counts",
    "pg_bin_dir",
    "label",
    "stale_seconds",
)


# What a config may hold that nobody but the backup user may read.
SECRET_KEYS = ("login_password", "aws_secret_key", "aws_session_token")
MAX_CONFIG_BYTES = 1024 * 1024
# Waiting for the repository lock: first pause, and the longest one (seconds).
LOCK_RETRY_FIRST, LOCK_RETRY_MAX = 0.5, 30.0


def load_config(path):
    # O_NONBLOCK: a FIFO planted as the config must be refused, not waited on forever.
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ConfigError("cannot read config %s: %s" % (path, exc.strerror)) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(
                "config %s is not a regular file" % path,
                "give the path of the JSON config file (the backup_agent role writes one per database)",
            )
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                "config %s is %d bytes, more than a config ever needs" % (path, info.st_size)
            )
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as exc:
        raise ConfigError("cannot read config %s: %s" % (path, exc.strerror)) from exc
    finally:
        os.close(fd)
    try:
        config = json.loads(b"".join(chunks).decode("utf-8"))
    except ValueError as exc:
        raise ConfigError("config %s is not valid JSON: %s" % (path, exc)) from exc
    if not isinstance(config, dict):
        raise ConfigError("config %s must hold a JSON object" % path)
    secrets = secrets_in(config)
    if secrets and info.st_mode & 0o077:
        raise ConfigError(
            "config %s holds %s but is readable by group or others (mode %s)"
            % (path, ", ".join(secrets), oct(stat.S_IMODE(info.st_mode))),
            "run chmod 0600 %s (owned by the user that runs the backups)" % path,
        )
    return config


def secrets_in(config):
    """Names of the config keys that hold a secret (a password, an AWS key or token)."""
    found = [k for k in SECRET_KEYS if config.get(k)]
    url = config.get("database_url")
    if isinstance(url, str) and url:
        try:
            if parse_url(url).get("password"):
                found.append("database_url (with a password)")
        except ConfigError:
            # Not parseable: may still carry a password; treat it as secret.
            found.append("database_url")
    rehearsal = config.get("restore_test")
    if isinstance(rehearsal, dict) and rehearsal.get("login_password"):
        found.append("restore_test.login_password")
    return found


# A file group's config (files-backup): the files_backup module's options.
FILE_OPTION_KEYS = (
    "name",
    "paths",
    "exclude",
    "compression",
    "compression_level",
    "encrypt",
    "passphrase_file",
    "label",
    "stale_seconds",
    "incremental",
    "full_every",
)
# The pg_dump module's parameters (what the role renders), plus the agent's own "verify".
CONFIG_KEYS = (
    frozenset(BACKUP_OPTION_KEYS)
    | frozenset(CONNECTION_ARGS)
    | frozenset(AWS_CREDENTIAL_ARGS)
    | frozenset(
        (
            "repository",
            "s3_targets",
            "verify",
            "restore_test",
            "retention",
            "audit_log",
            "lock_wait",
            "create_repository",
            "old_passphrase_files",
            "cluster",
            "wal",
        )
    )
    | frozenset(FILE_OPTION_KEYS)
)
# Keys of "retention" (the backup_retention module's option names) -> RetentionPolicy's.
RETENTION_KEYS = {
    "keep_daily": "daily",
    "keep_weekly": "weekly",
    "keep_monthly": "monthly",
    "keep_yearly": "yearly",
    "min_keep": "min_keep",
}
# Keys of "restore_test": where and how the rehearsal runs. Connection keys override the
# backup's (the backup role rarely may create databases).
RESTORE_TEST_KEYS = frozenset(
    (
        "target_dir",
        "target_database",
        "maintenance_db",
        "require_verified",
        "jobs",
        "scratch_dir",
        "login_host",
        "login_port",
        "login_user",
        "login_password",
        "passfile",
        "ssl_mode",
    )
)
INT_KEYS = (
    "jobs",
    "compression_level",
    "compression_threads",
    "stale_seconds",
    "login_port",
    "connect_timeout",
    "s3_part_size_mb",
    "s3_concurrency",
    "s3_retries",
    "full_every",
)
LIST_KEYS = ("tables", "exclude_tables", "s3_targets", "paths", "exclude", "old_passphrase_files")
STRING_LIST_KEYS = ("tables", "exclude_tables", "paths", "exclude", "old_passphrase_files")
BOOL_KEYS = (
    "schema_only",
    "data_only",
    "encrypt",
    "include_globals",
    "row_counts",
    "create_repository",
    "incremental",
)
STRING_KEYS = tuple(
    sorted(
        CONFIG_KEYS
        - frozenset(INT_KEYS + LIST_KEYS + BOOL_KEYS)
        - frozenset(("verify", "restore_test", "retention", "lock_wait", "wal"))
    )
)
# Keys of "verify" (verify_set's options) and their kinds.
VERIFY_KEYS = {"deep": "boolean", "max_age_hours": "number", "size_tolerance_percent": "number"}
RESTORE_TEST_KINDS = {"jobs": "integer", "login_port": "integer", "require_verified": "boolean"}
# Keys of "wal" (WAL archiving: wal-push / wal-fetch) and their kinds.
WAL_KEYS = {
    "spool_dir": "string",
    "workers": "integer",
    "compression_level": "integer",
    "fetch_prefetch": "integer",
    "push_timeout": "number",
    "fetch_timeout": "number",
    "async": "boolean",
}


def _kind_ok(value, kind):
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    raise ValueError(kind)


def _check_kind(where, value, kind):
    """ConfigError unless ``value`` (of config key ``where``) is null or of ``kind``."""
    if value is not None and not _kind_ok(value, kind):
        article = "an" if kind[0] in "aeiou" else "a"
        raise ConfigError(
            "config key %s must be %s %s (got %r)" % (where, article, kind, value),
            "fix the JSON config: %s"
            % {
                "string": 'quote it, e.g. "clinic_db"',
                "boolean": "true or false, without quotes",
                "integer": "a whole number without quotes, e.g. 4",
                "number": "a number without quotes, e.g. 25",
                "object": 'a JSON object, e.g. {"deep": true}',
                "list": 'a JSON list, e.g. ["a", "b"]',
            }[kind],
        )


def _check_unknown(where, mapping, allowed):
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ConfigError(
            "%s has unknown key(s): %s" % (where, ", ".join(unknown)),
            "allowed: %s" % ", ".join(sorted(allowed)),
        )


def check_config(config):
    """Reject what the module's argument spec would reject: a typo must not silently drop
    a target, and a value of the wrong type (at any depth) must end in a ConfigError
    naming the key, never in a traceback."""
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise ConfigError(
            "config has unknown key(s): %s" % ", ".join(unknown),
            "the keys are the pg_dump module's parameters (ansible-doc clinic.backup.pg_dump)",
        )
    for key in INT_KEYS:
        _check_kind(key, config.get(key), "integer")
    for key in BOOL_KEYS:
        _check_kind(key, config.get(key), "boolean")
    for key in STRING_KEYS:
        _check_kind(key, config.get(key), "string")
    for key in LIST_KEYS:
        _check_kind(key, config.get(key), "list")
    for key in STRING_LIST_KEYS:
        for index, item in enumerate(config.get(key) or []):
            _check_kind("%s[%d]" % (key, index), item, "string")
    lock_wait(config, None)
    for index, target in enumerate(config.get("s3_targets") or []):
        if not isinstance(target, dict) or not target.get("bucket"):
            raise ConfigError("every entry of s3_targets needs a bucket (got %r)" % (target,))
        _check_unknown("s3_targets[%d]" % index, target, S3_LOCATION_ARGS)
        for key, value in target.items():
            _check_kind(
                "s3_targets[%d].%s" % (index, key),
                value,
                "object" if key == "object_lock" else "string",
            )
    verify = config.get("verify")
    _check_kind("verify", verify, "object")
    _check_unknown("verify", verify or {}, VERIFY_KEYS)
    for key, kind in VERIFY_KEYS.items():
        _check_kind("verify.%s" % key, (verify or {}).get(key), kind)
    policy = config.get("retention")
    _check_kind("retention", policy, "object")
    _check_unknown("retention", policy or {}, RETENTION_KEYS)
    for key in policy or {}:
        _check_kind("retention.%s" % key, policy[key], "integer")
    wal_options = config.get("wal")
    _check_kind("wal", wal_options, "object")
    _check_unknown("wal", wal_options or {}, WAL_KEYS)
    for key, kind in WAL_KEYS.items():
        _check_kind("wal.%s" % key, (wal_options or {}).get(key), kind)
    for key in ("workers", "fetch_prefetch"):
        value = (wal_options or {}).get(key)
        if value is not None and not 0 <= value <= 64:
            raise ConfigError("wal.%s must be between 0 and 64 (got %d)" % (key, value))
    if config.get("cluster") is not None:
        check_cluster(config["cluster"])
    rehearsal = config.get("restore_test")
    _check_kind("restore_test", rehearsal, "object")
    _check_unknown("restore_test", rehearsal or {}, RESTORE_TEST_KEYS)
    for key, value in (rehearsal or {}).items():
        _check_kind("restore_test.%s" % key, value, RESTORE_TEST_KINDS.get(key, "string"))


def lock_wait(config, given):
    """Seconds to wait for the repository lock: --lock-wait, else the config's lock_wait, else 0."""
    value = given if given is not None else config.get("lock_wait")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(
            "lock_wait must be a number of seconds, 0 or more (got %r)" % (value,),
            "e.g. 1800 to queue behind a backup of another database for up to 30 minutes",
        )
    return float(value)


def run_waiting(command, config, args, wait):
    """Run ``command``; while the repository lock is held, retry (pausing 0.5 s, doubling
    up to 30 s) until ``wait`` seconds have passed. The engine raises LockedError before
    it writes anything, so a retry starts clean."""
    deadline = time.monotonic() + wait
    pause = LOCK_RETRY_FIRST
    announced = False
    while True:
        try:
            return command(config, args)
        except LockedError as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if wait > 0:
                    exc.message = "%s; gave up after waiting %.0f seconds" % (exc.message, wait)
                    exc.hint = (
                        "the other run took longer than lock_wait; this run did nothing"
                        " (raise lock_wait or spread the cron schedules)"
                    )
                raise
            if not announced:
                # stderr goes to the cron log: say why the run is quiet for a while.
                sys.stderr.write("%s; waiting up to %.0f seconds\n" % (exc.message, wait))
                sys.stderr.flush()
                announced = True
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, LOCK_RETRY_MAX)


def database_name(config):
    """The database (or file group) a run is about, for its metrics and audit record."""
    for key in ("database", "name"):
        if isinstance(config.get(key), str) and config[key]:
            return config[key]
    url = config.get("database_url")
    if isinstance(url, str) and url:
        try:
            name = parse_url(url).get("dbname")
        except ConfigError:
            name = None
        if name:
            return name
    return "unknown"


def repositories(config, for_writing):
    repos = []
    if config.get("repository"):
        repos.append(
            local_repository(
                config["repository"],
                must_exist=not for_writing,
                create_parents=bool(config.get("create_repository")),
            )
        )
    for target in config.get("s3_targets") or []:
        repos.append(s3_repository(target, config))
    if not repos:
        raise ConfigError("the config names no repository and no s3_targets")
    return repos


def cmd_backup(config, args):
    options = BackupOptions(
        **{k: config[k] for k in BACKUP_OPTION_KEYS if config.get(k) is not None}
    )
    return run_backup(connection_from_params(config), repositories(config, True), options)


def sets_name(config):
    """Whose sets verify and retention are about: the base backups of the config's
    ``cluster`` when it names one (the role pg_wal_archiving's config, whose ``database``
    only says where to connect), else its database's (or file group's) sets."""
    return config.get("cluster") or config.get("database") or config.get("name")


# A base backup is taken weekly by default: older than a day is not overdue.
BASEBACKUP_MAX_AGE_HOURS = 8 * 24.0


def cmd_verify(config, args):
    """Verify the newest set (or --set-id) in EVERY repository of the config, each copy
    where it is stored, its outcome recorded next to it: a restore from S3 with
    require_verified (the ransomware case) needs the S3 copy's own record."""
    verify_options = config.get("verify") or {}
    outcomes = [
        verify_set(
            repo,
            set_id=args.set_id,
            database=sets_name(config),
            passphrase_file=config.get("passphrase_file"),
            old_passphrase_files=config.get("old_passphrase_files") or (),
            deep=verify_options.get("deep", True),
            max_age_hours=verify_options.get(
                "max_age_hours", BASEBACKUP_MAX_AGE_HOURS if config.get("cluster") else 25.0
            ),
            size_tolerance_percent=verify_options.get("size_tolerance_percent", 50.0),
            pg_bin_dir=config.get("pg_bin_dir"),
        )
        for repo in repositories(config, False)
    ]
    # The first repository's outcome at the top (as before), every copy's beside it.
    result = dict(outcomes[0], repositories=outcomes)
    result["ok"] = all(o["ok"] for o in outcomes)
    result["failures"] = [
        "%s: %s" % (o["repository"], failure) for o in outcomes for failure in o["failures"]
    ]
    if not result["ok"]:
        error = BackupError(
            "backup set %s failed verification: %s"
            % (
                ", ".join(sorted({o["set_id"] for o in outcomes if not o["ok"]})),
                "; ".join(result["failures"]),
            )
        )
        error.result = result
        raise error
    return result


def cmd_list(config, args):
    sets = []
    key = RecordKey.from_file(config.get("passphrase_file"), config.get("old_passphrase_files"))
    for repo in repositories(config, False):
        # The config's database (or file group) and, when it names one, its cluster's
        # base backups.
        names = {config.get("database") or config.get("name"), config.get("cluster")} - {None}
        entries = [
            e for e in list_catalog(repo, key=key) if not names or e.get("database") in names
        ]
        sets.extend(
            {k: v for k, v in e.items() if k != "manifest"}
            for e in add_recovery_windows(repo, entries, key)
        )
    return {"sets": sets}


def cmd_retention(config, args):
    """Prune every repository of the config by its retention policy (defaults: the
    runbook's), authenticating every set with the passphrase's key."""
    keys = config.get("retention") or {}
    policy = RetentionPolicy(**{RETENTION_KEYS[k]: v for k, v in keys.items()})
    repos = repositories(config, False)
    lock_paths = lock_paths_for(repos)
    key = RecordKey.from_file(config.get("passphrase_file"), config.get("old_passphrase_files"))
    results = [
        apply_retention(repo, policy, database=sets_name(config), lock_paths=lock_paths, key=key)
        for repo in repos
    ]
    return {
        "changed": any(r["changed"] for r in results),
        "deleted": [i for r in results for i in r["deleted"]],
        "repositories": [
            {
                k: r.get(k)
                for k in ("repository", "kept", "deleted", "corrupt", "locked", "warnings", "wal")
            }
            for r in results
        ],
    }


def cmd_files_backup(config, args):
    """Back up the config's file group (``name`` + ``paths``: uploads, configuration)."""
    options = FileBackupOptions(
        **{k: config[k] for k in FILE_OPTION_KEYS if config.get(k) is not None}
    )
    return run_file_backup(repositories(config, True), options)


def cmd_files_restore_test(config, args):
    """Rehearse restoring the newest file set of ``name`` into a scratch directory."""
    rehearsal = config.get("restore_test") or {}
    target = rehearsal.get("target_dir") or os.path.join(
        tempfile.gettempdir(), "clinic-restore-test-%s" % safe_name(config.get("name") or "files")
    )
    options = FileRestoreOptions(
        target,
        mode="rehearse",
        set_id=args.set_id,
        name=config.get("name"),
        passphrase_file=config.get("passphrase_file"),
        old_passphrase_files=config.get("old_passphrase_files") or (),
    )
    return restore_files(repositories(config, False)[0], options)


def cmd_restore_test(config, args):
    """Rehearse restoring the newest set (or --set-id) and report RTO/RPO."""
    rehearsal = dict(config.get("restore_test") or {})
    server = dict(config)
    server.update({k: v for k, v in rehearsal.items() if k not in ("maintenance_db",)})
    options = RestoreOptions(
        mode="rehearse",
        set_id=args.set_id,
        database=config.get("database"),
        target_database=rehearsal.get("target_database"),
        require_verified=rehearsal.get("require_verified", False),
        passphrase_file=config.get("passphrase_file"),
        old_passphrase_files=config.get("old_passphrase_files") or (),
        jobs=rehearsal.get("jobs", 1),
        scratch_dir=rehearsal.get("scratch_dir"),
        pg_bin_dir=config.get("pg_bin_dir"),
    )
    connection = connection_from_params(
        server, dbname=rehearsal.get("maintenance_db") or "postgres"
    )
    return run_restore(repositories(config, False)[0], connection, options)


def cmd_audit_verify(config, args):
    """Check the hash chain of the config's audit log (read-only: no record appended)."""
    path = config.get("audit_log")
    if not path:
        raise ConfigError(
            "the config names no audit_log", "set audit_log to the log the jobs append to"
        )
    intact, first_bad = verify_chain(path)
    with open(path, "rb") as handle:
        lines = sum(1 for _line in handle)
    result = {"audit_log": path, "lines": lines, "intact": intact, "first_bad_line": first_bad}
    if not intact:
        error = BackupError(
            "audit log %s is not intact from line %d on: a line was edited, deleted or "
            "inserted" % (path, first_bad),
            "keep the log as evidence, compare it with its off-host copy, and find out who "
            "could write to it",
        )
        error.result = result
        raise error
    return result


def cmd_wal_push(config, args):
    """archive_command (``wal-push --config FILE %p``) handled by the engine itself: the
    file is stored in every repository before this returns (the spool's fast path and
    its background workers, walspool.py, answer most calls without coming here)."""
    if not args.wal_path:
        raise ConfigError(
            "wal-push needs the WAL file's path", "archive_command: ... wal-push --config FILE %p"
        )
    with session_for(config) as session:
        return push_wal(repositories(config, True), session.cluster, args.wal_path, session)


def cmd_wal_fetch(config, args):
    """restore_command (``wal-fetch --config FILE %f %p``): exit 1 with nothing written
    when the file is not archived; a damaged or forged file (or an unreadable repository)
    exits 126, which makes PostgreSQL stop recovery instead of ending it early."""
    if not args.wal_path or not args.wal_dest:
        raise ConfigError(
            "wal-fetch needs the file name and the destination",
            "restore_command: ... wal-fetch --config FILE %f %p",
        )
    try:
        start_prefetch(args.config, config, args.wal_path)
    except OSError as exc:
        sys.stderr.write("WAL prefetch not started: %s\n" % exc)
    with session_for(config) as session:
        record = fetch_wal(
            repositories(config, False), session.cluster, args.wal_path, args.wal_dest, session
        )
    return {"name": args.wal_path, "size": record["size"]}


def cmd_wal_status(config, args):
    """The archiver's state for monitoring: pg_stat_archiver (when the config can
    connect) and each repository's newest segment; --metrics-dir writes them."""
    with session_for(config) as session:
        key, cluster = session.key, session.cluster
    archiver, problems = None, []
    if config.get("database") or config.get("database_url"):
        try:
            archiver = read_archiver(connection_from_params(config))
        except BackupError as exc:
            problems.append("pg_stat_archiver could not be read: %s" % exc)
    repos = []
    for repo in repositories(config, False):
        try:
            repos.append(wal_status(repo, cluster, key))
        except BackupError as exc:
            problems.append("%s: %s" % (repo.url, exc))
    result = {"cluster": cluster, "archiver": archiver, "repositories": repos, "problems": problems}
    if args.metrics_dir:
        write_wal_metrics(args.metrics_dir, cluster, archiver, repos)
    if problems:
        error = BackupError("WAL status incomplete: %s" % "; ".join(problems))
        error.result = result
        raise error
    return result


# A base backup takes the cluster's own settings: no dump format, tables or globals.
BASEBACKUP_OPTION_KEYS = (
    "compression",
    "compression_level",
    "compression_threads",
    "encrypt",
    "passphrase_file",
    "pg_bin_dir",
    "label",
    "stale_seconds",
)


def cmd_basebackup(config, args):
    """A base backup set of the config's ``cluster`` (pg_basebackup streamed into every
    repository); the WAL that makes it restorable is archived by wal-push."""
    if not config.get("cluster"):
        raise ConfigError(
            "basebackup needs the config key cluster (the PostgreSQL instance's name)",
            'add e.g. "cluster": "main" (the role pg_wal_archiving writes it)',
        )
    options = BaseBackupOptions(
        config["cluster"],
        **{k: config[k] for k in BASEBACKUP_OPTION_KEYS if config.get(k) is not None},
    )
    # Any database reaches the cluster; the replication connection names none.
    dbname = None if config.get("database") or config.get("database_url") else "postgres"
    connection = connection_from_params(config, dbname=dbname)
    return run_base_backup(connection, repositories(config, True), options)


COMMANDS = {
    "audit-verify": cmd_audit_verify,
    "basebackup": cmd_basebackup,
    "backup": cmd_backup,
    "verify": cmd_verify,
    "list": cmd_list,
    "restore-test": cmd_restore_test,
    "retention": cmd_retention,
    "files-backup": cmd_files_backup,
    "files-restore-test": cmd_files_restore_test,
    "wal-push": cmd_wal_push,
    "wal-fetch": cmd_wal_fetch,
    "wal-status": cmd_wal_status,
}
# PostgreSQL runs these per WAL file: quiet on success, one line on stderr otherwise.
QUIET_COMMANDS = ("wal-push", "wal-fetch")
# What each command's metrics file is called (job label) and its audit action.
METRIC_JOBS = {
    "backup": "backup",
    "verify": "verify",
    "restore-test": "restore_test",
    "retention": "retention",
    "files-backup": "backup",
    "files-restore-test": "restore_test",
    # Its own metrics: a weekly base backup must not trip the nightly backup's age alert.
    "basebackup": "basebackup",
}
AUDIT_ACTIONS = dict(METRIC_JOBS, basebackup="backup")


# Where status looks for the restore-test metrics without --metrics-dir: the
# backup_agent role's default (backup_agent_metrics_dir), when it exists.
DEFAULT_METRICS_DIR = "/var/lib/prometheus/node-exporter"


def status_config_paths(args):
    """The configs ``status`` reports on: every --config, then the *.json files of
    --config-dir (the backup_agent role writes one per database and file group)."""
    paths = list(args.config or [])
    if args.config_dir:
        try:
            names = sorted(os.listdir(args.config_dir))
        except OSError as exc:
            raise ConfigError(
                "cannot list config directory %s: %s" % (args.config_dir, exc.strerror),
                "give the directory of the agent's JSON configs, e.g. /etc/clinic-backup",
            ) from exc
        found = [
            os.path.join(args.config_dir, name)
            for name in names
            if name.endswith(".json") and os.path.isfile(os.path.join(args.config_dir, name))
        ]
        if not found:
            raise ConfigError(
                "config directory %s holds no *.json config" % args.config_dir,
                "the backup_agent role writes one per database (backup_agent_databases)",
            )
        paths.extend(found)
    if not paths:
        raise ConfigError("status needs --config FILE (one or more) or --config-dir DIR")
    return paths


def status_group(path, args, now, thresholds, metrics_dir):
    """The status of one config (read-only: no lock, no metrics; the read itself is
    audited when the config has an audit log)."""
    config = load_config(path)
    check_config(config)
    key = RecordKey.from_file(config.get("passphrase_file"), config.get("old_passphrase_files"))
    if config.get("audit_log"):
        AuditLog(config["audit_log"]).record(
            "read", "ok", database=database_name(config), repositories=repository_names(config)
        )
    groups = [
        gather_group(
            database_name(config),
            locations_of(config),
            key,
            now,
            audit_log=config.get("audit_log"),
            metrics_dir=metrics_dir,
            restore_test_log=args.restore_test_log,
            thresholds=thresholds,
            limit=args.limit,
        )
    ]
    if config.get("cluster"):
        # The cluster's base backups and how far its WAL reaches (point-in-time
        # recovery); they are weekly, and rehearsed by dr_point_in_time.yml, not cron.
        groups.append(
            gather_group(
                config["cluster"],
                locations_of(config),
                key,
                now,
                thresholds=Thresholds(BASE_BACKUP_MAX_AGE_HOURS, thresholds.verify_max_age_days, 0),
                limit=args.limit,
            )
        )
    return groups


def run_status(args):
    """``status``: exit 0 when every config and repository was read (overdue or not),
    1 when a repository or log could not be read, 2 for a bad config or option."""
    try:
        paths = status_config_paths(args)
        thresholds = Thresholds(
            args.backup_max_age_hours, args.verify_max_age_days, args.restore_test_max_age_days
        )
        if args.limit is not None and args.limit < 1:
            raise ConfigError("--limit must be at least 1, not %s" % args.limit)
    except ConfigError as exc:
        json.dump(error_result(exc), sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
        return EXIT_CONFIG
    metrics_dir = args.metrics_dir
    if metrics_dir is None and os.path.isdir(DEFAULT_METRICS_DIR):
        metrics_dir = DEFAULT_METRICS_DIR
    now = utc_now()
    groups, code = [], EXIT_OK
    for path in paths:
        try:
            found = status_group(path, args, now, thresholds, metrics_dir)
        except ConfigError as exc:
            found, code = [error_group(path, "config %s: %s" % (path, exc))], EXIT_CONFIG
        except BackupError as exc:
            found = [error_group(path, "config %s: %s" % (path, exc))]
            code = code or EXIT_FAILED
        for group in found:
            if group.get("errors"):
                code = code or EXIT_FAILED
            groups.append(group)
    report = build_status(groups, now, thresholds)
    try:
        if args.json:
            json.dump(report, sys.stdout, indent=2, sort_keys=True, default=str)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(render(report))
        sys.stdout.flush()
    except (OSError, ValueError):
        pass  # stdout is gone (a closed pipe): the exit code still tells
    return code


PROGRESS_INTERVAL_SECONDS = 10.0
# Base backups are weekly by default (role pg_wal_archiving): overdue after 8 days.
BASE_BACKUP_MAX_AGE_HOURS = 8 * 24.0


def _progress_line(text):
    sys.stderr.write("%s %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S%z"), text))
    sys.stderr.flush()


def _terminate(signum, _frame):
    # Turn SIGTERM (cron timeout, systemd stop) into an exception so that
    # staging files are removed and uploads aborted on the way out.
    raise SystemExit(128 + signum)


def _non_negative(text, what):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be %s, 0 or more (got %r)" % (what, text))
    return value


def _seconds(text):
    return _non_negative(text, "a number of seconds")


def _amount(text):
    return _non_negative(text, "a number")


def _record_skip(config, args, database, result):
    """A run that gave up on the lock did nothing, but must not pass unnoticed:
    an audit record (outcome skipped) and the skipped-runs metrics. Returns problems."""
    problems = []
    job = METRIC_JOBS.get(args.command)
    if job and config.get("audit_log"):
        try:
            AuditLog(config["audit_log"]).record(
                AUDIT_ACTIONS[args.command],
                "skipped",
                database=database,
                repositories=repository_names(config),
                error_type="LockedError",
                detail=str(result.get("msg", ""))[:1000],
            )
        except (BackupError, OSError, ValueError) as exc:
            problems.append("the audit record of the skipped run could not be written: %s" % exc)
    if job and args.metrics_dir:
        try:
            write_skipped_metrics(args.metrics_dir, job, database)
        except BackupError as exc:
            problems.append("the skipped run could not be recorded in the metrics: %s" % exc)
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(prog="clinic-backup", description="clinic.backup host agent")
    parser.add_argument("command", choices=sorted(list(COMMANDS) + ["status"]))
    parser.add_argument(
        "--config",
        action="append",
        help="JSON file with the module parameters (status: may be given several times)",
    )
    parser.add_argument(
        "--config-dir", help="status: every *.json config in this directory (/etc/clinic-backup)"
    )
    parser.add_argument(
        "wal_path", nargs="?", help="wal-push: the WAL file (%%p); wal-fetch: its name (%%f)"
    )
    parser.add_argument("wal_dest", nargs="?", help="wal-fetch: where to write it (%%p)")
    parser.add_argument("--set-id", help="set to verify or rehearse (default: the newest)")
    parser.add_argument("--metrics-dir", help="write Prometheus textfile metrics here")
    parser.add_argument(
        "--lock-wait",
        type=_seconds,
        metavar="SECONDS",
        help="while another run holds the repository lock, wait up to this long"
        " (default: the config's lock_wait, else 0: exit 75 at once)",
    )
    status_options = parser.add_argument_group("status")
    status_options.add_argument("--json", action="store_true", help="JSON instead of tables")
    status_options.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, help="sets per table (default 10)"
    )
    status_options.add_argument(
        "--backup-max-age-hours",
        type=_amount,
        default=DEFAULT_BACKUP_MAX_AGE_HOURS,
        metavar="HOURS",
        help="overdue without a backup this recent (default 25; 0: no check)",
    )
    status_options.add_argument(
        "--verify-max-age-days",
        type=_amount,
        default=DEFAULT_VERIFY_MAX_AGE_DAYS,
        metavar="DAYS",
        help="overdue without a verification this recent, per copy (default 8; 0: no check)",
    )
    status_options.add_argument(
        "--restore-test-max-age-days",
        type=_amount,
        default=DEFAULT_RESTORE_TEST_MAX_AGE_DAYS,
        metavar="DAYS",
        help="overdue without a successful restore test this recent (default 32; 0: no check)",
    )
    status_options.add_argument(
        "--restore-test-log",
        metavar="FILE",
        help="also read playbooks/restore_test.yml's log (clinic_backup_restore_test_log)",
    )
    try:
        # Intermixed: "wal-push --config FILE %p" puts the positional after the option.
        args = parser.parse_intermixed_args(argv)
    except SystemExit as exc:
        given = sys.argv[1:] if argv is None else argv
        if exc.code == EXIT_CONFIG and given[:1] == ["wal-fetch"]:
            return EXIT_WAL_REFUSED  # a broken restore_command must stop recovery
        raise
    if args.command == "status":
        return run_status(args)
    if args.config_dir or not args.config or len(args.config) != 1:
        parser.error("%s needs exactly one --config (and no --config-dir)" % args.command)
    args.config = args.config[0]
    signal.signal(signal.SIGTERM, _terminate)
    # Long streams say how far they are (cron appends stderr to the job's log).
    report_progress_to(ProgressLog(_progress_line, PROGRESS_INTERVAL_SECONDS))
    started = time.time()
    database = "unknown"
    config = {}
    try:
        config = load_config(args.config)
        database = database_name(config)
        if args.command in ("basebackup", "verify", "retention") and isinstance(
            config.get("cluster"), str
        ):
            database = config["cluster"]
        check_config(config)
        wait = lock_wait(config, args.lock_wait)
        result = run_waiting(COMMANDS[args.command], config, args, wait)
        code = EXIT_OK
    except LockedError as exc:
        result, code = error_result(exc), EXIT_LOCKED
    except ConfigError as exc:
        result, code = error_result(exc), EXIT_CONFIG
    except BackupError as exc:
        result, code = error_result(exc), EXIT_FAILED
    except SystemExit as exc:
        # SIGTERM (_terminate): the cleanup ran on the way out; the failure must still
        # reach the metrics, or last_status keeps saying the previous run's 0.
        code = exc.code if isinstance(exc.code, int) else EXIT_FAILED
        result = {
            "msg": "terminated by signal %d before the %s finished" % (code - 128, args.command)
        }
    except Exception as exc:  # a bug must still reach the metrics and the audit log
        traceback.print_exc()
        result = {
            "msg": "internal error in the %s: %s: %s" % (args.command, exc.__class__.__name__, exc),
            "error_type": exc.__class__.__name__,
        }
        code = EXIT_FAILED
    if code == EXIT_LOCKED:
        for problem in _record_skip(config, args, database, result):
            # Still 75: the run was skipped; the warning says what else went wrong.
            result.setdefault("warnings", []).append(problem)
    elif args.command in AUDIT_ACTIONS:
        try:
            problem = audit_record(
                config.get("audit_log"),
                AUDIT_ACTIONS[args.command],
                code == EXIT_OK,
                dict(result, database=result.get("database") or database),
                repository_names(config),
            )
        except (OSError, ValueError, TypeError) as exc:
            problem = "the audit record could not be written: %s" % exc
        if problem:
            # An operation nobody can account for is not a success.
            result.setdefault("warnings", []).append(problem)
            code = EXIT_FAILED if code == EXIT_OK else code
            result.setdefault("msg", problem)
    if args.metrics_dir and args.command in METRIC_JOBS and code != EXIT_LOCKED:
        try:
            write_job_metrics(
                args.metrics_dir,
                METRIC_JOBS[args.command],
                database,
                code == EXIT_OK,
                duration=time.time() - started,
                size=result.get("size"),
                rpo=result.get("rpo_seconds") if code == EXIT_OK else None,
            )
        except BackupError as exc:
            # Monitoring that cannot see the run would report the previous outcome.
            problem = "the metrics could not be written: %s" % exc
            result.setdefault("warnings", []).append(problem)
            if code == EXIT_OK:
                code = EXIT_FAILED
                result["msg"] = problem
            else:
                result.setdefault("msg", problem)
    result["ok"] = code == EXIT_OK
    if (
        args.command == "wal-fetch"
        and code != EXIT_OK
        and result.get("error_type") != WalNotArchived.__name__
    ):
        # Anything but "not archived" must stop recovery, never end it early.
        code = EXIT_WAL_REFUSED
    if args.command in QUIET_COMMANDS:
        if code != EXIT_OK:
            sys.stderr.write(
                "clinic-backup %s: %s\n" % (args.command, " ".join(str(result.get("msg")).split()))
            )
        return code
    try:
        json.dump(result, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass  # stdout is gone (a closed pipe): the exit code still tells
    return code


if __name__ == "__main__":
    raise SystemExit(main())
