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


# ----------------------------------- issue #10: URLs parsed with libpq's rules
PASSWORD = "2024/Winter!Clinic"
FRAGMENTS = [PASSWORD, "2024", "Winter!Clinic", "Winter", "Clinic"]


def assert_no_password(error):
    """Neither the message, the hint nor the exception chain holds any piece of it."""
    texts = [str(error), error.message, error.hint or ""]
    cause = error.__cause__ or error.__context__
    while cause is not None:
        texts.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    assert error.__suppress_context__ or error.__context__ is None
    for text in texts:
        for fragment in FRAGMENTS:
            assert fragment not in text, (fragment, text)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://clinic_user:2024/Winter!Clinic@host/db",
        "postgresql://clinic_user:2024/Winter!Clinic@host:5432/db?sslmode=require",
        "postgres://clinic_user:2024/Winter!Clinic@host",
        "postgresql://clinic_user:2024?Winter!Clinic@host/db",
        "postgresql://clinic_user:2024#Winter!Clinic@host/db",
        "postgresql://clinic_user:2024@Winter!Clinic@host/db",
        "postgresql://clinic_user:2024/Winter!Clinic/x@host/db",
        "postgresql://clinic_user:2024:Winter!Clinic@host:x2024/db",
        "postgresql://clinic_user:2024%Winter!Clinic@host/db",
        "postgresql://clinic_user:2024%2FWinter!Clinic%00@host/db",
        "postgresql://clinic_user:2024%2FWinter!Clinic%FF@host/db",
        "postgresql://clinic_user:2024/Winter!Clinic@host/db\n",
        "postgresql://clinic_user:2024%2FWinter!Clinic@host/db?Winter=2024",
        "postgresql://clinic_user:2024%2FWinter!Clinic@host/db?sslmode",
        "postgresql://clinic_user:2024%2FWinter!Clinic@[::1/db",
        "postgresq://clinic_user:2024/Winter!Clinic@host/db",
        "clinic_user:2024/Winter!Clinic@host/db",
    ],
)
def test_no_error_quotes_any_piece_of_the_password(url):
    with pytest.raises(ConfigError) as info:
        PgConnection(url=url)
    assert_no_password(info.value)


def test_an_unencoded_slash_in_the_password_is_refused_and_says_how_to_encode():
    """urlsplit took '2024' for the port, 'Winter!Clinic@host/db' for the path... and
    printed them; libpq would have connected to host 'clinic_user', port 2024."""
    with pytest.raises(ConfigError) as info:
        parse_url("postgresql://clinic_user:2024/Winter!Clinic@host/db")
    assert "ambiguous" in info.value.message
    assert "must be percent-encoded (%2F, %3F, %23, %40, %25)" in info.value.hint
    assert_no_password(info.value)


def test_the_percent_encoded_password_is_decoded_as_libpq_does():
    params = parse_url("postgresql://clinic_user:2024%2FWinter!Clinic%40x%3F%23@host:5432/db")
    assert params["password"] == "2024/Winter!Clinic@x?#"
    assert (params["user"], params["host"], params["port"]) == ("clinic_user", "host", "5432")
    assert params["dbname"] == "db"


@pytest.mark.parametrize(
    "url,expected",
    [
        ("postgresql://u:a:b@h/db", {"user": "u", "password": "a:b", "host": "h", "dbname": "db"}),
        ("postgresql://u@h", {"user": "u", "host": "h"}),
        ("postgresql:///db", {"dbname": "db"}),
        (
            "postgresql://%2Fvar%2Frun%2Fpostgresql/db",
            {"host": "/var/run/postgresql", "dbname": "db"},
        ),
        ("postgresql://[::1]:5433/db", {"host": "::1", "port": "5433", "dbname": "db"}),
        ("postgresql://h1:5432,h2:5433/db", {"host": "h1,h2", "port": "5432,5433", "dbname": "db"}),
        (
            "postgresql://h/my%20db?application_name=a%26b",
            {"host": "h", "dbname": "my db", "application_name": "a&b"},
        ),
    ],
)
def test_libpq_url_forms(url, expected):
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    "url,match",
    [
        ("postgresql://u:p@h/db?password=x", "parameter 'password' is not supported"),
        ("postgresql://u:p@h/db?secretish=1", r"parameter \(an unknown name\) is not supported"),
        ("postgresql://u:p@h:0/db", "invalid port"),
        ("postgresql://u:p@h:65536/db", "invalid port"),
        ("postgresql://u:p%zz@h/db", "password holds a '%' that is not a %XX escape"),
        ("postgresql://u:p@h/d%00b", "database name holds %00"),
        ("postgresql://u:p@h/a@b", "ambiguous"),
        ("postgresql://u:p@h/db\t", "control character"),
        ("postgresql://h1:1,h2/db", "port for some hosts only"),
        ("mysql://x@y/z", r"postgresql:// or postgres:// \(got mysql://\)"),
    ],
)
def test_more_bad_urls_are_refused_clearly(url, match):
    with pytest.raises(ConfigError, match=match):
        parse_url(url)


# ---------------------------------------- issue #10: names PostgreSQL cannot hold
@pytest.mark.parametrize(
    "keywords,option",
    [
        ({"dbname": "d" * 10000}, "database"),
        ({"dbname": "d" * 64}, "database"),
        ({"dbname": "é" * 32}, "database"),  # 64 bytes in 32 characters
        ({"dbname": "db", "user": "u" * 64}, "login_user"),
        ({"url": "postgresql://h/" + "d" * 64}, "database"),
        ({"url": "postgresql://%s@h/db" % ("u" * 64)}, "login_user"),
    ],
)
def test_names_over_63_bytes_are_refused_before_connecting(keywords, option):
    """A 10 kB name ended in 'server terminated abnormally'; 64..9999 bytes were
    silently truncated by the server, possibly to another database's name."""
    with pytest.raises(ConfigError) as info:
        PgConnection(host="h", **keywords)
    assert "at most 63 bytes (NAMEDATALEN-1)" in info.value.message
    assert "set %s to the exact name" % option in info.value.hint
    assert len(str(info.value)) < 400


def test_a_63_byte_name_is_accepted():
    conn = PgConnection(host="h", dbname="d" * 63, user="é" * 31)
    assert conn.dbname == "d" * 63


def test_for_database_checks_the_length_too():
    with pytest.raises(ConfigError, match="NAMEDATALEN"):
        PgConnection(host="h", dbname="db").for_database("x" * 64)


def test_a_passfile_libpq_would_ignore_is_refused_naming_the_fix(tmp_path):
    from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError
    from ansible_collections.clinic.backup.plugins.module_utils.pgsource import PgConnection

    passfile = tmp_path / "pgpass"
    with pytest.raises(ConfigError, match="cannot use passfile .*No such file"):
        PgConnection(dbname="clinic_db", passfile=str(passfile))
    passfile.write_text("localhost:5432:*:clinic_user:secret\n")
    passfile.chmod(0o640)
    with pytest.raises(ConfigError, match="libpq ignores") as caught:
        PgConnection(dbname="clinic_db", passfile=str(passfile))
    assert "chmod 0600" in caught.value.hint
    assert "secret" not in str(caught.value)
    passfile.chmod(0o600)
    assert PgConnection(dbname="clinic_db", passfile=str(passfile)).params["passfile"]
