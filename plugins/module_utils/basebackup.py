# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Base backups of a whole PostgreSQL cluster, stored as sets (kind ``basebackup``).

Backup: ``pg_basebackup -D - -Ft -X none --checkpoint=fast --manifest-checksums=SHA256``
writes one tar archive of the data directory to its stdout; the bytes pass through
Python once (a tar watcher reads ``backup_label`` and the server's ``backup_manifest``
as they go by, and checks every member name), then the shared pipeline
(compression -> gpg -> sha256 -> every target). No plaintext ever reaches a disk.
The set's manifest (sealed, written last) records the cluster's system identifier,
timeline, start/stop LSN and the WAL segments the backup needs (``start_wal`` ..
``stop_wal``). ``-X none``: the WAL comes from the archive, so a cluster without
working archiving is refused (its base backup could never be made consistent).

Restore (``restore_base_backup``): the newest sealed base backup of the cluster that
stopped before the recovery target is extracted (tarsafety rules, nothing outside the
directory, no links out) into an EMPTY data directory (mode 0700), then checked with
``pg_verifybackup -n`` against the server's own manifest (the WAL is checked apart,
since recovery fetches it through ``restore_command``). A damaged set is passed over
for the next older one, as every restore of the engine does. Recovery itself
(``recovery.signal``, ``restore_command``, targets) is pitr.py's business.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import json
import os
import pwd
import re
import subprocess
import tarfile
import tempfile
import threading
import time

from . import pipeline, wal
from .catalog import load_manifest
from .errors import BackupError, ConfigError, IntegrityError, SourceError
from .file_restore import FileTarExtractor, remove_tree
from .lifecycle import (
    ReadOptions,
    ReadSession,
    SetWriting,
    StreamOptions,
    check_readable_now,
    check_restorable,
    check_targets,
    choose_sets,
    manifest_header,
    prepare_targets,
    record_key,
    stream_into,
    try_newest_first,
)
from .locking import RunLock, lock_path_for
from .passphrase import load_passphrase
from .pgsource import find_pg_bin_dir, tool_version
from .repository import isoformat, new_set_id, parse_time, safe_name, utc_now
from .tarsafety import unsafe_member

try:
    import psycopg2
except ImportError:  # reported by PgConnection.connect
    psycopg2 = None

KIND = "basebackup"
ARTIFACT_NAME = "base"
CONTENT = "pg_basebackup-tar"
FORMAT = "tar"
SERVER_MANIFEST = "backup_manifest"
BACKUP_LABEL = "backup_label"
MIN_SERVER_VERSION_NUM = 130000  # backup manifests (and their injection into -D -) began in 13
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
# backup_label is a few hundred bytes; of backup_manifest (one line per file: tens of MB
# for a big cluster) only the tail is kept, where the WAL-Ranges are.
LABEL_LIMIT = 64 * 1024
MANIFEST_TAIL = 1024 * 1024
ARCHIVING_HINT = (
    "apply the role clinic.backup.pg_wal_archiving (or set wal_level = replica, "
    "archive_mode = on and an archive_command that runs clinic-backup wal-push), restart "
    "PostgreSQL, then take the base backup"
)

STALL_RE = re.compile(r"still waiting for all required WAL segments to be archived[^\n]*")
LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
CLUSTER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,47}$")


# ---------------------------------------------------------------------- names and LSNs
def check_cluster_name(name, what="cluster"):
    """A cluster's name as the agent config gives it (repository.safe_name rules)."""
    if not isinstance(name, str) or not CLUSTER_RE.fullmatch(name) or safe_name(name) != name:
        raise ConfigError(
            "%s %r is not a valid cluster name" % (what, name),
            "use letters, digits, '_', '.' and '-' (at most 48, not starting with '.' or '-'), "
            "e.g. main",
        )
    return name


def parse_lsn(text):
    """The byte position of a PostgreSQL LSN written as ``X/Y`` (hex)."""
    match = LSN_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ConfigError(
            "%r is not a PostgreSQL LSN" % (text,),
            "write it as pg_current_wal_lsn() does: 0/3000060",
        )
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(position):
    return "%X/%X" % (position >> 32, position & 0xFFFFFFFF)


