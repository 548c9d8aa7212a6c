"""clinic.backup.role_passwords: SCRAM verifiers computed on the host, the password never
sent, idempotent on a second run (the ansible.posix four-run pattern)."""

from __future__ import annotations

import secrets
from pathlib import Path

import psycopg2
import pytest
from testbed.pg import PostgresCluster

from ansible_collections.clinic.backup.plugins.module_utils.role_passwords import (
    scram_verifier,
    verifier_matches,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def logged_server():
    """A cluster that logs every statement: what reaches the server is on record."""
    cluster = PostgresCluster(settings={"log_statement": "all"})
    try:
        cluster.start()
        cluster.create_role("app_one", secrets.token_urlsafe(16))
        cluster.create_role("app two", secrets.token_urlsafe(16))
        yield cluster
    finally:
        cluster.destroy()


def task(cluster, roles, name="passwords", **extra):
    args = {"login_host": cluster.host, "login_port": cluster.port, "login_user": cluster.superuser}
    args.update(extra, roles=roles)
    return {"name": name, "clinic.backup.role_passwords": args}


def can_log_in(cluster, user, password) -> bool:
    try:
        psycopg2.connect(
            host=cluster.host, port=cluster.port, user=user, password=password, dbname="postgres"
        ).close()
    except psycopg2.OperationalError:
        return False
    return True


def test_verifier_is_what_postgres_computes(logged_server):
    """Our SCRAM verifier accepts the password PostgreSQL itself hashed, and only it."""
    password = secrets.token_urlsafe(18)
    logged_server.psql(
        "SET password_encryption = 'scram-sha-256'; ALTER ROLE app_one PASSWORD '%s'" % password
    )
    stored = logged_server.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app_one'")
    assert stored.startswith("SCRAM-SHA-256$4096:")
    assert verifier_matches(password, stored)
    assert not verifier_matches(password + "x", stored)
    assert verifier_matches(password, scram_verifier(password))
    assert not verifier_matches(password, "md5" + "0" * 32)


def test_check_run_check_run_then_log_in_and_nothing_in_the_log(ansible, logged_server):
    roles = [
        {"name": "app_one", "password": "One-" + secrets.token_urlsafe(18)},
        {"name": "app two", "password": "Tw'o\\\"-" + secrets.token_urlsafe(18)},
    ]
    changed = []
    for check in (True, False, True, False):
        result = ansible.play([task(logged_server, roles)], check=check).assert_ok()
        changed.append(result.result("passwords")["changed"])
    assert changed == [True, True, False, False]
    for role in roles:
        assert can_log_in(logged_server, role["name"], role["password"])
    log = Path(logged_server.log_file).read_text()
    assert "SCRAM-SHA-256$4096:" in log  # the ALTER ROLE statements were logged...
    for role in roles:
        assert role["password"] not in log  # ...with the verifier only


def test_a_missing_role_fails_before_any_change(ansible, logged_server):
    before = logged_server.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app_one'")
    roles = [
        {"name": "app_one", "password": secrets.token_urlsafe(18)},
        {"name": "ghost", "password": secrets.token_urlsafe(18)},
    ]
    result = ansible.play([task(logged_server, roles)]).result("passwords")
    assert result["_status"] == "failed"
    assert "ghost" in result["msg"] and "do not exist" in result["msg"]
    after = logged_server.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app_one'")
    assert after == before


@pytest.mark.parametrize(
    "roles, words",
    [
        ([{"name": "app_one", "password": "Zq9x"}], ["shorter than 12"]),
        ([{"name": "app_one", "password": "pässwörd-lang-genug"}], ["non-ASCII"]),
        (
            [{"name": "app_one", "password": "a" * 16}, {"name": "app_one", "password": "b" * 16}],
            ["listed twice"],
        ),
    ],
    ids=["short", "non-ascii", "twice"],
)
def test_weak_or_ambiguous_input_is_refused(ansible, logged_server, roles, words):
    result = ansible.play([task(logged_server, roles)]).result("passwords")
    assert result["_status"] == "failed"
    assert all(w in result["msg"] for w in words), result["msg"]
    for role in roles:
        assert role["password"] not in result["msg"]
