# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restore chosen tables of a set into a live database (the runbook's "partial restore").

The live database is never written from the stream. The whole set is restored into a
work database exactly as a full restore does it (restore.DatabaseRestore.restore_work:
the same choice of set, authentication, sha256, and every table's row count checked
against the manifest), then, in ONE transaction on the live database:

* ``append``: the chosen tables' rows are copied from the work database into the
  existing live tables (COPY TO STDOUT on one connection piped into COPY FROM STDIN on
  the other). A row that breaks a unique key or a foreign key aborts the transaction:
  nothing changed.
* ``replace``: the live tables are dropped (RESTRICT, never CASCADE) and recreated from
  the work database's own definition (``pg_dump --section=pre-data``), filled, then their
  indexes, constraints and triggers (``--section=post-data``) are created. Anything else
  that depends on a table (views, other tables' foreign keys, functions using its row
  type) makes the run refuse before the work database is built, and is reported;
  foreign keys pointing at it are dropped and re-created (and so re-validated) in the
  same transaction only when the operator says ``recreate_foreign_keys``.

The sequences a table owns never move backwards (ids handed out are never handed out
again), and each live table's row count is checked inside the transaction before it
commits. PostgreSQL errors are told apart by SQLSTATE, never by their (translated) text,
and messages name constraints and tables, never row values (PHI).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re
import threading

from . import pipeline
from .catalog import load_manifest
from .errors import BackupError, ConfigError, SourceError
from .lifecycle import check_restorable
from .pgsource import qualified_name
from .restore import DatabaseRestore, RestoreOptions, drop_quietly, run_restore

TABLE_MODES = ("append", "replace")
# How long the live transaction waits for a table the application holds: a clear
# "in use" beats a task that hangs behind a long transaction.
LOCK_TIMEOUT = "60s"
SHOWN_TABLES = 20

# SQLSTATEs (never the message text, which the server translates).
UNIQUE_VIOLATION = "23505"
FOREIGN_KEY_VIOLATION = "23503"
INTEGRITY_CLASS = "23"
DEPENDENT_OBJECTS = "2BP01"
LOCK_NOT_AVAILABLE = "55P03"
INSUFFICIENT_PRIVILEGE = "42501"
UNDEFINED_COLUMN = "42703"
DATATYPE_MISMATCH = "42804"
DATA_EXCEPTION_CLASS = "22"

# pg_dump's own "\restrict KEY" line (psql >= 17.6 & co.): not SQL, removed with its
# matching "\unrestrict KEY" before the script is executed as SQL.
_RESTRICT_LINE = re.compile(r"^\\restrict ([A-Za-z0-9]+)\r?$", re.M)


# ---------------------------------------------------------------------- table names
def split_name(text):
    """The identifiers of ``schema.table`` or ``table`` (double-quoted parts unquoted,
    others taken literally, as pg_dump's ``tables`` option does), or None."""
    parts, i = [], 0
    while i <= len(text):
        if text.startswith('"', i):
            buf, j = [], i + 1
            while True:
                k = text.find('"', j)
                if k < 0:
                    return None
                buf.append(text[j:k])
                if text.startswith('""', k):
                    buf.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            parts.append("".join(buf))
        else:
            k = text.find(".", i)
            end = len(text) if k < 0 else k
            if end == i or '"' in text[i:end]:
                return None
            parts.append(text[i:end])
            i = end
        if i == len(text):
            return tuple(parts) if len(parts) in (1, 2) else None
        if text[i] != ".":
            return None
        i += 1
    return None


def list_set_tables(manifest):
    """The tables of a set and their rows in the backup's snapshot, sorted by name."""
    counts = manifest.get("row_counts") or {}
    tables = []
    for key in sorted(counts):
        parts = split_name(key)
        schema, name = parts if parts and len(parts) == 2 else (None, key)
        tables.append({"table": key, "schema": schema, "name": name, "rows": counts[key]})
    return tables


