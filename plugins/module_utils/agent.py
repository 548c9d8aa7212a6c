# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host agent: the same engine as the modules, run by cron.

    python3 -m ansible_collections.clinic.backup.plugins.module_utils.agent backup --config FILE

Commands: backup, verify, list, restore-test (a rehearsal of the newest set),
retention (prune by the config's "retention" policy), and for a file group's config
(name + paths: uploads, configuration) files-backup and files-restore-test.

The config file is JSON whose keys are the modules' parameters (the role
renders it from the same variables), so there is one vocabulary and one
implementation; "audit_log" names the audit log every command but list appends
to. Output is one JSON document on stdout; exit codes: 0 success, 1 failure
(including an operation the audit log could not record), 2 bad configuration,
75 another run holds the lock.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import argparse
import json
import os
import signal
import sys
import tempfile
import time

from .backup import BackupOptions, run_backup
from .catalog import list_catalog
from .errors import BackupError, ConfigError, LockedError
from .files import FileBackupOptions, restore_files, run_file_backup
from .metrics import write_job_metrics
from .module_support import (
    AWS_CREDENTIAL_ARGS,
    CONNECTION_ARGS,
    audit_record,
    connection_from_params,
    error_result,
    local_repository,
    repository_names,
    s3_repository,
)
from .repository import safe_name
from .restore import RestoreOptions, run_restore
from .retention import RetentionPolicy, apply_retention, lock_paths_for
from .verify import verify_set

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 75

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


def load_config(path):
    try:
        with open(path) as handle:
            config = json.load(handle)
    except OSError as exc:
        raise ConfigError("cannot read config %s: %s" % (path, exc.strerror)) from exc
    except ValueError as exc:
        raise ConfigError("config %s is not valid JSON: %s" % (path, exc)) from exc
    if not isinstance(config, dict):
        raise ConfigError("config %s must hold a JSON object" % path)
    return config


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
)
# The pg_dump module's parameters (what the role renders), plus the agent's own "verify".
CONFIG_KEYS = (
    frozenset(BACKUP_OPTION_KEYS)
    | frozenset(CONNECTION_ARGS)
    | frozenset(AWS_CREDENTIAL_ARGS)
    | frozenset(("repository", "s3_targets", "verify", "restore_test", "retention", "audit_log"))
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
)
LIST_KEYS = ("tables", "exclude_tables", "s3_targets", "paths", "exclude")


def check_config(config):
    """Reject what the module's argument spec would reject: a typo must not silently drop
    a target, and text where a number belongs must not end in a traceback."""
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise ConfigError(
            "config has unknown key(s): %s" % ", ".join(unknown),
            "the keys are the pg_dump module's parameters (ansible-doc clinic.backup.pg_dump)",
        )
    for key in INT_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError("config key %s must be an integer (got %r)" % (key, value))
    for key in LIST_KEYS:
        value = config.get(key)
        if value is not None and not isinstance(value, list):
            raise ConfigError("config key %s must be a list (got %r)" % (key, value))
    for target in config.get("s3_targets") or []:
        if not isinstance(target, dict) or not target.get("bucket"):
            raise ConfigError("every entry of s3_targets needs a bucket (got %r)" % (target,))
    policy = config.get("retention")
    if policy is not None and not isinstance(policy, dict):
        raise ConfigError("config key retention must be an object (got %r)" % (policy,))
    unknown = sorted(set(policy or {}) - set(RETENTION_KEYS))
    if unknown:
        raise ConfigError(
            "retention has unknown key(s): %s" % ", ".join(unknown),
            "allowed: %s" % ", ".join(RETENTION_KEYS),
        )
    rehearsal = config.get("restore_test")
    if rehearsal is not None:
        if not isinstance(rehearsal, dict):
            raise ConfigError("config key restore_test must be an object (got %r)" % (rehearsal,))
        unknown = sorted(set(rehearsal) - RESTORE_TEST_KEYS)
        if unknown:
            raise ConfigError(
                "restore_test has unknown key(s): %s" % ", ".join(unknown),
                "allowed: %s" % ", ".join(sorted(RESTORE_TEST_KEYS)),
            )


def repositories(config, for_writing):
    repos = []
    if config.get("repository"):
        repos.append(local_repository(config["repository"], must_exist=not for_writing))
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


