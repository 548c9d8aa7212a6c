"""A restore carries over the database's own privileges, settings, comment and owner.

pg_dump stores them as TOC entries that pg_restore emits only with --create; the
engine restores without it (into a work database renamed afterwards), so it applies
them itself. A source database of its own (never the shared clinic_db), with a name
that needs quoting, is backed up with the engine and restored under another name.
"""

from __future__ import annotations

import secrets

import pytest
from testbed.pg import quote_ident, quote_literal

from ansible_collections.clinic.backup.plugins.module_utils.backup import BackupOptions, run_backup
from ansible_collections.clinic.backup.plugins.module_utils.pgsource import PgConnection
from ansible_collections.clinic.backup.plugins.module_utils.repository import LocalRepository
from ansible_collections.clinic.backup.plugins.module_utils.restore import (
    RestoreOptions,
    run_restore,
)

pytestmark = pytest.mark.integration


def connection(pg, dbname):
    return PgConnection(host=pg.host, port=str(pg.port), user=pg.superuser, dbname=dbname)


def properties(pg, name):
    """(datacl, settings of the database and of roles in it, comment, owner)."""
    literal = quote_literal(name)
    # datacl as a sorted list of grantee:privilege:grantor (the order of aclitems in
    # the array is not significant).
    acl = pg.psql(
        "SELECT string_agg(item, ',' ORDER BY item) FROM ("
        "SELECT CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END"
        " || ':' || a.privilege_type || ':' || pg_get_userbyid(a.grantor) AS item "
        "FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = %s) acl" % literal
    )
    settings = pg.psql(
        "SELECT coalesce(r.rolname, '-') || ':' || array_to_string(s.setconfig, ',') "
        "FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
        "LEFT JOIN pg_roles r ON r.oid = s.setrole WHERE d.datname = %s ORDER BY 1" % literal
    )
    comment = pg.psql(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s" % literal
    )
    owner = pg.psql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s" % literal)
    return acl, settings, comment, owner


@pytest.fixture(scope="module")
def source(pg, tmp_path_factory):
    """A database whose name needs quoting, with its own ACL, settings and comment,
    and a role granted CONNECT on it."""
    tag = secrets.token_hex(3)
    name, role, owner = "Clinic-Db %s" % tag, "Clinic App %s" % tag, "dbowner_%s" % tag
    db, r = quote_ident(name), quote_ident(role)
    pg.psql("CREATE ROLE %s NOLOGIN; CREATE ROLE %s NOLOGIN" % (r, quote_ident(owner)))
    pg.create_database(name, owner=owner)
    pg.psql(
        "REVOKE CONNECT ON DATABASE {db} FROM PUBLIC;"
        "GRANT CONNECT ON DATABASE {db} TO {r};"
        "ALTER DATABASE {db} SET work_mem = '7MB';"
        # The name as a string literal inside a value: must stay as it is.
        "ALTER DATABASE {db} SET search_path = public, {db};"
        "ALTER ROLE {r} IN DATABASE {db} SET statement_timeout = '5s';"
        "COMMENT ON DATABASE {db} IS {c};".format(
            db=db, r=r, c=quote_literal("PHI of DATABASE %s; keep" % db)
        )
    )
    pg.psql("CREATE TABLE visits AS SELECT g AS id FROM generate_series(1, 50) g", dbname=name)
    passphrase = tmp_path_factory.mktemp("dbprops") / "passphrase"
    passphrase.write_text("correct horse battery staple dbprops\n")
    passphrase.chmod(0o600)
    created = []
    yield {
        "name": name,
        "role": role,
        "owner": owner,
        "passphrase": str(passphrase),
        "repo_base": tmp_path_factory.mktemp("dbprops-repos"),
        "created": created,
    }
    for database in created + [name]:
        pg.drop_database(database)
    pg.psql("DROP ROLE IF EXISTS %s; DROP ROLE IF EXISTS %s" % (r, quote_ident(owner)))


def backup_and_restore(pg, source, fmt, mode="create"):
    repo = LocalRepository(str(source["repo_base"] / fmt), must_exist=False)
    run_backup(
        connection(pg, source["name"]),
        [repo],
        BackupOptions(format=fmt, passphrase_file=source["passphrase"]),
    )
    target = "restored %s_%s" % (fmt, secrets.token_hex(3))
    if mode != "rehearse":
        source["created"].append(target)
    options = RestoreOptions(
        mode=mode,
        database=source["name"],
        target_database=target,
        passphrase_file=source["passphrase"],
    )
    result = run_restore(repo, connection(pg, "postgres"), options)
    return target, result


@pytest.mark.parametrize("fmt", ["custom", "directory"])
def test_restore_carries_acl_settings_comment_and_owner(pg, source, fmt):
    target, result = backup_and_restore(pg, source, fmt)
    acl, settings, comment, owner = properties(pg, source["name"])
    assert "PUBLIC:CONNECT" not in acl and "PUBLIC:TEMPORARY" in acl
    assert properties(pg, target) == (acl, settings, comment, owner)
    assert "%s:CONNECT:%s" % (source["role"], source["owner"]) in acl.split(",")
    # The name inside the search_path value and the comment was not renamed.
    assert quote_ident(source["name"]) in settings and source["name"] in comment
    assert owner == source["owner"]
    assert result["database_properties"]["applied"] is True
    assert not [w for w in result["warnings"] if "database priv" in w]


def test_rehearsal_applies_them_and_a_missing_role_is_a_warning(pg, source):
    # Backed up while the role exists; the role is gone when the restore runs (a
    # server where it was never created): the GRANT is reported, the rest applied.
    repo = LocalRepository(str(source["repo_base"] / "missing-role"), must_exist=False)
    gone = "gone %s" % secrets.token_hex(3)
    db = quote_ident(source["name"])
    pg.psql(
        "CREATE ROLE %s NOLOGIN; GRANT CONNECT ON DATABASE %s TO %s"
        % (quote_ident(gone), db, quote_ident(gone))
    )
    try:
        run_backup(
            connection(pg, source["name"]),
            [repo],
            BackupOptions(passphrase_file=source["passphrase"]),
        )
    finally:
        pg.psql(
            "REVOKE ALL ON DATABASE %s FROM %s; DROP ROLE %s"
            % (db, quote_ident(gone), quote_ident(gone))
        )
    options = RestoreOptions(
        mode="rehearse",
        database=source["name"],
        target_database="rehearse_%s" % secrets.token_hex(3),
        passphrase_file=source["passphrase"],
    )
    result = run_restore(repo, connection(pg, "postgres"), options)
    report = result["database_properties"]
    assert report["applied"] is True and report["statements"] >= 6
    missing = [w for w in result["warnings"] if gone in w]
    assert len(missing) == 1 and "42704" in missing[0], result["warnings"]
    assert [e for e in report["errors"] if gone in e] == report["errors"]


def test_a_plain_set_says_it_holds_none(pg, source):
    # pg_dump -Fp without --create writes no database-level statement: said, not hidden.
    target, result = backup_and_restore(pg, source, "plain")
    assert result["database_properties"]["applied"] is False
    assert [w for w in result["warnings"] if "plain-format set holds no database-level" in w]
    assert properties(pg, target)[0] == ""  # datacl NULL: the defaults, PUBLIC may connect