def set_tables(entries, set_id):
    """What backup_info's ``list_tables`` returns for ``set_id`` among catalog entries
    (the first copy listed: local before S3); ConfigError when it is not there or its
    manifest cannot be read."""
    for entry in entries:
        if entry.get("id") != set_id:
            continue
        if entry.get("state") != "complete":
            raise ConfigError(
                "set %s in %s is corrupt: %s"
                % (set_id, entry.get("repository"), entry.get("error")),
                "its tables cannot be listed; choose another set",
            )
        tables = list_set_tables(entry["manifest"])
        return {
            "set_id": set_id,
            "repository": entry["repository"],
            "database": entry["database"],
            "authentication": entry.get("authentication"),
            "tables": tables,
            "rows": sum(t["rows"] for t in tables),
        }
    raise ConfigError(
        "no set %s in the repositories read" % set_id,
        "backup_info without list_tables lists the sets",
    )


def resolve_tables(manifest, wanted):
    """[(manifest key, schema, table)] for the names asked for, in that order, each once.

    A name is the manifest's own key (``public."Patient Notes"``), ``schema.table``, or a
    bare table name found in exactly one schema. Anything else is refused before anything
    is built, listing what the set holds."""
    if not wanted:
        raise ConfigError("no tables given", "name at least one table, e.g. public.appointments")
    tables = list_set_tables(manifest)
    if not tables:
        raise ConfigError(
            "set %s records no row counts, so its tables cannot be checked" % manifest["id"],
            "restore from a set taken with row_counts: true (the default), or restore the "
            "whole database with mode: create",
        )
    by_key = {t["table"]: t for t in tables}
    chosen, seen = [], set()
    for text in wanted:
        found = _find_table(text, tables, by_key, manifest["id"])
        if found["table"] in seen:
            continue
        seen.add(found["table"])
        if found["schema"] is None:
            raise ConfigError(
                "set %s records table %r under a name that is not schema.table"
                % (manifest["id"], found["table"]),
                "the manifest was damaged or tampered with: use another set",
            )
        chosen.append((found["table"], found["schema"], found["name"]))
    return chosen


def check_table_name(text):
    if not isinstance(text, str) or not text or any(ord(ch) < 32 for ch in text):
        raise ConfigError("table names must be non-empty printable strings (got %r)" % (text,))


def _find_table(text, tables, by_key, set_id):
    check_table_name(text)
    if text in by_key:
        return by_key[text]
    parts = split_name(text) or ()
    if len(parts) == 2:
        matches = [t for t in tables if (t["schema"], t["name"]) == parts]
    elif len(parts) == 1:
        matches = [t for t in tables if t["name"] == parts[0]]
    else:
        matches = []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(
            "table %r is in several schemas of set %s: %s"
            % (text, set_id, ", ".join(t["table"] for t in matches)),
            "name it with its schema",
        )
    names = [t["table"] for t in tables]
    raise ConfigError(
        "set %s has no table %r; nothing was changed" % (set_id, text),
        "its tables: %s%s (backup_info with list_tables: true lists them with their row counts)"
        % (
            ", ".join(names[:SHOWN_TABLES]),
            " and %d more" % (len(names) - SHOWN_TABLES) if len(names) > SHOWN_TABLES else "",
        ),
    )


# ---------------------------------------------------------------------- options
class TableRestoreOptions(RestoreOptions):
    """A table restore: which tables, how, into which existing database."""

    def __init__(
        self,
        target_database=None,
        tables=None,
        table_mode="append",
        recreate_foreign_keys=False,
        **read_options,
    ):
        """``read_options``: what RestoreOptions takes to choose, read and check the set
        (set_id, database, require_verified, not_after, fallback, passphrase_file,
        allow_unauthenticated, allow_unencrypted, ...) and to build the work database
        (jobs, no_owner, pg_bin_dir, scratch_dir): passed on as they are, so that a table
        restore chooses and authenticates exactly as a full restore does."""
        if target_database is None:
            raise ConfigError(
                "mode tables needs target_database", "name the live database to restore into"
            )
        for key in ("mode", "include_globals", "owner", "keep_previous", "check_row_counts"):
            if key in read_options:
                raise ConfigError("%s does not apply to a table restore" % key)
        # The work database is built exactly as a full restore builds it; "tables" is not
        # one of lifecycle's whole-database modes, so the base is told "create" (what
        # happens to the work database) and the mode is set afterwards.
        super(TableRestoreOptions, self).__init__(
            target_database=target_database,
            mode="create",
            include_globals=False,
            check_row_counts=True,
            **read_options,
        )
        self.mode = "tables"
        if table_mode not in TABLE_MODES:
            raise ConfigError(
                "unknown table_mode %r" % (table_mode,),
                "append (add the backup's rows to the live table) or replace (the table "
                "with its schema, as in the backup)",
            )
        if not tables or not isinstance(tables, (list, tuple)):
            raise ConfigError(
                "mode tables needs the tables to restore",
                "e.g. tables: [public.appointments]; backup_info with list_tables: true "
                "lists a set's tables",
            )
        for name in tables:
            check_table_name(name)
        self.tables = list(tables)
        self.table_mode = table_mode
        self.recreate_foreign_keys = bool(recreate_foreign_keys)


