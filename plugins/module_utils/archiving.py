# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Server settings for continuous archiving, and the proof that the archive works.

``apply_settings``: each wanted setting is compared with what the server already has
(``pg_settings`` for the running value, ``pg_file_settings`` for what
``postgresql.auto.conf`` holds but a restart has not applied yet) and only a
difference is written, with ``ALTER SYSTEM``; then the configuration is reloaded and
the settings that wait for a restart (``pending_restart``) are returned, so that the
caller restarts only when one really needs it.

``prove_archiving``: ``pg_switch_wal()`` closes the current segment; the proof is that
segment's sealed record appearing in every repository (local and S3), not merely
``pg_stat_archiver`` saying so.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re
import time

from .errors import ConfigError, IntegrityError, SourceError

SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
# Settings whose value this module writes; anything else is refused (a typo must not
# become a silently ignored custom setting).
ARCHIVING_SETTINGS = (
    "wal_level",
    "archive_mode",
    "archive_command",
    "archive_library",
    "restore_command",
    "archive_timeout",
    "max_wal_senders",
    "wal_compression",
)


def _normalize(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def read_settings(cursor, names):
    """{name: {"setting", "unit", "pending_restart", "file_value"}} for the names."""
    cursor.execute(
        "SELECT name, setting, unit, pending_restart, context FROM pg_settings "
        "WHERE name = ANY(%s)",
        (list(names),),
    )
    found = {
        row[0]: {"setting": row[1], "unit": row[2], "pending_restart": row[3], "context": row[4]}
        for row in cursor.fetchall()
    }
    # The last line of postgresql.auto.conf wins; pg_file_settings lists every line.
    cursor.execute(
        "SELECT name, setting FROM pg_file_settings "
        "WHERE name = ANY(%s) AND sourcefile LIKE '%%/postgresql.auto.conf' ORDER BY seqno",
        (list(names),),
    )
    for name, value in cursor.fetchall():
        if name in found:
            found[name]["file_value"] = value
    return found


def _same(wanted, current):
    """Whether the server already has the wanted value: the literal postgresql.auto.conf
    holds (also before the restart that applies it), else the running value. A running
    value that is equal only after unit conversion ('5min', 300 s) is written once; from
    then on postgresql.auto.conf holds our literal and nothing changes."""
    if current.get("file_value") is not None:
        return current["file_value"] == wanted
    return current["setting"] == wanted


def apply_settings(conn, wanted, check_mode=False):
    """Write the settings that differ (ALTER SYSTEM), reload, report what is pending.

    ``wanted``: {name: value}. Returns {"changed": [names], "pending_restart": [names],
    "settings": {name: running value}}.
    """
    wanted = {name: _normalize(value) for name, value in (wanted or {}).items()}
    for name, value in wanted.items():
        if name not in ARCHIVING_SETTINGS:
            raise ConfigError(
                "%r is not a setting this module manages" % name,
                "manage: %s" % ", ".join(ARCHIVING_SETTINGS),
            )
        if "\0" in value or "\n" in value:
            raise ConfigError("the value of %s holds a line break or NUL byte" % name)
    conn.autocommit = True  # ALTER SYSTEM cannot run inside a transaction block
    cursor = conn.cursor()
    current = read_settings(cursor, wanted)
    unknown = sorted(set(wanted) - set(current))
    if unknown:
        raise ConfigError(
            "the server does not know the setting(s) %s" % ", ".join(unknown),
            "this server version may not have them: remove them from the wanted settings",
        )
    changed = [name for name in sorted(wanted) if not _same(wanted[name], current[name])]
    if changed and not check_mode:
        from psycopg2 import sql

        for name in changed:
            cursor.execute(
                sql.SQL("ALTER SYSTEM SET {} = %s").format(sql.Identifier(name)), (wanted[name],)
            )
        cursor.execute("SELECT pg_reload_conf()")
        # The reload is asynchronous: wait until pg_file_settings shows our lines.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            current = read_settings(cursor, wanted)
            if all(current[n].get("file_value") == wanted[n] for n in changed):
                break
            time.sleep(0.1)
        time.sleep(0.2)  # pending_restart is set by the postmaster's reload itself
        current = read_settings(cursor, wanted)
    pending = sorted(
        name
        for name in wanted
        if current[name]["pending_restart"]
        or (check_mode and name in changed and current[name]["context"] == "postmaster")
    )
    return {
        "changed": changed,
        "pending_restart": pending,
        "settings": {name: current[name]["setting"] for name in sorted(wanted)},
    }


def switch_wal(conn):
    """Close the current WAL segment; the name of the segment that was closed."""
    conn.autocommit = True
    cursor = conn.cursor()
    cursor.execute("SELECT pg_is_in_recovery()")
    if cursor.fetchone()[0]:
        raise ConfigError(
            "the server is in recovery (a standby): archiving is proven on the primary",
            "run this against the primary",
        )
    # A switch with nothing written since the last one is a no-op; one small record
    # makes sure a fresh segment is closed and archived.
    cursor.execute("SELECT pg_logical_emit_message(false, 'clinic.backup', 'archive proof')")
    cursor.execute("SELECT pg_walfile_name(pg_switch_wal())")
    return cursor.fetchone()[0]


def archiver_status(conn):
    cursor = conn.cursor()
    cursor.execute(
        "SELECT archived_count, last_archived_wal, failed_count, last_failed_wal, "
        "extract(epoch FROM now() - last_failed_time) FROM pg_stat_archiver"
    )
    row = cursor.fetchone()
    return {
        "archived_count": row[0],
        "last_archived_wal": row[1],
        "failed_count": row[2],
        "last_failed_wal": row[3],
        "last_failed_age_seconds": float(row[4]) if row[4] is not None else None,
    }


def prove_archiving(conn, stored_in, timeout=120, poll=0.5):
    """Switch WAL and wait until the closed segment is stored in every repository.

    ``stored_in(name)``: the repositories (descriptions) that do NOT hold a valid copy of
    the segment yet; empty when it is everywhere. Returns the proof's facts.
    """
    started = time.monotonic()
    before = archiver_status(conn)
    name = switch_wal(conn)
    missing = None
    while True:
        missing = stored_in(name)
        if not missing:
            break
        if time.monotonic() - started > timeout:
            status = archiver_status(conn)
            failing = status["failed_count"] > before["failed_count"]
            raise IntegrityError(
                "WAL segment %s was not stored in %s within %d s"
                % (name, ", ".join(missing), timeout),
                (
                    "archive_command is failing (pg_stat_archiver: %d failures, last %s): read the "
                    "PostgreSQL log for the agent's error"
                    % (status["failed_count"], status["last_failed_wal"])
                    if failing
                    else "archive_command has not run for it: check archive_mode (a restart may be "
                    "pending) and archive_command in pg_settings"
                ),
            )
        time.sleep(poll)
    status = archiver_status(conn)
    return {
        "segment": name,
        "seconds": round(time.monotonic() - started, 3),
        "archiver": status,
    }


def connect(connection):
    """A psycopg2 connection (autocommit) or SourceError naming where it tried."""
    conn = connection.connect()
    try:
        conn.autocommit = True
    except Exception as exc:  # pragma: no cover - psycopg2 always allows it here
        conn.close()
        raise SourceError("cannot use the connection: %s" % exc) from exc
    return conn


def wal_record_key(cluster, name):
    """Where a segment's record lives below a repository root (PITR_DESIGN.md layout)."""
    return "wal/%s/%s/%s.json" % (cluster, name[:16], name)


def missing_from(repositories, cluster, name):
    """Descriptions of the repositories that do not hold the segment's record yet."""
    import os

    from . import s3 as s3util

    missing = []
    key = wal_record_key(cluster, name)
    for repo in repositories:
        if repo.kind == "local":
            if not os.path.isfile(os.path.join(repo.path, key)):
                missing.append(repo.path)
            continue
        full = s3util.join_key(repo.prefix, key)
        try:
            repo.client.head_object(Bucket=repo.bucket, Key=full)
        except Exception:  # 404 and unreachable alike: not (yet) provably stored there
            missing.append("s3://%s/%s" % (repo.bucket, full))
    return missing