def wal_file_name(timeline, position, segment_size=DEFAULT_SEGMENT_SIZE, previous=False):
    """The WAL segment file holding byte ``position`` on ``timeline`` (``previous``: the
    one holding the byte before it, as pg_walfile_name does for an end position)."""
    segment = (position - 1 if previous and position else position) // segment_size
    per_log = 0x100000000 // segment_size
    return "%08X%08X%08X" % (timeline, segment // per_log, segment % per_log)


# ---------------------------------------------------------------------- the tar stream
class TarWatcher(object):
    """Follows the plain tar stream pg_basebackup writes, as it passes, without holding
    it: counts members, files and bytes, names the first unsafe member, and keeps
    ``backup_label`` and the tail of ``backup_manifest``."""

    def __init__(self):
        self._header = bytearray()
        self._remaining = 0  # data + padding bytes of the current member still to pass
        self._data_left = 0  # of which data
        self._capture = None  # (what, bytearray) of the member being kept
        self._next_name = None  # from a GNU long-name or pax header
        self.ended = False
        self.members = 0
        self.files = 0
        self.bytes = 0
        self.links = []
        self.unsafe = None
        self.label = None
        self.manifest_tail = None
        self.manifest_size = None
        self.error = None

    def feed(self, chunk):
        view = memoryview(chunk)
        pos, end = 0, len(view)
        while pos < end and self.error is None:
            if self._remaining:
                take = min(self._remaining, end - pos)
                data = min(take, self._data_left)
                if self._capture is not None and data:
                    self._keep(view[pos : pos + data])
                self._data_left -= data
                self._remaining -= take
                pos += take
                if not self._remaining:
                    self._member_done()
                continue
            if self.ended:
                return  # the zero blocks after the end marker
            take = min(tarfile.BLOCKSIZE - len(self._header), end - pos)
            self._header += view[pos : pos + take]
            pos += take
            if len(self._header) == tarfile.BLOCKSIZE:
                block, self._header = bytes(self._header), bytearray()
                self._read_header(block)

    def _keep(self, data):
        what, kept = self._capture
        kept += data
        if what == SERVER_MANIFEST and len(kept) > 2 * MANIFEST_TAIL:
            del kept[: len(kept) - MANIFEST_TAIL]
        elif what == BACKUP_LABEL and len(kept) > LABEL_LIMIT:
            self.error = "backup_label is larger than %d bytes" % LABEL_LIMIT

    def _read_header(self, block):
        if block == tarfile.NUL * tarfile.BLOCKSIZE:
            self.ended = True
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.TarError as exc:
            self.error = "unreadable tar header after member %d: %s" % (self.members, exc)
            return
        self._data_left = info.size
        self._remaining = info.size + (-info.size % tarfile.BLOCKSIZE)
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE):
            self._capture = (info.type, bytearray())
        else:
            name = self._next_name if self._next_name is not None else info.name
            self._next_name = None
            self._member(name, info)
        if not self._remaining:
            self._member_done()

    def _member(self, name, info):
        self.members += 1
        why = unsafe_member(name)
        if why and self.unsafe is None:
            self.unsafe = "%r (%s)" % (name, why)
        if info.isreg():
            self.files += 1
            self.bytes += info.size
            if name in (BACKUP_LABEL, SERVER_MANIFEST):
                self._capture = (name, bytearray())
                if name == SERVER_MANIFEST:
                    self.manifest_size = info.size
        elif info.issym() or info.islnk():
            self.links.append(name)
        elif not info.isdir():
            self.links.append(name)  # devices, FIFOs: a data directory holds none

    def _member_done(self):
        if self._capture is None:
            return
        what, kept = self._capture
        self._capture = None
        if what == tarfile.GNUTYPE_LONGNAME:
            self._next_name = bytes(kept).rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif what == tarfile.XHDTYPE:
            match = re.search(rb"\d+ path=([^\n]*)\n", bytes(kept))
            if match:
                self._next_name = match.group(1).decode("utf-8", "surrogateescape")
        elif what == BACKUP_LABEL:
            self.label = bytes(kept).decode("utf-8", "replace")
        else:
            self.manifest_tail = bytes(kept[-MANIFEST_TAIL:]).decode("utf-8", "replace")


def parse_backup_label(text):
    """{start_lsn, start_wal, timeline, start_time, checkpoint_lsn} of a backup_label."""
    fields = {}
    for line in text.splitlines():
        key, _sep, value = line.partition(": ")
        fields[key.strip()] = value.strip()
    match = re.match(r"^(\S+) \(file ([0-9A-F]{24})\)$", fields.get("START WAL LOCATION", ""))
    if not match or not fields.get("START TIMELINE", "").isdigit():
        raise SourceError(
            "backup_label written by pg_basebackup is not understood: %r" % text[:300]
        )
    result = {
        "start_lsn": format_lsn(parse_lsn(match.group(1))),
        "start_wal": match.group(2),
        "timeline": int(fields["START TIMELINE"]),
        "checkpoint_lsn": fields.get("CHECKPOINT LOCATION"),
        "start_time": None,
    }
    try:
        moment = datetime.datetime.strptime(fields.get("START TIME", ""), "%Y-%m-%d %H:%M:%S %Z")
        result["start_time"] = isoformat(moment.replace(tzinfo=datetime.timezone.utc))
    except ValueError:
        pass
    return result


def parse_wal_ranges(manifest_tail):
    """[(timeline, start position, end position)] of a backup_manifest's WAL-Ranges."""
    match = re.search(r'"WAL-Ranges"\s*:\s*(\[.*?\])', manifest_tail or "", re.S)
    if not match:
        return []
    try:
        ranges = json.loads(match.group(1))
        return [
            (int(r["Timeline"]), parse_lsn(r["Start-LSN"]), parse_lsn(r["End-LSN"])) for r in ranges
        ]
    except (ValueError, KeyError, TypeError, ConfigError):
        return []


class PgBaseBackupSource(object):
    """pg_basebackup's stdout as an iterable of chunks (fed to the pipeline by its feeder
    thread), each one shown to a TarWatcher first; a non-zero exit raises SourceError at
    the end of the stream, so the set is never committed."""

    def __init__(
        self, argv, env, watcher, archiver_probe=None, poll_seconds=1.0, idle_seconds=10.0
    ):
        self.argv = argv
        self.env = env
        self.watcher = watcher
        self.archiver_probe = archiver_probe
        self.poll_seconds = poll_seconds
        self.idle_seconds = idle_seconds
        self._last_data = time.monotonic()
        self._last_probe = 0.0
        self.proc = None
        self.stalled = None
        self._stderr = tempfile.TemporaryFile()
        self._done = threading.Event()

    def __iter__(self):
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=self._untranslated_env(),
            close_fds=True,
        )
        watchdog = threading.Thread(target=self._watch)
        watchdog.daemon = True
        watchdog.start()
        out = self.proc.stdout
        try:
            while True:
                chunk = out.read1(pipeline.CHUNK_SIZE)
                if not chunk:
                    break
                self._last_data = time.monotonic()
                self.watcher.feed(chunk)
                yield chunk
            code = self.proc.wait()
        finally:
            self._done.set()
        if self.stalled:
            raise SourceError(
                "WAL archiving stalled during the base backup: the server kept waiting for "
                "its last segments to be archived (%s); the backup was stopped, nothing stored"
                % self.stalled,
                "fix the archive_command (see pg_stat_archiver and the server log), then take "
                "the base backup again",
            )
        if code != 0:
            raise SourceError(
                "pg_basebackup failed with exit code %d: %s" % (code, self.stderr_tail()),
                "the role needs the REPLICATION attribute and pg_hba.conf a 'replication' line "
                "for it (host replication <user> <address> scram-sha-256), and max_wal_senders "
                "a free slot",
            )

    def _untranslated_env(self):
        env = dict(self.env)
        env.pop("LANGUAGE", None)
        env["LC_MESSAGES"] = "C"  # the stall is recognised by the server's own words
        return env

    def _watch(self):
        """Stop pg_basebackup when the server says it is waiting for WAL archiving: with
        -X none it would wait for a failing archive_command forever (PostgreSQL says so
        once a minute)."""
        while not self._done.wait(self.poll_seconds):
            try:
                size = os.fstat(self._stderr.fileno()).st_size
                text = os.pread(self._stderr.fileno(), 65536, max(0, size - 65536))
            except (OSError, ValueError):
                return
            match = STALL_RE.search(text.decode("utf-8", "replace"))
            if match:
                self.stalled = match.group(0).strip()
            elif self.archiver_probe is not None and self._idle_long_enough():
                # The server's words above are English only; pg_stat_archiver is not.
                self.stalled = self.archiver_probe()
            if self.stalled:
                self.proc.terminate()
                return

    def _idle_long_enough(self):
        now = time.monotonic()
        if now - self._last_data < self.idle_seconds or now - self._last_probe < self.idle_seconds:
            return False
        self._last_probe = now
        return True

    def stderr_tail(self):
        if self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read()[-pipeline.STDERR_TAIL :].decode("utf-8", "replace").strip()

    def close(self):
        self._done.set()  # the watchdog stops before the stderr file goes
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