# ---------------------------------------------------------------------- catalog queries
_OWNED_SEQUENCES = (
    "SELECT s.oid, n.nspname, s.relname, q.seqincrement FROM pg_depend d "
    "JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
    "JOIN pg_namespace n ON n.oid = s.relnamespace "
    "JOIN pg_sequence q ON q.seqrelid = s.oid "
    "WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass "
    "AND d.refobjid = %s AND d.deptype IN ('a', 'i') ORDER BY 2, 3"
)

# Objects that DROP TABLE ... RESTRICT would refuse to leave behind: whatever depends
# (normally) on the table, its row type or a sequence it owns, except what belongs to
# the table itself (its constraints, defaults, rules, triggers, policies), which the
# backup's definition brings back. Foreign keys from other tables are listed apart.
_DEPENDENTS = """
WITH parts (classid, objid) AS (
    SELECT 'pg_class'::regclass, %(oid)s::oid
    UNION ALL SELECT 'pg_type'::regclass, reltype FROM pg_class WHERE oid = %(oid)s
    UNION ALL SELECT 'pg_class'::regclass, d.objid FROM pg_depend d
        JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
        WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
        AND d.refobjid = %(oid)s AND d.deptype IN ('a', 'i')
)
SELECT DISTINCT COALESCE(v.type, o.type), COALESCE(v.identity, o.identity),
       COALESCE(rw.ev_class, co.conrelid, ad.adrelid, tg.tgrelid, po.polrelid,
                CASE WHEN d.classid = 'pg_class'::regclass THEN d.objid END)
FROM pg_depend d
JOIN parts p ON d.refclassid = p.classid AND d.refobjid = p.objid
CROSS JOIN LATERAL pg_identify_object(d.classid, d.objid, d.objsubid) o
LEFT JOIN pg_rewrite rw ON d.classid = 'pg_rewrite'::regclass AND rw.oid = d.objid
LEFT JOIN LATERAL pg_identify_object('pg_class'::regclass, rw.ev_class, 0) v
       ON rw.oid IS NOT NULL
LEFT JOIN pg_constraint co ON d.classid = 'pg_constraint'::regclass AND co.oid = d.objid
LEFT JOIN pg_attrdef ad ON d.classid = 'pg_attrdef'::regclass AND ad.oid = d.objid
LEFT JOIN pg_trigger tg ON d.classid = 'pg_trigger'::regclass AND tg.oid = d.objid
LEFT JOIN pg_policy po ON d.classid = 'pg_policy'::regclass AND po.oid = d.objid
WHERE d.deptype = 'n'
  AND NOT COALESCE(co.contype = 'f' AND co.confrelid = %(oid)s, false)
ORDER BY 1, 2
"""

_REFERENCED_BY = (
    "SELECT c.conname, n.nspname, r.relname, pg_get_constraintdef(c.oid), c.conrelid "
    "FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid "
    "JOIN pg_namespace n ON n.oid = r.relnamespace "
    "WHERE c.contype = 'f' AND c.confrelid = %s AND c.conrelid <> %s AND c.conparentid = 0 "
    "ORDER BY 2, 3, 1"
)

_REFERENCES = (
    "SELECT c.conname, n.nspname, r.relname FROM pg_constraint c "
    "JOIN pg_class r ON r.oid = c.confrelid JOIN pg_namespace n ON n.oid = r.relnamespace "
    "WHERE c.contype = 'f' AND c.conrelid = %s AND c.conparentid = 0 ORDER BY 2, 3, 1"
)


