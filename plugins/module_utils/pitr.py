# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Point-in-time recovery: a base backup plus archived WAL, replayed to a moment.

``recover()`` runs the whole restore into a NEW data directory on a given port:

1. refuse bad input before anything changes (target, empty data dir, free port; the
   running cluster is only ever replaced with an explicit confirmation, and then
   kept aside as ``<data_dir>.pre_pitr_<time>``);
2. the newest base backup that stopped before the target is extracted into the data
   directory (``basebackup.restore_base_backup``, passed in as ``base_restore``);
3. ``recovery.signal`` and the recovery settings (``restore_command`` through the
   agent's ``wal-fetch``, ``recovery_target_*``, ``recovery_target_action = 'promote'``,
   ``recovery_target_timeline = 'latest'``, the port) are written;
4. the server is started as the cluster's OS user and watched until it has promoted
   (``pg_controldata`` says "in production"), failed, or timed out;
5. the point actually reached is read from the server log (``recovery stopping
   before commit of transaction ..., time ...``) and ``pg_last_xact_replay_timestamp()``;
   every database is connected to and every table counted (each must be readable);
6. the measured RTO (wall time of 2-5) and RPO (end of the run minus the point reached:
   everything after it is not in the new cluster) are returned.

A failed recovery stops the server it started and moves the data directory aside as
``<data_dir>.failed_<time>`` (kept for diagnosis, never taken for a restored cluster).
The engine never imports Ansible.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import json
import os
import pwd
import re
import shlex
import socket
import subprocess
import time

from .errors import BackupError, ConfigError, IntegrityError, SourceError
from .repository import atomic_write, isoformat, utc_now
from .restore import parse_moment

TARGET_KINDS = ("time", "lsn", "name", "latest")
LSN_PATTERN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
RESTORE_POINT_LIMIT = 63  # MAXFNAMELEN - 1: pg_create_restore_point()'s longest name
DEFAULT_TIMEOUT = 6 * 3600
POLL_SECONDS = 0.25
RECOVERY_LOG = "clinic-pitr-recovery.log"
ROLLBACK_LOG = "clinic-pitr-rollback.log"
# Settings every recovery writes; a second run's lines must not be mistaken for ours.
RECOVERY_KEYS = (
    "restore_command",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_xid",
    "recovery_target_inclusive",
    "recovery_target_action",
    "recovery_target_timeline",
)
# Settings the first start needs whatever the cluster's own configuration says: the
# recovery messages are read from this log in English, so it must be ours and untranslated.
START_OPTIONS = "-c lc_messages=C -c logging_collector=off -c log_min_messages=warning"


class RecoveryTarget(object):
    """Where replay stops: ``kind`` in TARGET_KINDS, ``value`` as PostgreSQL takes it."""

    def __init__(self, kind, value=None, moment=None, inclusive=True):
        self.kind = kind
        self.value = value
        self.moment = moment  # UTC datetime for kind "time"
        self.inclusive = inclusive

    def describe(self):
        if self.kind == "latest":
            return "the end of the archived WAL (latest)"
        if self.kind == "name":
            return "restore point %r" % self.value
        return "%s %s (%s)" % (
            self.kind,
            self.value,
            "inclusive" if self.inclusive else "exclusive",
        )

    def as_dict(self):
        return {"kind": self.kind, "value": self.value, "inclusive": self.inclusive}