# ---------------------------------------------------------------------- backup
class BaseBackupOptions(StreamOptions):
    """What cluster to back up and how; validated on construction (ConfigError)."""

    def __init__(
        self,
        cluster,
        compression="zstd",
        compression_level=None,
        compression_threads=0,
        encrypt=True,
        passphrase_file=None,
        pg_bin_dir=None,
        label=None,
        stale_seconds=3600,
    ):
        self.cluster = check_cluster_name(cluster)
        self.pg_bin_dir = pg_bin_dir
        self._set_stream_options(
            compression,
            compression_level,
            compression_threads,
            encrypt,
            passphrase_file,
            label,
            stale_seconds,
        )

    def artifact_file(self):
        name = ARTIFACT_NAME + ".tar" + pipeline.COMPRESSION_SUFFIX[self.compression]
        return name + (".gpg" if self.encrypt else "")


def pg_basebackup_argv(bin_dir, label=None):
    argv = [
        os.path.join(bin_dir, "pg_basebackup"),
        "--no-password",
        "--pgdata=-",
        "--format=tar",
        "--wal-method=none",
        "--checkpoint=fast",
        "--manifest-checksums=SHA256",
        # Compression is the pipeline's, once; the data directory is synced by nobody.
        "--no-sync",
    ]
    if label:
        argv.append("--label=%s" % label[:60])
    return argv


class ServerFacts(object):
    """What the backup needs to know about the server, read before anything is written."""

    def __init__(self, connection):
        conn = connection.connect()
        try:
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute(
                "SELECT current_setting('server_version_num')::int, "
                "current_setting('server_version'), "
                "current_setting('archive_mode'), pg_is_in_recovery(), "
                "(SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user), "
                "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), "
                "(SELECT count(*) FROM pg_tablespace "
                " WHERE spcname NOT IN ('pg_default', 'pg_global'))"
            )
            (
                self.version_num,
                self.version,
                self.archive_mode,
                self.in_recovery,
                self.may_replicate,
                segment_size,
                self.tablespaces,
            ) = cur.fetchone()
            self.segment_size = int(segment_size or DEFAULT_SEGMENT_SIZE)
            self.archive_command = self._setting(cur, "archive_command")
            self.archive_library = self._setting(cur, "archive_library")
            self.system_identifier = None
            self.archiver = None
            try:
                cur.execute("SELECT system_identifier FROM pg_control_system()")
                self.system_identifier = str(cur.fetchone()[0])
                cur.execute(
                    "SELECT archived_count, last_archived_wal, last_archived_time, failed_count, "
                    "last_failed_wal, last_failed_time FROM pg_stat_archiver"
                )
                self.archiver = cur.fetchone()
            except psycopg2.Error:
                pass  # not granted to this role: the checks that need them are skipped
        except psycopg2.Error as exc:
            raise SourceError(
                "cannot read the settings of %s: %s"
                % (connection.describe(), " ".join(str(exc).split()))
            ) from exc
        finally:
            conn.close()
        self.user = connection.params.get("user", "the current user")

    @staticmethod
    def _setting(cur, name):
        cur.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,))
        row = cur.fetchone()
        return row[0] if row else ""

    @property
    def major(self):
        return self.version_num // 10000

    def refusal(self):
        """(message, hint) when a base backup of this server must not be taken, or None."""
        if self.version_num < MIN_SERVER_VERSION_NUM:
            return (
                "the server runs PostgreSQL %s; base backups need 13 or newer (backup manifests)"
                % self.version,
                "upgrade PostgreSQL, or keep to database backups (clinic.backup.pg_dump)",
            )
        if not self.may_replicate:
            return (
                "role %s may not take base backups (it has neither REPLICATION nor SUPERUSER)"
                % self.user,
                "ALTER ROLE <user> REPLICATION, and allow it a 'replication' line in pg_hba.conf",
            )
        if self.archive_mode == "off" or (self.in_recovery and self.archive_mode != "always"):
            return (
                "WAL archiving is off on this server (archive_mode = %s%s): a base backup taken "
                "without the WAL could never be restored"
                % (self.archive_mode, ", and it is a standby" if self.in_recovery else ""),
                ARCHIVING_HINT,
            )
        if not (self.archive_command or "").strip() and not (self.archive_library or "").strip():
            return (
                "archive_mode is on but neither archive_command nor archive_library is set: "
                "no WAL is archived, and pg_basebackup would wait for it forever",
                ARCHIVING_HINT,
            )
        if self.tablespaces:
            return (
                "the cluster has %d tablespace(s) besides pg_default: a streamed base backup "
                "holds one data directory only" % self.tablespaces,
                "move the tables to pg_default, or back the databases up with clinic.backup.pg_dump",
            )
        return None

    def archiver_failing(self):
        """A description when the archiver's latest attempt failed, else None: the backup
        would wait, with no end, for its last segment to be archived."""
        if not self.archiver:
            return None
        _count, _last_wal, last_time, failed, failed_wal, failed_time = self.archiver
        if failed and failed_time is not None and (last_time is None or failed_time > last_time):
            return "segment %s failed to archive at %s (%d failures so far)" % (
                failed_wal,
                failed_time.isoformat(),
                failed,
            )
        return None

    def describe(self, connection):
        return {
            "version": self.version,
            "version_num": self.version_num,
            "host": connection.params.get("host"),
            "port": connection.params.get("port"),
            "standby": bool(self.in_recovery),
        }