def _relation(cur, schema, name):
    """(oid, relkind, is a partition) of ``schema.name``, or None."""
    cur.execute(
        "SELECT c.oid, c.relkind, c.relispartition FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (schema, name),
    )
    return cur.fetchone()


def _ident(schema, name):
    from psycopg2 import sql

    return sql.Identifier(schema, name)


def _count(cur, schema, name):
    from psycopg2 import sql

    cur.execute(sql.SQL("SELECT count(*) FROM {}").format(_ident(schema, name)))
    return cur.fetchone()[0]


def describe_dependents(cur, oid, replaced_oids):
    """What depends on the live table ``oid`` and would stop DROP TABLE, and what fires
    on it. Objects of tables in ``replaced_oids`` (replaced in the same run) are left out:
    they go and come back with their own table."""
    cur.execute(_REFERENCED_BY, (oid, oid))
    referenced_by = [
        {
            "constraint": row[0],
            "table": qualified_name(row[1], row[2]),
            "definition": row[3],
        }
        for row in cur.fetchall()
        if row[4] not in replaced_oids
    ]
    cur.execute(_DEPENDENTS, {"oid": oid})
    others = [
        {"type": kind, "object": identity}
        for kind, identity, owner in cur.fetchall()
        if owner not in replaced_oids and owner != oid
    ]
    cur.execute(_REFERENCES, (oid,))
    references = [
        {"constraint": row[0], "table": qualified_name(row[1], row[2])} for row in cur.fetchall()
    ]
    cur.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal ORDER BY 1",
        (oid,),
    )
    triggers = [row[0] for row in cur.fetchall()]
    return {
        "referenced_by": referenced_by,
        "views": [o["object"] for o in others if o["type"] in ("view", "materialized view")],
        "other": [
            "%(type)s %(object)s" % o
            for o in others
            if o["type"] not in ("view", "materialized view")
        ],
        "references": references,
        "triggers": triggers,
    }


def _next_value(cur, oid, increment):
    """The value ``nextval`` of sequence ``oid`` would hand out next."""
    from psycopg2 import sql

    cur.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.oid = %s",
        (oid,),
    )
    schema, name = cur.fetchone()
    cur.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(_ident(schema, name)))
    last, called = cur.fetchone()
    return last + increment if called else last


def _copy_order(cur, oids):
    """``oids`` with every table after the tables it references (append must insert
    parents before children; a cycle keeps the order given and fails clearly)."""
    cur.execute(
        "SELECT conrelid, confrelid FROM pg_constraint WHERE contype = 'f' "
        "AND conrelid = ANY(%s) AND confrelid = ANY(%s) AND conrelid <> confrelid",
        (list(oids), list(oids)),
    )
    parents = {oid: set() for oid in oids}
    for child, parent in cur.fetchall():
        parents[child].add(parent)
    ordered, left = [], list(oids)
    while left:
        ready = [oid for oid in left if not (parents[oid] & set(left))] or left[:1]
        ordered.append(ready[0])
        left.remove(ready[0])
    return ordered


