"""The audit log: private, append-only, hash-chained, and never holding a secret."""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import pwd
import socket
import threading

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import audit
from ansible_collections.clinic.backup.plugins.module_utils.audit import (
    GENESIS,
    AuditLog,
    redact,
    verify_chain,
)
from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError, StoreError
from ansible_collections.clinic.backup.plugins.module_utils.version import TOOL_VERSION

SET_ID = "20261122T010000Z-clinic_db-1a2b3c"


def lines(path):
    return path.read_bytes().splitlines()


def records(path):
    return [json.loads(line) for line in lines(path)]


def write_log(path, count):
    log = AuditLog(str(path))
    for number in range(count):
        log.record("backup", "ok", set_id=SET_ID, database="clinic_db", number=number)
    return lines(path)


def rewrite(path, new_lines):
    path.write_bytes(b"".join(line + b"\n" for line in new_lines))


def test_record_carries_who_what_when(tmp_path):
    path = tmp_path / "audit.log"
    written = AuditLog(str(path)).record(
        "restore", "refused", set_id=SET_ID, target="scratch_db", detail="target not empty"
    )
    (record,) = records(path)
    assert record == written
    assert record["action"] == "restore" and record["outcome"] == "refused"
    assert record["set_id"] == SET_ID and record["target"] == "scratch_db"
    assert record["detail"] == "target not empty"
    assert record["time"].endswith("Z") and record["time"][:4].isdigit()
    assert record["host"] == socket.gethostname()
    assert record["uid"] == os.geteuid()
    assert record["user"] == pwd.getpwuid(os.geteuid()).pw_name
    assert record["pid"] == os.getpid()
    assert record["tool_version"] == TOOL_VERSION
    assert record["prev"] == GENESIS
    assert len(record["hash"]) == 64
    assert verify_chain(str(path)) == (True, None)


def test_each_line_chains_to_the_one_before(tmp_path):
    path = tmp_path / "audit.log"
    raw = write_log(path, 3)
    parsed = [json.loads(line) for line in raw]
    assert parsed[0]["prev"] == GENESIS
    assert parsed[1]["prev"] == hashlib.sha256(raw[0]).hexdigest()
    assert parsed[2]["prev"] == hashlib.sha256(raw[1]).hexdigest()
    assert [r["number"] for r in parsed] == [0, 1, 2]
    times = [r["time"] for r in parsed]
    assert times == sorted(times)


def test_sudo_user_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "dr_admin")
    record = AuditLog(str(tmp_path / "audit.log")).record("verify", "ok", set_id=SET_ID)
    assert record["sudo_user"] == "dr_admin"


def test_creates_private_file_and_directories_whatever_the_umask(tmp_path):
    path = tmp_path / "log" / "clinic" / "audit.log"
    old = os.umask(0)
    try:
        AuditLog(str(path)).record("backup", "ok", set_id=SET_ID)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "log").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "log" / "clinic").stat().st_mode & 0o777 == 0o700


def test_existing_directory_permissions_are_left_alone(tmp_path):
    folder = tmp_path / "var-log"
    folder.mkdir()
    folder.chmod(0o755)
    AuditLog(str(folder / "audit.log")).record("backup", "ok")
    assert folder.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
def test_refuses_a_file_with_group_or_other_access(tmp_path, mode):
    path = tmp_path / "audit.log"
    path.write_bytes(b"")
    path.chmod(mode)
    with pytest.raises(ConfigError, match="loose permissions") as info:
        AuditLog(str(path)).record("backup", "ok")
    assert "chmod 0600" in str(info.value)
    assert path.read_bytes() == b""


@pytest.mark.parametrize("dangling", [False, True])
def test_refuses_a_symlink(tmp_path, dangling):
    real = tmp_path / "real.log"
    if not dangling:
        real.write_bytes(b"")
        real.chmod(0o600)
    link = tmp_path / "audit.log"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="is a symlink"):
        AuditLog(str(link)).record("backup", "ok")
    assert real.read_bytes() == b"" if not dangling else not real.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_refuses_a_file_owned_by_someone_else(tmp_path):
    path = tmp_path / "audit.log"
    path.write_bytes(b"")
    path.chmod(0o600)
    os.chown(path, 54321, 54321)
    with pytest.raises(ConfigError, match="owned by uid 54321"):
        AuditLog(str(path)).record("backup", "ok")


def test_refuses_relative_path_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="must be absolute"):
        AuditLog("audit.log")
    with pytest.raises(ConfigError, match="is a directory"):
        AuditLog(str(tmp_path)).record("backup", "ok")


@pytest.mark.parametrize(
    ("args", "fields", "words"),
    [
        (("backup", "done"), {}, "unknown audit outcome"),
        (("drop_everything", "ok"), {}, "unknown audit action"),
        (("backup", "ok"), {"host": "db1"}, "set by the log itself"),
        (("backup", "ok"), {"prev": "0"}, "set by the log itself"),
    ],
)
def test_rejects_bad_calls_without_writing(tmp_path, args, fields, words):
    path = tmp_path / "audit.log"
    with pytest.raises(ValueError, match=words):
        AuditLog(str(path)).record(*args, **fields)
    assert not path.exists()