def archiver_failure_since(connection, since):
    """A description when the archiver's latest attempt failed after ``since`` (a UTC
    datetime) and nothing was archived after it, else None (also when it cannot tell)."""
    try:
        conn = connection.connect()
    except BackupError:
        return None
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT last_archived_time, failed_count, last_failed_wal, last_failed_time "
            "FROM pg_stat_archiver"
        )
        last_time, failed, failed_wal, failed_time = cur.fetchone()
    except psycopg2.Error:
        return None
    finally:
        conn.close()
    if failed_time is None or failed_time < since:
        return None
    if last_time is not None and last_time >= failed_time:
        return None
    return "pg_stat_archiver: segment %s failed to archive at %s (%d failures so far)" % (
        failed_wal,
        failed_time.isoformat(),
        failed,
    )


def _check_name_is_free(repo, name):
    """Refuse a cluster name whose newest set in ``repo`` is of another kind: both would
    share one latest pointer and one retention group."""
    try:
        set_id = repo.read_latest(name)
        if set_id is None:
            return
        manifest = load_manifest(repo, set_id)
    except BackupError:
        return  # unreadable pointer or manifest: nothing to protect here
    if manifest.get("kind", "database") != KIND:
        raise ConfigError(
            "%s already holds %s sets named %r"
            % (repo.url, manifest.get("kind", "database"), name),
            "give the cluster another name (config key cluster), or use another repository",
        )


def run_base_backup(connection, repositories, options, check_mode=False, now=None):
    """Take one base backup set of the cluster ``connection`` reaches into every
    repository; returns a result dict.

    ``connection``: a pgsource.PgConnection (any database; pg_basebackup's replication
    connection uses the same host, port, user and password, through the environment).
    Raises ConfigError/SourceError/StoreError before anything is written when the input
    or the server is wrong; raises BackupError after committing the healthy targets
    when some target failed (the result is attached as ``exc.result``).
    """
    if not isinstance(options, BaseBackupOptions):
        raise ConfigError("run_base_backup needs BaseBackupOptions, got %r" % (options,))
    passphrase = load_passphrase(options.passphrase_file) if options.encrypt else None
    key = record_key(options)
    unreachable = check_targets(repositories)
    for repo in repositories:
        if repo.url not in unreachable:
            _check_name_is_free(repo, options.cluster)
    server = ServerFacts(connection)
    refusal = server.refusal()
    if refusal:
        raise ConfigError(*refusal)
    failing = server.archiver_failing()
    if failing:
        raise SourceError(
            "WAL archiving is failing on this server: %s" % failing,
            "pg_basebackup -X none waits until its last segment is archived: fix the "
            "archive_command first (see the server log and clinic-backup wal-push's errors)",
        )
    bin_dir = find_pg_bin_dir(server.major, options.pg_bin_dir)
    if not os.path.isfile(os.path.join(bin_dir, "pg_basebackup")):
        raise ConfigError(
            "no pg_basebackup in %s" % bin_dir, "install postgresql-client-%d" % server.major
        )
    started = now or utc_now()
    clock = time.time()
    set_id = new_set_id(options.cluster, started)
    if check_mode:
        return {
            "changed": True,
            "check_mode": True,
            "set_id": set_id,
            "cluster": options.cluster,
            "database": options.cluster,
            "targets": [r.url for r in repositories],
            "server": server.describe(connection),
            "warnings": ["%s is unreachable: %s" % item for item in unreachable.items()],
        }
    with RunLock(lock_path_for(repositories)):
        layout_warnings = prepare_targets(
            repositories, unreachable, options.stale_seconds, key, options.cluster
        )
        with SetWriting(repositories, unreachable, set_id, options, passphrase, key) as writing:
            result = _take_base_backup(
                connection, options, server, bin_dir, writing, started, clock
            )
        result["warnings"] = layout_warnings + result["warnings"]
        failure = writing.failure("base backup set")
        if failure:
            error = BackupError(*failure)
            error.result = result
            raise error
        return result


def _take_base_backup(connection, options, server, bin_dir, writing, started, clock):
    watcher = TarWatcher()
    source = PgBaseBackupSource(
        pg_basebackup_argv(bin_dir, options.label),
        connection.child_env(),
        watcher,
        archiver_probe=lambda: archiver_failure_since(connection, started),
    )
    try:
        entry, locations = writing.stream(options.artifact_file(), [], source)
    finally:
        source.close()
    stopped = utc_now()
    facts = _backup_facts(watcher, server)
    artifacts = [dict(entry, name=ARTIFACT_NAME, content=CONTENT, locations=locations)]
    manifest = manifest_header(KIND, writing.set_id, options.cluster, options, started, clock)
    manifest.update(facts)
    manifest.update(
        {
            "cluster": options.cluster,
            "format": FORMAT,
            "system_identifier": server.system_identifier,
            "pg_version": server.version,
            "stop_time": isoformat(stopped),
            "server": server.describe(connection),
            "pg_basebackup_version": tool_version(bin_dir, "pg_basebackup"),
            "wal_segment_size": server.segment_size,
            "server_manifest": {
                "file": SERVER_MANIFEST,
                "size": watcher.manifest_size,
                "checksums": "SHA256",
            },
            "tar": {"members": watcher.members, "files": watcher.files, "bytes": watcher.bytes},
            "artifacts": [{k: v for k, v in a.items() if k != "locations"} for a in artifacts],
        }
    )
    if not manifest.get("start_time"):
        manifest["start_time"] = isoformat(started)
    manifest, warnings = writing.commit(manifest, options.cluster)
    return {
        "changed": writing.changed,
        "set_id": writing.set_id,
        "cluster": options.cluster,
        "database": options.cluster,
        "manifest": manifest,
        "artifacts": artifacts,
        "targets": writing.reports(),
        "size": artifacts[0]["size"],
        "duration_seconds": manifest["duration_seconds"],
        "start_wal": manifest["start_wal"],
        "stop_wal": manifest["stop_wal"],
        "start_lsn": manifest["start_lsn"],
        "stop_lsn": manifest["stop_lsn"],
        "timeline": manifest["timeline"],
        "warnings": warnings,
    }