# ---------------------------------------------------------------------- errors
def _server_error(exc, what, table_mode):
    """A BackupError for a psycopg2 error, decided by its SQLSTATE. Messages name the
    constraint and table, never the row (a key value can be PHI)."""
    code = exc.pgcode or ""
    diag = getattr(exc, "diag", None)
    constraint = getattr(diag, "constraint_name", None)
    table = getattr(diag, "table_name", None)
    primary = getattr(diag, "message_primary", None) or exc.__class__.__name__
    where = " (constraint %s on table %s)" % (constraint, table) if constraint else ""
    if code == UNIQUE_VIOLATION:
        error = ConfigError(
            "%s: rows of the backup already exist in the live table%s; nothing was changed"
            % (what, where),
            "append adds every row of the backup: delete the rows that are already there, or "
            "use table_mode: replace (the table as in the backup)",
        )
    elif code == FOREIGN_KEY_VIOLATION:
        error = ConfigError(
            "%s: rows would break a foreign key%s; nothing was changed" % (what, where),
            "restore the referenced table in the same run (list it in tables), or, for "
            "replace, the rows of other tables point at rows the backup does not have",
        )
    elif code == DEPENDENT_OBJECTS:
        error = ConfigError(
            "%s: other objects depend on the table: %s; nothing was changed"
            % (what, getattr(diag, "message_detail", None) or primary),
            "drop and re-create them by hand, or restore the whole database with mode: "
            "create and copy what you need",
        )
    elif code == LOCK_NOT_AVAILABLE:
        error = SourceError(
            "%s: the table is in use (no lock within %s); nothing was changed"
            % (what, LOCK_TIMEOUT),
            "stop the application (or its long transaction) and run again",
        )
    elif code == INSUFFICIENT_PRIVILEGE:
        error = ConfigError(
            "%s: %s; nothing was changed" % (what, primary),
            "connect as the table's owner or a superuser (no_owner: true if the backup's "
            "owner role may not be set)",
        )
    elif code in (UNDEFINED_COLUMN, DATATYPE_MISMATCH) or code[:2] == DATA_EXCEPTION_CLASS:
        error = ConfigError(
            "%s: the live table's columns differ from the backup's (%s); nothing was changed"
            % (what, primary),
            "use table_mode: replace to put the table back as it was in the backup"
            if table_mode == "append"
            else "the backup's definition does not fit this database",
        )
    elif code[:2] == INTEGRITY_CLASS:
        error = ConfigError(
            "%s: rows break a constraint of the live table%s (SQLSTATE %s); nothing was "
            "changed" % (what, where, code),
            "use table_mode: replace, or fix the live table's constraints first",
        )
    else:
        error = SourceError(
            "%s failed: %s (SQLSTATE %s); nothing was changed" % (what, primary, code or "none")
        )
    error.sqlstate = code
    return error


# ---------------------------------------------------------------------- one run
class TablePlan(object):
    """What a run will do to each table, found on the live database before anything."""

    def __init__(self, manifest, tables):
        self.manifest = manifest
        self.tables = tables  # [{"table", "schema", "name", "expected", "oid", ...}]

    def report(self):
        keys = ("table", "expected", "exists", "rows_before", "dependents")
        return [{k: t[k] for k in keys} for t in self.tables]