def plan_recovery(target, inclusive=True):
    """A RecoveryTarget from ``{"time": ISO 8601}``, ``{"lsn": "0/1234"}``,
    ``{"name": restore point}`` or ``"latest"``; ConfigError for anything else."""
    if target == "latest" or target == {"latest": True}:
        return RecoveryTarget("latest", inclusive=True)
    if not isinstance(target, dict) or len([k for k, v in target.items() if v]) != 1:
        raise ConfigError(
            "the recovery target must be exactly one of time, lsn, name or latest (got %r)"
            % (target,),
            'e.g. {"time": "2026-12-03T14:31:00Z"}, {"lsn": "0/3000060"}, '
            '{"name": "before_migration"} or "latest"',
        )
    kind, value = [(k, v) for k, v in target.items() if v][0]
    if kind == "latest":
        return RecoveryTarget("latest", inclusive=True)
    if kind not in TARGET_KINDS:
        raise ConfigError(
            "unknown recovery target kind %r" % (kind,), "use one of: %s" % ", ".join(TARGET_KINDS)
        )
    if not isinstance(value, str):
        raise ConfigError("the recovery target %s must be a string (got %r)" % (kind, value))
    value = value.strip()
    if kind == "time":
        moment = parse_moment(value, "recovery target time")
        if moment > utc_now() + datetime.timedelta(seconds=5):
            raise ConfigError(
                "recovery target time %s is in the future" % value,
                'to replay everything archived, use target "latest"',
            )
        # The server reads this in its own time zone when none is given: always say UTC.
        text = moment.strftime("%Y-%m-%d %H:%M:%S.%f+00")
        return RecoveryTarget("time", text, moment=moment, inclusive=bool(inclusive))
    if kind == "lsn":
        if not LSN_PATTERN.match(value):
            raise ConfigError(
                "recovery target LSN %r is not an LSN" % value,
                "give it as pg_current_wal_lsn() shows it, e.g. 0/3000060",
            )
        return RecoveryTarget("lsn", value.upper(), inclusive=bool(inclusive))
    if not value or "\0" in value or len(value.encode("utf-8")) > RESTORE_POINT_LIMIT:
        raise ConfigError(
            "restore point name %r is empty, too long or holds a NUL byte" % value,
            "give the name passed to pg_create_restore_point() (at most 63 bytes)",
        )
    return RecoveryTarget("name", value, inclusive=True)


def lsn_to_int(lsn):
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def conf_literal(value):
    """A postgresql.conf string value: single quotes doubled, no newline or NUL."""
    text = str(value)
    if "\n" in text or "\r" in text or "\0" in text:
        raise ConfigError("setting value %r holds a line break or NUL byte" % text)
    return "'%s'" % text.replace("\\", "\\\\").replace("'", "''")


def restore_command(agent_bin, agent_config):
    """The restore_command calling the agent. PostgreSQL runs it through /bin/sh, so the
    paths are shell-quoted; %f and %p are PostgreSQL's (file name, destination)."""
    for what, path in (("agent_bin", agent_bin), ("agent_config", agent_config)):
        if not path or not os.path.isabs(path):
            raise ConfigError(
                "%s must be an absolute path (got %r)" % (what, path),
                "PostgreSQL runs restore_command from the data directory",
            )
        if "%" in path:
            raise ConfigError(
                "%s %r holds a %%, which PostgreSQL would expand" % (what, path),
                "install the agent and its config under paths without %",
            )
    return "%s wal-fetch --config %s %%f %%p" % (shlex.quote(agent_bin), shlex.quote(agent_config))


def recovery_settings(target, command, port, settings=None, archive=False):
    """(name, literal) pairs appended to postgresql.auto.conf, in order."""
    lines = [("restore_command", conf_literal(command))]
    if target.kind == "time":
        lines.append(("recovery_target_time", conf_literal(target.value)))
    elif target.kind == "lsn":
        lines.append(("recovery_target_lsn", conf_literal(target.value)))
    elif target.kind == "name":
        lines.append(("recovery_target_name", conf_literal(target.value)))
    if target.kind in ("time", "lsn"):
        lines.append(("recovery_target_inclusive", "on" if target.inclusive else "off"))
    if target.kind != "latest":
        lines.append(("recovery_target_action", "'promote'"))
    lines.append(("recovery_target_timeline", "'latest'"))
    lines.append(("port", str(int(port))))
    if not archive:
        # The new cluster must not push its own timeline into the repository it was
        # restored from (a rehearsal would otherwise mix with production's WAL); apply
        # the pg_wal_archiving role to it once it is accepted.
        lines.append(("archive_mode", "'off'"))
    for name, value in sorted((settings or {}).items()):
        if not re.match(r"^[a-z_][a-z0-9_.]*$", name):
            raise ConfigError("setting name %r is not a PostgreSQL setting name" % name)
        lines.append((name, conf_literal(value)))
    return lines


