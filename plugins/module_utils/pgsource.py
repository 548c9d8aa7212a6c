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
import stat
import subprocess

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


# libpq connection keywords a URL query may hold: named in our errors because they
# cannot be a fragment of a password; any other key is not echoed.
_LIBPQ_KEYWORDS = _URL_QUERY_KEYS | {
    "password",
    "options",
    "hostaddr",
    "client_encoding",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "sslcompression",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslpassword",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "sslnegotiation",
    "requirepeer",
    "requiressl",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "require_auth",
    "channel_binding",
    "service",
    "target_session_attrs",
    "load_balance_hosts",
    "replication",
}

_URL_SCHEMES = ("postgresql://", "postgres://")
_ENCODING_HINT = (
    "write the URL as postgresql://user:password@host:5432/dbname; a '/', '?', '#', '@' "
    "or '%' in the user name, password or database name must be percent-encoded "
    "(%2F, %3F, %23, %40, %25)"
)


def parse_url(url):
    """Split a ``postgresql://user:pass@host:port/db?sslmode=...`` URL into libpq keywords.

    libpq's rules: the user part ends at the '@', host and port follow, then
    ``/dbname`` and ``?key=value&...``; every part is percent-decoded.  A URL that
    libpq and a generic URL parser would split differently (an unencoded '/', '?',
    '#' or '@' in the password) is refused.  No error ever quotes the URL past its
    scheme: any piece of it may be a piece of the password.
    """
    if not isinstance(url, str):
        raise ConfigError("database URL must be a string", _ENCODING_HINT)
    scheme = next((s for s in _URL_SCHEMES if url.startswith(s)), None)
    if scheme is None:
        head = url.split("://", 1)[0] if "://" in url else ""
        raise ConfigError(
            "database URL must start with postgresql:// or postgres://%s"
            % (" (got %s://)" % head if re.match(r"^[A-Za-z][A-Za-z0-9+.-]{0,19}$", head) else ""),
            "use the libpq URL form postgresql://user@host:5432/dbname",
        )
    rest = url[len(scheme) :]
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in rest):
        # A generic URL parser silently drops tabs and newlines; libpq keeps them.
        raise ConfigError(
            "database URL holds a control character (newline, tab...)",
            "remove it; if it belongs to the password, percent-encode it (e.g. a tab as %09)",
        )
    # The authority (user part and hosts) ends at the first '/', '?' or '#'.  libpq
    # itself ends the user part at the first '@' before any '/', so an '@' further
    # on means a password (or name) holding an unencoded '/', '?' or '#': with
    # "user:2024/Winter@host/db" libpq would connect to host "user", port 2024.
    cut = min(
        [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0] or [len(rest)]
    )
    authority, tail = rest[:cut], rest[cut:]
    if "#" in rest:
        raise ConfigError("database URL holds an unencoded '#'", _ENCODING_HINT)
    if "@" in tail or authority.count("@") > 1:
        raise ConfigError(
            "database URL is ambiguous: its user part (user:password@) holds an unencoded "
            "'/', '?', '#' or '@', or its database name holds an '@'",
            _ENCODING_HINT,
        )
    params = {}
    if "@" in authority:
        userinfo, authority = authority.split("@", 1)
        user, colon, password = userinfo.partition(":")
        if user:
            params["user"] = _url_decode(user, "user name")
        if colon and password:
            params["password"] = _url_decode(password, "password")
    hosts, ports = _split_hosts(authority)
    if any(hosts):
        params["host"] = ",".join(hosts)
    if any(ports):
        params["port"] = ",".join(ports)
    path, _mark, query = tail.partition("?")
    dbname = _url_decode(path[1:], "database name") if path.startswith("/") else ""
    if dbname:
        params["dbname"] = dbname
    for item in query.split("&") if query else ():
        key, equals, value = item.partition("=")
        key = _url_decode(key, "parameter name")
        if key not in _URL_QUERY_KEYS:
            raise ConfigError(
                "database URL parameter %s is not supported"
                % (repr(key) if key in _LIBPQ_KEYWORDS else "(an unknown name)"),
                "supported: %s; the password goes in the user part (user:password@) or "
                "login_password" % ", ".join(sorted(_URL_QUERY_KEYS)),
            )
        if not equals:
            raise ConfigError(
                "database URL parameter %r has no value" % key, "write it as %s=value" % key
            )
        params[key] = _url_decode(value, "value of parameter %r" % key)
    return params


def _split_hosts(authority):
    """(hosts, ports) of ``host[:port][,host[:port]...]``, IPv6 in brackets; decoded."""
    hosts, ports = [], []
    for item in authority.split(",") if authority else ():
        if item.startswith("["):
            host, bracket, port = item[1:].partition("]")
            if not bracket or (port and not port.startswith(":")):
                raise ConfigError(
                    "database URL has an unterminated or malformed [IPv6] host", _ENCODING_HINT
                )
            port = port[1:]
        else:
            host, _colon, port = item.partition(":")
            host = _url_decode(host, "host")
        if port and not (port.isdigit() and port.isascii() and 0 < int(port) < 65536):
            # Never quote it: with an unencoded '/' in the password, this "port" is
            # where the password starts.
            raise ConfigError(
                "database URL has an invalid port",
                "use a number, e.g. :5432; if the URL holds a password, %s"
                % _ENCODING_HINT.split("; ", 1)[1],
            )
        hosts.append(host)
        ports.append(port)
    if len(hosts) > 1 and any(ports) and not all(ports):
        raise ConfigError(
            "database URL gives a port for some hosts only",
            "give every host its port, or none (then login_port applies to all)",
        )
    return hosts, ports