class TableRestore(DatabaseRestore):
    """Restore the set into a work database (as a full restore does), then move the
    chosen tables into the live database in one transaction."""

    # The work database is only read from and dropped: the live database keeps its own.
    apply_database_properties = False

    def prepare(self):
        target_exists = super(TableRestore, self).prepare()
        if not target_exists:
            raise ConfigError(
                "database %r does not exist" % self.options.target_database,
                "a table restore writes into an existing database; restore the whole "
                "database with mode: create",
            )
        return target_exists

    def _live(self):
        return self.connection.for_database(self.options.target_database)

    def plan(self, set_id):
        """Check the set and the live tables; refuse before anything is built."""
        options = self.options
        manifest = load_manifest(self.repo, set_id, self.session.key)
        warnings = check_restorable(manifest, options, self.session.key)
        chosen = resolve_tables(manifest, options.tables)
        counts = manifest["row_counts"]
        conn = self._live().connect()
        try:
            cur = conn.cursor()
            tables = []
            for key, schema, name in chosen:
                found = _relation(cur, schema, name)
                entry = {
                    "table": key,
                    "schema": schema,
                    "name": name,
                    "expected": counts[key],
                    "exists": found is not None,
                    "oid": found[0] if found else None,
                    "rows_before": None,
                    "dependents": None,
                }
                if found is None and options.table_mode == "append":
                    raise ConfigError(
                        "table %s does not exist in database %r, so there is nothing to append to"
                        % (key, options.target_database),
                        "use table_mode: replace to create it with its schema from the backup",
                    )
                if found is not None:
                    if found[1] not in ("r", "p") or (
                        options.table_mode == "replace" and (found[1] == "p" or found[2])
                    ):
                        raise ConfigError(
                            "%s in database %r is not a plain table (relkind %s%s)"
                            % (
                                key,
                                options.target_database,
                                found[1],
                                ", a partition" if found[2] else "",
                            ),
                            "only plain tables are replaced; partitioned tables can be appended to",
                        )
                    entry["rows_before"] = _count(cur, schema, name)
                tables.append(entry)
            replaced = (
                {t["oid"] for t in tables if t["oid"]}
                if (options.table_mode == "replace")
                else set()
            )
            # Definitions (foreign keys re-created later) come out schema-qualified.
            cur.execute("SELECT pg_catalog.set_config('search_path', '', true)")
            for entry in tables:
                if entry["oid"] is not None:
                    entry["dependents"] = describe_dependents(cur, entry["oid"], replaced)
            conn.rollback()
        finally:
            conn.close()
        if options.table_mode == "replace":
            _refuse_dependents(tables, options)
        plan = TablePlan(manifest, tables)
        plan.warnings = warnings
        return plan

    def check_report(self, set_id):
        plan = self.plan(set_id)
        return {
            "table_mode": self.options.table_mode,
            "tables": plan.report(),
            "warnings": plan.warnings,
        }

    def attempt(self, set_id):
        self.work = None
        try:
            plan = self.plan(set_id)
            result = self.restore_work(set_id)
            moved = self._move(plan)
        except BaseException:
            drop_quietly(self.server, self.work)
            raise
        result.update(moved)
        result["table_mode"] = self.options.table_mode
        # The live database has changed: a work database that will not go away is
        # worth a warning, not a failed task.
        try:
            self.server.drop(self.work)
            result["work_database_dropped"] = self.work
        except BackupError as exc:
            result["warnings"].append(
                "the work database %s could not be dropped (%s): drop it by hand" % (self.work, exc)
            )
        return result

    # ------------------------------------------------------------------ the move
    def _dump_section(self, plan, section):
        """The work database's definition of the chosen tables (pg_dump, one section)."""
        work = self.connection.for_database(self.work)
        argv = [
            os.path.join(self.bin_dir, "pg_dump"),
            "--no-password",
            "--section=%s" % section,
            "--strict-names",
            "--dbname=%s" % work.conninfo_dbname(),
        ]
        if self.options.no_owner:
            argv.append("--no-owner")
        for entry in plan.tables:
            argv.append(
                "--table=%s"
                % ".".join('"%s"' % p.replace('"', '""') for p in (entry["schema"], entry["name"]))
            )
        chunks = []
        try:
            pipeline.run_stream(
                [pipeline.Stage("pg_dump", argv, env=work.child_env())], chunks.append
            )
        except BackupError as exc:
            raise SourceError(
                "reading the definition of %s from the work database failed: %s"
                % (", ".join(t["table"] for t in plan.tables), exc)
            ) from exc
        return strip_restrict(b"".join(chunks).decode("utf-8"))

    def _move(self, plan):
        options = self.options
        replace = options.table_mode == "replace"
        pre = self._dump_section(plan, "pre-data") if replace else None
        post = self._dump_section(plan, "post-data") if replace else None
        work = self.connection.for_database(self.work).connect()
        live = self._live().connect()
        try:
            wcur, lcur = work.cursor(), live.cursor()
            work_tables = _work_tables(wcur, plan)
            what = "%s %s" % (
                "appending to" if not replace else "replacing",
                ", ".join(t["table"] for t in plan.tables),
            )
            try:
                report = _transaction(wcur, lcur, plan, work_tables, options, pre, post)
                live.commit()
            except Exception as exc:
                live.rollback()
                if _is_pg_error(exc):
                    raise _server_error(exc, what, options.table_mode) from exc
                raise
            work.rollback()
        finally:
            work.close()
            live.close()
        report["changed"] = True
        return report


def _is_pg_error(exc):
    import psycopg2

    return isinstance(exc, psycopg2.Error)


def _refuse_dependents(tables, options):
    blocking = []
    for entry in tables:
        deps = entry["dependents"]
        if not deps:
            continue
        objects = ["view %s" % v for v in deps["views"]] + deps["other"]
        if deps["referenced_by"] and not options.recreate_foreign_keys:
            objects = [
                "foreign key %(constraint)s of %(table)s" % fk for fk in deps["referenced_by"]
            ] + objects
        if objects:
            blocking.append("%s: %s" % (entry["table"], ", ".join(objects)))
    if not blocking:
        return
    only_fks = all(
        not entry["dependents"]["views"] and not entry["dependents"]["other"]
        for entry in tables
        if entry["dependents"]
    )
    error = ConfigError(
        "replacing drops the table, and other objects depend on it (%s); nothing was changed"
        % "; ".join(blocking),
        "recreate_foreign_keys: true drops those foreign keys and re-creates them, checked "
        "against the restored rows, in the same transaction"
        if only_fks
        else "views and other dependents are never dropped: drop and re-create them by hand "
        "around the restore, use table_mode: append, or restore the whole database with "
        "mode: create and copy what you need",
    )
    error.result = {"tables": [{k: t[k] for k in ("table", "dependents")} for t in tables]}
    raise error


