# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Argument specs shared by the modules and the translation of their
parameters into engine objects.  Plain data and functions: the modules own
AnsibleModule, this file only knows dictionaries."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from . import s3 as s3util
from .pgsource import PgConnection
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
    )


def s3_target_options():
    """Suboptions of one entry of pg_dump's s3_targets: a location whose bucket is required."""
    options = {name: dict(spec) for name, spec in S3_LOCATION_ARGS.items()}
    options["bucket"]["required"] = True
    return options


def local_repository(path, must_exist=True):
    return LocalRepository(path, must_exist=must_exist)


def repository_from_params(params):
    """The one repository a module reads: ``repository`` (local) or ``bucket``/``prefix``."""
    if params.get("repository"):
        return local_repository(params["repository"])
    return s3_repository(params, params)


def error_result(exc):
    """fail_json keyword arguments for an engine error."""
    result = {"msg": str(exc), "error_type": exc.__class__.__name__}
    if getattr(exc, "hint", None):
        result["hint"] = exc.hint
    if getattr(exc, "result", None):
        result.update({k: v for k, v in exc.result.items() if k != "changed"})
        result["changed"] = exc.result.get("changed", False)
    return result