def _backup_facts(watcher, server):
    """The manifest fields read from the stream; SourceError when the archive lacks what a
    restore needs (nothing is committed then)."""
    if watcher.error:
        raise SourceError(
            "pg_basebackup wrote an archive this tool cannot follow: %s" % watcher.error
        )
    if not watcher.ended:
        raise SourceError("pg_basebackup's archive ended without the tar end marker")
    if watcher.unsafe:
        raise SourceError(
            "pg_basebackup's archive holds an unsafe member name: %s" % watcher.unsafe
        )
    if watcher.links:
        raise SourceError(
            "the data directory holds links or special files (%s): a restore would refuse them"
            % ", ".join(watcher.links[:5]),
            "a streamed base backup holds one plain data directory; move tablespaces and "
            "symlinked directories (pg_wal) back into it, or use clinic.backup.pg_dump",
        )
    if watcher.label is None:
        raise SourceError("pg_basebackup's archive holds no backup_label")
    if watcher.manifest_tail is None:
        raise SourceError(
            "pg_basebackup's archive holds no backup_manifest: pg_verifybackup could never "
            "check a restore of it",
            "use pg_basebackup 13 or newer, and do not turn manifests off",
        )
    label = parse_backup_label(watcher.label)
    ranges = parse_wal_ranges(watcher.manifest_tail)
    if not ranges:
        raise SourceError("backup_manifest names no WAL-Ranges: the backup's WAL is unknown")
    stop_timeline, _start, stop = ranges[-1]
    start_timeline, start, _end = ranges[0]
    return {
        "timeline": label["timeline"],
        "start_lsn": format_lsn(start),
        "stop_lsn": format_lsn(stop),
        "stop_timeline": stop_timeline,
        "start_wal": wal_file_name(start_timeline, start, server.segment_size),
        "stop_wal": wal_file_name(stop_timeline, stop, server.segment_size, previous=True),
        "checkpoint_lsn": label["checkpoint_lsn"],
        "start_time": label["start_time"],
    }


# ---------------------------------------------------------------------- restore
class BaseRestoreResult(object):
    """What restore_base_backup did: ``data_dir``, ``set_id``, ``manifest`` (the set's),
    ``repository``, ``verified`` (pg_verifybackup's verdict: True, or None when it could
    not run), ``passed_over`` / ``damaged`` (sets not taken, with reasons), ``warnings``."""

    def __init__(self, data_dir, set_id, manifest, repository, **details):
        self.data_dir = data_dir
        self.set_id = set_id
        self.manifest = manifest
        self.repository = repository
        self.verified = details.get("verified")
        self.verify_output = details.get("verify_output", "")
        self.passed_over = details.get("passed_over", [])
        self.damaged = details.get("damaged", [])
        self.warnings = details.get("warnings", [])
        self.files = details.get("files")
        self.bytes = details.get("bytes")
        self.duration_seconds = details.get("duration_seconds")
        self.check_mode = bool(details.get("check_mode"))

    def as_dict(self):
        manifest = self.manifest or {}
        return {
            "changed": not self.check_mode,
            "check_mode": self.check_mode,
            "data_dir": self.data_dir,
            "set_id": self.set_id,
            "repository": self.repository,
            "cluster": manifest.get("cluster"),
            "timeline": manifest.get("timeline"),
            "start_lsn": manifest.get("start_lsn"),
            "stop_lsn": manifest.get("stop_lsn"),
            "start_wal": manifest.get("start_wal"),
            "stop_wal": manifest.get("stop_wal"),
            "stop_time": manifest.get("stop_time"),
            "verified": self.verified,
            "verify_output": self.verify_output,
            "files": self.files,
            "bytes": self.bytes,
            "passed_over": self.passed_over,
            "damaged": self.damaged,
            "duration_seconds": self.duration_seconds,
            "warnings": self.warnings,
        }


class BaseRestoreOptions(ReadOptions):
    """Which base backup to restore and where. ``target_time`` (datetime or ISO 8601
    text) / ``target_lsn`` (``X/Y``): take the newest set that stopped before it; neither:
    the newest ("latest"). ``owner``: user name or uid the data directory is given to
    (root only; the server refuses a data directory it does not own)."""

    def __init__(
        self,
        data_dir,
        cluster=None,
        target_time=None,
        target_lsn=None,
        owner=None,
        pg_bin_dir=None,
        verify=True,
        **read_options,
    ):
        self._set_read_options(**read_options)
        if cluster is not None:
            check_cluster_name(cluster)
        self.cluster = cluster
        self.data_dir = check_data_dir_path(data_dir)
        if target_time is not None and target_lsn is not None:
            raise ConfigError("give target_time or target_lsn, not both")
        self.target_time = _parse_target_time(target_time) if target_time is not None else None
        self.target_lsn = parse_lsn(target_lsn) if target_lsn is not None else None
        self.owner = _resolve_owner(owner) if owner is not None else None
        self.pg_bin_dir = pg_bin_dir
        self.verify = bool(verify)

    def accept(self, entry):
        """Why a usable base backup cannot serve this target, or None."""
        manifest = entry["manifest"]
        try:
            if self.target_time is not None:
                stopped = parse_time(manifest.get("stop_time") or manifest["finished_at"])
                if stopped > self.target_time:
                    return "stopped at %s, after the target time %s" % (
                        isoformat(stopped),
                        isoformat(self.target_time),
                    )
            if (
                self.target_lsn is not None
                and parse_lsn(manifest.get("stop_lsn")) > self.target_lsn
            ):
                return "stopped at LSN %s, after the target LSN %s" % (
                    manifest.get("stop_lsn"),
                    format_lsn(self.target_lsn),
                )
        except (ValueError, ConfigError):
            return "its manifest records no usable stop time or LSN"
        return None