def strip_restrict(script):
    """``script`` without pg_dump's ``\\restrict KEY`` / ``\\unrestrict KEY`` lines. The
    key is random, so no line of the dumped objects can be taken for them."""
    match = _RESTRICT_LINE.search(script)
    if match is None:
        return script
    key = match.group(1)
    lines = [
        line
        for line in script.split("\n")
        if line.rstrip("\r") not in ("\\restrict " + key, "\\unrestrict " + key)
    ]
    return "\n".join(lines)


def _work_tables(wcur, plan):
    """Per chosen table, from the work database: oid, the columns COPY moves (generated
    ones are computed again), the sequences it owns and their next values."""
    found = {}
    for entry in plan.tables:
        rel = _relation(wcur, entry["schema"], entry["name"])
        if rel is None:
            raise SourceError(
                "table %s is not in the work database after the restore" % entry["table"]
            )
        oid = rel[0]
        wcur.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
            "AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            (oid,),
        )
        columns = [row[0] for row in wcur.fetchall()]
        wcur.execute(_OWNED_SEQUENCES, (oid,))
        sequences = [
            {
                "schema": row[1],
                "name": row[2],
                "increment": row[3],
                "backup_next": _next_value(wcur, row[0], row[3]),
            }
            for row in wcur.fetchall()
        ]
        found[entry["table"]] = {"oid": oid, "columns": columns, "sequences": sequences}
    order = _copy_order(wcur, [found[t["table"]]["oid"] for t in plan.tables])
    by_oid = {found[t["table"]]["oid"]: t for t in plan.tables}
    return found, [by_oid[oid] for oid in order]


def _live_sequences(lcur, entry, work_info):
    """{(schema, name): next value} of the live sequences named like the backup's."""
    values = {}
    for seq in work_info["sequences"]:
        rel = _relation(lcur, seq["schema"], seq["name"])
        if rel is not None and rel[1] == "S":
            values[(seq["schema"], seq["name"])] = _next_value(lcur, rel[0], seq["increment"])
    return values


def _transaction(wcur, lcur, plan, work_tables, options, pre, post):
    """Everything that writes the live database, inside its one transaction."""
    from psycopg2 import sql

    found, order = work_tables
    replace = options.table_mode == "replace"
    lcur.execute("SET LOCAL lock_timeout = '%s'" % LOCK_TIMEOUT)
    existing = [t for t in plan.tables if t["exists"]]
    for entry in existing:
        # Replace: nobody may read a table that is about to go. Append: readers go on,
        # writers wait, so the counts before and after are exact.
        lock = "ACCESS EXCLUSIVE" if replace else "SHARE ROW EXCLUSIVE"
        lcur.execute(
            sql.SQL("LOCK TABLE {} IN " + lock + " MODE").format(
                _ident(entry["schema"], entry["name"])
            )
        )
        # Counted again under the lock: rows written since the plan count too.
        entry["rows_before"] = _count(lcur, entry["schema"], entry["name"])
    live_next = {}
    for entry in plan.tables:
        live_next.update(_live_sequences(lcur, entry, found[entry["table"]]))
    dropped_fks = []
    if replace:
        if options.recreate_foreign_keys:
            for entry in existing:
                for fk in entry["dependents"]["referenced_by"]:
                    table = split_name(fk["table"])
                    lcur.execute(
                        sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                            _ident(*table), sql.Identifier(fk["constraint"])
                        )
                    )
                    dropped_fks.append(dict(fk, schema=table[0], name=table[1]))
        if existing:
            lcur.execute(
                sql.SQL("DROP TABLE {} RESTRICT").format(
                    sql.SQL(", ").join(_ident(t["schema"], t["name"]) for t in existing)
                )
            )
        lcur.execute(pre)
        # pg_dump's script resets lock_timeout and search_path: ours again.
        lcur.execute("SET LOCAL lock_timeout = '%s'" % LOCK_TIMEOUT)
    for entry in order:
        info = found[entry["table"]]
        entry["restored"] = _copy_table(wcur, lcur, entry, info["columns"])
    if replace:
        lcur.execute(post)
        lcur.execute("SET LOCAL lock_timeout = '%s'" % LOCK_TIMEOUT)
        for fk in dropped_fks:
            # Re-created, so re-validated: rows of other tables pointing at rows the
            # backup does not have fail the whole transaction.
            lcur.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(
                    _ident(fk["schema"], fk["name"]), sql.Identifier(fk["constraint"])
                )
                + sql.SQL(fk["definition"])
            )
    reports = []
    for entry in plan.tables:
        info = found[entry["table"]]
        sequences = _advance_sequences(lcur, info["sequences"], live_next)
        after = _count(lcur, entry["schema"], entry["name"])
        expected_after = entry["expected"] + (0 if replace else (entry["rows_before"] or 0))
        if entry["restored"] != entry["expected"] or after != expected_after:
            raise SourceError(
                "table %s holds %d rows after the %s, %d expected (%d in the backup); nothing "
                "was changed"
                % (entry["table"], after, options.table_mode, expected_after, entry["expected"]),
                "a trigger or rule on the live table may have changed the rows",
            )
        reports.append(
            {
                "table": entry["table"],
                "table_mode": options.table_mode,
                "expected": entry["expected"],
                "restored": entry["restored"],
                "rows_before": entry["rows_before"],
                "rows_after": after,
                "existed": entry["exists"],
                "dependents": entry["dependents"],
                "sequences": sequences,
            }
        )
    return {
        "tables": reports,
        "foreign_keys_recreated": ["%(constraint)s on %(table)s" % fk for fk in dropped_fks],
    }


