# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Set PostgreSQL role passwords after a restore, without the password ever
leaving this process in clear.

Backups taken as a non-superuser hold no role passwords, and after ransomware
every password must change anyway. The password is turned into a SCRAM-SHA-256
verifier here (what psql's ``\\password`` does) and only the verifier is sent in
``ALTER ROLE ... PASSWORD``: the server, its statement log and any proxy see a
salted hash, never the password. When the current verifier can be read (as a
superuser), a role whose password already matches is left alone, so a second
run changes nothing.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import hashlib
import hmac
import os

from .errors import ConfigError, SourceError

SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
SALT_BYTES = 16


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def scram_verifier(password, salt=None, iterations=SCRAM_ITERATIONS):
    """The ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` string PostgreSQL stores."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return "SCRAM-SHA-256$%d:%s$%s:%s" % (
        iterations,
        _b64(salt),
        _b64(stored_key),
        _b64(server_key),
    )


def verifier_matches(password, stored):
    """Whether ``stored`` (pg_authid.rolpassword) is a SCRAM verifier of ``password``."""
    try:
        method, params, keys = stored.split("$")
        iterations, salt = params.split(":")
        if method != "SCRAM-SHA-256":
            return False
        expected = scram_verifier(password, base64.b64decode(salt), int(iterations))
    except (AttributeError, ValueError, TypeError):
        return False
    return hmac.compare_digest(expected.split("$")[2], keys)


def check_roles(roles):
    """Validate ``[{name, password}]``; raise ConfigError naming the entry (never the password)."""
    if not roles:
        raise ConfigError("no roles given", "list the roles with their new passwords")
    seen = set()
    for index, role in enumerate(roles):
        name = role.get("name") if isinstance(role, dict) else None
        password = role.get("password") if isinstance(role, dict) else None
        if not name or not isinstance(name, str):
            raise ConfigError("roles entry %d has no name" % (index + 1))
        if name in seen:
            raise ConfigError("role %r is listed twice" % name)
        seen.add(name)
        if not password or not isinstance(password, str):
            raise ConfigError("role %r has an empty password" % name, "set it from Ansible Vault")
        if len(password) < 12:
            raise ConfigError(
                "the password for role %r is shorter than 12 characters" % name,
                "use a generated password (e.g. openssl rand -base64 24)",
            )
        if not password.isascii() or any(ord(ch) < 32 for ch in password):
            # PostgreSQL runs SASLprep over non-ASCII passwords before hashing; a verifier
            # computed without it would not match what clients send.
            raise ConfigError(
                "the password for role %r holds non-ASCII or control characters" % name,
                "use printable ASCII (generated passwords are)",
            )


def set_passwords(connection, roles, check_mode=False):
    """Give each role its password; returns {changed, roles: [{name, changed}]}.

    ``connection``: PgConnection to any database of the server, as a superuser or a role
    with CREATEROLE. A role that does not exist fails the whole call before any change.
    """
    check_roles(roles)
    import psycopg2
    from psycopg2 import sql

    conn = connection.connect()
    try:
        cur = conn.cursor()
        names = [role["name"] for role in roles]
        cur.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (names,))
        existing = {row[0] for row in cur.fetchall()}
        missing = [name for name in names if name not in existing]
        if missing:
            raise ConfigError(
                "role(s) %s do not exist on %s" % (", ".join(missing), connection.describe()),
                "restore the set's globals (include_globals) or create the roles first",
            )
        current = {}
        cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if cur.fetchone()[0]:
            cur.execute(
                "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)", (names,)
            )
            current = dict(cur.fetchall())
        report = []
        for role in roles:
            same = verifier_matches(role["password"], current.get(role["name"]))
            report.append({"name": role["name"], "changed": not same})
            if same or check_mode:
                continue
            # Client-side interpolation of a literal: the verifier, never the password.
            cur.execute(
                sql.SQL("ALTER ROLE {} PASSWORD %s").format(sql.Identifier(role["name"])),
                (scram_verifier(role["password"]),),
            )
        conn.commit()
    except psycopg2.Error as exc:
        conn.rollback()
        raise SourceError(
            "setting role passwords failed: %s" % " ".join(str(exc).split()),
            "connect as a superuser or a role with CREATEROLE",
        ) from exc
    finally:
        conn.close()
    return {"changed": any(r["changed"] for r in report), "roles": report}
