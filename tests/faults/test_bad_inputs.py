"""Fault 8: bad input gets a clear error (words asserted) and changes nothing.

Complements tests/integration/test_bad_input.py (whose 12 cases are not repeated here).
Groups:

* modules: pg_dump / backup_verify / s3_transfer in one ansible-playbook run - odd
  database names, unknown formats and options, broken passphrase files, traversal set
  ids, bad URLs, bad S3 settings and credentials.
* credentials: moto with IAM auth switched on (``/moto-api/reset-auth``), an IAM user and
  key. "Revoked key" = an access key id moto does not know (InvalidAccessKeyId); "rotated
  secret" = the right key id with a wrong secret (SignatureDoesNotMatch). moto never
  expires STS credentials, so the expired token is the fault proxy answering S3's
  ``400 ExpiredToken`` error document.
* agent: config files the host agent reads.
* malicious artifacts: directory-format sets whose tar stream (zstd + gpg with the right
  passphrase, correct sha256 in the manifest) holds members escaping the extraction
  directory.
* wrong passphrase on verify.
* restore: the malicious directory sets above met by the restore's own extractor
  (nothing written outside its scratch directory, no database left), and a wrong
  passphrase (a clear error, no fallback to older data, nothing marked bad).

Retention (negative counts, a policy keeping nothing) and restore (an existing target,
traversal set ids, a name with a newline and a semicolon, a time without a zone, a role
without CREATEDB) join the module group.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testbed.ansible import ansible_env, run_playbook
from testbed.faultproxy import FaultProxy
from testbed.files import write_private
from testbed.s3 import MotoS3Server

from ansible_collections.clinic.backup.plugins.module_utils import authentication, catalog
from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.pgsource import PgConnection
from ansible_collections.clinic.backup.plugins.module_utils.repository import (
    isoformat,
    new_set_id,
    utc_now,
)
from ansible_collections.clinic.backup.plugins.module_utils.restore import (
    RestoreOptions,
    run_restore,
)
from ansible_collections.clinic.backup.plugins.module_utils.verify import verify_set

from . import faultlib
from .faultlib import agent_config, helpers


def _clear(result: dict[str, Any], words: list[str]) -> bool:
    text = str(result.get("msg", ""))
    return (
        result.get("_status") in ("failed", "ignored")
        and all(w in text for w in words)
        and "Traceback" not in str(result.get("module_stderr", "")) + text
    )


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def auth_s3() -> Iterator[dict[str, Any]]:
    """A moto server with IAM auth on: one user with an s3:* policy, one bucket."""
    import boto3

    server = MotoS3Server()
    try:
        server.start()
        iam = boto3.client(
            "iam",
            endpoint_url=server.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="AKIATESTBEDCLINIC000",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="clinic-backup")
        key = iam.create_access_key(UserName="clinic-backup")["AccessKey"]
        iam.put_user_policy(
            UserName="clinic-backup",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        server.create_bucket("auth-bucket")
        req = urllib.request.Request(
            server.endpoint_url + "/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            req, timeout=10
        ) as resp:
            assert resp.status == 200
        expired = FaultProxy(server.port).start()
        expired.add(
            "error", status=400, code="ExpiredToken", message="The provided token has expired."
        )
        try:
            yield {
                "server": server,
                "key": key["AccessKeyId"],
                "secret": key["SecretAccessKey"],
                "bucket": "auth-bucket",
                "expired_url": expired.url,
            }
        finally:
            expired.stop()
    finally:
        server.stop()
        server.cleanup()


def credential_variants(auth: dict[str, Any]) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """name -> (credential/endpoint settings, words a clear error contains)."""
    endpoint = auth["server"].endpoint_url
    return {
        "revoked access key (InvalidAccessKeyId)": (
            {
                "endpoint_url": endpoint,
                "aws_access_key": "AKIA" + secrets.token_hex(8).upper(),
                "aws_secret_key": auth["secret"],
            },
            ["InvalidAccessKeyId", "access key"],
        ),
        "rotated secret key (SignatureDoesNotMatch)": (
            {
                "endpoint_url": endpoint,
                "aws_access_key": auth["key"],
                "aws_secret_key": "x" + auth["secret"][1:],
            },
            ["SignatureDoesNotMatch", "secret key"],
        ),
        "expired session token (ExpiredToken)": (
            {
                "endpoint_url": auth["expired_url"],
                "aws_access_key": auth["key"],
                "aws_secret_key": auth["secret"],
                "aws_session_token": "FwoGZXIvYXdzEXPIRED",
            },
            ["ExpiredToken", "expired"],
        ),
    }


@pytest.fixture
def good_repo(pg, collections_path, passphrase_file, tmp_path) -> Path:
    """A repository holding one good set of clinic_db."""
    repo_dir = tmp_path / "good-repo"
    repo_dir.mkdir(mode=0o700)
    result = faultlib.run_agent(
        collections_path,
        agent_config(tmp_path, pg, pg.clinic_db, passphrase_file, repository=repo_dir),
    )
    assert result.rc == 0, result.text()
    return repo_dir


# ---------------------------------------------------------------------- modules
def module_cases(
    pg: Any,
    s3: Any,
    bucket: str,
    auth: dict[str, Any],
    passphrase_file: Path,
    repo_dir: Path,
    tmp_path: Path,
) -> list[tuple[str, str, dict[str, Any], list[str]]]:
    """(task name, module, arguments, words the error must contain)."""
    files = tmp_path / "inputs"
    files.mkdir()
    empty = write_private(files / "empty", b"")
    two_lines = write_private(files / "two-lines", b"first line\nsecond line\n")
    link = files / "link"
    link.symlink_to(passphrase_file)
    a_dir = files / "a-directory"
    a_dir.mkdir(mode=0o700)
    group_readable = write_private(files / "group-readable", b"secret passphrase\n", 0o640)
    world_readable = write_private(files / "world-readable", b"secret passphrase\n", 0o644)
    a_file = write_private(files / "not-a-directory", b"")
    conn = {
        "database": pg.clinic_db,
        "login_host": pg.host,
        "login_port": pg.port,
        "login_user": pg.clinic_user,
        "login_password": pg.clinic_password,
    }
    dump = dict(conn, passphrase_file=str(passphrase_file), repository=str(repo_dir))
    target = {"bucket": bucket, "endpoint_url": s3.endpoint_url}
    url = pg.url(pg.clinic_user, pg.clinic_password, pg.clinic_db)
    verify = {"repository": str(repo_dir), "passphrase_file": str(passphrase_file)}
    remote = {"bucket": bucket, "endpoint_url": s3.endpoint_url}
    some_id = new_set_id("clinic_db")
    cases = [
        (
            "database name with quote and semicolon",
            "pg_dump",
            dict(dump, database="clinic_db'; DROP TABLE patients; --"),
            ["does not exist"],
        ),
        (
            "excluded table name with newline",
            "pg_dump",
            dict(dump, exclude_tables=["patients\n; DROP"]),
            ["control character"],
        ),
        ("empty table name", "pg_dump", dict(dump, tables=[""]), ["non-empty"]),
        ("unknown format", "pg_dump", dict(dump, format="tar"), ["format", "tar", "one of"]),
        ("unknown compression", "pg_dump", dict(dump, compression="lz4"), ["compression", "lz4"]),
        (
            "schema_only and data_only",
            "pg_dump",
            dict(dump, schema_only=True, data_only=True),
            ["mutually exclusive"],
        ),
        (
            "zero jobs",
            "pg_dump",
            dict(dump, format="directory", jobs=0),
            ["jobs must be at least 1"],
        ),
        ("empty passphrase file", "pg_dump", dict(dump, passphrase_file=str(empty)), ["is empty"]),
        (
            "passphrase file is a symlink",
            "pg_dump",
            dict(dump, passphrase_file=str(link)),
            ["is a symlink"],
        ),
        (
            "passphrase file with two lines",
            "pg_dump",
            dict(dump, passphrase_file=str(two_lines)),
            ["more than one line"],
        ),
        (
            "passphrase file is a directory",
            "pg_dump",
            dict(dump, passphrase_file=str(a_dir)),
            ["not a regular file"],
        ),
        (
            "group-readable passphrase file",
            "pg_dump",
            dict(dump, passphrase_file=str(group_readable)),
            ["loose permissions", "0o640"],
        ),
        (
            "encryption without a passphrase file",
            "pg_dump",
            {k: v for k, v in dump.items() if k != "passphrase_file"},
            ["passphrase_file"],
        ),
        (
            "repository is a regular file",
            "pg_dump",
            dict(dump, repository=str(a_file)),
            ["not writable"],
        ),
        (
            "database_url with another scheme",
            "pg_dump",
            {
                "database_url": url.replace("postgresql://", "mysql://"),
                "passphrase_file": str(passphrase_file),
                "repository": str(repo_dir),
            },
            ["must start with postgresql://"],
        ),
        (
            "database_url smuggling server options",
            "pg_dump",
            {
                "database_url": url + "?options=-csearch_path%3Devil",
                "passphrase_file": str(passphrase_file),
                "repository": str(repo_dir),
            },
            ["'options' is not supported"],
        ),
        (
            "S3 part size below 5 MiB",
            "pg_dump",
            dict(dump, s3_targets=[target], s3_part_size_mb=1),
            ["below the 5 MiB minimum"],
        ),
        (
            "kms_key_id without sse aws:kms",
            "pg_dump",
            dict(dump, s3_targets=[dict(target, sse="AES256", kms_key_id="alias/clinic")]),
            ["sse=aws:kms"],
        ),
        (
            "bucket name with a path",
            "pg_dump",
            dict(dump, s3_targets=[dict(target, bucket=bucket + "/../other")]),
            ["invalid bucket name"],
        ),
        (
            "verify set_id ../../etc",
            "backup_verify",
            dict(verify, set_id="../../etc"),
            ["is not a backup set id"],
        ),
        (
            "verify set_id with path and semicolon",
            "backup_verify",
            dict(verify, set_id=some_id + "/../../x; rm -rf /"),
            ["is not a backup set id"],
        ),
        (
            "verify with a world-readable passphrase file",
            "backup_verify",
            dict(verify, passphrase_file=str(world_readable)),
            ["loose permissions", "chmod 0600"],
        ),
        (
            "verify a set that does not exist",
            "backup_verify",
            dict(verify, set_id=some_id),
            ["has no manifest"],
        ),
        (
            "verify on a missing bucket",
            "backup_verify",
            dict(remote, bucket="no-such-bucket-verify", passphrase_file=str(passphrase_file)),
            ["NoSuchBucket"],
        ),
        (
            "upload set_id ../../etc",
            "s3_transfer",
            dict(remote, mode="upload", repository=str(repo_dir), set_id="../../etc"),
            ["is not a backup set id"],
        ),
        (
            "download set_id ../../../tmp/x",
            "s3_transfer",
            dict(
                remote,
                mode="download",
                repository=str(tmp_path / "download"),
                set_id="../../../tmp/x",
            ),
            ["is not a backup set id"],
        ),
        (
            "upload to a missing bucket",
            "s3_transfer",
            dict(remote, mode="upload", repository=str(repo_dir), bucket="no-such-bucket-upload"),
            ["NoSuchBucket"],
        ),
        (
            "download into a relative repository",
            "s3_transfer",
            dict(remote, mode="download", repository="relative/restore", set_id=some_id),
            ["must be absolute"],
        ),
    ]
    prune = {"repository": str(repo_dir)}
    zero = {"keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0, "keep_yearly": 0}
    cases += [
        ("retention keep_daily -1", "backup_retention", dict(prune, keep_daily=-1), ["keep_daily"]),
        ("retention min_keep -3", "backup_retention", dict(prune, min_keep=-3), ["min_keep"]),
        (
            "retention that would delete every backup",
            "backup_retention",
            dict(prune, **zero),
            ["would delete every backup"],
        ),
        (
            "retention that would delete every backup, min_keep 0",
            "backup_retention",
            dict(prune, min_keep=0, **zero),
            ["would delete every backup"],
        ),
        (
            "retention of a repository outside any set layout",
            "backup_retention",
            {"repository": str(tmp_path / "no-such-repository")},
            ["does not exist"],
        ),
    ]
    restore = {
        "repository": str(repo_dir),
        "passphrase_file": str(passphrase_file),
        "login_host": pg.host,
        "login_port": pg.port,
        "login_user": pg.superuser,
    }
    cases += [
        (
            "restore over an existing database (create)",
            "backup_restore",
            dict(restore, target_database=pg.clinic_db),
            ["already exists", "mode: replace"],
        ),
        (
            "restore set_id ../../etc",
            "backup_restore",
            dict(restore, target_database="x_restore", set_id="../../etc"),
            ["is not a backup set id"],
        ),
        (
            "restore target name with newline and semicolon",
            "backup_restore",
            dict(restore, target_database="x;\nDROP DATABASE clinic_db"),
            ["control character"],
        ),
        (
            "restore not_after without a time zone",
            "backup_restore",
            dict(restore, target_database="x_restore", not_after="2026-11-30 08:00"),
            ["no time zone"],
        ),
        (
            "restore as a role that may not create databases",
            "backup_restore",
            dict(
                restore,
                target_database="x_restore",
                login_user=pg.clinic_user,
                login_password=pg.clinic_password,
            ),
            ["may not create databases"],
        ),
    ]
    for name, (settings, words) in credential_variants(auth).items():
        # Listing reads an error body: these must be clear (pg_dump's bucket check: see below).
        location = {"bucket": auth["bucket"], "endpoint_url": settings["endpoint_url"]}
        creds = {k: v for k, v in settings.items() if k != "endpoint_url"}
        cases.append(
            (
                "verify S3 with " + name,
                "backup_verify",
                dict(location, passphrase_file=str(passphrase_file), **creds),
                words,
            )
        )
    return cases


def test_module_bad_inputs_fail_clearly_and_change_nothing(
    pg,
    s3,
    fresh_bucket,
    direct_s3,
    auth_s3,
    collections_path,
    passphrase_file,
    good_repo,
    tmp_path,
    summary_row,
):
    cases = module_cases(pg, s3, fresh_bucket, auth_s3, passphrase_file, good_repo, tmp_path)
    before = {
        "repo": faultlib.tree_digest(good_repo),
        "patients": pg.psql("SELECT count(*) FROM patients", dbname=pg.clinic_db),
    }
    watched = [tmp_path / "download", Path("/tmp/x"), good_repo.parent / "etc"]
    existed = {p for p in watched if p.exists()}
    # strategy free over 4 local "hosts", each taking every 4th case: the cases run 4 at a time.
    hosts = ["bad%d" % i for i in range(4)]
    tasks = [
        {
            "name": name,
            "clinic.backup.%s" % module: args,
            "ignore_errors": True,
            "when": "inventory_hostname == %r" % hosts[i % len(hosts)],
        }
        for i, (name, module, args, _words) in enumerate(cases)
    ]
    playbook = tmp_path / "bad-inputs.yml"
    playbook.write_text(
        json.dumps(
            [
                {
                    "name": "bad inputs",
                    "hosts": "all",
                    "gather_facts": False,
                    "strategy": "free",
                    "tasks": tasks,
                }
            ]
        )
    )
    run = run_playbook(
        playbook, ansible_env(collections_path, s3.env()), inventory=",".join(hosts) + ","
    )
    problems = []
    for name, module, _args, words in cases:
        found = [r for r in run.task_results(name) if r.get("_status") != "skipped"]
        assert len(found) == 1, run.output()
        result = found[0]
        clear = _clear(result, words)
        summary_row("bad input: %s module" % module).bad_input(clear)
        if not clear:
            problems.append("%s: %s / %s" % (name, result.get("_status"), result.get("msg")))
    after = {
        "repo": faultlib.tree_digest(good_repo),
        "patients": pg.psql("SELECT count(*) FROM patients", dbname=pg.clinic_db),
    }
    changed = [k for k in before if before[k] != after[k]]
    s3_changes = helpers.s3_keys(direct_s3, fresh_bucket) + helpers.open_multipart_uploads(
        direct_s3, fresh_bucket
    )
    stray = [str(p) for p in watched if p.exists() and p not in existed]
    if changed or s3_changes or stray:
        summary_row("bad input: pg_dump module").note(
            "state changed: %s %s %s" % (changed, s3_changes, stray)
        )
    assert len(cases) >= 30
    assert not problems, "\n".join(problems)
    assert not changed and not s3_changes and not stray, (changed, s3_changes, stray)


# ---------------------------------------------------------------------- credentials via pg_dump
@pytest.mark.parametrize(
    "variant",
    [
        "revoked access key (InvalidAccessKeyId)",
        "rotated secret key (SignatureDoesNotMatch)",
        "expired session token (ExpiredToken)",
    ],
)
def test_backup_with_bad_s3_credentials_names_the_credential_problem(
    variant, pg, auth_s3, collections_path, passphrase_file, repo_dir, tmp_path, summary_row
):
    settings, words = credential_variants(auth_s3)[variant]
    target = {"bucket": auth_s3["bucket"], "endpoint_url": settings["endpoint_url"]}
    creds = {k: v for k, v in settings.items() if k != "endpoint_url"}
    config = agent_config(
        tmp_path,
        pg,
        pg.clinic_db,
        passphrase_file,
        repository=repo_dir,
        s3_targets=[target],
        s3_retries=1,
        **creds,
    )
    result = faultlib.run_agent(collections_path, config)
    clear = result.rc in (1, 2) and all(w in result.msg for w in words)
    row = summary_row("bad input: S3 credentials (backup)")
    row.bad_input(clear)
    row.note("%s -> %s" % (variant, result.msg[:160]))
    assert helpers.local_sets(repo_dir) == [] and helpers.staging_leftovers(repo_dir) == []
    assert clear, result.msg


def test_database_name_with_newline_fails_clearly(
    pg, collections_path, passphrase_file, repo_dir, tmp_path, summary_row
):
    config = agent_config(
        tmp_path, pg, "clinic_db\nDROP TABLE patients", passphrase_file, repository=repo_dir
    )
    result = faultlib.run_agent(collections_path, config)
    clear = result.rc in (1, 2) and "does not exist" in result.msg
    row = summary_row("bad input: host agent")
    row.bad_input(clear)
    row.note("database name with newline -> %s" % result.msg[:200])
    assert helpers.local_sets(repo_dir) == [] and helpers.staging_leftovers(repo_dir) == []
    assert clear, result.msg


def test_latest_pointer_stays_per_database_with_punctuation_in_names(
    pg, collections_path, passphrase_file, repo_dir, tmp_path, summary_row
):
    other = "clinic;db"
    pg.create_database(other, owner=pg.clinic_user)
    try:
        ids = {}
        for database in (pg.clinic_db, other):
            config = agent_config(tmp_path, pg, database, passphrase_file, repository=repo_dir)
            result = faultlib.run_agent(collections_path, config)
            assert result.rc == 0, result.text()
            ids[database] = result.doc["set_id"]
    finally:
        pg.drop_database(other)
    repo = faultlib.local_repository(repo_dir)
    latest = repo.read_latest(pg.clinic_db)
    named = catalog.load_manifest(repo, latest)["database"] if latest else None
    row = summary_row("bad input: host agent")
    row.bad_input(named == pg.clinic_db)
    row.note("latest/clinic_db.json names %s, a set of database %r" % (latest, named))
    assert named == pg.clinic_db and latest == ids[pg.clinic_db], (latest, named, ids)


# ---------------------------------------------------------------------- the host agent
AGENT_CASES = {
    "unknown format": ({"format": "tar"}, "backup", None, ["unknown dump format 'tar'"]),
    "config is not JSON": (None, "backup", None, ["is not valid JSON"]),
    "verify --set-id ../../etc": ({}, "verify", "../../etc", ["is not a backup set id"]),
    "verify --set-id with a shell payload": ({}, "verify", "x;reboot", ["is not a backup set id"]),
}
AGENT_BUGS = {
    "jobs given as text": ({"format": "directory", "jobs": "four"}, ["jobs"]),
    "compression level given as text": ({"compression_level": "high"}, ["compression_level"]),
    "misspelt key s3_target (the S3 copy is silently skipped)": (
        {"s3_target": [{"bucket": "offsite", "endpoint_url": "http://127.0.0.1:9"}]},
        ["s3_target"],
    ),
}


def _agent_case(
    pg, collections_path, passphrase_file, repo_dir, tmp_path, extra, command="backup", set_id=None
):
    metrics_dir = tmp_path / "metrics"
    if extra is None:
        config = str(write_private(tmp_path / "broken.json", b'{"database": "clinic_db", '))
    else:
        config = agent_config(
            tmp_path, pg, pg.clinic_db, passphrase_file, repository=repo_dir, **extra
        )
    before = faultlib.tree_digest(repo_dir)
    result = faultlib.run_agent(
        collections_path, config, command=command, set_id=set_id, metrics_dir=metrics_dir
    )
    changed = faultlib.tree_digest(repo_dir) != before
    return result, changed, faultlib.read_metrics(metrics_dir, pg.clinic_db, job=command)


@pytest.mark.parametrize("name", list(AGENT_CASES))
def test_agent_bad_config_fails_clearly(
    name, pg, collections_path, passphrase_file, good_repo, tmp_path, summary_row
):
    extra, command, set_id, words = AGENT_CASES[name]
    result, changed, metrics = _agent_case(
        pg, collections_path, passphrase_file, good_repo, tmp_path, extra, command, set_id
    )
    clear = (
        result.rc == 2 and all(w in result.msg for w in words) and "Traceback" not in result.stderr
    )
    summary_row("bad input: host agent").bad_input(clear)
    assert clear, result.text()
    assert not changed
    if command == "backup" and metrics:
        assert metrics["clinic_backup_last_status"] == 1.0


@pytest.mark.parametrize("name", list(AGENT_BUGS))
def test_agent_config_is_validated_like_module_arguments(
    name, pg, collections_path, passphrase_file, repo_dir, tmp_path, summary_row
):
    extra, words = AGENT_BUGS[name]
    result, changed, metrics = _agent_case(
        pg, collections_path, passphrase_file, repo_dir, tmp_path, extra
    )
    clear = (
        result.rc == 2 and all(w in result.msg for w in words) and "Traceback" not in result.stderr
    )
    row = summary_row("bad input: host agent")
    row.bad_input(clear)
    row.reported(result.reported_ok, False)  # a success here means an offsite copy silently skipped
    detail = result.msg or (result.stderr.strip().splitlines() or [""])[-1]
    row.note("%s -> rc=%s: %s" % (name, result.rc, detail[:120]))
    assert clear, result.text()[-600:]
    assert not changed
    assert metrics.get("clinic_backup_last_status") == 1.0, metrics


# ---------------------------------------------------------------------- malicious artifacts
def _member(
    name: str, kind: str = "file", target: str = "", uname: str = "postgres"
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000
    info.uname = info.gname = uname
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, target
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, target
    return info


MALICIOUS = {
    "member ../evil.sql": (_member("../evil.sql"), ["'../evil.sql' is unsafe", "parent directory"]),
    "member a/../../evil.sql": (_member("a/../../evil.sql"), ["'a/../../evil.sql' is unsafe"]),
    "absolute member /etc/cron.d/evil": (
        _member("/etc/cron.d/evil"),
        ["'/etc/cron.d/evil' is unsafe", "absolute path"],
    ),
    "symlink out to /etc/passwd": (
        _member("./3001.dat", "symlink", "/etc/passwd"),
        ["3001.dat", "is unsafe"],
    ),
    "hard link to ../../etc/shadow": (
        _member("./3002.dat", "hardlink", "../../etc/shadow"),
        ["3002.dat", "is unsafe"],
    ),
}


def build_directory_set(
    repo_dir: Path, passphrase_file: Path, extra: list[tarfile.TarInfo]
) -> tuple[str, Path]:
    """A directory-format set with a real-looking tar (toc.dat + data files + ``extra``),
    compressed with zstd and encrypted with gpg and the right passphrase, manifest with the
    correct sha256 and size, sealed with the passphrase's key."""
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in [_member("./toc.dat"), _member("./3000.dat")] + extra:
            data = b"PGDMP fake table of contents\n" if member.isfile() else b""
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    compressed = subprocess.run(
        ["zstd", "-q", "-c"], input=stream.getvalue(), capture_output=True, check=True
    ).stdout
    home = repo_dir.parent / ("gnupg-" + secrets.token_hex(4))
    home.mkdir(mode=0o700)
    try:
        encrypted = subprocess.run(
            helpers.stock_gpg(
                passphrase_file, home, "--symmetric", "--cipher-algo", "AES256", "--output", "-"
            ),
            input=compressed,
            capture_output=True,
            check=True,
        ).stdout
    finally:
        helpers.kill_gpg_agent(home)
    started = utc_now()
    set_id = new_set_id("clinic_db", started)
    set_dir = repo_dir / "sets" / set_id
    set_dir.mkdir(parents=True, mode=0o700)
    artifact = set_dir / "clinic_db.dir.tar.zst.gpg"
    artifact.write_bytes(encrypted)
    manifest = {
        "format_version": 1,
        "id": set_id,
        "database": "clinic_db",
        "format": "directory",
        "compression": {"algorithm": "zstd", "level": 3},
        "encryption": {"method": "gpg-symmetric", "cipher": "AES256"},
        "artifacts": [
            {
                "name": "database",
                "file": artifact.name,
                "content": "pg_dump-directory-tar",
                "size": len(encrypted),
                "sha256": hashlib.sha256(encrypted).hexdigest(),
            }
        ],
        "started_at": isoformat(started),
        "finished_at": isoformat(utc_now()),
        "options": {},
    }
    # Sealed with the passphrase: whoever crafted it knew it, so only the tar checks stand.
    manifest = authentication.seal(manifest, RecordKey.from_file(str(passphrase_file)), "manifest")
    (set_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return set_id, artifact


def _verify_crafted(
    tmp_path: Path, passphrase_file: Path, extra: list[tarfile.TarInfo]
) -> tuple[dict, bytes, bytes]:
    repo_dir = tmp_path / ("crafted-" + secrets.token_hex(3))
    repo_dir.mkdir(mode=0o700)
    set_id, artifact = build_directory_set(repo_dir, passphrase_file, extra)
    before = artifact.read_bytes()
    outcome = verify_set(
        faultlib.local_repository(repo_dir),
        set_id=set_id,
        passphrase_file=str(passphrase_file),
        max_age_hours=0,
        size_tolerance_percent=0,
    )
    return outcome, before, artifact.read_bytes()


def test_crafted_directory_set_without_unsafe_member_verifies(tmp_path, passphrase_file):
    """Control: the crafted set is valid; the failures below come from the unsafe members."""
    outcome, _before, _after = _verify_crafted(tmp_path, passphrase_file, [])
    assert outcome["ok"], outcome["failures"]


@pytest.mark.parametrize("name", list(MALICIOUS))
def test_unsafe_tar_member_fails_verify_naming_it(name, tmp_path, passphrase_file, summary_row):
    member, words = MALICIOUS[name]
    outcome, before, after = _verify_crafted(tmp_path, passphrase_file, [member])
    text = "; ".join(outcome["failures"])
    clear = not outcome["ok"] and all(w in text for w in words)
    row = summary_row("bad input: malicious directory artifact")
    row.bad_input(clear)
    row.reported(outcome["ok"], False)
    assert clear, text or outcome
    assert before == after
    assert not (tmp_path / "evil.sql").exists()


def test_unsafe_tar_member_with_spaced_owner_name_fails_verify(
    tmp_path, passphrase_file, summary_row
):
    outcome, _before, _after = _verify_crafted(
        tmp_path, passphrase_file, [_member("../evil.sql", uname="clinic backup")]
    )
    text = "; ".join(outcome["failures"])
    clear = not outcome["ok"] and "'../evil.sql' is unsafe" in text
    row = summary_row("bad input: malicious directory artifact")
    row.bad_input(clear)
    row.reported(outcome["ok"], False)
    assert clear, outcome.get("checks")


# ---------------------------------------------------------------------- wrong passphrase
def _wrong_passphrase_verify(
    good_repo: Path, tmp_path: Path, passphrase_file: Path
) -> tuple[str, str, bool, dict, dict]:
    """Verify the good set with the right passphrase (recorded: ok), then with a wrong one.

    Returns (set id, what verify said, whether it said ok, tree before, tree after). verify
    may answer with a failed outcome or refuse with an error; both are accepted here.
    """
    wrong = write_private(tmp_path / "wrong-passphrase", secrets.token_urlsafe(32).encode() + b"\n")
    repo = faultlib.local_repository(good_repo)
    right = verify_set(
        repo, passphrase_file=str(passphrase_file), max_age_hours=0, size_tolerance_percent=0
    )
    assert right["ok"], right["failures"]
    before = faultlib.tree_digest(good_repo)
    try:
        outcome = verify_set(
            repo, passphrase_file=str(wrong), max_age_hours=0, size_tolerance_percent=0
        )
        text, ok = "; ".join(outcome["failures"]), outcome["ok"]
    except BackupError as exc:
        text, ok = str(exc), False
    return right["set_id"], text, ok, before, faultlib.tree_digest(good_repo)


def test_wrong_passphrase_on_verify_fails_clearly(
    good_repo, tmp_path, passphrase_file, summary_row
):
    _set_id, text, ok, _before, _after = _wrong_passphrase_verify(
        good_repo, tmp_path, passphrase_file
    )
    clear = not ok and (
        ("decryption failed" in text and "Bad session key" in text) or "passphrase" in text
    )
    row = summary_row("bad input: wrong passphrase on verify")
    row.bad_input(clear)
    row.note("verify says: %s" % text[-160:])
    assert clear, text


def test_wrong_passphrase_on_verify_changes_nothing(
    good_repo, tmp_path, passphrase_file, summary_row
):
    set_id, _text, _ok, before, after = _wrong_passphrase_verify(
        good_repo, tmp_path, passphrase_file
    )
    repo = faultlib.local_repository(good_repo)
    chosen = catalog.newest_complete(repo, require_verified=True)
    row = summary_row("bad input: wrong passphrase on verify")
    if before != after:
        row.note(
            "after a wrong-passphrase verify the good set is recorded as %r and "
            "newest_complete(require_verified=True) returns %s"
            % (catalog.load_verification(repo, set_id).get("state"), chosen and chosen["id"])
        )
    # The good set was the newest verified one before: counted lost if no longer selectable.
    row.add("sets_lost", chosen is None or chosen["id"] != set_id)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    assert chosen is not None and chosen["id"] == set_id


# ---------------------------------------------------------------------- restore
def _databases(pg) -> set[str]:
    return set(pg.psql("SELECT datname FROM pg_database").split())


def _rehearse(pg, repo_dir: Path, passphrase: Path, **extra) -> tuple[str, bool]:
    """Rehearse a restore on the test cluster; (what it said, whether it succeeded)."""
    options = RestoreOptions(
        mode="rehearse",
        database="clinic_db",
        target_database="bad_input_%s" % secrets.token_hex(3),
        passphrase_file=str(passphrase),
        **extra,
    )
    server = PgConnection(host=pg.host, port=pg.port, user=pg.superuser, dbname="postgres")
    try:
        result = run_restore(faultlib.local_repository(repo_dir), server, options)
    except BackupError as exc:
        return str(exc), False
    return "restored %s" % result["set_id"], True


@pytest.mark.parametrize("name", list(MALICIOUS))
def test_unsafe_tar_member_is_never_extracted_by_restore(
    name, pg, tmp_path, passphrase_file, summary_row
):
    """Restore unpacks directory sets itself: the member is refused before it is written."""
    member, _words = MALICIOUS[name]
    repo_dir = tmp_path / "crafted"
    repo_dir.mkdir(mode=0o700)
    set_id, artifact = build_directory_set(repo_dir, passphrase_file, [member])
    shown = member.name[2:] if member.name.startswith("./") else member.name
    before_dbs, before_bytes = _databases(pg), artifact.read_bytes()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    text, ok = _rehearse(pg, repo_dir, passphrase_file, set_id=set_id, scratch_dir=str(scratch))
    clear = not ok and repr(shown) in text and ("unsafe" in text or "not a regular file" in text)
    row = summary_row("bad input: malicious directory artifact on restore")
    row.bad_input(clear)
    row.reported(ok, False)
    escaped = [p for p in (tmp_path / "evil.sql", tmp_path.parent / "evil.sql") if p.exists()]
    row.add("leftovers", len(list(scratch.iterdir())) + len(escaped))
    assert clear, text
    assert escaped == [] and list(scratch.iterdir()) == []
    assert _databases(pg) == before_dbs
    assert artifact.read_bytes() == before_bytes


def test_wrong_passphrase_on_restore_fails_clearly_and_changes_nothing(
    good_repo, pg, tmp_path, passphrase_file, summary_row
):
    wrong = write_private(tmp_path / "wrong-passphrase", secrets.token_urlsafe(32).encode() + b"\n")
    before_tree, before_dbs = faultlib.tree_digest(good_repo), _databases(pg)
    text, ok = _rehearse(pg, good_repo, wrong)
    clear = not ok and "sealed with another passphrase" in text
    row = summary_row("bad input: wrong passphrase on restore")
    row.bad_input(clear)
    row.reported(ok, False)
    assert clear, text
    assert faultlib.tree_digest(good_repo) == before_tree
    assert _databases(pg) == before_dbs
    # The right passphrase still restores the same set: nothing was marked bad.
    assert _rehearse(pg, good_repo, passphrase_file)[1]
