"""The psql meta-command guard and SQLSTATE-based error parsing."""

from __future__ import annotations

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import sqlguard

DUMP = (
    b"--\n-- PostgreSQL database dump\n--\n\n"
    b"\\restrict AbC123\n\n"
    b"SET statement_timeout = 0;\n"
    b"COPY public.notes (id, body) FROM stdin;\n"
    b"1\t\\N\n"
    b"2\t\\\\! not a command, data\n"
    b"\\.\n\n"
    b"\\unrestrict AbC123\n"
    b"--\n-- PostgreSQL database dump complete\n--\n"
)


def run(guard, data, sizes=(7,)):
    out, pos, i = [], 0, 0
    while pos < len(data):
        step = sizes[i % len(sizes)]
        out.append(guard(data[pos : pos + step]))
        pos += step
        i += 1
    out.append(guard.flush())
    return b"".join(out)


@pytest.mark.parametrize("sizes", [(1,), (7,), (3, 50), (100000,)])
def test_a_pg_dump_script_passes_restricted_under_our_own_key(sizes):
    guard = sqlguard.MetaCommandGuard()
    out = run(guard, DUMP, sizes)
    lines = out.split(b"\n")
    assert lines[0] == b"\\restrict " + guard.key.encode()
    assert b"AbC123" not in out  # pg_dump's own (un)restrict lines are gone
    assert b"COPY public.notes" in out and b"1\t\\N" in out and b"\\." in out
    assert guard.found is None


@pytest.mark.parametrize(
    "script",
    [
        b"\\! id > /tmp/x\nSELECT 1;\n",
        b"SELECT 1;\n   \\o /tmp/out\n",
        b"COPY t FROM stdin;\n1\n\\.\n\\! id\n",
        b"\\unrestrict AbC123\n\\! id\n",
        b"SELECT 1; \\! id\n",
        b"SELECT 'a''b' AS x; \\! id\n",
        b"SELECT $$ not \\! here $$; \\o /tmp/x\n",
        b"/* a \\! b */ SELECT 1 \\g\n",
        b"SELECT E'it\\'s' \\! id\n",
    ],
)
def test_a_meta_command_outside_copy_data_is_named(script):
    guard = sqlguard.MetaCommandGuard()
    run(guard, script)
    assert guard.found and "line" in guard.found


@pytest.mark.parametrize(
    "script",
    [
        b"SELECT 'C:\\temp\\x' AS path;\n",
        b"SELECT E'tab\\there', 'it''s \\ fine';\n",
        b'SELECT 1 AS "odd\\name";\n',
        b"CREATE FUNCTION f() RETURNS text AS $body$\nSELECT '\\';\n"
        b"\\ still body\n$body$ LANGUAGE sql;\n",
        b"/* outer /* nested \\ */ still \\ comment */ SELECT 1;\n",
        b"-- a comment \\! not a command\nSELECT 1;\n",
        b"SELECT a$b$c FROM t;\n",
    ],
)
def test_backslashes_inside_sql_text_are_not_meta_commands(script):
    guard = sqlguard.MetaCommandGuard()
    run(guard, script)
    assert guard.found is None


def test_the_key_is_fresh_for_every_script():
    assert sqlguard.MetaCommandGuard().key != sqlguard.MetaCommandGuard().key


def test_an_empty_script_still_starts_restricted():
    guard = sqlguard.MetaCommandGuard()
    assert guard.flush().startswith(b"\\restrict ")


def test_server_errors_are_told_apart_by_sqlstate_in_any_language():
    stderr = "\n".join(
        [
            'psql:<stdin>:12: ERROR:  42710: role "clinic_user" already exists',
            "LOCATION:  CreateRole, user.c:320",
            "psql:<stdin>:14: FEHLER:  42704: Tablespace »archive« existiert nicht",
            "psql:<stdin>:15: NOTICE:  00000: nothing to do",
            "psql:<stdin>:16: WARNUNG:  01000: no privileges were granted",
            "psql:<stdin>:17: error: backslash commands are restricted",
        ]
    )
    errors = sqlguard.server_errors(stderr)
    assert errors == [
        ("42710", 'role "clinic_user" already exists'),
        ("42704", "Tablespace »archive« existiert nicht"),
    ]


@pytest.mark.parametrize(
    ("version", "ok"),
    [((15, 18), True), ((15, 13), False), ((16, 10), True), ((17, 5), False), ((18, 0), True)],
)
def test_psql_without_restrict_is_refused(monkeypatch, version, ok):
    monkeypatch.setattr(sqlguard, "psql_version", lambda psql: version)
    if ok:
        sqlguard.check_psql_restricts("psql")
    else:
        with pytest.raises(sqlguard.ConfigError, match="restricted mode"):
            sqlguard.check_psql_restricts("psql")
