# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Append-only audit log of what was done to the PHI backups, by whom and when.

One JSON object per line (JSON lines), for example::

    {"action":"backup","database":"clinic_db","hash":"9c1e...","host":"db1",
     "outcome":"ok","pid":4242,"prev":"00...00","set_id":"20261122T010000Z-clinic_db-1a2b3c",
     "time":"2026-11-22T01:00:07.123456Z","tool_version":"0.1.0","uid":0,"user":"root"}

Every record carries the UTC time, the action (backup, verify, restore, restore_test,
retention, transfer), the outcome (ok, failed, refused, or skipped: a host agent run
that found the repository locked and did nothing), the host, the OS user (from
the effective uid, not from $USER; ``sudo_user`` too when run through sudo), the pid
and the tool version, plus the caller's fields (set_id, database, repository, target,
detail...). Caller fields go through redact() first: no password, passphrase, token or
key, and no password inside a URL or a conninfo string, ever reaches the file.

Writing: the file is opened with O_APPEND|O_NOFOLLOW (a symlink is refused), created
0600 in a directory created 0700 if missing; an existing file with any group or other
permission, or owned by another user than the caller or root, is refused. Each record
is written under an exclusive flock (the same lock every writer takes) with one
os.write, then fsynced: concurrent writers (cron backup, an Ansible restore) never
interleave or lose lines, and the chain below stays linear.

Tamper evidence: ``prev`` is the sha256 of the previous line (without its newline; 64
zeros on the first line) and ``hash`` the sha256 of the line's own canonical JSON
without the ``hash`` key. verify_chain() names the first line that does not parse,
whose ``hash`` does not match its content (an edited line), or whose ``prev`` does
not match the line before it (a line deleted or inserted before it). Limits, by
design of a keyless chain: someone able to write the file can rewrite the whole
chain from the edit on, and dropping lines at the end leaves a valid chain; ship the
lines (or the last ``hash``) off the host, e.g. to syslog, to anchor them.

Redaction (redact()): a field is masked when its name, lower-cased, contains
password, passwd, passphrase, pwd, secret, token, credential, private, cookie,
authorization, or the word ``key``/``keys`` (``access_key``, ``api_key``, ``key``).
Names that look sensitive but hold no secret and matter to an audit stay readable:
kms_key_id (which KMS key encrypted the objects: an id, not key material),
passphrase_file and passfile (paths, not contents), object_key and s3_key (S3
object names). Their values are still scanned like every string: a
``scheme://user:password@host`` URL keeps the user and loses the password, and the
value after any word containing password/passwd/passphrase/secret/token followed by
``=`` or ``:`` is masked (conninfo and query strings, ``PGPASSWORD=...``, a dict's
repr in an error message). Bytes are never written, only their length. Masking errs
on the side of hiding: an audit line that says less is acceptable, a leaked secret
is not.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import fcntl
import hashlib
import json
import os
import pwd
import re
import socket
import stat
import time

from .errors import ConfigError, StoreError
from .repository import fsync_dir, isoformat, make_private_dirs, utc_now
from .version import TOOL_VERSION

# "read": someone looked at the catalog (status, backup_info): access to the backups'
# metadata is logged like access to the backups themselves.
ACTIONS = (
    "backup",
    "verify",
    "restore",
    "restore_test",
    "retention",
    "transfer",
    "credentials",
    "read",
    # Server settings of continuous archiving and their proof (wal_archiving).
    "archiving",
)
OUTCOMES = ("ok", "failed", "refused", "skipped")
RESERVED = frozenset(
    (
        "time",
        "action",
        "outcome",
        "host",
        "user",
        "uid",
        "sudo_user",
        "pid",
        "tool_version",
        "prev",
        "hash",
    )
)
GENESIS = "0" * 64
MASK = "<redacted>"
SAFE_KEYS = frozenset(("kms_key_id", "passphrase_file", "passfile", "object_key", "s3_key"))
_SENSITIVE_KEY = re.compile(
    r"password|passwd|passphrase|pwd|secret|token|credential|private|cookie|authorization"
    r"|(?:^|[^a-z])keys?(?:$|[^a-z])|apikey|accesskey"
)
# scheme://user:password@host  ->  scheme://user:<redacted>@host. Up to the last "@"
# before the path, so an unescaped "@" in the password leaves no tail behind; failing
# that, up to the next "@", so an unescaped "/" does not hide the password from the
# pattern (a rare "http://host:80/x?a=b@c" then loses more than it needs to).
# Every pattern starts at a literal ("://" or a keyword), its runs stop at "/" or are
# bounded, and the atomic (?=(x))\N groups never backtrack: linear time on long
# messages, no regex denial of service (tests/unit/test_audit.py).
_URL_PASSWORD = re.compile(r"(://(?=([^/\s:@]*))\2):(?:[^/\s]*|[^\s@]{0,256})@")
# password=... / PGPASSWORD=... / aws_secret_access_key: ... / 'token': '...' in text
# (conninfo strings, query strings, environment dumps, reprs of dicts).
_ASSIGNED_SECRET = re.compile(
    r"((?:password|passwd|passphrase|secret|token)(?=(\w{0,64}))\2['\"]?\s*[=:]\s*)"
    r"('[^']*'|\"[^\"]*\"|[^&\s,;}]*)",
    re.IGNORECASE,
)
LOCK_TIMEOUT = 30.0
_READ_BLOCK = 8192