def write_recovery_config(data_dir, lines, owner=None):
    """Append ``lines`` to postgresql.auto.conf and create recovery.signal (atomically)."""
    auto = os.path.join(data_dir, "postgresql.auto.conf")
    try:
        with open(auto, "rb") as handle:
            existing = handle.read().decode("utf-8")
    except FileNotFoundError:
        existing = "# Do not edit this file manually!\n"
    if existing and not existing.endswith("\n"):
        existing += "\n"
    added = "".join("%s = %s\n" % pair for pair in lines)
    text = existing + "# clinic.backup point-in-time recovery, %s\n" % isoformat(utc_now()) + added
    atomic_write(auto, text.encode("utf-8"), mode=0o600)
    signal_path = os.path.join(data_dir, "recovery.signal")
    atomic_write(signal_path, b"", mode=0o600)
    # A base backup taken from a standby could carry standby.signal: we want archive
    # recovery and a promotion, not a new standby.
    standby = os.path.join(data_dir, "standby.signal")
    if os.path.lexists(standby):
        os.unlink(standby)
    if owner is not None:
        for path in (auto, signal_path):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    return auto


# ------------------------------------------------------------------ server processes
class ServerAccount(object):
    """Runs PostgreSQL's programs as the cluster's OS user (``None``: as ourselves)."""

    def __init__(self, name=None):
        if name and os.geteuid() == 0:
            try:
                self.pw = pwd.getpwnam(name)
            except KeyError:
                raise ConfigError(
                    "the OS user %r does not exist" % name,
                    "set os_user to the account PostgreSQL runs as (Debian: postgres)",
                ) from None
        elif os.geteuid() == 0:
            raise ConfigError(
                "PostgreSQL refuses to run as root: os_user is required when running as root",
                "set os_user to the account PostgreSQL runs as (Debian: postgres)",
            )
        else:
            self.pw = None  # not root: the server runs as we do
        self.name = self.pw.pw_name if self.pw else pwd.getpwuid(os.geteuid()).pw_name

    def chown_tree(self, top):
        if self.pw is None:
            return
        for root, dirs, files in os.walk(top):
            for name in [root] + [os.path.join(root, n) for n in dirs + files]:
                os.lchown(name, self.pw.pw_uid, self.pw.pw_gid)

    def run(self, argv, env=None, timeout=600, cwd="/"):
        kwargs = {}
        if self.pw is not None:
            kwargs.update(user=self.pw.pw_uid, group=self.pw.pw_gid, extra_groups=[])
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        child_env.update(LC_ALL="C", LANG="C")
        if self.pw is not None:
            child_env.update(HOME=self.pw.pw_dir, USER=self.pw.pw_name, LOGNAME=self.pw.pw_name)
        child_env.update(env or {})
        try:
            return subprocess.run(
                argv,
                env=child_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
                **kwargs,
            )
        except OSError as exc:
            raise ConfigError("cannot run %s: %s" % (argv[0], exc.strerror)) from exc


def server_bin_dir(data_dir, explicit=None):
    """The bin directory of the PostgreSQL major version the data directory was made by."""
    if explicit:
        if not os.path.isfile(os.path.join(explicit, "pg_ctl")):
            raise ConfigError(
                "no pg_ctl in pg_bin_dir %s" % explicit,
                "point pg_bin_dir at the server's bin directory (e.g. /usr/lib/postgresql/15/bin)",
            )
        return explicit
    try:
        with open(os.path.join(data_dir, "PG_VERSION")) as handle:
            major = handle.read().strip()
    except OSError as exc:
        raise IntegrityError(
            "the restored data directory %s has no PG_VERSION (%s)" % (data_dir, exc.strerror)
        ) from exc
    for candidate in ("/usr/lib/postgresql/%s/bin" % major, "/usr/pgsql-%s/bin" % major):
        if os.path.isfile(os.path.join(candidate, "pg_ctl")):
            return candidate
    raise ConfigError(
        "the base backup is of PostgreSQL %s, whose server is not installed here" % major,
        "install postgresql-%s (the server of the same major version), or set pg_bin_dir" % major,
    )


def control_data(account, bin_dir, data_dir):
    """pg_controldata's fields as a dict (run with LC_ALL=C, so the labels are English)."""
    proc = account.run([os.path.join(bin_dir, "pg_controldata"), "-D", data_dir], timeout=60)
    if proc.returncode != 0:
        raise SourceError(
            "pg_controldata failed on %s: %s"
            % (data_dir, proc.stderr.decode("utf-8", "replace").strip())
        )
    fields = {}
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return fields


