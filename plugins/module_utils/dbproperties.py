# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The database's own privileges and properties, carried over to a restored database.

pg_dump (custom and directory formats) stores the database's ACL (``REVOKE CONNECT ...
FROM PUBLIC``, ``GRANT CONNECT ... TO role``), its COMMENT, owner and ``ALTER DATABASE
... SET`` / ``ALTER ROLE ... IN DATABASE ... SET`` settings as TOC entries that
pg_restore only emits with ``--create``. A restore runs without ``--create`` (into a
work database renamed to the target afterwards), so they are read here separately:
``pg_restore --list --create`` finds the entries, ``pg_restore --create -L <those> -f -``
prints their SQL, and every identifier that follows the keyword DATABASE (the source
database's name, quoted or not) is replaced by the work database's name, quoted.
The SQL is tokenized (string literals, quoted identifiers, comments), never edited as
text: a setting value or a comment that holds the database's name stays as it was.

A plain-format set (``pg_dump -Fp`` without ``--create``) holds none of these
statements: nothing can be carried over from it.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re
import subprocess
import tempfile

# The TOC entries that belong to the database itself (pg_restore --list --create).
_ENTRY = re.compile(
    r"^\d+; \d+ \d+ (?:DATABASE|DATABASE PROPERTIES|COMMENT - DATABASE|ACL - DATABASE) "
)
_SECTION = re.compile(r"^-- Name: .*; Type: ([A-Z ]+); Schema: ")
_KEEP_SECTIONS = ("DATABASE", "COMMENT", "DATABASE PROPERTIES", "ACL")
_TOKEN = re.compile(
    r"""(?P<space>\s+)
      |(?P<comment>--[^\n]*)
      |(?P<literal>[Ee]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*')
      |(?P<quoted>"(?:[^"]|"")*")
      |(?P<word>[A-Za-z_\x80-\uffff][A-Za-z0-9_$\x80-\uffff]*)
      |(?P<semicolon>;)
      |(?P<other>[^\s;'"\\A-Za-z_]+)
    """,
    re.VERBOSE | re.DOTALL,
)
# What pg_restore reads of a custom-format stream to find these entries: the TOC
# comes first; a larger one is reported as not found rather than held in memory.
TOC_PREFIX_LIMIT = 16 * 1024 * 1024


def quote_ident(name):
    """PostgreSQL identifier quoting, always quoted (valid for any name)."""
    return '"' + name.replace('"', '""') + '"'


def _ident_value(token, kind):
    if kind == "quoted":
        return token[1:-1].replace('""', '"')
    return token.lower()  # an unquoted identifier folds to lower case


def _statements(text):
    """Split SQL text into statements of (kind, token) lists; raise ValueError on
    anything pg_dump would not write here (a backslash outside a literal)."""
    statements, current, pos = [], [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError("unexpected character %r at offset %d" % (text[pos], pos))
        pos = match.end()
        kind = match.lastgroup
        if kind in ("space", "comment"):
            if current:
                current.append(("space", " "))
            continue
        if kind == "semicolon":
            if current:
                statements.append(current)
            current = []
            continue
        current.append((kind, match.group(kind)))
    if any(kind != "space" for kind, _token in current):
        raise ValueError("an unterminated statement")
    return statements


def rewrite(sql_text, source, target):
    """The statements of ``sql_text`` with the database ``source`` renamed ``target``.

    Returns (statements, problems): each identifier right after the keyword DATABASE
    must name ``source``; a statement naming any other database is left out and
    named in ``problems``."""
    out, problems = [], []
    for statement in _statements(sql_text):
        tokens = list(statement)
        words = [i for i, (kind, _t) in enumerate(tokens) if kind != "space"]
        wrong = None
        for pos, index in enumerate(words[:-1]):
            kind, token = tokens[index]
            if kind == "word" and token.upper() == "DATABASE":
                name_index = words[pos + 1]
                name_kind, name = tokens[name_index]
                if name_kind not in ("word", "quoted") or _ident_value(name, name_kind) != source:
                    wrong = name
                    break
                tokens[name_index] = ("quoted", quote_ident(target))
        text = "".join(token for _kind, token in tokens).strip()
        if wrong is not None:
            problems.append("a statement names database %s, not %s: %s" % (wrong, source, text))
            continue
        if not _database_level(tokens, words):
            problems.append("not a statement about the database itself, left out: %s" % text)
            continue
        out.append(text + ";")
    return out, problems


def _database_level(tokens, words):
    """Whether a statement is one of those pg_dump writes for a database's own entries:
    GRANT/REVOKE ... ON DATABASE, ALTER DATABASE, ALTER ROLE ... IN DATABASE,
    COMMENT/SECURITY LABEL ON DATABASE. Anything else in those entries was not written
    by pg_dump and is never run."""
    upper = [tokens[i][1].upper() if tokens[i][0] == "word" else None for i in words]
    if "DATABASE" not in upper[:-1]:
        return False
    first = upper[0]
    if first in ("GRANT", "REVOKE", "COMMENT", "SECURITY"):
        at = upper.index("DATABASE")
        return at > 0 and upper[at - 1] == "ON"
    if first == "ALTER" and len(upper) > 2:
        if upper[1] == "DATABASE":
            # SET/RESET a setting or OWNER TO; never RENAME, tablespace or the like.
            return len(upper) > 3 and upper[3] in ("SET", "RESET", "OWNER")
        return (
            upper[1] in ("ROLE", "USER")
            and "IN" in upper
            and upper.index("IN") + 1 < len(upper)
            and upper[upper.index("IN") + 1] == "DATABASE"
        )
    return False


def database_sql(pg_restore, archive, source, target, with_owner):
    """The database-level statements of a custom/directory archive, for ``target``.

    ``archive``: bytes (the start of a custom-format stream) or a directory path.
    ``with_owner``: keep ``ALTER DATABASE ... OWNER TO`` (not when the restore sets
    its own owner or was asked for no owners). Returns (statements, problems)."""
    stdin = archive if isinstance(archive, bytes) else None
    path = [] if stdin is not None else [archive]
    env = dict(os.environ, LC_ALL="C")

    def run_pg_restore(*options):
        return subprocess.run(
            [pg_restore, "--create", *options] + path,
            input=stdin,
            capture_output=True,
            env=env,
            check=False,
        )

    listing = run_pg_restore("--list")
    if listing.returncode != 0:
        detail = listing.stderr.decode("utf-8", "replace").strip()
        return [], ["pg_restore --list could not read the archive's TOC: %s" % detail]
    entries = [
        line
        for line in listing.stdout.decode("utf-8", "replace").splitlines()
        if _ENTRY.match(line)
    ]
    if not entries:
        return [], []
    # Only TOC ids and names in this list, no data: a private temporary file.
    with tempfile.NamedTemporaryFile("w", prefix="clinic-toc-", suffix=".list") as listfile:
        listfile.write("\n".join(entries) + "\n")
        listfile.flush()
        script = run_pg_restore("--use-list=" + listfile.name, "--file=-")
    if script.returncode != 0:
        detail = script.stderr.decode("utf-8", "replace").strip()
        return [], ["pg_restore could not print the database's properties: %s" % detail]
    try:
        return rewrite(kept_sections(script.stdout.decode("utf-8"), with_owner), source, target)
    except ValueError as exc:
        return [], ["the database's properties are not SQL pg_dump writes (%s)" % exc]


def kept_sections(text, with_owner):
    """The SQL of the database-level sections, without CREATE DATABASE and without
    pg_restore's own psql lines (\\connect, \\restrict, \\encoding)."""
    kept, section = [], None
    for line in text.splitlines(True):
        header = _SECTION.match(line)
        if header:
            section = header.group(1)
            continue
        if line.startswith("\\"):
            section = None  # pg_restore's reconnect: the next header opens a section
            continue
        if section in _KEEP_SECTIONS:
            kept.append(line)
    return _drop_create("".join(kept), with_owner)


def _drop_create(text, with_owner):
    """Leave out CREATE DATABASE (the work database exists) and, unless asked, the
    owner; done on statements so that a literal can never be cut."""
    parts = []
    for statement in _statements(text):
        words = [t.upper() for kind, t in statement if kind == "word"][:4]
        if words[:2] == ["CREATE", "DATABASE"]:
            continue
        if words[:2] == ["ALTER", "DATABASE"] and "OWNER" in words and not with_owner:
            continue
        parts.append("".join(t for _k, t in statement).strip() + ";\n")
    return "".join(parts)