def _url_decode(text, what):
    """Percent-decode one URL part as libpq does: a bad escape or %00 is an error."""
    if "%" not in text:
        return text
    raw = bytearray()
    index = 0
    encoded = text.encode("utf-8")
    while index < len(encoded):
        byte = encoded[index]
        if byte == 0x25:  # '%'
            pair = encoded[index + 1 : index + 3]
            if len(pair) != 2 or not all(c in b"0123456789abcdefABCDEF" for c in pair):
                raise ConfigError(
                    "database URL: the %s holds a '%%' that is not a %%XX escape" % what,
                    "write a literal '%' as %25",
                )
            if pair == b"00":
                raise ConfigError("database URL: the %s holds %%00 (a NUL byte)" % what)
            raw.append(int(pair, 16))
            index += 3
        else:
            raw.append(byte)
            index += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            "database URL: the %s holds percent-escapes that are not UTF-8" % what,
            "percent-encode the UTF-8 bytes of each character",
        ) from None


def check_passfile(path):
    """Refuse a libpq password file that libpq would silently ignore (missing, not a
    regular file, readable by group or others): the connection would then fail with a
    bare "no password supplied" that names neither the file nor the fix."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(
            "cannot use passfile %s: %s" % (path, exc.strerror),
            "create it (host:port:database:user:password per line) with mode 0600",
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(
            "passfile %s is not a regular file" % path, "point passfile at a .pgpass-format file"
        )
    if info.st_mode & 0o077:
        raise ConfigError(
            "passfile %s has permissions %s: libpq ignores a password file readable by group or "
            "others" % (path, oct(stat.S_IMODE(info.st_mode))),
            "run: chmod 0600 %s" % path,
        )
    if not os.access(path, os.R_OK):
        raise ConfigError(
            "passfile %s is not readable by this user (uid %d)" % (path, os.geteuid()),
            "chown it to the user that runs the backup",
        )


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
        _check_name_length(params["dbname"], "database name", "database")
        _check_name_length(params.get("user"), "login user name", "login_user")
        if params.get("passfile"):
            check_passfile(params["passfile"])
        self.params = params

    @property
    def dbname(self):
        return self.params["dbname"]

    def for_database(self, dbname):
        """The same server and credentials, another database."""
        _check_name_length(dbname, "database name", "database")
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


# PostgreSQL's NAMEDATALEN: names hold at most NAMEDATALEN-1 bytes.
NAMEDATALEN = 64


def _check_name_length(name, what, option):
    """Refuse a database or role name PostgreSQL cannot hold, before connecting: the
    server silently truncates it to 63 bytes (which may name another database) and
    drops the connection without a word past its 10000-byte startup packet."""
    if name is None:
        return
    size = len(name.encode("utf-8", "surrogateescape"))
    if size >= NAMEDATALEN:
        raise ConfigError(
            "the %s %r is %d bytes long; PostgreSQL names hold at most %d bytes "
            "(NAMEDATALEN-1)"
            % (what, name if len(name) <= 40 else name[:40] + "...", size, NAMEDATALEN - 1),
            "set %s to the exact name, as psql lists it (\\l for databases, \\du for roles)"
            % option,
        )


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

    def unreadable(self, patterns=(), exclude=()):
        """What pg_dump (and the row counts) would be refused, as readable text: schemas
        without USAGE, tables and sequences without SELECT, within the dump's scope.

        Found before the dump starts: a refused count aborts the snapshot's transaction,
        and pg_dump then fails with "could not import the requested snapshot", naming
        neither the table nor the privilege.
        """
        if self.is_superuser:
            return []
        cur = self.conn.cursor()
        cur.execute(
            "SELECT n.nspname, c.relname, c.relkind, c.oid, "
            "has_schema_privilege(n.oid, 'USAGE'), "
            "CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(c.oid, 'SELECT') "
            "ELSE has_table_privilege(c.oid, 'SELECT') END "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p', 'S') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%' "
            "ORDER BY 1, 2"
        )
        rows = cur.fetchall()
        chosen = set(self._oids(patterns)) if patterns else None
        left_out = set(self._oids(exclude))
        problems, schemas = [], set()
        for schema, name, kind, oid, usage, select in rows:
            if (chosen is not None and oid not in chosen) or oid in left_out:
                continue
            if not usage:
                if schema not in schemas:
                    schemas.add(schema)
                    problems.append("schema %s (no USAGE)" % quote_ident(schema))
            elif not select:
                problems.append(
                    "%s %s (no SELECT)"
                    % ("sequence" if kind == "S" else "table", qualified_name(schema, name))
                )
        return problems

    def _oids(self, patterns):
        cur = self.conn.cursor()
        oids = []
        for pattern in patterns:
            cur.execute("SELECT to_regclass(%s)::oid", (pattern,))
            oid = cur.fetchone()[0]
            if oid is not None:
                oids.append(oid)
        return oids

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
