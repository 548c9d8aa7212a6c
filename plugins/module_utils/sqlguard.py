# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Plain SQL scripts reach psql only in restricted mode.

psql runs its backslash meta-commands (``\\!`` runs a shell command, ``\\o`` writes
files, ``\\copy`` reads them) from any script it is given, and a plain-format dump or
the globals script is data read back from storage: someone who can write to the
repository could put a meta-command in it. Since PostgreSQL 13.22 / 14.19 / 15.14 /
16.10 / 17.6, ``\\restrict KEY`` makes psql refuse every meta-command until
``\\unrestrict KEY``. ``MetaCommandGuard`` opens every script with a ``\\restrict``
of its own random key, which the script cannot know, and removes pg_dump's own
``\\restrict``/``\\unrestrict`` lines (psql would refuse a second ``\\restrict``). So
psql itself refuses any meta-command a script holds, wherever it hides; the guard
also names the first one it sees outside COPY data, so a planted script is reported
as such. The MAC on the manifest stays the primary guard: this one holds even for a
set written before manifests were sealed.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re
import subprocess

from .errors import ConfigError
from .pipeline import StdinFeeder

# pg_dump's own lines: "\restrict <key>" at the top, "\unrestrict <key>" at the end.
_OWN_RESTRICT = re.compile(rb"^\\(?:un)?restrict [A-Za-z0-9]+\r?$")
_COPY_FROM_STDIN = re.compile(rb"^COPY .* FROM stdin;\r?$")
_END_OF_COPY = re.compile(rb"^\\\.\r?$")
# Versions whose psql knows \restrict, by major version (the minor release that added it).
RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}
MAX_LINE = 64 * 1024 * 1024
# What psql (run with LC_ALL=C) says when restricted mode refuses a meta-command.
RESTRICTED_REFUSAL = "backslash commands are restricted"


