# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Argument specs shared by the modules and the translation of their
parameters into engine objects.  Plain data and functions: the modules own
AnsibleModule, this file only knows dictionaries."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from . import s3 as s3util
from .audit import AuditLog
from .errors import BackupError
from .pgsource import HAS_PSYCOPG2, PSYCOPG2_IMPORT_ERROR, PgConnection
from .repository import LocalRepository, S3Repository

CONNECTION_ARGS = dict(
    database=dict(type="str", aliases=["db", "login_db"]),
    database_url=dict(type="str", no_log=True),
    login_host=dict(type="str", aliases=["host"]),
    login_port=dict(type="int", aliases=["port"]),
    login_user=dict(type="str", aliases=["login", "user"]),
    login_password=dict(type="str", no_log=True),
    passfile=dict(type="path", no_log=False),
    ssl_mode=dict(
        type="str", choices=["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
    ),
    connect_timeout=dict(type="int", default=15),
    pg_bin_dir=dict(type="path"),
)

S3_LOCATION_ARGS = dict(
    bucket=dict(type="str"),
    prefix=dict(type="str", default=""),
    region=dict(type="str"),
    endpoint_url=dict(type="str"),
    sse=dict(type="str", default="none", choices=list(s3util.SSE_CHOICES)),
    kms_key_id=dict(type="str", no_log=False),
    storage_class=dict(type="str"),
    # Used by modules that write sets; readers accept it so one set of S3 variables
    # serves every module (and find locked sets through the bucket's own configuration).
    object_lock=dict(
        type="dict",
        options=dict(
            mode=dict(type="str", required=True, choices=list(s3util.OBJECT_LOCK_MODES)),
            days=dict(type="int", required=True),
        ),
    ),
)

AUDIT_ARGS = dict(audit_log=dict(type="path"))
# Doc fragment clinic.backup.authentication: modules that read sets.
PASSPHRASE_ARGS = dict(
    passphrase_file=dict(type="path", no_log=False),
    old_passphrase_files=dict(type="list", elements="path", default=[], no_log=False),
)
# ... clinic.backup.authentication.unauthenticated: modules that choose or check sets ...
AUTHENTICATION_ARGS = dict(PASSPHRASE_ARGS, allow_unauthenticated=dict(type="bool", default=False))
# ... and clinic.backup.authentication.restore.
RESTORE_AUTHENTICATION_ARGS = dict(
    AUTHENTICATION_ARGS, allow_unencrypted=dict(type="bool", default=False)
)

AWS_CREDENTIAL_ARGS = dict(
    aws_profile=dict(type="str", aliases=["profile"]),
    aws_access_key=dict(type="str", no_log=True, aliases=["access_key"]),
    aws_secret_key=dict(type="str", no_log=True, aliases=["secret_key"]),
    aws_session_token=dict(type="str", no_log=True, aliases=["session_token"]),
    s3_part_size_mb=dict(type="int", default=s3util.DEFAULT_PART_SIZE // s3util.MiB),
    s3_concurrency=dict(type="int", default=4),
    s3_retries=dict(type="int", default=8),
)


def connection_from_params(params, dbname=None):
    """PgConnection from module parameters; explicit login_* override the URL.

    ``dbname``: the database to connect to when it is not ``params["database"]``
    (restore connects to a maintenance database).
    """
    return PgConnection(
        url=params.get("database_url"),
        host=params.get("login_host"),
        port=params.get("login_port"),
        user=params.get("login_user"),
        dbname=dbname or params.get("database"),
        password=params.get("login_password"),
        passfile=params.get("passfile"),
        sslmode=params.get("ssl_mode"),
        connect_timeout=params.get("connect_timeout"),
    )


def s3_repository(target, params):
    """S3Repository for one target dict, credentials from params or the boto3 chain."""
    client = s3util.make_client(
        region=target.get("region"),
        endpoint_url=target.get("endpoint_url"),
        profile=params.get("aws_profile"),
        access_key=params.get("aws_access_key"),
        secret_key=params.get("aws_secret_key"),
        session_token=params.get("aws_session_token"),
        retries=params.get("s3_retries") or 8,
    )
    extra = s3util.upload_extra_args(
        target.get("sse") or "none", target.get("kms_key_id"), target.get("storage_class")
    )
    return S3Repository(
        client,
        target["bucket"],
        target.get("prefix") or "",
        part_size=(params.get("s3_part_size_mb") or s3util.DEFAULT_PART_SIZE // s3util.MiB)
        * s3util.MiB,
        concurrency=params.get("s3_concurrency") or 4,
        extra_args=extra,
        object_lock=target.get("object_lock"),
    )


def s3_target_options():
    """Suboptions of one entry of pg_dump's s3_targets: a location whose bucket is required."""
    options = {name: dict(spec) for name, spec in S3_LOCATION_ARGS.items()}
    options["bucket"]["required"] = True
    return options


def local_repository(path, must_exist=True, create_parents=False):
    return LocalRepository(path, must_exist=must_exist, create_parents=create_parents)


# The options of every module that writes a set (pg_dump, pg_basebackup, files_backup):
# where it goes and how it is stored.
SET_WRITING_ARGS = dict(
    compression=dict(type="str", default="zstd", choices=["zstd", "gzip", "none"]),
    compression_level=dict(type="int"),
    encrypt=dict(type="bool", default=True),
    passphrase_file=dict(type="path", no_log=False),
    repository=dict(type="path"),
    create_repository=dict(type="bool", default=False),
    s3_targets=dict(type="list", elements="dict", default=[], options=s3_target_options()),
    label=dict(type="str"),
    stale_seconds=dict(type="int", default=3600),
)


def target_repositories(params):
    """The repositories a module writes a new set into: the local ``repository``
    (created if missing, its parent only with ``create_repository``) and every entry of
    ``s3_targets``."""
    repositories = []
    if params["repository"]:
        repositories.append(
            local_repository(
                params["repository"],
                must_exist=False,
                create_parents=params["create_repository"],
            )
        )
    for target in params["s3_targets"]:
        repositories.append(s3_repository(target, params))
    return repositories


def repositories_from_params(params):
    """The repositories a module reads: ``repository`` (local) and/or ``bucket``/``prefix``."""
    repos = []
    if params.get("repository"):
        repos.append(local_repository(params["repository"]))
    if params.get("bucket"):
        repos.append(s3_repository(params, params))
    return repos


def repository_from_params(params):
    """The one repository of a module whose options make them mutually exclusive."""
    return repositories_from_params(params)[0]


def missing_library(params, psycopg2=False):
    """(name, import error) of a Python library this run needs and cannot import, or None:
    boto3 only when an S3 location is given, psycopg2 when asked for."""
    if psycopg2 and not HAS_PSYCOPG2:
        return "psycopg2", PSYCOPG2_IMPORT_ERROR
    if (params.get("bucket") or params.get("s3_targets")) and not s3util.HAS_BOTO3:
        return "boto3", s3util.BOTO3_IMPORT_ERROR
    return None


def error_result(exc):
    """fail_json keyword arguments for an engine error."""
    result = {"msg": str(exc), "error_type": exc.__class__.__name__}
    if getattr(exc, "hint", None):
        result["hint"] = exc.hint
    if getattr(exc, "result", None):
        result.update({k: v for k, v in exc.result.items() if k != "changed"})
        result["changed"] = exc.result.get("changed", False)
    return result


# Result keys worth an audit record: what was touched, never option values.
AUDIT_FIELDS = (
    "set_id",
    "database",
    "target_database",
    "previous_database",
    "mode",
    "deleted",
    "error_type",
    # Evidence of a restore test (measured RTO, age of the data) and of a backup's run time.
    "duration_seconds",
    "rpo_seconds",
)


def repository_names(params):
    """Where an operation worked, from module parameters or an agent config (no secrets)."""
    names = [params["repository"]] if params.get("repository") else []
    targets = list(params.get("s3_targets") or [])
    if params.get("bucket"):
        targets.append(params)
    for target in targets:
        if isinstance(target, dict):
            names.append("s3://%s/%s" % (target.get("bucket"), target.get("prefix") or ""))
    return names


def audit_record(path, action, ok, result, repositories=()):
    """Append one audit record for a finished operation; None when no log is configured.

    Returns an error text (for the caller to fail with) when the record could not be
    written, so that an unaudited operation never passes silently.
    """
    if not path:
        return None
    fields = {key: result[key] for key in AUDIT_FIELDS if result.get(key) not in (None, [], "")}
    fields["repositories"] = list(repositories)
    if not ok:
        fields["detail"] = str(result.get("msg", ""))[:1000]
    # Bad input (ConfigError) was refused before anything changed; anything else failed.
    refused = result.get("error_type") == "ConfigError"
    outcome = "ok" if ok else ("refused" if refused else "failed")
    try:
        AuditLog(path).record(action, outcome, **fields)
    except BackupError as exc:
        return "the audit record could not be written: %s" % exc
    return None


def record_read(module, database=None):
    """Record that this task read the catalog (who looked at which backups), in check
    mode too: a read happened either way. Fails the task when the record cannot be
    written, as for every other operation."""
    problem = audit_record(
        module.params.get("audit_log"),
        "read",
        True,
        {"database": database},
        repository_names(module.params),
    )
    if problem:
        module.fail_json(msg=problem)


def fail_audited(module, action, exc):
    """fail_json for an engine error, recorded in the audit log first.

    ``module``: the AnsibleModule (duck-typed: params, check_mode, fail_json).
    """
    failure = error_result(exc)
    if not module.check_mode:
        problem = audit_record(
            module.params.get("audit_log"),
            action,
            False,
            failure,
            repository_names(module.params),
        )
        if problem:
            failure["msg"] = "%s; also, %s" % (failure["msg"], problem)
    module.fail_json(**failure)


def exit_audited(module, action, result, ok=True, fail_task=False):
    """End the task, recording the operation in the audit log first.

    ``ok``: the operation's outcome for the log (a verify that found damage is not ok
    even when the task only warns); ``fail_task``: end with fail_json (``result["msg"]``
    says why). An operation that could not be recorded fails the task: it did happen,
    and the result says what.
    """
    if not module.check_mode:
        problem = audit_record(
            module.params.get("audit_log"), action, ok, result, repository_names(module.params)
        )
        if problem:
            result = dict(result)
            result["msg"] = "%s; also, %s" % (result["msg"], problem) if fail_task else problem
            fail_task = True
    if fail_task:
        module.fail_json(**result)
    module.exit_json(**result)
