"""Pure parts of the table restore: table names as the manifest keys them, the choice of
tables before anything is built, pg_dump's \\restrict lines, backup_info's list_tables."""

from __future__ import annotations

import pytest

from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError
from ansible_collections.clinic.backup.plugins.module_utils.pgsource import qualified_name
from ansible_collections.clinic.backup.plugins.module_utils.table_restore import (
    TableRestoreOptions,
    list_set_tables,
    resolve_tables,
    set_tables,
    split_name,
    strip_restrict,
)

COUNTS = {
    "public.appointments": 4000,
    "public.patients": 1000,
    'public."Patient Notes; DROP TABLE x"': 25,
    'public."it\'s"': 7,
    "audit.patients": 3,
    '"odd.schema"."a""b"': 1,
}
MANIFEST = {"id": "20261122T010000Z-clinic_db-1a2b3c", "row_counts": COUNTS}


@pytest.mark.parametrize(
    "schema, table", [("public", "x"), ("odd.schema", 'a"b'), ("public", "Patient Notes; -- x")]
)
def test_split_name_reads_back_what_qualified_name_writes(schema, table):
    assert split_name(qualified_name(schema, table)) == (schema, table)


@pytest.mark.parametrize("text", ['"unterminated', "a..b", "a.b.c", 'a"b.c', "", "."])
def test_split_name_refuses_what_is_not_a_name(text):
    assert split_name(text) is None


def test_list_set_tables_is_sorted_with_schema_and_name():
    tables = list_set_tables(MANIFEST)
    assert [t["table"] for t in tables] == sorted(COUNTS)
    notes = [t for t in tables if t["rows"] == 25][0]
    assert (notes["schema"], notes["name"]) == ("public", "Patient Notes; DROP TABLE x")


def test_resolve_tables_by_key_qualified_or_bare_name_each_once():
    chosen = resolve_tables(
        MANIFEST,
        [
            "appointments",
            "public.appointments",
            "public.Patient Notes; DROP TABLE x",
            'public."it\'s"',
            '"odd.schema"."a""b"',
        ],
    )
    assert chosen == [
        ("public.appointments", "public", "appointments"),
        ('public."Patient Notes; DROP TABLE x"', "public", "Patient Notes; DROP TABLE x"),
        ('public."it\'s"', "public", "it's"),
        ('"odd.schema"."a""b"', "odd.schema", 'a"b'),
    ]


@pytest.mark.parametrize(
    "wanted, words",
    [
        (["public.nope"], "has no table 'public.nope'"),
        (["Public.Appointments"], "its tables: "),  # no case folding
        (["patients"], "in several schemas"),
        ([], "no tables given"),
        (["bad\nname"], "printable"),
    ],
)
def test_resolve_tables_refuses_clearly(wanted, words):
    with pytest.raises(ConfigError, match=words):
        resolve_tables(MANIFEST, wanted)


def test_a_set_without_row_counts_is_refused():
    with pytest.raises(ConfigError, match="records no row counts"):
        resolve_tables({"id": "x", "row_counts": None}, ["public.a"])


def test_strip_restrict_removes_only_pg_dumps_own_lines():
    script = (
        "\\restrict abc123\nSET x = 1;\nCOMMENT ON TABLE t IS '\n\\restrict other\n';\n"
        "\\unrestrict abc123\n"
    )
    assert strip_restrict(script) == "SET x = 1;\nCOMMENT ON TABLE t IS '\n\\restrict other\n';\n"
    assert strip_restrict("SET x = 1;\n") == "SET x = 1;\n"


def test_set_tables_names_a_missing_or_corrupt_set():
    entries = [
        {"id": "a", "state": "corrupt", "repository": "/r", "error": "bad"},
        {
            "id": "b",
            "state": "complete",
            "repository": "/r",
            "database": "clinic_db",
            "authentication": "ok",
            "manifest": MANIFEST,
        },
    ]
    listed = set_tables(entries, "b")
    assert listed["rows"] == sum(COUNTS.values()) and len(listed["tables"]) == len(COUNTS)
    with pytest.raises(ConfigError, match="corrupt: bad"):
        set_tables(entries, "a")
    with pytest.raises(ConfigError, match="no set c"):
        set_tables(entries, "c")


@pytest.mark.parametrize(
    "args, words",
    [
        ({"tables": ["public.a"]}, "needs target_database"),
        ({"target_database": "db", "tables": []}, "needs the tables"),
        ({"target_database": "db", "tables": ["a"], "table_mode": "merge"}, "unknown table_mode"),
        ({"target_database": "db", "tables": ["a"], "keep_previous": False}, "does not apply"),
    ],
)
def test_options_refuse_bad_input(args, words):
    with pytest.raises(ConfigError, match=words):
        TableRestoreOptions(**args)


def test_options_choose_like_a_full_restore():
    options = TableRestoreOptions(
        target_database="clinic_db", tables=["public.a"], allow_unauthenticated=True
    )
    assert options.mode == "tables" and options.table_mode == "append"
    assert options.allow_unauthenticated is True and options.include_globals is False
    assert options.check_row_counts is True and options.fallback is True