def postmaster_status(data_dir):
    """(pid, port, socket_dir, status) from postmaster.pid, or None when absent."""
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    if len(lines) < 1 or not lines[0].strip().isdigit():
        return None
    pid = int(lines[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass

    def field(number):
        return lines[number].strip() if len(lines) > number else ""

    return {
        "pid": pid,
        "port": int(field(3)) if field(3).isdigit() else None,
        "socket_dir": field(4).split(",")[0].strip(),
        "status": field(7),
    }


def port_in_use(port):
    """True when something accepts TCP connections on the port (loopback)."""
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                if sock.connect_ex((address, port)) == 0:
                    return True
        except OSError:
            continue
    return False


# ------------------------------------------------------------------ the server log
_TIME = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?(?:[+-]\d\d(?::?\d\d)?)?)"
STOP_PATTERNS = (
    re.compile(
        r"recovery stopping (?P<how>before|after) (?P<what>commit|abort) of transaction "
        r"(?P<xid>\d+), time " + _TIME
    ),
    re.compile(r"recovery stopping at restore point \"(?P<name>.*)\", time " + _TIME),
    re.compile(
        r"recovery stopping (?P<how>before|after) WAL location \(LSN\) \"(?P<lsn>[0-9A-F/]+)\""
    ),
)
LAST_TX = re.compile(r"last completed transaction was at log time " + _TIME)
REDO_DONE = re.compile(r"redo done at ([0-9A-F]+/[0-9A-F]+)")
NEW_TIMELINE = re.compile(r"selected new timeline ID: (\d+)")
NOT_REACHED = "recovery ended before configured recovery target was reached"
FATAL = re.compile(r"\b(FATAL|PANIC):\s+(.*)")


def parse_log_time(text):
    """A UTC datetime from the server's ``2026-12-03 12:40:01.123456+00`` form."""
    text = text.strip()
    match = re.match(r"^(.*?)([+-]\d\d)(?::?(\d\d))?$", text)
    if match:
        text = "%s%s:%s" % (match.group(1), match.group(2), match.group(3) or "00")
    moment = datetime.datetime.fromisoformat(text.replace(" ", "T"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.astimezone(datetime.timezone.utc)


def read_recovery_log(text):
    """What the server said about the recovery: stop point, last transaction, redo end,
    new timeline, and the first FATAL/PANIC."""
    found = {}
    for line in text.splitlines():
        for pattern in STOP_PATTERNS:
            match = pattern.search(line)
            if match:
                found["stop_message"] = line[match.start() :].strip()
                groups = match.groupdict()
                found["stop"] = {k: v for k, v in groups.items() if v is not None}
                times = [g for g in match.groups() if g and re.match(r"^\d{4}-", g)]
                if times:
                    found["stop_time"] = parse_log_time(times[-1])
        match = LAST_TX.search(line)
        if match:
            found["last_transaction_time"] = parse_log_time(match.group(1))
        match = REDO_DONE.search(line)
        if match:
            found["redo_done_lsn"] = match.group(1)
        match = NEW_TIMELINE.search(line)
        if match:
            found["new_timeline"] = int(match.group(1))
        if NOT_REACHED in line:
            found["target_not_reached"] = True
        match = FATAL.search(line)
        if match and "fatal" not in found:
            found["fatal"] = match.group(2).strip()
    return found


class RecoveringServer(object):
    """A server started on a restored data directory, watched until it has promoted."""

    def __init__(self, account, bin_dir, data_dir, log_file):
        self.account = account
        self.bin_dir = bin_dir
        self.data_dir = data_dir
        self.log_file = log_file
        self.log_offset = 0
        self.started = False

    def log_text(self):
        try:
            with open(self.log_file, "rb") as handle:
                handle.seek(self.log_offset)
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines=15):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def start(self):
        try:
            self.log_offset = os.path.getsize(self.log_file)
        except OSError:
            self.log_offset = 0
        # -W: do not wait for "ready"; wait_promoted() watches the replay itself, for as
        # long as the replay of the WAL needs (pg_ctl's own wait gives up after -t).
        proc = self.account.run(
            [
                os.path.join(self.bin_dir, "pg_ctl"),
                "-D",
                self.data_dir,
                "-l",
                self.log_file,
                "-o",
                START_OPTIONS,
                "-W",
                "-s",
                "start",
            ],
            timeout=120,
        )
        self.started = True
        if proc.returncode != 0:
            raise SourceError(
                "pg_ctl start failed on %s: %s\n%s"
                % (self.data_dir, proc.stderr.decode("utf-8", "replace").strip(), self.log_tail()),
                "read the server log %s" % self.log_file,
            )

    def wait_promoted(self, target, timeout):
        """Block until the cluster is "in production" and accepts connections; the log's
        account of the recovery. SourceError (with the server's words) otherwise."""
        deadline = time.monotonic() + timeout
        appeared = False
        while True:
            status = postmaster_status(self.data_dir)
            said = read_recovery_log(self.log_text())
            if status is not None:
                appeared = True
                state = control_data(self.account, self.bin_dir, self.data_dir).get(
                    "Database cluster state", ""
                )
                if state == "in production" and status["status"] == "ready":
                    return said, status
            elif appeared or time.monotonic() > deadline - timeout + 30:
                # The postmaster is gone (or never came up): recovery failed.
                raise self._failure(target, said)
            if said.get("target_not_reached") or (said.get("fatal") and status is None):
                raise self._failure(target, said)
            if time.monotonic() > deadline:
                raise SourceError(
                    "recovery to %s did not finish within %d s" % (target.describe(), timeout),
                    "raise the timeout for a long replay; the server log %s shows how far it got"
                    % self.log_file,
                )
            time.sleep(POLL_SECONDS)

    def _failure(self, target, said):
        if said.get("target_not_reached"):
            return IntegrityError(
                "recovery ended before %s was reached: the archived WAL stops earlier "
                "(a segment is missing, damaged or not archived yet)" % target.describe(),
                "the server's last words: %s. Check the archive with backup_verify (WAL "
                "continuity), or choose an earlier target" % (said.get("fatal") or NOT_REACHED),
            )
        return SourceError(
            "the recovering server stopped: %s" % (said.get("fatal") or "no FATAL message"),
            "server log %s:\n%s" % (self.log_file, self.log_tail()),
        )

    def stop(self, mode="fast"):
        if postmaster_status(self.data_dir) is None:
            return
        self.account.run(
            [
                os.path.join(self.bin_dir, "pg_ctl"),
                "-D",
                self.data_dir,
                "-m",
                mode,
                "-w",
                "-t",
                "120",
                "-s",
                "stop",
            ],
            timeout=180,
        )


# ------------------------------------------------------------------ checks over psql
CHECK_SQL = r"""
SELECT json_build_object(
  'in_recovery', pg_is_in_recovery(),
  'last_replay_time', to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC',
                              'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
  'current_lsn', pg_current_wal_lsn()::text,
  'timeline', (SELECT timeline_id FROM pg_control_checkpoint()),
  'server_version', current_setting('server_version_num')::int,
  'databases', (SELECT json_agg(datname ORDER BY datname) FROM pg_database
                WHERE datallowconn AND NOT datistemplate));
"""
# Every user table is read in full (count(*)): a table whose files did not come back
# fails here, not when the clinic's application first touches it.
COUNT_SQL = r"""
SELECT coalesce(json_object_agg(n.nspname || '.' || c.relname,
  (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %I.%I',
     n.nspname, c.relname), false, true, '')))[1]::text::bigint), '{}'::json)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm') AND c.relispartition IS NOT TRUE
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast';
"""


def run_psql(account, bin_dir, socket_dir, port, user, dbname, sql):
    proc = account.run(
        [
            os.path.join(bin_dir, "psql"),
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
        env={
            "PGHOST": socket_dir,
            "PGPORT": str(port),
            "PGUSER": user,
            "PGDATABASE": dbname,
            "PGCONNECT_TIMEOUT": "15",
            "PGAPPNAME": "clinic.backup pitr",
        },
        timeout=3600,
    )
    if proc.returncode != 0:
        raise SourceError(
            "the check query on database %r of the recovered cluster failed: %s"
            % (dbname, proc.stderr.decode("utf-8", "replace").strip())
        )
    return json.loads(proc.stdout.decode("utf-8"))


def check_recovered(account, bin_dir, status, user):
    """Connect to every database of the recovered cluster; count every table."""
    socket_dir = status["socket_dir"] or "/var/run/postgresql"
    port = status["port"]
    facts = run_psql(account, bin_dir, socket_dir, port, user, "postgres", CHECK_SQL)
    if facts["in_recovery"]:
        raise IntegrityError("the recovered cluster is still in recovery after its promotion")
    counts = {}
    for dbname in facts["databases"] or []:
        counts[dbname] = run_psql(account, bin_dir, socket_dir, port, user, dbname, COUNT_SQL)
    facts["row_counts"] = counts
    return facts


# ------------------------------------------------------------------ the whole restore
class PitrOptions(object):
    """What recover() needs besides the base backup (see the module's documentation)."""

    def __init__(
        self,
        target,
        data_dir,
        port,
        agent_bin,
        agent_config,
        os_user=None,
        pg_bin_dir=None,
        settings=None,
        archive=False,
        timeout=DEFAULT_TIMEOUT,
        check_user="postgres",
        replace_running=False,
        confirm_replace=None,
        keep_running=True,
        check_mode=False,
    ):
        self.target = target
        self.data_dir = os.path.abspath(data_dir) if data_dir else data_dir
        self.port = port
        self.agent_bin = agent_bin
        self.agent_config = agent_config
        self.os_user = os_user
        self.pg_bin_dir = pg_bin_dir
        self.settings = dict(settings or {})
        self.archive = archive
        self.timeout = timeout
        self.check_user = check_user
        self.replace_running = replace_running
        self.confirm_replace = confirm_replace
        self.keep_running = keep_running
        self.check_mode = check_mode


def _stamp():
    return utc_now().strftime("%Y%m%dT%H%M%SZ")


def check_destination(options):
    """ConfigError unless the data directory may be written and the port is free.
    Returns the running cluster to replace (postmaster status) or None."""
    if not options.data_dir or not os.path.isabs(options.data_dir):
        raise ConfigError(
            "data_dir must be an absolute path (got %r)" % (options.data_dir,),
            "give the new cluster's data directory, e.g. /var/lib/postgresql/15/pitr",
        )
    if not isinstance(options.port, int) or not 1 <= options.port <= 65535:
        raise ConfigError("port must be a TCP port number (got %r)" % (options.port,))
    restore_command(options.agent_bin, options.agent_config)  # validates both paths
    if not os.path.isfile(options.agent_config):
        raise ConfigError(
            "the agent config %s does not exist" % options.agent_config,
            "give the config the pg_wal_archiving role wrote for the cluster (wal-fetch reads it)",
        )
    running = None
    if os.path.lexists(options.data_dir):
        if os.path.islink(options.data_dir) or not os.path.isdir(options.data_dir):
            raise ConfigError("data_dir %s exists and is not a directory" % options.data_dir)
        if os.listdir(options.data_dir):
            if not options.replace_running:
                raise ConfigError(
                    "data_dir %s is not empty: a point-in-time restore only writes into a new or "
                    "empty directory" % options.data_dir,
                    "choose a new directory (and port); to replace the cluster living there, "
                    "set replace_running=true and confirm_replace to the same path",
                )
            if options.confirm_replace != options.data_dir:
                raise ConfigError(
                    "replacing the cluster in %s needs confirm_replace set to exactly that path "
                    "(got %r)" % (options.data_dir, options.confirm_replace),
                    "the cluster there will be stopped and kept aside as %s.pre_pitr_<time>"
                    % options.data_dir,
                )
            running = postmaster_status(options.data_dir) or {}
    if not running and port_in_use(options.port):
        raise ConfigError(
            "port %d is in use: another server listens there" % options.port,
            "choose a free port for the recovered cluster",
        )
    return running


def recover(options, base_restore):
    """Run the point-in-time restore; returns the result dict (see the module's RETURN).

    ``base_restore(data_dir)`` extracts the chosen base backup into the empty (or absent)
    ``data_dir`` and returns an object with ``set_id`` and ``manifest``.
    """
    started = time.monotonic()
    started_at = utc_now()
    target = options.target
    account = ServerAccount(options.os_user)
    running = check_destination(options)
    command = restore_command(options.agent_bin, options.agent_config)
    result = {
        "changed": False,
        "target": target.as_dict(),
        "data_dir": options.data_dir,
        "port": options.port,
        "started_at": isoformat(started_at),
        "replaced": None,
    }
    if options.check_mode:
        result["would_replace"] = options.data_dir if running is not None else None
        return result
    parent = os.path.dirname(options.data_dir)
    if not os.path.isdir(parent):
        raise ConfigError(
            "the parent directory of data_dir, %s, does not exist" % parent,
            "create it (owned by the cluster's OS user) or choose another data_dir",
        )
    if running is None:
        return _recover_into(options, base_restore, account, command, started, result)
    result["replaced"] = _move_running_aside(account, options)
    result["changed"] = True
    try:
        return _recover_into(options, base_restore, account, command, started, result)
    except BaseException as exc:
        # A replacement that did not finish must not leave the clinic without its
        # database: the original goes back in place, running again if it was.
        _put_back(account, options, result, bool(running), exc)
        raise


def _recover_into(options, base_restore, account, command, started, result):
    target = options.target
    phase_started = time.monotonic()
    base = base_restore(options.data_dir)
    phases = {"base_restore": round(time.monotonic() - phase_started, 3)}
    result["changed"] = True
    result["set_id"] = getattr(base, "set_id", None)
    for detail in ("repository", "verified", "passed_over", "damaged"):
        if getattr(base, detail, None) is not None:
            result[detail] = getattr(base, detail)
    manifest = getattr(base, "manifest", None) or {}
    result["base_backup"] = {
        key: manifest.get(key)
        for key in ("set_id", "start_time", "stop_time", "start_lsn", "stop_lsn", "timeline")
        if manifest.get(key) is not None
    }
    os.chmod(options.data_dir, 0o700)
    bin_dir = server_bin_dir(options.data_dir, options.pg_bin_dir)
    log_dir = os.path.join(options.data_dir, "log")
    if not os.path.isdir(log_dir):
        os.mkdir(log_dir, 0o700)
    log_file = os.path.join(log_dir, RECOVERY_LOG)
    lines = recovery_settings(target, command, options.port, options.settings, options.archive)
    write_recovery_config(options.data_dir, lines)
    account.chown_tree(options.data_dir)
    server = RecoveringServer(account, bin_dir, options.data_dir, log_file)
    try:
        phase_started = time.monotonic()
        server.start()
        said, status = server.wait_promoted(target, options.timeout)
        phases["replay"] = round(time.monotonic() - phase_started, 3)
        phase_started = time.monotonic()
        facts = check_recovered(account, bin_dir, status, options.check_user)
        phases["checks"] = round(time.monotonic() - phase_started, 3)
    except BaseException as exc:
        _fail_aside(server, options, result, exc)
        raise
    finished_at = utc_now()
    point = reached_point(target, said, facts, manifest)
    result.update(point)
    result.update(
        {
            "log_file": log_file,
            "timeline": facts.get("timeline"),
            "current_lsn": facts.get("current_lsn"),
            "server_version": facts.get("server_version"),
            "row_counts": facts["row_counts"],
            "databases": facts.get("databases") or [],
            "finished_at": isoformat(finished_at),
            "duration_seconds": round(time.monotonic() - started, 3),
            # Where the RTO went: extraction, replay until promotion, the checks.
            "phases": phases,
            "archive_mode": "on" if options.archive else "off",
        }
    )
    reached = point.get("reached_time")
    if reached:
        moment = datetime.datetime.strptime(reached, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc
        )
        result["rpo_seconds"] = round(max(0.0, (finished_at - moment).total_seconds()), 3)
    if not options.keep_running:
        server.stop()
    result["running"] = options.keep_running
    return result


def reached_point(target, said, facts, manifest):
    """The recovery point actually reached, as far as the server tells it."""
    stop_time = said.get("stop_time")
    last_tx = said.get("last_transaction_time")
    replay = facts.get("last_replay_time")
    reached = stop_time or last_tx
    if reached is None and replay:
        reached = datetime.datetime.strptime(replay, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc
        )
    if reached is None and manifest.get("stop_time"):
        # No transaction replayed at all: the data is as of the base backup's end.
        reached = parse_moment(manifest["stop_time"], "stop_time")
    out = {
        "reached_time": isoformat(reached) if reached else None,
        "reached_message": said.get("stop_message")
        or ("recovery ended at the end of the archived WAL" if target.kind == "latest" else None),
        "redo_done_lsn": said.get("redo_done_lsn"),
        "new_timeline": said.get("new_timeline"),
        "last_transaction_time": isoformat(last_tx) if last_tx else None,
    }
    if target.kind != "latest" and not said.get("stop_message"):
        # PostgreSQL promotes at the end of the WAL when the target lies beyond it, from
        # version 13 on only with a FATAL; older ones silently. Never report that as done.
        raise IntegrityError(
            "the server promoted without reaching %s" % target.describe(),
            "the archived WAL ends before the target: check WAL continuity with backup_verify",
        )
    return out


def _move_running_aside(account, options):
    bin_dir = server_bin_dir(options.data_dir, options.pg_bin_dir)
    if postmaster_status(options.data_dir) is not None:
        proc = account.run(
            [os.path.join(bin_dir, "pg_ctl"), "-D", options.data_dir, "-m", "fast", "-w", "stop"],
            timeout=600,
        )
        if proc.returncode != 0:
            raise SourceError(
                "could not stop the cluster in %s: %s"
                % (options.data_dir, proc.stderr.decode("utf-8", "replace").strip()),
                "stop it yourself, then run the restore again",
            )
    aside = "%s.pre_pitr_%s" % (options.data_dir, _stamp())
    os.rename(options.data_dir, aside)
    return aside


def _put_back(account, options, result, was_running, exc):
    """Undo a replacement: what the failed restore left in data_dir goes aside as
    ``.failed_<time>`` (if _fail_aside has not done it), the original cluster back into
    data_dir, started again with its own options (postmaster.opts) when it was running."""
    aside = result["replaced"]
    if os.path.lexists(options.data_dir):
        failed = "%s.failed_%s" % (options.data_dir, _stamp())
        os.rename(options.data_dir, failed)
        result["failed_data_dir"] = failed
    os.rename(aside, options.data_dir)
    result["replaced"] = None
    result["rolled_back"] = True
    restarted = None
    if was_running:
        bin_dir = server_bin_dir(options.data_dir, options.pg_bin_dir)
        log_dir = os.path.join(options.data_dir, "log")
        if not os.path.isdir(log_dir):
            os.mkdir(log_dir, 0o700)
            account.chown_tree(log_dir)
        # restart, not start: a stopped server is started with the options of its last
        # start (postmaster.opts), e.g. a Debian cluster's config_file outside data_dir.
        proc = account.run(
            [
                os.path.join(bin_dir, "pg_ctl"), "-D", options.data_dir, "-l",
                os.path.join(log_dir, ROLLBACK_LOG), "-w", "-t", "300", "restart", "-m", "fast",
            ],
            timeout=330,
        )  # fmt: skip
        restarted = proc.returncode == 0
        if not restarted:
            result["rollback_error"] = proc.stderr.decode("utf-8", "replace").strip()[-500:]
    result["original_restarted"] = restarted
    if isinstance(exc, BackupError):
        exc.result = dict(getattr(exc, "result", None) or {}, **result)
        exc.result["changed"] = True
        exc.hint = (
            "the original cluster is back in %s%s; %s"
            % (
                options.data_dir,
                {True: " and running again", False: " but did NOT start: start it yourself",
                 None: " (it was not running)"}[restarted],
                exc.hint or "see the recovery log in the failed directory",
            )
        )  # fmt: skip


def _fail_aside(server, options, result, exc):
    """Stop what we started and move the half-recovered directory out of the way."""
    try:
        server.stop(mode="immediate")
    except BackupError:
        pass
    if os.path.isdir(options.data_dir):
        failed = "%s.failed_%s" % (options.data_dir, _stamp())
        try:
            os.rename(options.data_dir, failed)
        except OSError:
            return
        result["failed_data_dir"] = failed
        if isinstance(exc, BackupError):
            exc.result = dict(result, failed_data_dir=failed, changed=True)
