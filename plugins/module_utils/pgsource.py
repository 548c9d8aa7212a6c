# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where the data comes from: libpq connection settings, PostgreSQL binaries,
and a consistent snapshot shared by pg_dump and the row counts in the manifest.

Secrets travel to pg_dump/pg_dumpall only through the child's environment
(PGPASSWORD) or a passfile (PGPASSFILE); a ``postgresql://`` URL is split here
so its password never reaches argv.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import glob
import os
import re
import shutil
import subprocess

try:  # Python 3
    from urllib.parse import parse_qsl, unquote, urlsplit
except ImportError:  # pragma: no cover - Python 2 is not supported by the engine
    from urlparse import parse_qsl, unquote, urlsplit  # type: ignore

from .errors import ConfigError, SourceError

try:
    import psycopg2
    import psycopg2.extensions

    HAS_PSYCOPG2 = True
    PSYCOPG2_IMPORT_ERROR = None
except ImportError as _exc:  # reported by the module with missing_required_lib
    HAS_PSYCOPG2 = False
    PSYCOPG2_IMPORT_ERROR = _exc

# libpq keyword -> environment variable understood by every libpq client.
LIBPQ_ENV = {
    "host": "PGHOST",
    "port": "PGPORT",
    "user": "PGUSER",
    "dbname": "PGDATABASE",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME",
}

_URL_QUERY_KEYS = set(LIBPQ_ENV) - {"password"}


def parse_url(url):
    """Split a ``postgresql://user:pass@host:port/db?sslmode=...`` URL into libpq keywords."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigError(
            "database URL must start with postgresql:// (got scheme %r)" % parts.scheme,
            "use the libpq URL form postgresql://user@host:5432/dbname",
        )
    params = {}
    if parts.hostname:
        params["host"] = unquote(parts.hostname)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError("database URL has an invalid port", "use a number, e.g. :5432") from None
    if port:
        params["port"] = str(port)
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password:
        params["password"] = unquote(parts.password)
    dbname = unquote(parts.path.lstrip("/"))
    if dbname:
        params["dbname"] = dbname
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _URL_QUERY_KEYS:
            raise ConfigError(
                "database URL parameter %r is not supported" % key,
                "supported: %s" % ", ".join(sorted(_URL_QUERY_KEYS)),
            )
        params[key] = value
    return params


class PgConnection(object):
    """libpq connection settings; explicit keywords override the URL's."""

    def __init__(self, url=None, application_name="clinic.backup", **keywords):
        params = parse_url(url) if url else {}
        for key, value in keywords.items():
            if key not in LIBPQ_ENV:
                raise ConfigError("unknown connection setting %r" % key)
            if value not in (None, ""):
                params[key] = str(value)
        params.setdefault("application_name", application_name)
        if not params.get("dbname"):
            raise ConfigError("no database name given", "set database (or a URL ending in /dbname)")
        if "\0" in "".join(params.values()):
            raise ConfigError("connection settings contain a NUL byte")
        self.params = params

    @property
    def dbname(self):
        return self.params["dbname"]

    def for_database(self, dbname):
        """The same server and credentials, another database."""
        other = PgConnection.__new__(PgConnection)
        other.params = dict(self.params, dbname=dbname)
        return other

    def conninfo_dbname(self):
        """``--dbname`` value naming only the database, as a quoted conninfo keyword:
        a bare name holding '=' would otherwise be parsed as a whole connection string.
        Host, port and user still come from child_env()."""
        return "dbname='%s'" % self.dbname.replace("\\", "\\\\").replace("'", "\\'")

    def child_env(self, base=None):
        """Environment for pg_dump & co: inherited env minus stray PG settings, plus ours."""
        env = dict(os.environ if base is None else base)
        for var in LIBPQ_ENV.values():
            env.pop(var, None)
        for key, value in self.params.items():
            env[LIBPQ_ENV[key]] = value
        # Children must never prompt: a missing password is an error, not a hang.
        env["PGCONNECT_TIMEOUT"] = self.params.get("connect_timeout", "15")
        return env

    def describe(self):
        """Where we connect, safe to log (no password)."""
        return "database %r on %s:%s as %s" % (
            self.dbname,
            self.params.get("host", "local socket"),
            self.params.get("port", "5432"),
            self.params.get("user", "the current user"),
        )

    def connect(self):
        """psycopg2 connection with the same settings the child processes get."""
        if not HAS_PSYCOPG2:
            raise ConfigError(
                "the psycopg2 Python library is required", "pip install psycopg2-binary"
            )
        kwargs = dict(self.params)
        kwargs.setdefault("connect_timeout", "15")
        try:
            return psycopg2.connect(**kwargs)
        except psycopg2.OperationalError as exc:
            raise SourceError(
                "cannot connect to %s: %s" % (self.describe(), _one_line(exc)),
                "check that the server is running, the database exists and the credentials are right",
            ) from exc


def _one_line(exc):
    """libpq's message on one line: its first line alone can end inside a quoted name
    holding a newline ('database "clinic_db<newline>x" does not exist')."""
    text = " ".join(str(exc).split())
    return text or exc.__class__.__name__