def cmd_verify(config, args):
    verify_options = config.get("verify") or {}
    outcome = verify_set(
        repositories(config, False)[0],
        set_id=args.set_id,
        database=config.get("database"),
        passphrase_file=config.get("passphrase_file"),
        deep=verify_options.get("deep", True),
        max_age_hours=verify_options.get("max_age_hours", 25.0),
        size_tolerance_percent=verify_options.get("size_tolerance_percent", 50.0),
        pg_bin_dir=config.get("pg_bin_dir"),
    )
    if not outcome["ok"]:
        error = BackupError(
            "backup set %s failed verification: %s"
            % (outcome["set_id"], "; ".join(outcome["failures"]))
        )
        error.result = outcome
        raise error
    return outcome


def cmd_list(config, args):
    sets = []
    for repo in repositories(config, False):
        sets.extend(
            {k: v for k, v in e.items() if k != "manifest"}
            for e in list_catalog(repo, config.get("database"))
        )
    return {"sets": sets}


def cmd_retention(config, args):
    """Prune every repository of the config by its retention policy (defaults: the seed's)."""
    keys = config.get("retention") or {}
    policy = RetentionPolicy(**{RETENTION_KEYS[k]: v for k, v in keys.items()})
    repos = repositories(config, False)
    lock_paths = lock_paths_for(repos)
    results = [
        apply_retention(repo, policy, database=config.get("database"), lock_paths=lock_paths)
        for repo in repos
    ]
    return {
        "changed": any(r["changed"] for r in results),
        "deleted": [i for r in results for i in r["deleted"]],
        "repositories": [
            {k: r[k] for k in ("repository", "kept", "deleted", "corrupt", "warnings")}
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
    return restore_files(
        repositories(config, False)[0],
        target,
        set_id=args.set_id,
        name=config.get("name"),
        passphrase_file=config.get("passphrase_file"),
        mode="rehearse",
    )


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
        jobs=rehearsal.get("jobs", 1),
        scratch_dir=rehearsal.get("scratch_dir"),
        pg_bin_dir=config.get("pg_bin_dir"),
    )
    connection = connection_from_params(
        server, dbname=rehearsal.get("maintenance_db") or "postgres"
    )
    return run_restore(repositories(config, False)[0], connection, options)


COMMANDS = {
    "backup": cmd_backup,
    "verify": cmd_verify,
    "list": cmd_list,
    "restore-test": cmd_restore_test,
    "retention": cmd_retention,
    "files-backup": cmd_files_backup,
    "files-restore-test": cmd_files_restore_test,
}
# What each command's metrics file is called (job label) and its audit action.
METRIC_JOBS = {
    "backup": "backup",
    "verify": "verify",
    "restore-test": "restore_test",
    "retention": "retention",
    "files-backup": "backup",
    "files-restore-test": "restore_test",
}
AUDIT_ACTIONS = METRIC_JOBS


def _terminate(signum, _frame):
    # Turn SIGTERM (cron timeout, systemd stop) into an exception so that
    # staging files are removed and uploads aborted on the way out.
    raise SystemExit(128 + signum)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="clinic-backup", description="clinic.backup host agent")
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--config", required=True, help="JSON file with the module parameters")
    parser.add_argument("--set-id", help="set to verify or rehearse (default: the newest)")
    parser.add_argument("--metrics-dir", help="write Prometheus textfile metrics here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.time()
    database = "unknown"
    config = {}
    try:
        config = load_config(args.config)
        database = config.get("database") or config.get("name") or "unknown"
        check_config(config)
        result = COMMANDS[args.command](config, args)
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
    if args.command in AUDIT_ACTIONS and code != EXIT_LOCKED:
        problem = audit_record(
            config.get("audit_log"),
            AUDIT_ACTIONS[args.command],
            code == EXIT_OK,
            dict(result, database=result.get("database") or database),
            repository_names(config),
        )
        if problem:
            # An operation nobody can account for is not a success.
            result.setdefault("warnings", []).append(problem)
            code = EXIT_FAILED if code == EXIT_OK else code
            result.setdefault("msg", problem)
    result["ok"] = code == EXIT_OK
    if args.metrics_dir and args.command in METRIC_JOBS and code != EXIT_LOCKED:
        write_job_metrics(
            args.metrics_dir,
            METRIC_JOBS[args.command],
            database,
            code == EXIT_OK,
            duration=time.time() - started,
            size=result.get("size"),
            rpo=result.get("rpo_seconds") if code == EXIT_OK else None,
        )
    json.dump(result, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