def _advance_sequences(lcur, sequences, live_next):
    """Set each sequence the table owns to the later of the backup's and the live
    database's next value: an id handed out is never handed out again."""
    report = []
    for seq in sequences:
        rel = _relation(lcur, seq["schema"], seq["name"])
        if rel is None or rel[1] != "S":
            continue
        values = [seq["backup_next"]]
        if (seq["schema"], seq["name"]) in live_next:
            values.append(live_next[(seq["schema"], seq["name"])])
        value = max(values) if seq["increment"] > 0 else min(values)
        lcur.execute("SELECT setval(%s::oid::regclass, %s, false)", (rel[0], value))
        report.append({"sequence": qualified_name(seq["schema"], seq["name"]), "next_value": value})
    return report


def _copy_table(wcur, lcur, entry, columns):
    """COPY the table's rows from the work database into the live one through a pipe
    (no plaintext on disk); returns the rows copied."""
    from psycopg2 import sql

    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    table = _ident(entry["schema"], entry["name"])
    out_sql = sql.SQL("COPY {} ({}) TO STDOUT").format(table, cols)
    in_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(table, cols)
    out_text = out_sql.as_string(wcur.connection)
    in_text = in_sql.as_string(lcur.connection)
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb")
    writer = os.fdopen(write_fd, "wb")
    failures = []

    def produce():
        try:
            with writer:  # closed either way: the live COPY sees the end of the data
                wcur.copy_expert(out_text, writer)
        except BaseException as exc:  # reported by the caller after the join
            failures.append(exc)

    thread = threading.Thread(target=produce)
    thread.daemon = True
    thread.start()
    try:
        lcur.copy_expert(in_text, reader)
    finally:
        # A producer still writing gets EPIPE and stops.
        reader.close()
        thread.join()
    if failures:
        # The live COPY saw an early end of data: the caller rolls it back.
        raise SourceError(
            "reading %s from the work database failed: %s" % (entry["table"], failures[0])
        )
    return lcur.rowcount


# ---------------------------------------------------------------------- entry point
def run_table_restore(repo, connection, options, check_mode=False, now=None):
    """Restore ``options.tables`` of a set into the existing ``options.target_database``;
    returns a result dict. ``connection``: the server, connected to a maintenance
    database as a role that may create (work) databases. The set is chosen, read and
    authenticated by the full restore's own run (restore.run_restore)."""
    return run_restore(repo, connection, options, check_mode, now, kind=TableRestore)
