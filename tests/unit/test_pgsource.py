"""Connection settings: URLs are split so passwords reach children only through the environment."""

from __future__ import annotations

import pytest

from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError
from ansible_collections.clinic.backup.plugins.module_utils.pgsource import (
    PgConnection,
    parse_url,
    qualified_name,
    table_pattern,
)


def test_parse_url_splits_every_part():
    params = parse_url(
        "postgresql://clinic_user:p%40ss%3Bword@db.example:6543/clinic_db?sslmode=require"
    )
    assert params == {
        "host": "db.example",
        "port": "6543",
        "user": "clinic_user",
        "password": "p@ss;word",
        "dbname": "clinic_db",
        "sslmode": "require",
    }


@pytest.mark.parametrize(
    "url,match",
    [
        ("mysql://x@y/z", "must start with postgresql://"),
        ("postgresql://x@y:notaport/z", "invalid port"),
        ("postgresql://x@y/z?options=-c%20x", "not supported"),
    ],
)
def test_parse_url_rejects_bad_urls(url, match):
    with pytest.raises(ConfigError, match=match):
        parse_url(url)


def test_explicit_settings_override_url():
    conn = PgConnection(url="postgresql://a:pw@h1:1/db1", host="h2", dbname="db2")
    assert (
        conn.params["host"] == "h2"
        and conn.params["dbname"] == "db2"
        and conn.params["password"] == "pw"
    )


def test_child_env_carries_password_and_drops_stray_pg_settings():
    conn = PgConnection(url="postgresql://a:pw@h/db")
    env = conn.child_env({"PGPASSWORD": "stale", "PGSERVICE": "x", "PATH": "/bin"})
    assert env["PGPASSWORD"] == "pw" and env["PGHOST"] == "h" and env["PGDATABASE"] == "db"
    assert env["PATH"] == "/bin"


def test_describe_hides_password():
    assert "pw" not in PgConnection(url="postgresql://a:pw@h/db").describe()


def test_database_is_required():
    with pytest.raises(ConfigError, match="no database name"):
        PgConnection(host="h")


@pytest.mark.parametrize(
    "name,pattern",
    [
        ("patients", '"patients"'),
        ("public.patients", '"public"."patients"'),
        ("Patient Notes; DROP TABLE x", '"Patient Notes; DROP TABLE x"'),
        ('it"s', '"it""s"'),
        ("star*", '"star*"'),
    ],
)
def test_table_pattern_is_exact_and_quoted(name, pattern):
    assert table_pattern(name) == pattern


@pytest.mark.parametrize("name", ["", "bad\nname", "tab\tname", None, 5])
def test_table_pattern_rejects_bad_names(name):
    with pytest.raises(ConfigError):
        table_pattern(name)


def test_qualified_name_quotes_only_when_needed():
    assert qualified_name("public", "patients") == "public.patients"
    assert qualified_name("public", "It's") == 'public."It\'s"'