def test_secrets_never_reach_the_file(tmp_path):
    password = "Hunter2-correct-horse"
    url_password = "p@ss:w0rd-in-url"
    passphrase = b"battery staple passphrase"
    secret_key = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY"
    path = tmp_path / "audit.log"
    AuditLog(str(path)).record(
        "backup",
        "failed",
        database="clinic_db",
        login_user="clinic_user",
        login_password=password,
        database_url="postgresql://clinic_user:%s@db.clinic.local:5432/clinic_db" % url_password,
        passphrase=passphrase,
        aws={"aws_secret_key": secret_key, "region": "us-east-1"},
        targets=[{"url": "postgres://admin:%s@replica/clinic_db" % password}],
        detail="pg_dump failed: PGPASSWORD=%s host=db password='%s' sslmode=require"
        % (password, password),
        kms_key_id="arn:aws:kms:us-east-1:111122223333:key/1234abcd",
        passphrase_file="/root/.backup-passphrase",
    )
    data = path.read_bytes()
    for secret in (password, url_password, "p@ss", passphrase.decode(), secret_key):
        assert secret.encode() not in data
    (record,) = records(path)
    assert record["login_password"] == "<redacted>"
    assert record["passphrase"] == "<redacted>"
    assert record["aws"] == {"aws_secret_key": "<redacted>", "region": "us-east-1"}
    assert record["database_url"] == (
        "postgresql://clinic_user:<redacted>@db.clinic.local:5432/clinic_db"
    )
    assert record["targets"] == [{"url": "postgres://admin:<redacted>@replica/clinic_db"}]
    assert "host=db" in record["detail"] and "sslmode=require" in record["detail"]
    # Who and which key stay readable.
    assert record["login_user"] == "clinic_user"
    assert record["kms_key_id"] == "arn:aws:kms:us-east-1:111122223333:key/1234abcd"
    assert record["passphrase_file"] == "/root/.backup-passphrase"
    assert verify_chain(str(path)) == (True, None)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"password": "x"}, {"password": "<redacted>"}),
        ({"Passphrase": "x"}, {"Passphrase": "<redacted>"}),
        ({"api_token": "x", "token": "y"}, {"api_token": "<redacted>", "token": "<redacted>"}),
        ({"access_key": "AKIA", "key": "k"}, {"access_key": "<redacted>", "key": "<redacted>"}),
        ({"AccessKeyId": "AKIA"}, {"AccessKeyId": "<redacted>"}),
        ({"client_secret": 12}, {"client_secret": "<redacted>"}),
        ({"password": None, "token": ""}, {"password": None, "token": ""}),
        ({"kms_key_id": "alias/backups"}, {"kms_key_id": "alias/backups"}),
        ({"monkey": "business", "keyword": "k"}, {"monkey": "business", "keyword": "k"}),
        ({"blob": b"\x00secret"}, {"blob": "<7 bytes>"}),
        ({"sizes": (1, 2)}, {"sizes": [1, 2]}),
        (
            {"url": "https://user@example.org/x", "n": 3, "ok": True},
            {"url": "https://user@example.org/x", "n": 3, "ok": True},
        ),
        (
            {"url": "postgresql://u:pa/ss@db/clinic_db", "dsn": "postgres://u:p@s:s@db:5432/x"},
            {
                "url": "postgresql://u:<redacted>@db/clinic_db",
                "dsn": "postgres://u:<redacted>@db:5432/x",
            },
        ),
        (
            {"detail": "s3://bucket/key?X-Amz-Security-Token=abc&x=1"},
            {"detail": "s3://bucket/key?X-Amz-Security-Token=<redacted>&x=1"},
        ),
        (
            {"detail": "{'login_password': 'abc', 'db': 'x'}"},
            {"detail": "{'login_password': <redacted>, 'db': 'x'}"},
        ),
    ],
)
def test_redact(fields, expected):
    assert redact(fields) == expected


@pytest.mark.parametrize(
    "text",
    [
        "x" * 200_000,
        "password" * 25_000,
        "a." * 100_000,
        "://" + "u" * 200_000,
        "://user:" + "p" * 200_000,
        "token" + "_" * 200_000,
        "://x:" * 50_000,
        "://x:/" * 50_000,
        "password=" * 25_000,
    ],
    ids=[
        "word",
        "keywords",
        "dotted",
        "scheme",
        "authority",
        "keyword-word",
        "urls",
        "slashes",
        "assigned",
    ],
)
def test_redaction_is_linear_on_long_text(text):
    """Error messages can be long: redaction must not backtrack its way into minutes."""
    import time

    start = time.monotonic()
    audit.redact_text(text)
    assert time.monotonic() - start < 1.0