def _sensitive(name):
    lowered = name.lower()
    return lowered not in SAFE_KEYS and _SENSITIVE_KEY.search(lowered) is not None


def redact_text(text):
    """``text`` without URL passwords and ``password=...`` values."""
    text = _URL_PASSWORD.sub(r"\1:%s@" % MASK, text)
    return _ASSIGNED_SECRET.sub(r"\1%s" % MASK, text)


def redact(fields):
    """A copy of ``fields`` safe to write: secrets masked (see the module docstring).

    Nested dicts and lists are redacted too; values that are not JSON types are
    written as their str() (bytes only as their length).
    """
    return {str(key): _redact_value(str(key), value) for key, value in fields.items()}


def _redact_value(name, value):
    if name is not None and _sensitive(name):
        return MASK if value not in (None, "") else value
    if isinstance(value, dict):
        return redact(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_redact_value(None, item) for item in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "<%d bytes>" % len(value)
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact_text(str(value))


def _canonical(record):
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _digest(data):
    return hashlib.sha256(data).hexdigest()


def _identity():
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    identity = {"user": user, "uid": uid}
    if os.environ.get("SUDO_USER"):
        identity["sudo_user"] = os.environ["SUDO_USER"]
    return identity


class AuditLog(object):
    """An append-only, hash-chained JSON-lines audit log at ``path`` (absolute)."""

    def __init__(self, path, lock_timeout=LOCK_TIMEOUT):
        if not path or not os.path.isabs(path):
            raise ConfigError(
                "audit log path %r must be absolute" % (path,),
                "e.g. /var/log/clinic-backup/audit.log",
            )
        self.path = os.path.normpath(path)
        self.lock_timeout = lock_timeout

    def record(self, action, outcome, **fields):
        """Append one record; return it as written (a dict).

        ``fields`` are the caller's (set_id, database, repository, target, detail...),
        redacted before anything is written; the names the log sets itself (RESERVED:
        time, host, user, pid...) raise ValueError, so a database login goes in
        ``login_user``, a database server in ``db_host``. Raises ConfigError for a
        refused file and StoreError when the line could not be written and fsynced.
        """
        if action not in ACTIONS:
            raise ValueError("unknown audit action %r (one of %s)" % (action, ", ".join(ACTIONS)))
        if outcome not in OUTCOMES:
            raise ValueError(
                "unknown audit outcome %r (one of %s)" % (outcome, ", ".join(OUTCOMES))
            )
        clash = sorted(RESERVED.intersection(fields))
        if clash:
            raise ValueError("audit fields %s are set by the log itself" % ", ".join(clash))
        record = redact(fields)
        record.update(_identity())
        record.update(
            action=action,
            outcome=outcome,
            host=socket.gethostname(),
            pid=os.getpid(),
            tool_version=TOOL_VERSION,
        )
        fd = self._open()
        try:
            self._lock(fd)
            # Stamped under the lock: times never go backwards down the file.
            record["time"] = isoformat(utc_now())
            last, terminated = _last_line(fd)
            record["prev"] = GENESIS if last is None else _digest(last)
            record["hash"] = _digest(_canonical(record).encode("ascii"))
            line = _canonical(record).encode("ascii") + b"\n"
            if not terminated:
                # A torn line (a crash mid-write): end it, so it stays one bad line.
                line = b"\n" + line
            _write_all(fd, line, self.path)
            os.fsync(fd)
        except OSError as exc:
            raise _store_error("write", self.path, exc) from exc
        finally:
            os.close(fd)  # also releases the flock
        return record

    def _open(self):
        directory = os.path.dirname(self.path)
        created_dirs = make_private_dirs(directory, "audit log directory")
        flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        created = False
        try:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
                fd = os.open(self.path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP or os.path.islink(self.path):
                raise ConfigError(
                    "audit log %s is a symlink" % self.path,
                    "point the audit log at a regular file, not a link",
                ) from exc
            if exc.errno == errno.EISDIR:
                raise ConfigError(
                    "audit log %s is a directory" % self.path,
                    "give the path of a file inside it, e.g. %s"
                    % os.path.join(self.path, "audit.log"),
                ) from exc
            raise _store_error("open", self.path, exc) from exc
        try:
            _check_private(fd, self.path)
            if created or created_dirs:
                fsync_dir(directory)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _lock(self, fd):
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            if time.monotonic() >= deadline:
                raise StoreError(
                    "audit log %s stayed locked for %.0f seconds" % (self.path, self.lock_timeout),
                    "another process holds it: find it with fuser %s" % self.path,
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _check_private(fd, path):
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError("audit log %s is not a regular file" % path)
    if info.st_mode & 0o077:
        raise ConfigError(
            "audit log %s has loose permissions %s" % (path, oct(stat.S_IMODE(info.st_mode))),
            "it names patients' backup sets and who touched them: run chmod 0600 %s" % path,
        )
    if info.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            "audit log %s is owned by uid %d, not by this user or root" % (path, info.st_uid),
            "chown it to the user that runs the backups",
        )


def _store_error(action, path, exc):
    hint = None
    if exc.errno == errno.ENOSPC:
        hint = "the filesystem holding the audit log is full"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = "the backup user cannot write there: fix ownership or permissions"
    return StoreError("cannot %s audit log %s: %s" % (action, path, exc.strerror or exc), hint)


def _write_all(fd, data, path):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise StoreError("cannot write audit log %s: short write" % path)
        view = view[written:]


def _last_line(fd):
    """(last line without its newline, whether the file ends with a newline); (None, True) if empty."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None, True
    data = b""
    position = size
    while position > 0:
        step = min(_READ_BLOCK, position)
        position -= step
        data = os.pread(fd, step, position) + data
        cut = data.rfind(b"\n", 0, len(data) - 1)
        if cut >= 0:
            data = data[cut + 1 :]
            break
    if data.endswith(b"\n"):
        return data[:-1], True
    return data, False


def check_line(line, prev_line):
    """None if ``line`` (bytes, no newline) is a sound record following ``prev_line``, else why not."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "not a JSON record"
    if not isinstance(record, dict):
        return "not a JSON object"
    claimed = record.pop("hash", None)
    if claimed != _digest(_canonical(record).encode("ascii")):
        return "content does not match its hash (edited)"
    expected = GENESIS if prev_line is None else _digest(prev_line)
    if record.get("prev") != expected:
        return "prev does not match the line before (a line was removed or inserted)"
    return None


def verify_chain(path):
    """(True, None) if every line of the audit log is intact and chained, else (False, n).

    ``n`` is the 1-based number of the first bad line: one that does not parse, was
    edited, or does not follow the line before it (see check_line). An empty log is
    intact; a missing one raises ConfigError.
    """
    with _open_log(path) as handle:
        previous = None
        for number, line in _lines(handle):
            if check_line(line, previous) is not None:
                return False, number
            previous = line
    return True, None


def _open_log(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError(
            "cannot open audit log %s: %s" % (path, exc.strerror),
            "give the path of an existing audit log (symlinks are refused)",
        ) from exc
    return os.fdopen(fd, "rb")


def _lines(handle):
    """(1-based number, line without its newline) of every line."""
    for number, raw in enumerate(handle, 1):
        yield number, raw[:-1] if raw.endswith(b"\n") else raw


def log_evidence(path):
    """What the audit log proves, for a status or a compliance report: whether it is
    intact (verify_chain's rule, one pass), how many records of each action it holds and
    the times of its first and last record. A missing log is ``{"present": False}``;
    an unreadable one raises ConfigError as verify_chain does."""
    if not os.path.lexists(path):
        return {"path": path, "present": False}
    actions, first_at, last_at, records, first_bad = {}, None, None, 0, None
    with _open_log(path) as handle:
        previous = None
        for number, line in _lines(handle):
            if first_bad is None and check_line(line, previous) is not None:
                first_bad = number
            previous = line
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if not isinstance(record, dict):
                continue
            records += 1
            action = str(record.get("action"))
            actions[action] = actions.get(action, 0) + 1
            moment = record.get("time")
            if isinstance(moment, str):
                first_at = first_at or moment
                last_at = moment
    return {
        "path": path,
        "present": True,
        "intact": first_bad is None,
        "first_bad_line": first_bad,
        "records": records,
        "actions": actions,
        "first_at": first_at,
        "last_at": last_at,
    }