def _parse_target_time(value):
    if isinstance(value, datetime.datetime):
        moment = value
    else:
        text = str(value).strip()
        try:
            moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(
                "target_time %r is not an ISO 8601 time" % (value,),
                "write it like 2026-12-03T14:31:00+00:00 (with its UTC offset)",
            ) from None
    if moment.tzinfo is None:
        raise ConfigError(
            "target_time %r has no UTC offset" % (value,),
            "add one (e.g. +00:00 or Z): the clinic's clock and the server's may differ",
        )
    return moment.astimezone(datetime.timezone.utc)


def _resolve_owner(owner):
    try:
        entry = pwd.getpwuid(owner) if isinstance(owner, int) else pwd.getpwnam(str(owner))
    except (KeyError, TypeError):
        raise ConfigError(
            "owner %r is not a user of this host" % (owner,),
            "give the server's user, e.g. postgres",
        ) from None
    if os.geteuid() not in (0, entry.pw_uid):
        raise ConfigError(
            "only root may give the restored data directory to %s" % entry.pw_name,
            "run the restore as %s, or as root" % entry.pw_name,
        )
    return entry.pw_uid, entry.pw_gid


def check_data_dir_path(data_dir):
    if not isinstance(data_dir, str) or not os.path.isabs(data_dir):
        raise ConfigError(
            "data_dir %r must be an absolute path" % (data_dir,),
            "e.g. /var/lib/postgresql/15/restored",
        )
    path = os.path.normpath(data_dir)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    if path == "/" or any(ord(ch) < 32 for ch in path):
        raise ConfigError("data_dir %r cannot be restored into" % data_dir)
    return path


def prepare_data_dir(path):
    """The EMPTY data directory to extract into: created (0700) when missing; returns
    whether it was created. A non-empty one is refused: a base backup is never mixed
    into files already there (a running cluster's, or a half restore's)."""
    if os.path.islink(path):
        raise ConfigError(
            "data_dir %s is a symbolic link" % path,
            "give the real directory (%s)" % os.path.realpath(path),
        )
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise ConfigError("data_dir %s exists and is not a directory" % path)
        left = os.listdir(path)
        if left:
            raise ConfigError(
                "data_dir %s is not empty (%d entries, e.g. %s)"
                % (path, len(left), sorted(left)[0]),
                "restore into a new or empty directory; a base backup is never extracted over "
                "an existing cluster",
            )
        os.chmod(path, 0o700)
        return False
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ConfigError(
            "the parent directory %s of data_dir does not exist" % parent, "create it first"
        )
    try:
        os.mkdir(path, 0o700)
    except OSError as exc:
        raise ConfigError("cannot create data_dir %s: %s" % (path, exc.strerror)) from None
    os.chmod(path, 0o700)  # mkdir's mode is subject to the umask
    return True


def empty_dir(path):
    """Remove everything inside ``path`` (a failed attempt), keeping the directory."""
    for name in os.listdir(path):
        remove_tree(os.path.join(path, name))


def _chown_tree(path, uid, gid):
    os.lchown(path, uid, gid)
    for current, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(current, name), uid, gid)


def run_pg_verifybackup(bin_dir, data_dir):
    """(ok, output) of ``pg_verifybackup -n`` on ``data_dir`` (None, why: not run)."""
    tool = os.path.join(bin_dir, "pg_verifybackup") if bin_dir else None
    if not tool or not os.path.isfile(tool):
        return None, "pg_verifybackup not found in %s" % bin_dir
    proc = subprocess.run(
        [tool, "--no-parse-wal", "--quiet", data_dir],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, LC_ALL="C"),
        check=False,
    )
    output = proc.stdout[-pipeline.STDERR_TAIL :].decode("utf-8", "replace").strip()
    return proc.returncode == 0, output or "backup successfully verified"


def _pg_major(manifest):
    try:
        return int(str(manifest.get("pg_version", "")).split(".", 1)[0])
    except ValueError:
        return None


def _extract(repo, set_id, options, session, data_dir):
    """Extract ``set_id`` into the empty ``data_dir`` and check it; returns details.
    The caller empties ``data_dir`` when this fails."""
    manifest = load_manifest(repo, set_id, session.key)
    warnings = check_restorable(manifest, options, session.key, KIND, "cluster")
    artifact = next((a for a in manifest["artifacts"] if a["name"] == ARTIFACT_NAME), None)
    if artifact is None or artifact.get("content") != CONTENT:
        raise IntegrityError("set %s holds no %s artifact" % (set_id, CONTENT))
    if repo.artifact_size(set_id, artifact["file"]) is None:
        raise IntegrityError("%s is missing" % repo.location(set_id, artifact["file"]))
    check_readable_now(repo, manifest)
    gpg_session = session.gpg_for(manifest)
    recorded = manifest.get("tar") if isinstance(manifest.get("tar"), dict) else {}
    count, size = recorded.get("files"), recorded.get("bytes")
    extractor = FileTarExtractor(
        data_dir,
        limit_files=count if isinstance(count, int) else None,
        limit_bytes=size if isinstance(size, int) else None,
    )
    try:
        try:
            stream_into(repo, set_id, artifact, manifest, gpg_session, consumer=extractor)
            extractor.finish()
        except BaseException:
            extractor.abort()
            raise
        if isinstance(count, int) and (count, size) != (extractor.files, extractor.bytes):
            raise IntegrityError(
                "set %s restored %d files (%d bytes), its manifest records %s files (%s bytes)"
                % (set_id, extractor.files, extractor.bytes, count, size)
            )
        extractor.apply_directories()
    finally:
        extractor.close()
    if not os.path.isfile(os.path.join(data_dir, SERVER_MANIFEST)):
        raise IntegrityError("set %s holds no backup_manifest: it cannot be checked" % set_id)
    for name in ("pg_wal", os.path.join("pg_wal", "archive_status")):
        try:
            os.mkdir(os.path.join(data_dir, name), 0o700)
        except FileExistsError:
            pass
    verified, output = None, "not run (verify: false)"
    if options.verify:
        try:
            bin_dir = find_pg_bin_dir(_pg_major(manifest), options.pg_bin_dir)
        except ConfigError as exc:
            bin_dir, output = None, str(exc)
        if bin_dir:
            verified, output = run_pg_verifybackup(bin_dir, data_dir)
        if verified is False:
            raise IntegrityError(
                "pg_verifybackup finds the data directory restored from set %s does not match "
                "the server's backup_manifest: %s" % (set_id, output)
            )
        if verified is None:
            warnings.append("the restored data directory was not checked: %s" % output)
    if options.owner is not None:
        _chown_tree(data_dir, *options.owner)
    os.sync()  # the data directory is durable before anyone starts a server on it
    return {
        "manifest": manifest,
        "verified": verified,
        "verify_output": output,
        "files": extractor.files,
        "bytes": extractor.bytes,
        "warnings": warnings,
    }