def test_intact_and_empty_logs_verify(tmp_path):
    path = tmp_path / "audit.log"
    path.write_bytes(b"")
    path.chmod(0o600)
    assert verify_chain(str(path)) == (True, None)
    write_log(path, 4)
    assert verify_chain(str(path)) == (True, None)


def test_missing_log_cannot_be_verified(tmp_path):
    with pytest.raises(ConfigError, match="cannot open audit log"):
        verify_chain(str(tmp_path / "absent.log"))


def test_edited_middle_line_is_named(tmp_path):
    path = tmp_path / "audit.log"
    raw = write_log(path, 5)
    raw[2] = raw[2].replace(b'"outcome":"ok"', b'"outcome":"failed"')
    rewrite(path, raw)
    assert verify_chain(str(path)) == (False, 3)


def test_deleted_middle_line_is_named(tmp_path):
    path = tmp_path / "audit.log"
    raw = write_log(path, 5)
    del raw[2]
    rewrite(path, raw)
    # Line 3 is now the one that followed the deleted line: its prev no longer matches.
    assert verify_chain(str(path)) == (False, 3)


def test_edit_with_recomputed_own_hash_breaks_the_next_line(tmp_path):
    path = tmp_path / "audit.log"
    raw = write_log(path, 5)
    record = json.loads(raw[1])
    record.pop("hash")
    record["set_id"] = "20261122T010000Z-clinic_db-ffffff"
    record["hash"] = hashlib.sha256(audit._canonical(record).encode()).hexdigest()
    raw[1] = audit._canonical(record).encode()
    rewrite(path, raw)
    assert verify_chain(str(path)) == (False, 3)


@pytest.mark.parametrize(
    ("change", "bad"),
    [
        (lambda raw: raw[:2] + [b"not json"] + raw[2:], 3),
        (lambda raw: raw[:1] + [b""] + raw[1:], 2),
        (lambda raw: [raw[1], raw[0]] + raw[2:], 1),
        (lambda raw: raw[:-1] + [raw[-1].replace(b'"number":3', b'"number":9')], 4),
    ],
    ids=["garbage-line", "blank-line", "swapped", "edited-last"],
)
def test_other_tampering_is_named(tmp_path, change, bad):
    path = tmp_path / "audit.log"
    rewrite(path, change(write_log(path, 4)))
    assert verify_chain(str(path)) == (False, bad)


def test_torn_last_line_is_closed_and_reported_not_merged(tmp_path):
    path = tmp_path / "audit.log"
    raw = write_log(path, 2)
    with open(path, "ab") as handle:
        handle.write(b'{"action":"backup","outc')  # a crash mid-write
    AuditLog(str(path)).record("backup", "ok", number=99)
    after = lines(path)
    assert len(after) == 4 and after[:2] == raw
    assert after[2] == b'{"action":"backup","outc'
    assert json.loads(after[3])["number"] == 99
    assert json.loads(after[3])["prev"] == hashlib.sha256(after[2]).hexdigest()
    assert verify_chain(str(path)) == (False, 3)


def test_lock_held_too_long_is_an_error(tmp_path):
    path = tmp_path / "audit.log"
    write_log(path, 1)
    with open(path, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="stayed locked"):
            AuditLog(str(path), lock_timeout=0.2).record("backup", "ok")
    assert len(lines(path)) == 1


WORKERS = 6
PER_WORKER = 40
BIG = "x" * 9000  # well past PIPE_BUF (4096): only the flock keeps such lines whole


def _append_many(path, worker, start):
    start.wait()
    log = AuditLog(path)
    for number in range(PER_WORKER):
        detail = BIG if number % 10 == 0 else "run %d" % number
        log.record("transfer", "ok", worker=worker, number=number, detail=detail)


def _check_concurrent_log(path, expected_workers, per_worker):
    raw = lines(path)
    assert len(raw) == len(expected_workers) * per_worker
    parsed = [json.loads(line) for line in raw]  # no interleaved, torn lines
    seen = {}
    for record in parsed:
        seen.setdefault(record["worker"], []).append(record["number"])
    # Nothing lost, nothing doubled, and each writer's records in its own order.
    assert seen == {worker: list(range(per_worker)) for worker in expected_workers}
    assert verify_chain(str(path)) == (True, None)


def test_concurrent_processes_neither_interleave_nor_lose_lines(tmp_path):
    path = tmp_path / "audit.log"
    context = multiprocessing.get_context("fork")
    start = context.Event()
    procs = [
        context.Process(target=_append_many, args=(str(path), worker, start))
        for worker in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0] * WORKERS
    _check_concurrent_log(path, range(WORKERS), PER_WORKER)


def test_concurrent_threads_neither_interleave_nor_lose_lines(tmp_path):
    path = tmp_path / "audit.log"
    start = threading.Event()
    errors = []

    def run(worker):
        try:
            _append_many(str(path), worker, start)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    start.set()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    _check_concurrent_log(path, range(4), PER_WORKER)
