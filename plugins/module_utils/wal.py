# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""WAL archiving through the engine: PostgreSQL's archive_command and restore_command.

Layout (local repository root and S3 prefix alike)::

    wal/<cluster>/keys/<key_id>.key.gpg    the cluster's WAL data key: 32 random bytes
                                           (hex), gpg symmetric AES256 under the
                                           passphrase with the engine's maximum S2K
    wal/<cluster>/keys/<key_id>.json       sealed record of that key file (sha256)
    wal/<cluster>/<16 hex>/<file>.zst.gpg  a segment / .partial / .backup file:
                                           compressed, then gpg with the data key as
                                           passphrase (s2k-mode 1: the key is random,
                                           stretching it buys nothing and costs 0.35
                                           CPU-s per file)
    wal/<cluster>/<16 hex>/<file>.json     its sealed record, written LAST: no record,
                                           no segment
    wal/<cluster>/history/<tli>.history.zst.gpg + .json   timeline history files

The passphrase's expensive key derivation is paid once per data key, not once per
segment. A passphrase rotation starts a new data key (sealed under the new passphrase);
old keys stay readable with ``old_passphrase_files``. Each record names its key_id.

Hand recovery (documented in the README): ``gpg -d keys/<id>.key.gpg > KEY`` with the
passphrase, then ``gpg --batch --passphrase-file KEY -d <seg>.zst.gpg | zstd -d > <seg>``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import collections
import hashlib
import os
import re
import stat
import sys
import threading
import time

from . import authentication, walspool
from .errors import BackupError, ConfigError, IntegrityError, StoreError, UnreachableError
from .pipeline import (
    COMPRESSION_SUFFIX,
    GNUPG_HOME_PREFIX,
    GpgSession,
    OwnedDir,
    Stage,
    compress_argv,
    decompress_argv,
    reap_stale_gpg_homes,
    run_stream,
    stop_gpg_home,
    which_or_fail,
)
from .repository import isoformat, parse_time, safe_name, utc_now

FORMAT_VERSION = 1
PURPOSE = "wal"
WAL = "wal"
KEYS = "keys"
HISTORY = "history"
RECORD_SUFFIX = ".json"
KEY_SUFFIX = ".key.gpg"
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
# WAL compresses well and must keep up with a write burst: zstd's fastest level.
DEFAULT_COMPRESSION_LEVEL = 1
MIN_SEGMENT_SIZE, MAX_SEGMENT_SIZE = 1024 * 1024, 1024 * 1024 * 1024
# The largest .history / .backup file accepted (both are a few hundred bytes).
MAX_SMALL_FILE = 1024 * 1024

_SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_PARTIAL_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})\.partial$")
_BACKUP_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})\.[0-9A-F]{8}\.backup$")
_HISTORY_RE = re.compile(r"^([0-9A-F]{8})\.history$")
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
# Sort order of the kinds at one position: a segment before its .partial / .backup.
_KIND_ORDER = {"history": 0, "segment": 1, "partial": 2, "backup": 3}


class WalName(collections.namedtuple("WalName", "timeline log seg kind name")):
    """A parsed WAL file name (history files: log and seg are 0)."""

    __slots__ = ()

    @property
    def position(self):
        return (self.log, self.seg)

    @property
    def directory(self):
        """Where the file lives under wal/<cluster>/."""
        return HISTORY if self.kind == "history" else self.name[:16]


class WalNotArchived(BackupError):
    """The WAL file is in no repository: restore_command's "not available" (exit 1)."""

    exit_code = 1


class WalRefused(IntegrityError):
    """Every copy of the WAL file is damaged or forged, or a repository that may hold it
    could not be read: recovery must stop here, not end early and promote."""

    # restore_command exiting above 125 makes PostgreSQL abort recovery (a missing file
    # would make it end recovery at this point instead, silently short of the target).
    exit_code = 126


def parse_wal_name(name):
    """WalName of a segment, .partial, .backup or .history file name; ConfigError else."""
    if isinstance(name, str):
        for kind, pattern in (
            ("segment", _SEGMENT_RE),
            ("partial", _PARTIAL_RE),
            ("backup", _BACKUP_RE),
        ):
            match = pattern.fullmatch(name)
            if match:
                return WalName(
                    int(match.group(1), 16),
                    int(match.group(2), 16),
                    int(match.group(3), 16),
                    kind,
                    name,
                )
        match = _HISTORY_RE.fullmatch(name)
        if match:
            return WalName(int(match.group(1), 16), 0, 0, "history", name)
    raise ConfigError(
        "%r is not a WAL file name" % (name,),
        "give a segment (000000010000000000000001), a .partial, .backup or .history file name",
    )


def _segments_per_log(segment_size):
    if (
        not isinstance(segment_size, int)
        or segment_size < MIN_SEGMENT_SIZE
        or segment_size > MAX_SEGMENT_SIZE
        or segment_size & (segment_size - 1)
    ):
        raise ConfigError(
            "WAL segment size %r is not a power of two between 1 MiB and 1 GiB" % (segment_size,)
        )
    return 0x100000000 // segment_size