def restore_base_backup(repositories, options, check_mode=False):
    """Extract the newest usable base backup (see BaseRestoreOptions) of the cluster into
    ``options.data_dir``; returns a BaseRestoreResult.

    Repositories are tried in order: in each, the sets that qualify, newest first (a
    damaged one is passed over for the next older one, with its reason, when
    ``options.fallback``). ConfigError for bad input (a non-empty data_dir, a wrong
    passphrase); IntegrityError when no set could be restored (the data_dir is left
    empty, or removed if this call created it).
    """
    if not repositories:
        raise ConfigError("no repository given", "set a local repository and/or an S3 bucket")
    clock = time.time()
    data_dir = options.data_dir
    passed, damaged, problems = [], [], []
    created = False
    with ReadSession(options.passphrase_file, options.old_passphrase_files) as session:
        if not check_mode:
            created = prepare_data_dir(data_dir)
        elif os.path.lexists(data_dir):
            if not os.path.isdir(data_dir) or os.path.islink(data_dir) or os.listdir(data_dir):
                prepare_data_dir(data_dir)  # raises, naming what is wrong
        elif not os.path.isdir(os.path.dirname(data_dir)):
            raise ConfigError(
                "the parent directory %s of data_dir does not exist" % os.path.dirname(data_dir),
                "create it first",
            )
        try:
            for repo in repositories:
                chosen, passed_here, entries = choose_sets(
                    repo, session, options, KIND, "cluster", options.accept
                )
                clusters = {e["database"] for e in entries if e["id"] in chosen}
                if options.cluster is None and len(clusters) > 1:
                    raise ConfigError(
                        "%s holds base backups of several clusters (%s)"
                        % (repo.url, ", ".join(sorted(clusters))),
                        "set cluster to the one to restore",
                    )
                passed.extend(dict(p, repository=repo.url) for p in passed_here)
                if not chosen:
                    problems.append("%s has no usable base backup" % repo.url)
                    continue
                if check_mode:
                    manifest = load_manifest(repo, chosen[0], session.key)
                    return BaseRestoreResult(
                        data_dir,
                        chosen[0],
                        manifest,
                        repo.url,
                        passed_over=passed,
                        check_mode=True,
                        warnings=["candidates, newest first: %s" % ", ".join(chosen)],
                    )

                def attempt(set_id, repo=repo):
                    try:
                        return _extract(repo, set_id, options, session, data_dir)
                    except BaseException:
                        empty_dir(data_dir)
                        raise

                try:
                    details, damaged_here = try_newest_first(
                        chosen, attempt, options.fallback, data_dir
                    )
                except IntegrityError as exc:
                    problems.append("%s: %s" % (repo.url, exc))
                    if not options.fallback:
                        raise
                    continue
                damaged.extend(dict(d, repository=repo.url) for d in damaged_here)
                return BaseRestoreResult(
                    data_dir,
                    details["manifest"]["id"],
                    details["manifest"],
                    repo.url,
                    verified=details["verified"],
                    verify_output=details["verify_output"],
                    files=details["files"],
                    bytes=details["bytes"],
                    passed_over=passed,
                    damaged=damaged,
                    warnings=details["warnings"],
                    duration_seconds=round(time.time() - clock, 3),
                )
        except BaseException:
            if created:
                remove_tree(data_dir)
            raise
        if created:
            remove_tree(data_dir)
    target = (
        "before %s" % isoformat(options.target_time)
        if options.target_time is not None
        else "before LSN %s" % format_lsn(options.target_lsn)
        if options.target_lsn is not None
        else ""
    )
    raise IntegrityError(
        "no base backup%s%s could be restored into %s"
        % (
            " of cluster %r" % options.cluster if options.cluster else "",
            " " + target if target else "",
            data_dir,
        ),
        "; ".join(
            problems
            + ["passed over: %(set_id)s (%(reason)s)" % p for p in passed]
            + ["damaged: %(set_id)s (%(reason)s)" % d for d in damaged]
        )
        or "run clinic-backup basebackup first",
    )


