"""Renaming the database in its own privilege/property statements (dbproperties)."""

from __future__ import annotations

from ansible_collections.clinic.backup.plugins.module_utils import dbproperties

SCRIPT = r'''--
-- Name: Src-DB; Type: DATABASE; Schema: -; Owner: postgres
--

CREATE DATABASE "Src-DB" WITH TEMPLATE = template0 ENCODING = 'UTF8';


ALTER DATABASE "Src-DB" OWNER TO "Owner ""x""";

\unrestrict AbC
\connect -reuse-previous=on "dbname='Src-DB'"
\restrict AbC

--
-- Name: DATABASE "Src-DB"; Type: COMMENT; Schema: -; Owner: postgres
--

COMMENT ON DATABASE "Src-DB" IS 'about DATABASE "Src-DB";
-- not a comment';

--
-- Name: Src-DB; Type: DATABASE PROPERTIES; Schema: -; Owner: postgres
--

ALTER DATABASE "Src-DB" SET search_path TO 'public', 'Src-DB';
ALTER ROLE app IN DATABASE "Src-DB" SET work_mem TO '9MB';

--
-- Name: DATABASE "Src-DB"; Type: ACL; Schema: -; Owner: postgres
--

REVOKE CONNECT,TEMPORARY ON DATABASE "Src-DB" FROM PUBLIC;
GRANT CONNECT ON DATABASE "Src-DB" TO "Clinic App";
'''


def test_every_database_identifier_is_renamed_and_nothing_else():
    text = dbproperties.kept_sections(SCRIPT, with_owner=True)
    statements, problems = dbproperties.rewrite(text, "Src-DB", 'new "db"')
    assert problems == []
    new = '"new ""db"""'
    assert statements == [
        'ALTER DATABASE %s OWNER TO "Owner ""x""";' % new,
        "COMMENT ON DATABASE %s IS 'about DATABASE \"Src-DB\";\n-- not a comment';" % new,
        "ALTER DATABASE %s SET search_path TO 'public', 'Src-DB';" % new,
        "ALTER ROLE app IN DATABASE %s SET work_mem TO '9MB';" % new,
        "REVOKE CONNECT,TEMPORARY ON DATABASE %s FROM PUBLIC;" % new,
        'GRANT CONNECT ON DATABASE %s TO "Clinic App";' % new,
    ]


def test_owner_left_out_when_the_restore_sets_its_own():
    text = dbproperties.kept_sections(SCRIPT, with_owner=False)
    statements, _problems = dbproperties.rewrite(text, "Src-DB", "t")
    assert not [s for s in statements if "OWNER" in s]
    assert len(statements) == 5


def test_unquoted_name_folds_to_lower_case_and_another_database_is_refused():
    statements, problems = dbproperties.rewrite(
        "GRANT CONNECT ON DATABASE clinic_db TO app; GRANT CONNECT ON DATABASE Clinic_DB TO b;"
        ' GRANT CONNECT ON DATABASE "Clinic_DB" TO c; GRANT CONNECT ON DATABASE other TO d;',
        "clinic_db",
        "target",
    )
    assert statements == [
        'GRANT CONNECT ON DATABASE "target" TO app;',
        'GRANT CONNECT ON DATABASE "target" TO b;',
    ]
    assert len(problems) == 2 and '"Clinic_DB"' in problems[0] and "other" in problems[1]


def test_a_backslash_outside_a_literal_is_not_sql():
    text = "GRANT CONNECT ON DATABASE d TO a;\n\\! touch /tmp/x\n"
    try:
        dbproperties.rewrite(text, "d", "t")
    except ValueError as exc:
        assert "\\\\" in str(exc) or "unexpected" in str(exc)
    else:
        raise AssertionError("a meta-command passed as SQL")


def test_only_statements_about_the_database_itself_are_kept():
    statements, problems = dbproperties.rewrite(
        "ALTER ROLE app IN DATABASE d SET work_mem TO '1MB';"
        " ALTER ROLE app SUPERUSER; GRANT pg_read_server_files TO app;"
        " DROP DATABASE d; ALTER DATABASE d RENAME TO x;"
        " SELECT 1 FROM pg_database WHERE datname = 'd';",
        "d",
        "t",
    )
    assert statements == ["ALTER ROLE app IN DATABASE \"t\" SET work_mem TO '1MB';"]
    assert len(problems) == 5