def segment_name(timeline, segno, segment_size=DEFAULT_SEGMENT_SIZE):
    """File name of segment number ``segno`` (LSN // segment size) on ``timeline``."""
    per_log = _segments_per_log(segment_size)
    return "%08X%08X%08X" % (timeline, segno // per_log, segno % per_log)


def segment_number(name, segment_size=DEFAULT_SEGMENT_SIZE):
    wal = name if isinstance(name, WalName) else parse_wal_name(name)
    per_log = _segments_per_log(segment_size)
    if wal.seg >= per_log:
        raise ConfigError(
            "%s is not a segment of a cluster with %d-byte segments" % (wal.name, segment_size)
        )
    return wal.log * per_log + wal.seg


def segment_after(name, segment_size=DEFAULT_SEGMENT_SIZE):
    """The next segment's name on the same timeline."""
    wal = parse_wal_name(name)
    if wal.kind == "history":
        raise ConfigError("%s is a history file, not a segment" % name)
    return segment_name(wal.timeline, segment_number(wal, segment_size) + 1, segment_size)


def segments_between(first, last, segment_size=DEFAULT_SEGMENT_SIZE):
    """Segment names from ``first`` to ``last`` inclusive, on first's timeline."""
    start, end = parse_wal_name(first), parse_wal_name(last)
    if start.kind == "history" or end.kind == "history":
        raise ConfigError("segments_between takes segment names, not history files")
    if start.timeline != end.timeline:
        raise ConfigError(
            "%s and %s are on different timelines" % (first, last),
            "use check_continuity, which follows timeline switches",
        )
    low, high = segment_number(start, segment_size), segment_number(end, segment_size)
    return [segment_name(start.timeline, n, segment_size) for n in range(low, high + 1)]


def parse_lsn(text):
    match = _LSN_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ConfigError("%r is not an LSN" % (text,), "an LSN looks like 0/3000060")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def parse_history(data):
    """[(parent timeline, switch LSN text)] of a timeline history file's content."""
    entries = []
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        if len(fields) < 2 or not fields[0].isdigit():
            raise IntegrityError("timeline history line %r is malformed" % line)
        parse_lsn(fields[1])
        entries.append([int(fields[0]), fields[1]])
    return entries


def check_cluster(cluster):
    if not isinstance(cluster, str) or not cluster or safe_name(cluster) != cluster:
        raise ConfigError(
            "cluster name %r is not usable in a repository path" % (cluster,),
            "use letters, digits, '_', '.' and '-' (e.g. main)",
        )
    return cluster


def cluster_prefix(cluster):
    return "%s/%s" % (WAL, check_cluster(cluster))


def stored_suffix(compression):
    return COMPRESSION_SUFFIX[compression] + ".gpg"


def object_paths(cluster, name, compression="zstd"):
    """(data path, record path) of a WAL file in a repository."""
    wal = parse_wal_name(name)
    folder = "%s/%s" % (cluster_prefix(cluster), wal.directory)
    return folder + "/" + name + stored_suffix(compression), folder + "/" + name + RECORD_SUFFIX


# ------------------------------------------------------------------ records


class WalRecord(object):
    """One archived WAL file as a repository lists it. ``problem`` is None for a record
    whose seal holds and whose stored file is there at its size; otherwise it says why
    the file cannot be used (such records are listed, never silently dropped)."""

    def __init__(self, wal_name, record_path, record=None, problem=None, authentication=None):
        self.wal = wal_name
        self.name = wal_name.name
        self.kind = wal_name.kind
        self.timeline = wal_name.timeline
        self.log = wal_name.log
        self.seg = wal_name.seg
        self.record_path = record_path
        self.record = record if isinstance(record, dict) else {}
        self.problem = problem
        self.authentication = authentication
        stored = self.record.get("stored") if isinstance(self.record.get("stored"), dict) else {}
        self.stored_file = stored.get("file")
        self.stored_size = stored.get("size")
        self.stored_sha256 = stored.get("sha256")
        self.size = self.record.get("size")
        self.sha256_plain = self.record.get("sha256_plain")
        encryption = self.record.get("encryption")
        self.key_id = encryption.get("key_id") if isinstance(encryption, dict) else None
        self.history = self.record.get("history")
        try:
            self.archived_at = parse_time(self.record.get("archived_at"))
        except (TypeError, ValueError):
            self.archived_at = None

    @property
    def sort_key(self):
        return (self.timeline, self.log, self.seg, _KIND_ORDER[self.kind], self.name)

    @property
    def stored_path(self):
        return self.record_path.rsplit("/", 1)[0] + "/" + self.stored_file

    def as_dict(self):
        return {
            "name": self.name,
            "kind": self.kind,
            "timeline": self.timeline,
            "archived_at": self.record.get("archived_at"),
            "size": self.size,
            "stored_size": self.stored_size,
            "authentication": self.authentication,
            "problem": self.problem,
        }

    def __repr__(self):
        return "WalRecord(%s%s)" % (
            self.name,
            ", problem=%r" % self.problem if self.problem else "",
        )


def _record_problem(record, wal, cluster, record_path):
    """Why a parsed record does not describe ``wal`` (None when it does)."""
    if not isinstance(record, dict):
        return "its record is not a JSON object"
    if record.get("kind") != "wal" or record.get("format_version") != FORMAT_VERSION:
        return "its record is not a format %d WAL record" % FORMAT_VERSION
    if record.get("name") != wal.name or record.get("cluster") != cluster:
        return "its record names %r of cluster %r, not this file" % (
            record.get("name"),
            record.get("cluster"),
        )
    stored = record.get("stored")
    if not (
        isinstance(stored, dict)
        and isinstance(stored.get("file"), str)
        and stored["file"].startswith(wal.name + ".")
        and stored["file"].endswith(".gpg")
        and "/" not in stored["file"]
        and _is_size(stored.get("size"))
        and isinstance(stored.get("sha256"), str)
        and _HEX64.fullmatch(stored["sha256"])
    ):
        return "its record's stored file entry is malformed"
    if not (
        _is_size(record.get("size"))
        and isinstance(record.get("sha256_plain"), str)
        and _HEX64.fullmatch(record["sha256_plain"])
    ):
        return "its record's size or sha256 is malformed"
    encryption = record.get("encryption")
    if not (
        isinstance(encryption, dict)
        and encryption.get("method") == "gpg-symmetric"
        and isinstance(encryption.get("key_id"), str)
        and _KEY_ID_RE.fullmatch(encryption["key_id"])
    ):
        return "its record's encryption entry is malformed"
    compression = record.get("compression")
    if not isinstance(compression, dict) or compression.get("method") not in COMPRESSION_SUFFIX:
        return "its record's compression entry is malformed"
    if not stored["file"] == wal.name + stored_suffix(compression["method"]):
        return "its record's stored file name does not match its compression"
    return None


def _is_size(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_record(raw, wal, cluster, record_path, key):
    """(record dict or None, authentication outcome, problem) of a stored record."""
    try:
        record = _load_json(raw)
    except ValueError as exc:
        return None, None, "its record is not valid JSON: %s" % exc
    problem = _record_problem(record, wal, cluster, record_path)
    if problem:
        return record if isinstance(record, dict) else None, None, problem
    outcome, auth_problem = authentication.check(record, key, PURPOSE)
    if outcome is None:
        return record, None, "its record fails its authentication check: %s" % auth_problem
    if outcome == authentication.UNSEALED and key is not None:
        return record, outcome, "its record is not sealed (every WAL record is): planted?"
    return record, outcome, None


def _load_json(raw):
    from .repository import load_json

    return load_json(raw)


def list_wal(repo, cluster, key, deep=False):
    """Every archived WAL file of ``cluster`` in ``repo`` (WalRecord list sorted by
    timeline, log, seg). Records that are damaged, forged or whose stored file is missing
    or of another size are listed with ``.problem`` set; ``deep`` also reads every
    stored file and checks its sha256 (a flipped bit)."""
    prefix = cluster_prefix(cluster)
    objects = repo.list_objects(prefix)
    records = []
    for path in sorted(objects):
        parts = path[len(prefix) + 1 :].split("/")
        if len(parts) != 2 or parts[0] == KEYS or not parts[1].endswith(RECORD_SUFFIX):
            continue
        try:
            wal = parse_wal_name(parts[1][: -len(RECORD_SUFFIX)])
        except ConfigError:
            continue  # not ours (or not a WAL file): no record of a WAL file
        if wal.directory != parts[0]:
            continue
        raw = repo.read_object(path)
        if raw is None:
            continue  # deleted meanwhile (retention)
        record, outcome, problem = check_record(raw, wal, cluster, path, key)
        item = WalRecord(wal, path, record, problem, outcome)
        if problem is None:
            stored_size = objects.get(item.stored_path)
            if stored_size is None:
                item.problem = "its stored file %s is missing" % item.stored_file
            elif stored_size != item.stored_size:
                item.problem = "its stored file %s is %d bytes, its record says %d" % (
                    item.stored_file,
                    stored_size,
                    item.stored_size,
                )
            elif deep:
                blob = repo.read_object(item.stored_path)
                if blob is None or hashlib.sha256(blob).hexdigest() != item.stored_sha256:
                    item.problem = "its stored file %s does not match its sha256 (damaged)" % (
                        item.stored_file
                    )
        records.append(item)
    records.sort(key=lambda r: r.sort_key)
    return records


def _segment_size_of(records, default=DEFAULT_SEGMENT_SIZE):
    for record in records:
        if record.kind == "segment" and record.problem is None and record.size:
            try:
                _segments_per_log(record.size)
                return record.size
            except ConfigError:
                continue
    return default


def check_continuity(records, first_name, last_name, segment_size=None):
    """Names of the WAL files missing (or unusable) for replay from ``first_name`` to
    ``last_name`` inclusive. On one timeline that is every segment between them; when
    ``last_name`` is on a later timeline, its history file says where each timeline
    branched off, and the path follows it (a missing history file is named)."""
    segment_size = segment_size or _segment_size_of(records)
    usable = {r.name for r in records if r.problem is None}
    first, last = parse_wal_name(first_name), parse_wal_name(last_name)
    if first.timeline == last.timeline:
        return [n for n in segments_between(first_name, last_name, segment_size) if n not in usable]
    history_name = "%08X.history" % last.timeline
    history = [r for r in records if r.name == history_name and r.problem is None]
    if not history or not isinstance(history[0].history, list):
        return [history_name]
    # Each entry: that timeline ended at the switch LSN; the next one begins in the
    # segment holding it (PostgreSQL copies the switch segment onto the new timeline).
    spans = []
    start = segment_number(first, segment_size)
    end = segment_number(last, segment_size)
    for parent, lsn in history[0].history:
        switch = parse_lsn(lsn) // segment_size
        if parent < first.timeline:
            continue
        spans.append((parent, start, switch - 1))
        start = max(start, switch)
    spans.append((last.timeline, start, end))
    if not spans or spans[0][0] != first.timeline:
        return [history_name]
    missing = []
    for timeline, low, high in spans:
        for number in range(low, high + 1):
            name = segment_name(timeline, number, segment_size)
            if name not in usable:
                missing.append(name)
    return missing


def wal_status(repo, cluster, key):
    """What monitoring needs from one repository, cheaply: the newest archived segment
    (its record read and checked), how many files and how many stored bytes."""
    prefix = cluster_prefix(cluster)
    objects = repo.list_objects(prefix)
    names = []
    for path in objects:
        parts = path[len(prefix) + 1 :].split("/")
        if len(parts) == 2 and parts[0] != KEYS and parts[1].endswith(RECORD_SUFFIX):
            try:
                wal = parse_wal_name(parts[1][: -len(RECORD_SUFFIX)])
            except ConfigError:
                continue
            if wal.kind != "history" and wal.directory == parts[0]:
                names.append((wal, path))
    result = {
        "repository": repo.url,
        "cluster": cluster,
        "count": len(names),
        "bytes": sum(size for path, size in objects.items() if not path.endswith(RECORD_SUFFIX)),
        "newest": None,
        "newest_archived_at": None,
        "newest_problem": None,
    }
    if names:
        wal, path = max(names, key=lambda item: (item[0].timeline, item[0].log, item[0].seg))
        raw = repo.read_object(path)
        record, _outcome, problem = (
            check_record(raw, wal, cluster, path, key) if raw is not None else (None, None, "gone")
        )
        result["newest"] = wal.name
        result["newest_problem"] = problem
        if record and not problem:
            result["newest_archived_at"] = record.get("archived_at")
    return result


def prune_wal_before(repo, cluster, first_needed_name, key=None, check_mode=False):
    """Delete the WAL files before ``first_needed_name`` (the start_wal of the oldest
    kept base backup): records first, then their data. History files are never deleted,
    nor anything on a later timeline than first_needed_name (a kept base backup on
    another timeline may need it). Returns (deleted names, kept count)."""
    first = parse_wal_name(first_needed_name)
    prefix = cluster_prefix(cluster)
    objects = repo.list_objects(prefix)
    doomed, kept = {}, set()
    for path in objects:
        parts = path[len(prefix) + 1 :].split("/")
        if len(parts) != 2 or parts[0] in (KEYS, HISTORY):
            continue
        base = parts[1]
        for suffix in (RECORD_SUFFIX,) + tuple(stored_suffix(c) for c in COMPRESSION_SUFFIX):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        else:
            continue
        try:
            wal = parse_wal_name(base)
        except ConfigError:
            continue
        if wal.directory != parts[0]:
            continue
        if wal.timeline <= first.timeline and wal.position < first.position:
            doomed.setdefault(wal.name, []).append(path)
        else:
            kept.add(wal.name)
    deleted = sorted(doomed)
    if not check_mode and deleted:
        # The record goes before the data: a half-pruned file is never listed as archived.
        ordered = [p for n in deleted for p in sorted(doomed[n]) if p.endswith(RECORD_SUFFIX)]
        ordered += [p for n in deleted for p in doomed[n] if not p.endswith(RECORD_SUFFIX)]
        repo.delete_objects(ordered)
    return deleted, len(kept)


# ------------------------------------------------------------------ encryption


def _gpg_env():
    env = dict(os.environ)
    env.pop("LANGUAGE", None)
    env["LC_ALL"] = "C"
    return env


class WalSession(object):
    """What pushing and fetching WAL share within one process: the record key (sealing
    and checking), the data keys already decrypted, and a private gpg home. Thread-safe:
    a worker pushes several segments at once through one session."""

    def __init__(self, key, cluster, compression="zstd", compression_level=None):
        if key is None:
            raise ConfigError(
                "WAL archiving needs passphrase_file",
                "segments are always encrypted and their records sealed: set passphrase_file",
            )
        if compression not in COMPRESSION_SUFFIX:
            raise ConfigError("unknown compression %r" % (compression,))
        self.key = key
        self.cluster = check_cluster(cluster)
        self.compression = compression
        self.compression_level = (
            DEFAULT_COMPRESSION_LEVEL
            if compression_level is None and compression == "zstd"
            else compression_level
        )
        # Fail now (a clear ConfigError) rather than on the first segment.
        compress_argv(compression, self.compression_level)
        self._lock = threading.Lock()
        self._data_keys = {}
        self._writing = None
        # One thread creates the first data key; the others wait for it.
        self._writing_lock = threading.Lock()
        self._home = None
        self.gpg = which_or_fail("gpg", "gnupg")

    # -- gpg home and stages
    def home(self):
        with self._lock:
            if self._home is None:
                reap_stale_gpg_homes()
                self._home = OwnedDir(GNUPG_HOME_PREFIX, remove=stop_gpg_home)
            return self._home.path

    def _data_key_stage(self, data_key, *action):
        read_fd, write_fd = os.pipe()
        try:
            os.write(write_fd, data_key + b"\n")
        finally:
            os.close(write_fd)
        argv = [
            self.gpg,
            "--homedir",
            self.home(),
            "--batch",
            "--no-tty",
            "--quiet",
            "--no-options",
            "--pinentry-mode",
            "loopback",
            "--passphrase-fd",
            str(read_fd),
            "--no-symkey-cache",
        ] + list(action)
        return Stage("gpg", argv, env=_gpg_env(), pass_fds=(read_fd,))

    def encrypt_stage(self, data_key):
        return self._data_key_stage(
            data_key,
            "--symmetric",
            "--cipher-algo",
            "AES256",
            # The data key is 256 random bits: a salted hash (mode 1) is all it needs.
            "--s2k-mode",
            "1",
            "--s2k-digest-algo",
            "SHA512",
            "--compress-algo",
            "none",
            "--output",
            "-",
        )

    def decrypt_stage(self, data_key):
        return self._data_key_stage(data_key, "--decrypt", "--output", "-")

    def close(self):
        with self._lock:
            if self._home is not None:
                self._home.close()
                self._home = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- data keys
    def _key_paths(self, key_id):
        folder = "%s/%s" % (cluster_prefix(self.cluster), KEYS)
        return folder + "/" + key_id + KEY_SUFFIX, folder + "/" + key_id + RECORD_SUFFIX

    def _key_records(self, repo):
        """{key_id: (record, raw record bytes)} of the key records in ``repo`` whose seal
        holds (any passphrase this key knows, the current or an older one)."""
        folder = "%s/%s" % (cluster_prefix(self.cluster), KEYS)
        found = {}
        for path in repo.list_objects(folder):
            name = path.rsplit("/", 1)[-1]
            key_id = name[: -len(RECORD_SUFFIX)] if name.endswith(RECORD_SUFFIX) else None
            if not key_id or not _KEY_ID_RE.fullmatch(key_id):
                continue
            raw = repo.read_object(path)
            record = self._checked_key_record(raw, key_id)
            if record is not None:
                found[key_id] = (record, raw)
        return found

    def _checked_key_record(self, raw, key_id):
        if raw is None:
            return None
        try:
            record = _load_json(raw)
        except ValueError:
            return None
        if not (
            isinstance(record, dict)
            and record.get("kind") == "wal_key"
            and record.get("key_id") == key_id
            and record.get("cluster") == self.cluster
            and isinstance(record.get("sha256"), str)
            and isinstance(record.get("created_at"), str)
        ):
            return None
        if authentication.check(record, self.key, PURPOSE)[0] != authentication.AUTHENTICATED:
            return None
        return record

    def _current_signer(self, record):
        block = record.get(authentication.FIELD) or {}
        try:
            return self.key.signer(bytes.fromhex(block["salt"]), block["key_id"]) is self.key
        except (KeyError, TypeError, ValueError):
            return False

    def _decrypt_key_file(self, record, data, where):
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise IntegrityError(
                "WAL data key %s in %s does not match its record's sha256"
                % (record["key_id"], where),
                "the key file was altered: restore it from another repository",
            )
        out = []
        with GpgSession(self.key.passphrase_for(record)) as gpg:
            run_stream(
                [gpg.decryption()],
                out.append,
                source=[data],
                failure_hint="the key file is damaged or was encrypted with another passphrase",
            )
        value = b"".join(out).strip()
        if not re.fullmatch(rb"[0-9a-f]{64}", value):
            raise IntegrityError("WAL data key %s does not decrypt to a key" % record["key_id"])
        return value

    def data_key(self, repositories, key_id):
        """The data key ``key_id`` (decrypted once per process), from the first repository
        holding a key file that matches its sealed record."""
        with self._lock:
            if key_id in self._data_keys:
                return self._data_keys[key_id]
        if not _KEY_ID_RE.fullmatch(key_id or ""):
            raise IntegrityError("%r is not a WAL data key id" % (key_id,))
        key_path, record_path = self._key_paths(key_id)
        problems = []
        for repo in repositories:
            try:
                record = self._checked_key_record(repo.read_object(record_path), key_id)
                if record is None:
                    problems.append("%s: no valid sealed key record" % repo.url)
                    continue
                data = repo.read_object(key_path)
                if data is None:
                    problems.append("%s: the key file is missing" % repo.url)
                    continue
                value = self._decrypt_key_file(record, data, repo.url)
            except BackupError as exc:
                problems.append("%s: %s" % (repo.url, exc))
                continue
            with self._lock:
                self._data_keys[key_id] = value
            return value
        raise WalRefused(
            "WAL data key %s of cluster %s is not usable: %s"
            % (key_id, self.cluster, "; ".join(problems)),
            "the key files live in wal/%s/keys/ of every repository; give old_passphrase_files "
            "if the passphrase was rotated" % self.cluster,
        )

    def writing_key(self, repositories):
        """(key_id, data key) to encrypt new WAL with: the newest key sealed under the
        current passphrase (created once, at the first push), present in every repository
        it can be copied to. Returns the repositories it could not be stored in."""
        with self._writing_lock:
            return self._writing_key(repositories)

    def _writing_key(self, repositories):
        if self._writing is not None:
            return self._writing + ({},)
        holders, failures = {}, {}
        for repo in repositories:
            try:
                for key_id, (record, raw) in self._key_records(repo).items():
                    if self._current_signer(record):
                        holders.setdefault(key_id, []).append((repo, record, raw))
            except StoreError as exc:
                failures[repo.url] = exc
        if holders:
            key_id = max(holders, key=lambda k: (holders[k][0][1]["created_at"], k))
            repo, record, raw = holders[key_id][0]
            value = self.data_key([repo], key_id)
            key_data = repo.read_object(self._key_paths(key_id)[0])
            missing = [r for r in repositories if r not in [h[0] for h in holders[key_id]]]
        else:
            key_id, value = os.urandom(8).hex(), os.urandom(32).hex().encode("ascii")
            out = []
            with GpgSession(self.key.passphrase_for({})) as gpg:
                run_stream([gpg.encryption()], out.append, source=[value + b"\n"])
            key_data = b"".join(out)
            record = authentication.seal(
                {
                    "format_version": FORMAT_VERSION,
                    "kind": "wal_key",
                    "cluster": self.cluster,
                    "key_id": key_id,
                    "file": key_id + KEY_SUFFIX,
                    "size": len(key_data),
                    "sha256": hashlib.sha256(key_data).hexdigest(),
                    "created_at": isoformat(utc_now()),
                    "cipher": "AES256",
                },
                self.key,
                PURPOSE,
            )
            raw = _dump(record)
            missing = list(repositories)
        key_path, record_path = self._key_paths(key_id)
        for repo in missing:
            if repo.url in failures:
                continue
            try:
                repo.write_object(key_path, key_data)
                repo.write_object(record_path, raw)
            except StoreError as exc:
                failures[repo.url] = exc
        # WAL records share the key record's salt: listing thousands of them derives the
        # record key once, not once per worker run.
        self.key.adopt_salt(record, PURPOSE)
        with self._lock:
            self._data_keys[key_id] = value
            if not failures:
                self._writing = (key_id, value)
        return key_id, value, failures


def _dump(record):
    from .repository import dump_json

    return dump_json(record)


# ------------------------------------------------------------------ push


def read_wal_file(path):
    """(WalName, bytes, os.stat_result) of a WAL file PostgreSQL asks to archive; a
    segment of a size no cluster uses (half a file) is refused."""
    name = os.path.basename(path)
    wal = parse_wal_name(name)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError("cannot open WAL file %s: %s" % (path, exc.strerror)) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("WAL file %s is not a regular file" % path)
        limit = MAX_SEGMENT_SIZE if wal.kind in ("segment", "partial") else MAX_SMALL_FILE
        if info.st_size > limit:
            raise IntegrityError("WAL file %s is %d bytes: too large" % (path, info.st_size))
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 1024 * 1024)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise IntegrityError("WAL file %s grew while being read" % path)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if wal.kind == "segment":
        try:
            _segments_per_log(len(data))
        except ConfigError:
            raise IntegrityError(
                "WAL file %s is %d bytes, not a whole segment: refusing half a segment"
                % (path, len(data))
            ) from None
    return wal, data, info


def push_wal(repositories, cluster, path, session):
    """Archive one WAL file into EVERY repository: compressed, encrypted, hashed, its
    data stored durably before its sealed record. A file already archived with the same
    content is left alone; one archived with other content fails loudly. Returns a
    result dict; raises when any repository did not get it (the others keep it)."""
    wal, data, _info = read_wal_file(path)
    plain_sha = hashlib.sha256(data).hexdigest()
    history = parse_history(data) if wal.kind == "history" else None
    data_path, record_path = object_paths(cluster, wal.name, session.compression)
    needed, already, failures, warnings = [], [], {}, []
    for repo in repositories:
        try:
            raw = repo.read_object(record_path)
        except StoreError as exc:
            failures[repo.url] = exc
            continue
        if raw is None:
            needed.append(repo)
            continue
        record, _outcome, problem = check_record(raw, wal, cluster, record_path, session.key)
        if problem is None and record.get("sha256_plain") != plain_sha:
            raise IntegrityError(
                "WAL file %s is already archived in %s with different content (sha256 %s, "
                "this one %s): refusing to overwrite it"
                % (wal.name, repo.url, record.get("sha256_plain"), plain_sha),
                "two clusters may be archiving under one cluster name, or a restored "
                "cluster reuses the old timeline: give each its own cluster name",
            )
        if problem is None:
            # The record alone is not the file: a stored file deleted or cut short since
            # must not let "already archived" pass.
            try:
                stored_size = repo.object_size(
                    record_path.rsplit("/", 1)[0] + "/" + record["stored"]["file"]
                )
            except StoreError as exc:
                failures[repo.url] = exc
                continue
            if stored_size == record["stored"]["size"]:
                already.append(repo.url)
                continue
            problem = "its stored file is missing or of another size"
        if problem is not None:
            warnings.append(
                "%s: replacing an unusable record of %s (%s)" % (repo.url, wal.name, problem)
            )
            needed.append(repo)
    if needed:
        key_id, data_key, key_failures = session.writing_key(needed)
        failures.update(key_failures)
        needed = [r for r in needed if r.url not in key_failures]
        stages = []
        compress = compress_argv(session.compression, session.compression_level)
        if compress:
            stages.append(Stage("compression", compress))
        stages.append(session.encrypt_stage(data_key))
        out = []
        stored = run_stream(stages, out.append, source=[data])
        blob = b"".join(out)
        record = authentication.seal(
            {
                "format_version": FORMAT_VERSION,
                "kind": "wal",
                "cluster": cluster,
                "name": wal.name,
                "timeline": wal.timeline,
                "size": len(data),
                "sha256_plain": plain_sha,
                "stored": {
                    "file": data_path.rsplit("/", 1)[-1],
                    "size": stored.size,
                    "sha256": stored.sha256,
                },
                "compression": {
                    "method": session.compression,
                    "level": session.compression_level,
                },
                "encryption": {
                    "method": "gpg-symmetric",
                    "cipher": "AES256",
                    "key_id": key_id,
                },
                "archived_at": isoformat(utc_now()),
                "history": history,
            },
            session.key,
            PURPOSE,
        )
        raw = _dump(record)
        for repo in needed:
            try:
                repo.write_object(data_path, blob)
                repo.write_object(record_path, raw)
            except StoreError as exc:
                failures[repo.url] = exc
    result = {
        "name": wal.name,
        "size": len(data),
        "sha256_plain": plain_sha,
        "stored_in": [r.url for r in needed if r.url not in failures] + already,
        "already_archived": already,
        "warnings": warnings,
    }
    if failures:
        error_class = (
            UnreachableError
            if all(isinstance(e, UnreachableError) for e in failures.values())
            else StoreError
        )
        error = error_class(
            "WAL file %s is not archived in every repository: %s"
            % (
                wal.name,
                "; ".join("%s: %s" % (url, exc) for url, exc in sorted(failures.items())),
            ),
            "PostgreSQL keeps the file and retries; the repositories that got it keep it",
        )
        error.result = result
        raise error
    return result


# ------------------------------------------------------------------ fetch


def _write_verified(session, record, blob, dest_path, data_key):
    """Decrypt + decompress ``blob`` into a temp file beside dest_path, check size and
    sha256 of the plaintext, then rename it into place. Nothing unverified is left."""
    directory = os.path.dirname(os.path.abspath(dest_path))
    tmp = os.path.join(
        directory,
        ".%s.clinic-tmp-%d-%d" % (os.path.basename(dest_path), os.getpid(), threading.get_ident()),
    )
    stages = [session.decrypt_stage(data_key)]
    decompress = decompress_argv(record["compression"]["method"])
    if decompress:
        stages.append(Stage("decompression", decompress))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            result = run_stream(
                stages,
                handle.write,
                source=[blob],
                failure_hint="the stored file is damaged, or forged with another key",
            )
            handle.flush()
            os.fsync(handle.fileno())
        if result.size != record["size"] or result.sha256 != record["sha256_plain"]:
            raise IntegrityError(
                "decrypts to %d bytes with sha256 %s; its record says %d bytes, %s"
                % (result.size, result.sha256, record["size"], record["sha256_plain"])
            )
        os.rename(tmp, dest_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def fetch_wal(repositories, cluster, name, dest_path, session):
    """Restore one archived WAL file to ``dest_path``: from the first repository holding
    a valid copy (sealed record, stored sha256, plaintext sha256 all checked), written
    atomically. Raises WalNotArchived when no repository has it (nothing written),
    WalRefused when every copy is damaged or forged, or a repository that may hold it
    could not be read (the file is named)."""
    wal = parse_wal_name(name)
    _data_path, record_path = object_paths(cluster, wal.name, session.compression)
    problems, unreachable = [], []
    for repo in repositories:
        try:
            raw = repo.read_object(record_path)
            if raw is None:
                continue
            record, _outcome, problem = check_record(raw, wal, cluster, record_path, session.key)
            if problem:
                problems.append("%s: %s" % (repo.url, problem))
                continue
            stored_path = record_path.rsplit("/", 1)[0] + "/" + record["stored"]["file"]
            blob = repo.read_object(stored_path)
            if blob is None:
                problems.append("%s: its stored file is missing" % repo.url)
                continue
            if (
                len(blob) != record["stored"]["size"]
                or hashlib.sha256(blob).hexdigest() != record["stored"]["sha256"]
            ):
                problems.append(
                    "%s: its stored file does not match its record's size and sha256 "
                    "(damaged or altered)" % repo.url
                )
                continue
            data_key = session.data_key(
                [repo] + [r for r in repositories if r is not repo], record["encryption"]["key_id"]
            )
            try:
                _write_verified(session, record, blob, dest_path, data_key)
            except OSError as exc:
                raise WalRefused(
                    "cannot write WAL file %s to %s: %s" % (wal.name, dest_path, exc.strerror),
                    "free space where PostgreSQL restores WAL and start the server again",
                ) from exc
            return record
        except WalRefused as exc:
            problems.append("%s: %s" % (repo.url, exc.message))
        except IntegrityError as exc:
            problems.append("%s: %s" % (repo.url, exc.message))
        except BackupError as exc:
            if isinstance(exc, StoreError):
                unreachable.append("%s: %s" % (repo.url, exc.message))
            else:
                problems.append("%s: %s" % (repo.url, exc.message))
    if problems:
        raise WalRefused(
            "WAL file %s is damaged or forged in every repository holding it: %s"
            % (wal.name, "; ".join(problems + unreachable)),
            "recovery stops here rather than end early: restore the file from another copy, "
            "or choose a recovery target before it",
        )
    if unreachable:
        raise WalRefused(
            "cannot tell whether WAL file %s is archived: %s" % (wal.name, "; ".join(unreachable)),
            "recovery stops here rather than end early: make the repository reachable and "
            "start the server again",
        )
    later = _later_segment(repositories, cluster, wal) if wal.kind == "segment" else None
    if later:
        raise WalRefused(
            "WAL file %s is missing from the archive, but %s after it is archived: a gap "
            "(deleted or never stored), not the end of the archive" % (wal.name, later),
            "recovery stops here rather than end early at the gap: restore the file from "
            "another copy, or choose a recovery target before it",
        )
    raise WalNotArchived("WAL file %s is not archived" % wal.name)


def _later_segment(repositories, cluster, wal):
    """A segment archived after ``wal`` on its timeline (same or next log directory), or
    None: tells a hole in the archive from its end."""
    prefix = cluster_prefix(cluster)
    folders = [wal.name[:16], "%08X%08X" % (wal.timeline, wal.log + 1)]
    for repo in repositories:
        for folder in folders:
            try:
                objects = repo.list_objects(prefix + "/" + folder)
            except StoreError:
                continue
            for path in sorted(objects):
                base = path.rsplit("/", 1)[-1]
                if not base.endswith(RECORD_SUFFIX):
                    continue
                try:
                    other = parse_wal_name(base[: -len(RECORD_SUFFIX)])
                except ConfigError:
                    continue
                if (
                    other.kind == "segment"
                    and other.timeline == wal.timeline
                    and other.position > wal.position
                ):
                    return other.name
    return None


# ------------------------------------------------------------------ monitoring


def read_archiver(connection):
    """pg_stat_archiver of the server (a PgConnection), plus how many files wait to be
    archived when this role may list archive_status (superuser or pg_monitor)."""
    import psycopg2
    from psycopg2 import errorcodes

    conn = connection.connect()
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT archived_count, last_archived_wal,"
                " extract(epoch FROM last_archived_time)::float8, failed_count,"
                " last_failed_wal, extract(epoch FROM last_failed_time)::float8,"
                " extract(epoch FROM now())::float8, current_setting('archive_mode'),"
                " current_setting('archive_command')"
                " FROM pg_stat_archiver"
            )
            row = cursor.fetchone()
            pending = None
            try:
                cursor.execute(
                    "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'"
                )
                pending = cursor.fetchone()[0]
            except psycopg2.Error as exc:
                if exc.pgcode not in (
                    errorcodes.INSUFFICIENT_PRIVILEGE,
                    errorcodes.UNDEFINED_FUNCTION,
                ):
                    raise
    except psycopg2.Error as exc:
        raise StoreError("cannot read pg_stat_archiver: %s" % _one_line(exc)) from exc
    finally:
        conn.close()
    return {
        "archived_count": row[0],
        "last_archived_wal": row[1],
        "last_archived_time": row[2],
        "failed_count": row[3],
        "last_failed_wal": row[4],
        "last_failed_time": row[5],
        "server_time": row[6],
        "archive_mode": row[7],
        "archive_command_set": bool(row[8]),
        "pending": pending,
    }


# ------------------------------------------------------------------ background workers


def _config_for_worker(config_path):
    """The agent's config, checked exactly as the agent checks it."""
    from .agent import check_config, load_config

    config = load_config(config_path)
    check_config(config)
    return config


def session_for(config):
    """The WalSession a config describes (cluster, passphrase, compression)."""
    if config.get("encrypt") is False:
        raise ConfigError(
            "WAL archives are always encrypted, but the config says encrypt: false",
            "give WAL archiving a config without encrypt: false (and with passphrase_file)",
        )
    key = authentication.RecordKey.from_file(
        config.get("passphrase_file"), config.get("old_passphrase_files")
    )
    wal_options = config.get("wal") or {}
    return WalSession(
        key,
        config.get("cluster") or "main",
        compression=config.get("compression") or "zstd",
        compression_level=wal_options.get("compression_level"),
    )


def _one_line(exc):
    return " ".join(str(exc).split())[:2000]


def ready_files(wal_dir, spool):
    """Files PostgreSQL marked ready to archive that have no status in the spool yet:
    history files first (PostgreSQL's own order), then by name. Status files of files
    that are no longer .ready (PostgreSQL marked them .done) are removed."""
    try:
        names = os.listdir(os.path.join(wal_dir, "archive_status"))
    except OSError:
        return []
    waiting = {
        entry[: -len(".ready")]
        for entry in names
        if entry.endswith(".ready") and walspool.valid_name(entry[: -len(".ready")])
    }
    push_dir = os.path.join(spool, walspool.PUSH)
    known = set()
    for entry in os.listdir(push_dir):
        name, _dot, outcome = entry.rpartition(".")
        if outcome not in ("ok", "error") or not walspool.valid_name(name):
            continue
        if name in waiting:
            known.add(name)
        elif outcome == "ok":
            try:
                os.unlink(os.path.join(push_dir, entry))
            except OSError:
                pass
    return sorted(waiting - known, key=lambda n: (not n.endswith(".history"), n))


# How long an idle worker keeps watching for new .ready files before it exits.
PUSH_LINGER_SECONDS = 3.0


def _remove_stale_temps(repos, cluster, spool, every_seconds=3600):
    """Once an hour: temp files of killed writes in the local archive (never listed, but
    they take space)."""
    marker = os.path.join(spool, ".temps-checked")
    try:
        if time.time() - os.stat(marker).st_mtime < every_seconds:
            return
    except OSError:
        pass
    for repo in repos:
        try:
            repo.remove_stale_temp_objects(cluster_prefix(cluster))
        except (OSError, StoreError):
            pass
    with open(marker, "w"):
        pass


def run_push_worker(config_path, wal_dir):
    """Push every .ready file of ``wal_dir`` with wal.workers threads, writing each one's
    .ok (after it is stored in every repository) or .error. Exits when idle, or after a
    pass with errors (PostgreSQL's retry starts the next worker)."""
    config = _config_for_worker(config_path)
    spool = walspool.spool_dir(config)
    walspool.make_spool(spool)
    lock = walspool.try_lock(os.path.join(spool, walspool.PUSH_LOCK))
    if lock is None:
        return 0  # another worker is pushing
    try:
        push_dir = os.path.join(spool, walspool.PUSH)
        # A new run retries everything: earlier errors are stale.
        for entry in os.listdir(push_dir):
            if entry.endswith(".error"):
                os.unlink(os.path.join(push_dir, entry))
        from concurrent.futures import ThreadPoolExecutor

        from .agent import repositories

        repos = repositories(config, True)
        for repo in repos:
            if repo.kind == "local":
                repo.check_writable()
                repo.ensure_layout()
        cluster = config.get("cluster") or "main"
        workers = max(1, int(walspool.wal_settings(config).get("workers") or 1))
        _remove_stale_temps(repos, cluster, spool)

        def push_one(name):
            path = os.path.join(wal_dir, name)
            try:
                identity = walspool.file_identity(os.stat(path))
                push_wal(repos, cluster, path, session)
            except FileNotFoundError:
                # A .ready without its file: PostgreSQL removes such orphans itself; the
                # status keeps this worker from picking it up again and again.
                walspool.write_status(spool, name, "error", {"msg": "%s is gone" % path})
                return True
            except Exception as exc:  # every failure must reach the foreground call
                walspool.write_status(spool, name, "error", {"msg": _one_line(exc)})
                return False
            walspool.write_status(spool, name, "ok", identity)
            return True

        with session_for(config) as session, ThreadPoolExecutor(workers) as pool:
            idle_since = time.monotonic()
            while True:
                todo = ready_files(wal_dir, spool)
                if not todo:
                    if time.monotonic() - idle_since > PUSH_LINGER_SECONDS:
                        return 0
                    time.sleep(0.1)
                    continue
                if not all(pool.map(push_one, todo)):
                    return 1
                idle_since = time.monotonic()
    finally:
        os.close(lock)


def prefetch_window(cursor, count, segment_size=DEFAULT_SEGMENT_SIZE):
    names, name = [], cursor
    for _index in range(count):
        name = segment_after(name, segment_size)
        names.append(name)
    return names


def run_fetch_worker(config_path, start_name):
    """Keep the segment a foreground call waits for and the ``wal.fetch_prefetch``
    segments after the cursor (the file recovery asked for last) verified in
    <spool>/fetch/, ``wal.workers`` fetches in flight at any time (a slow one does not
    hold up the others). A segment it cannot get is noted ``<name>.missing`` for the
    foreground, which leaves it to the engine. Exits when idle."""
    config = _config_for_worker(config_path)
    spool = walspool.spool_dir(config)
    walspool.make_spool(spool)
    lock = walspool.try_lock(os.path.join(spool, walspool.FETCH_LOCK))
    if lock is None:
        return 0
    try:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
        from concurrent.futures import wait as wait_for

        from .agent import repositories

        settings = walspool.wal_settings(config)
        count = int(settings.get("fetch_prefetch") or 0)
        workers = max(1, int(settings.get("workers") or 1))
        repos = repositories(config, False)
        cluster = config.get("cluster") or "main"
        fetch_dir = os.path.join(spool, walspool.FETCH)
        missing, fetched, in_flight = set(), set(), {}
        # Notes of an earlier worker are stale: this one tries those segments again.
        for entry in os.listdir(fetch_dir):
            if entry.endswith(".missing"):
                os.unlink(os.path.join(fetch_dir, entry))

        def fetch_one(name):
            try:
                fetch_wal(repos, cluster, name, os.path.join(fetch_dir, name), session)
                fetched.add(name)
                return
            except WalNotArchived:
                pass
            except Exception as exc:  # the foreground's own fetch reports it by name
                sys.stderr.write("prefetch of %s failed: %s\n" % (name, _one_line(exc)))
            missing.add(name)
            with open(walspool.missing_path(spool, name), "w"):
                pass

        def window_of(cursor, wanted):
            try:
                after = prefetch_window(cursor, count) if count else []
            except ConfigError:
                after = []
            return ([cursor] if wanted else []) + after

        with session_for(config) as session, ThreadPoolExecutor(workers) as pool:
            idle_since = time.monotonic()
            while True:
                cursor, wanted = walspool.read_cursor(spool)
                if cursor is None:
                    cursor, wanted = start_name, True
                window = window_of(cursor, wanted)
                for name in [n for n, future in in_flight.items() if future.done()]:
                    in_flight.pop(name).result()
                # Files outside the window were served, skipped by recovery or belong to
                # an earlier one: they are never served, so they go (notes too).
                for entry in os.listdir(fetch_dir):
                    name = entry[: -len(".missing")] if entry.endswith(".missing") else entry
                    if walspool.valid_name(name) and name not in window and name not in in_flight:
                        os.unlink(os.path.join(fetch_dir, entry))
                # A segment served is fetched again only when a call waits for it anew
                # (recovery may read a segment twice).
                todo = [
                    n
                    for n in window
                    if n not in in_flight
                    and (n not in fetched or (wanted and n == cursor))
                    and n not in missing
                    and not os.path.exists(os.path.join(fetch_dir, n))
                ]
                for name in todo[: max(0, workers - len(in_flight))]:
                    in_flight[name] = pool.submit(fetch_one, name)
                if in_flight:
                    idle_since = time.monotonic()
                    wait_for(list(in_flight.values()), timeout=0.02, return_when=FIRST_COMPLETED)
                    continue
                if time.monotonic() - idle_since > PUSH_LINGER_SECONDS:
                    return 0
                time.sleep(0.01)
    finally:
        os.close(lock)


def worker_main(argv):
    """``python -m ...walspool push WAL_DIR CONFIG`` / ``fetch NAME CONFIG``."""
    if len(argv) != 3 or argv[0] not in (walspool.PUSH, walspool.FETCH):
        sys.stderr.write("usage: walspool {push CONFIG WAL_DIR | fetch CONFIG NAME}\n")
        return 2
    kind, config_path, argument = argv
    sys.stderr.write(
        "%s %s worker %d started for %s\n" % (isoformat(utc_now()), kind, os.getpid(), argument)
    )
    try:
        if kind == walspool.PUSH:
            return run_push_worker(config_path, argument)
        return run_fetch_worker(config_path, argument)
    except BackupError as exc:
        sys.stderr.write("%s worker failed: %s\n" % (kind, _one_line(exc)))
        return 1