# ---------------------------------------------------------------------- WAL of a base backup
def _segment_size(manifest):
    size = manifest.get("wal_segment_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def newest_segment(records):
    """The newest usable archived segment (WalRecord), or None."""
    segments = [r for r in records if r.kind == "segment" and r.problem is None]
    return segments[-1] if segments else None


def wal_continuity(manifest, records):
    """(missing names with why, first, last) of the WAL a base backup needs to be
    restored to the newest archived segment: from its start_wal on (at least to its
    stop_wal), following timeline switches through their history files."""
    first, stop = manifest.get("start_wal"), manifest.get("stop_wal")
    newest = newest_segment(records)
    last = stop
    if newest is not None and (
        (newest.timeline, newest.log, newest.seg) > wal.parse_wal_name(stop)[:3]
    ):
        last = newest.name
    missing = wal.check_continuity(records, first, last, _segment_size(manifest))
    problems = {r.name: r.problem for r in records if r.problem}
    named = [
        "%s (%s)" % (name, problems[name]) if name in problems else "%s (not archived)" % name
        for name in missing
    ]
    return named, first, last


def recovery_window(manifest, records):
    """{"earliest": the base backup's stop_time, "latest": archived_at of the last
    segment of the unbroken run of WAL from its start_wal, "latest_wal"}; "latest" is
    None (with "problem") when the WAL up to stop_wal is not all archived. Follows the
    base backup's own timeline."""
    window = {"earliest": manifest.get("stop_time"), "latest": None, "latest_wal": None}
    usable = {r.name: r for r in records if r.problem is None and r.kind == "segment"}
    size = _segment_size(manifest) or wal.DEFAULT_SEGMENT_SIZE
    try:
        name, stop = manifest["start_wal"], wal.parse_wal_name(manifest["stop_wal"])
        last = None
        while name in usable:
            last = usable[name]
            name = wal.segment_after(name, size)
    except (KeyError, ConfigError) as exc:
        window["problem"] = "the manifest names no usable start_wal/stop_wal: %s" % exc
        return window
    if last is None or (last.log, last.seg) < (stop.log, stop.seg):
        window["problem"] = "WAL %s is not archived: this base backup cannot be made consistent" % (
            name
        )
        return window
    window["latest"] = isoformat(last.archived_at) if last.archived_at else None
    window["latest_wal"] = last.name
    return window


class ListedWal(object):
    """A cluster's archived segments as one object listing shows them (a record beside its
    stored file): a catalog listing must not read thousands of WAL records. Only the
    record at the end of a window is read, and its seal checked; verify reads them all."""

    def __init__(self, repo, cluster, key):
        self.repo, self.cluster, self.key = repo, cluster, key
        prefix = wal.cluster_prefix(cluster)
        objects = repo.list_objects(prefix)
        self.present = {}
        for path in objects:
            parts = path[len(prefix) + 1 :].split("/")
            if len(parts) != 2 or not parts[1].endswith(wal.RECORD_SUFFIX):
                continue
            try:
                name = wal.parse_wal_name(parts[1][: -len(wal.RECORD_SUFFIX)])
            except ConfigError:
                continue
            stored = path[: -len(wal.RECORD_SUFFIX)]
            if (
                name.kind == "segment"
                and name.directory == parts[0]
                and any(stored + wal.stored_suffix(c) in objects for c in pipeline.COMPRESSIONS)
            ):
                self.present[name.name] = (name, path)
        self._read = {}

    def records(self, names):
        """WalRecords of ``names`` that are listed: unread, except the last one."""
        out = []
        for index, name in enumerate(names):
            if name not in self.present:
                continue
            parsed, path = self.present[name]
            if index == len(names) - 1:
                out.append(self._checked(parsed, path))
            else:
                out.append(wal.WalRecord(parsed, path))
        return out

    def _checked(self, parsed, path):
        if path not in self._read:
            raw = self.repo.read_object(path)
            if raw is None:
                self._read[path] = wal.WalRecord(parsed, path, problem="gone")
            else:
                record, outcome, problem = wal.check_record(
                    raw, parsed, self.cluster, path, self.key
                )
                self._read[path] = wal.WalRecord(parsed, path, record, problem, outcome)
        return self._read[path]

    def window(self, manifest):
        size = _segment_size(manifest) or wal.DEFAULT_SEGMENT_SIZE
        run = []
        try:
            name = manifest["start_wal"]
            while name in self.present:
                run.append(name)
                name = wal.segment_after(name, size)
        except (KeyError, ConfigError):
            run = []
        window = recovery_window(manifest, self.records(run))
        if window.get("latest") is None and run and "problem" not in window:
            window["problem"] = "the record of %s cannot be used" % run[-1]
        return window


def add_recovery_windows(repo, entries, key):
    """Give every complete base backup entry of ``entries`` (catalog entries of ``repo``)
    its ``recovery_window``; the WAL of each cluster is listed once."""
    listed = {}
    for entry in entries:
        manifest = entry.get("manifest") or {}
        if entry.get("state") != "complete" or manifest.get("kind") != KIND:
            continue
        cluster = manifest.get("cluster") or manifest.get("database")
        if cluster not in listed:
            try:
                listed[cluster] = ListedWal(repo, cluster, key)
            except BackupError as exc:
                listed[cluster] = exc
        found = listed[cluster]
        if isinstance(found, BackupError):
            entry["recovery_window"] = {
                "earliest": manifest.get("stop_time"),
                "latest": None,
                "problem": "the WAL could not be listed: %s" % found,
            }
        else:
            entry["recovery_window"] = found.window(manifest)
    return entries


def prune_unneeded_wal(repo, kept_manifests, key, check_mode=False):
    """After retention: per cluster, delete the WAL before the start_wal of its kept base
    backup that starts earliest (never a segment a kept base backup needs); returns
    [{"cluster", "first_needed", "deleted", "kept"}]."""
    firsts = {}
    for manifest in kept_manifests:
        if manifest.get("kind") != KIND:
            continue
        try:
            start = wal.parse_wal_name(manifest["start_wal"])
        except (KeyError, ConfigError):
            continue  # names no WAL: protects none, and must not lead to deleting any
        cluster = manifest.get("cluster") or manifest["database"]
        order = (start.log, start.seg, start.timeline)
        if cluster not in firsts or order < firsts[cluster][0]:
            firsts[cluster] = (order, start.name)
    results = []
    for cluster in sorted(firsts):
        first = firsts[cluster][1]
        deleted, kept = wal.prune_wal_before(repo, cluster, first, key, check_mode)
        results.append(
            {"cluster": cluster, "first_needed": first, "deleted": deleted, "kept": kept}
        )
    return results