class Snapshot(object):
    """A REPEATABLE READ transaction whose snapshot pg_dump imports (--snapshot).

    The row counts recorded in the manifest are taken in the same snapshot, so a
    restore test can compare them exactly with what was dumped.
    """

    def __init__(self, connection):
        self.connection = connection
        self.conn = None
        self.snapshot_id = None
        self.server_version_num = None
        self.is_superuser = False

    def open(self):
        self.conn = self.connection.connect()
        try:
            self.conn.set_session(
                isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ,
                readonly=True,
            )
            cur = self.conn.cursor()
            cur.execute(
                "SELECT current_setting('server_version_num')::int, "
                "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
            )
            self.server_version_num, self.is_superuser = cur.fetchone()
            try:
                cur.execute("SELECT pg_export_snapshot()")
                self.snapshot_id = cur.fetchone()[0]
            except psycopg2.Error:
                # Standbys before PostgreSQL 10 cannot export; dump without a shared snapshot.
                self.conn.rollback()
                self.snapshot_id = None
        except psycopg2.Error as exc:
            self.close()
            raise SourceError(
                "cannot start a snapshot on %s: %s" % (self.connection.describe(), _one_line(exc))
            ) from exc
        return self

    @property
    def server_major(self):
        return self.server_version_num // 10000

    @property
    def server_version(self):
        num = self.server_version_num
        return "%d.%d" % (num // 10000, num % 10000)

    def user_tables(self):
        """Schema-qualified user tables, sorted."""
        cur = self.conn.cursor()
        cur.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%' ORDER BY 1, 2"
        )
        return cur.fetchall()

    def missing_tables(self, patterns):
        """The exact table patterns (see table_pattern) that name no table."""
        cur = self.conn.cursor()
        missing = []
        for pattern in patterns:
            cur.execute("SELECT to_regclass(%s)", (pattern,))
            if cur.fetchone()[0] is None:
                missing.append(pattern)
        return missing

    def row_counts(self, tables=None):
        """Exact row counts in this snapshot, keyed by ``schema.table`` (quoted as needed)."""
        from psycopg2 import sql

        counts = {}
        cur = self.conn.cursor()
        for schema, table in tables if tables is not None else self.user_tables():
            query = sql.SQL("SELECT count(*) FROM {}.{}").format(
                sql.Identifier(schema), sql.Identifier(table)
            )
            cur.execute(query)
            counts[qualified_name(schema, table)] = cur.fetchone()[0]
        return counts

    def close(self):
        if self.conn is not None:
            try:
                self.conn.rollback()
                self.conn.close()
            except Exception:  # closing a broken connection must not hide the real error
                pass
            self.conn = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc_info):
        self.close()


_PLAIN_IDENT = re.compile(r"^[a-z_][a-z0-9_$]*$")


def quote_ident(name):
    """Quote an identifier the way PostgreSQL does, only when needed."""
    if _PLAIN_IDENT.fullmatch(name):
        return name
    return '"%s"' % name.replace('"', '""')


def qualified_name(schema, table):
    return "%s.%s" % (quote_ident(schema), quote_ident(table))


def table_pattern(name):
    """Turn a table name into an exact pg_dump ``-t`` pattern.

    ``schema.table`` splits on the first dot; every part is double-quoted so
    that wildcards, quotes and semicolons are taken literally.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("table names must be non-empty strings (got %r)" % (name,))
    if any(ord(ch) < 32 for ch in name):
        raise ConfigError(
            "table name %r contains a control character (newline, tab...)" % name,
            "name tables with printable characters only",
        )
    parts = name.split(".", 1) if "." in name else [name]
    return ".".join('"%s"' % part.replace('"', '""') for part in parts)


def find_pg_bin_dir(server_major=None, explicit=None):
    """Directory holding pg_dump/pg_restore able to dump ``server_major``.

    pg_dump refuses servers newer than itself, so take the newest installed
    version that is at least the server's.
    """
    if explicit:
        if not os.path.isfile(os.path.join(explicit, "pg_dump")):
            raise ConfigError(
                "no pg_dump in pg_bin_dir %s" % explicit,
                "point pg_bin_dir at PostgreSQL's bin directory",
            )
        return explicit
    candidates = []
    for path in glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin"):
        match = re.search(r"(\d+)", os.path.basename(os.path.dirname(path)))
        if match and os.path.isfile(os.path.join(path, "pg_dump")):
            candidates.append((int(match.group(1)), path))
    candidates.sort(reverse=True)
    if candidates:
        if server_major is None or candidates[0][0] >= server_major:
            return candidates[0][1]
        raise ConfigError(
            "the newest pg_dump installed is %d but the server runs PostgreSQL %d"
            % (candidates[0][0], server_major),
            "install postgresql-client-%d" % server_major,
        )
    found = shutil.which("pg_dump")
    if not found:
        raise ConfigError(
            "pg_dump was not found", "install the PostgreSQL client (postgresql-client)"
        )
    return os.path.dirname(found)


def tool_version(bin_dir, tool="pg_dump"):
    out = subprocess.run(
        [os.path.join(bin_dir, tool), "--version"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return out.stdout.decode("utf-8", "replace").strip()