def psql_version(psql):
    """(major, minor) of a psql binary."""
    out = subprocess.run(
        [psql, "--version"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False
    ).stdout.decode("ascii", "replace")
    match = re.search(r"(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_psql_restricts(psql):
    """Raise ConfigError unless ``psql`` supports \\restrict."""
    major, minor = psql_version(psql)
    if major < 13 or (major in RESTRICT_SINCE and minor < RESTRICT_SINCE[major]):
        raise ConfigError(
            "%s (%d.%d) cannot run a script in restricted mode (\\restrict)" % (psql, major, minor),
            "update the PostgreSQL client packages (13.22, 14.19, 15.14, 16.10, 17.6 or newer): "
            "plain SQL scripts are only ever replayed with meta-commands refused",
        )


class MetaCommandGuard(object):
    """A line filter in front of psql's stdin (see the module docstring).

    ``__call__(chunk)`` returns the bytes to hand psql; ``found`` names the first
    meta-command met outside COPY data (None if none).
    """

    def __init__(self):
        self.key = os.urandom(24).hex()
        self.found = None
        self._line = 0
        self._pending = b""
        self._in_copy = False
        self._started = False
        self._lexer = SqlLexer()

    def __call__(self, chunk):
        out = []
        if not self._started:
            self._started = True
            out.append(b"\\restrict " + self.key.encode("ascii") + b"\n")
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > MAX_LINE:
            # A line this long is no dump's; pass it on (psql stays restricted) unjudged.
            out.append(self._pending)
            self._pending = b""
        for line in lines:
            kept = self._judge(line)
            if kept is not None:
                out.append(kept + b"\n")
        return b"".join(out)

    def flush(self):
        """The last, unterminated line (if any)."""
        line, self._pending = self._pending, b""
        if not line:
            return b"" if self._started else self(b"")
        kept = self._judge(line)
        return kept or b""

    def _judge(self, line):
        self._line += 1
        if self._in_copy:
            if _END_OF_COPY.match(line):
                self._in_copy = False
            return line
        if self._lexer.state == _SQL and _OWN_RESTRICT.match(line):
            return None
        if self._lexer.state == _SQL and _COPY_FROM_STDIN.match(line):
            self._in_copy = True
            return line
        at = self._lexer.feed(line)
        if at is not None and self.found is None:
            self.found = "line %d: %s" % (
                self._line,
                line[at : at + 40].strip().decode("utf-8", "replace"),
            )
        return line


# Lexer states: plain SQL, a '...' string, an E'...' string, a "..." identifier, a
# $tag$...$tag$ string, a /* ... */ comment.
_SQL, _QUOTE, _ESCAPED_QUOTE, _IDENT, _DOLLAR, _COMMENT = range(6)
_SQL_STOPS = re.compile(rb"[\\'\"$/-]")
_DOLLAR_TAG = re.compile(rb"\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_IDENT_CHAR = re.compile(rb"[A-Za-z0-9_$\x80-\xff]")
_COMMENT_STOPS = re.compile(rb"/\*|\*/")


class SqlLexer(object):
    """Just enough of psql's lexer to tell where a backslash starts a meta-command: not
    inside quotes, identifiers, dollar quotes or comments (strings may span lines)."""

    def __init__(self):
        self.state = _SQL
        self._tag = b""
        self._depth = 0

    def feed(self, line):
        """Consume one line (without its newline); the offset of the first backslash
        that psql would read as a meta-command, or None."""
        pos, end = 0, len(line)
        while pos < end:
            state = self.state
            if state == _SQL:
                match = _SQL_STOPS.search(line, pos)
                if match is None:
                    return None
                pos, char = match.start(), line[match.start() : match.start() + 1]
                if char == b"\\":
                    return pos
                if char == b"'":
                    before = line[pos - 1 : pos]
                    extended = before in (b"e", b"E") and not _IDENT_CHAR.match(
                        line[pos - 2 : pos - 1] or b" "
                    )
                    self.state = _ESCAPED_QUOTE if extended else _QUOTE
                    pos += 1
                elif char == b'"':
                    self.state = _IDENT
                    pos += 1
                elif char == b"$":
                    tag = _DOLLAR_TAG.match(line, pos)
                    if tag and not (pos and _IDENT_CHAR.match(line[pos - 1 : pos])):
                        self.state, self._tag = _DOLLAR, tag.group(0)
                        pos = tag.end()
                    else:
                        pos += 1
                elif line.startswith(b"--", pos):
                    return None  # the rest of the line is a comment
                elif line.startswith(b"/*", pos):
                    self.state, self._depth = _COMMENT, 1
                    pos += 2
                else:
                    pos += 1
            elif state in (_QUOTE, _IDENT):
                quote = b"'" if state == _QUOTE else b'"'
                found = line.find(quote, pos)
                if found < 0:
                    return None
                if line[found + 1 : found + 2] == quote:
                    pos = found + 2  # a doubled quote stays inside
                else:
                    self.state, pos = _SQL, found + 1
            elif state == _ESCAPED_QUOTE:
                quote, escape = line.find(b"'", pos), line.find(b"\\", pos)
                if quote < 0 and escape < 0:
                    return None
                if escape >= 0 and (quote < 0 or escape < quote):
                    pos = escape + 2  # the escaped character, whatever it is
                elif line[quote + 1 : quote + 2] == b"'":
                    pos = quote + 2
                else:
                    self.state, pos = _SQL, quote + 1
            elif state == _DOLLAR:
                found = line.find(self._tag, pos)
                if found < 0:
                    return None
                self.state, pos = _SQL, found + len(self._tag)
            else:
                match = _COMMENT_STOPS.search(line, pos)
                if match is None:
                    return None
                self._depth += 1 if match.group(0) == b"/*" else -1
                pos = match.end()
                if self._depth == 0:
                    self.state = _SQL
        return None


# SQLSTATE classes that are not errors: successful completion, warning, no data.
_NOT_ERROR_CLASSES = ("00", "01", "02")
DUPLICATE_OBJECT = "42710"
# "psql:<stdin>:12: ERROR:  42710: role "x" already exists" with VERBOSITY=verbose; the
# severity word is translated by the server's lc_messages, the SQLSTATE never is.
_VERBOSE_MESSAGE = re.compile(r"^(?:psql:[^:]*:\d+: )?[^\s:]+:\s+([0-9A-Z]{5}): (.*)$")


def server_errors(stderr_text):
    """[(sqlstate, message)] of the server errors psql printed with VERBOSITY=verbose."""
    errors = []
    for line in stderr_text.splitlines():
        match = _VERBOSE_MESSAGE.match(line)
        if match and match.group(1)[:2] not in _NOT_ERROR_CLASSES:
            errors.append((match.group(1), match.group(2).strip()))
    return errors


class PsqlFeeder(StdinFeeder):
    """Stream consumer running ``argv`` (psql reading a script on stdin) behind a
    MetaCommandGuard. ``finish`` waits and returns (exit code, stderr text)."""

    def __init__(self, argv, env):
        self.guard = MetaCommandGuard()
        super(PsqlFeeder, self).__init__(list(argv) + ["--set=VERBOSITY=verbose"], env)

    def __call__(self, chunk):
        self._send(self.guard(chunk))

    def finish(self):
        self._send(self.guard.flush())
        return super(PsqlFeeder, self).finish()
