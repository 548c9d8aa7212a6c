# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Backup repositories: a local directory or an S3 prefix, with one layout.

    <root>/sets/<set_id>/<artifact files>
    <root>/sets/<set_id>/manifest.json       written last: no manifest, no set
    <root>/sets/<set_id>/verification.json   latest verify result (optional)
    <root>/sets/<set_id>/restore_test.json   latest successful restore test (optional)
    <root>/latest/<database>.json            pointer to the newest complete set
    <root>/.staging/<set_id>/                local only: a set being written

Locally a set is written under .staging and renamed into sets/ in one step
after its manifest is fsynced, so a killed run leaves nothing under sets/.
On S3 (no rename) the manifest object is uploaded only after every artifact
upload completed and was size-checked.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import time

from . import authentication
from . import s3 as s3util
from .errors import ConfigError, StoreError

MANIFEST = "manifest.json"
VERIFICATION = "verification.json"
RESTORE_TEST = "restore_test.json"
SETS = "sets"
LATEST = "latest"
STAGING = ".staging"
SET_ID_RE = re.compile(r"^\d{8}T\d{6}Z-[A-Za-z0-9_.-]{1,64}-[0-9a-f]{6}$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")


def safe_name(text, limit=48):
    """A file-name-safe rendering of a database name (for ids and pointers)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip("._-") or "db"
    return cleaned[:limit]


def latest_file(database):
    """File name of a database's newest-set pointer.

    safe_name() maps different names to one ('clinic;db', 'clinic db' and 'clinic_db';
    names past 48 characters): when it changed the name, a hash of the real one is
    appended so that each database keeps its own pointer.
    """
    name = safe_name(database)
    if name != database:
        name += "-" + hashlib.sha256(database.encode("utf-8")).hexdigest()[:8]
    return name + ".json"


def load_json(raw):
    """A stored JSON record; ValueError for anything that is not one. Stored records
    are data a repository writer may have crafted: nesting deep enough to exhaust
    the parser's recursion is "not valid JSON" like any other garbage."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(str(exc) or exc.__class__.__name__) from None


def _pointer_record(raw, database):
    """A pointer document, if it parses and is this database's pointer."""
    try:
        pointer = load_json(raw)
    except ValueError:
        return None
    if not isinstance(pointer, dict) or pointer.get("database") != database:
        return None
    if not isinstance(pointer.get("set_id"), str):
        return None
    return pointer


def _pointer_set_id(pointer, key):
    """The set a pointer names: with ``key``, only if its seal holds (a forged or
    replayed-from-elsewhere pointer must not pin or promote a set)."""
    if pointer is None:
        return None
    if key is not None and authentication.check(pointer, key, "pointer")[0] != (
        authentication.AUTHENTICATED
    ):
        return None
    return pointer["set_id"]


def _open_regular(path):
    """Open a stored file for reading: never through a symlink in its last component,
    never blocking on a FIFO a repository writer put there, only a regular file."""
    fd = os.open(
        path,
        os.O_RDONLY
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_CLOEXEC", 0),
    )
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError(
                "%s is not a regular file" % path,
                "a repository holds only files: someone placed it there, remove it",
            )
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def check_set_id(set_id):
    if not isinstance(set_id, str) or not SET_ID_RE.fullmatch(set_id):
        raise ConfigError(
            "%r is not a backup set id" % (set_id,),
            "use an id from the catalog, e.g. 20261122T010000Z-clinic_db-1a2b3c",
        )
    return set_id


def check_file_name(name):
    if not isinstance(name, str) or not FILE_NAME_RE.fullmatch(name) or ".." in name:
        raise StoreError(
            "refusing artifact name %r from a manifest" % (name,),
            "the manifest may be tampered with: restore from another set",
        )
    return name


def check_object_path(path):
    """A repository path outside sets/ (the WAL archive: wal/<cluster>/...): each part a
    plain file name, never '..', never absolute, never a dot file (temp files)."""
    parts = path.split("/") if isinstance(path, str) else []
    if not parts or any(not FILE_NAME_RE.fullmatch(part) or ".." in part for part in parts):
        raise StoreError(
            "refusing repository path %r" % (path,),
            "a stored record may be tampered with: it names a path outside the archive",
        )
    return path


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, data, mode=0o600):
    """Write ``data`` to ``path`` via temp file + fsync + rename + directory fsync."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, ".%s.tmp-%d" % (os.path.basename(path), os.getpid()))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(directory)


def make_private_dirs(directory, what):
    """Create ``directory`` and its missing parents, each 0700 (makedirs would give the
    parents 0777 minus the umask); returns whether anything was created. A name that
    exists in any form (even a dangling symlink) is not created over: the caller's own
    checks then judge it."""
    missing = []
    while directory and not os.path.lexists(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise StoreError(
                    "cannot create %s %s: %s" % (what, path, exc.strerror),
                    "create it (mode 0700) for the user that runs the backups",
                ) from exc
    return bool(missing)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def dump_json(data):
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _store_error(action, path, exc):
    hint = None
    if exc.errno == errno.ENOSPC:
        hint = "the repository filesystem is full: free space or apply retention"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = "the backup user cannot write there: fix ownership or permissions"
    elif exc.errno == errno.EROFS:
        hint = "the filesystem is read-only"
    return StoreError("cannot %s %s: %s" % (action, path, exc.strerror or exc), hint)


class LocalFileSink(object):
    """Write one artifact file inside a staging directory, fsync on close."""

    def __init__(self, path):
        self.path = path
        self.size = 0
        try:
            self._fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600
            )
        except OSError as exc:
            raise _store_error("create", path, exc) from exc

    @property
    def location(self):
        return self.path

    def write(self, chunk):
        view = memoryview(chunk)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            raise _store_error("write", self.path, exc) from exc
        self.size += len(chunk)

    def close(self):
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise _store_error("fsync", self.path, exc) from exc
        finally:
            os.close(self._fd)
            self._fd = None
        return self.path

    def abort(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        _unlink_quietly(self.path)


class LocalSetWriter(object):
    def __init__(self, repo, set_id):
        self.repo = repo
        self.set_id = set_id
        self.staging = os.path.join(repo.path, STAGING, set_id)
        self.final = os.path.join(repo.path, SETS, set_id)
        try:
            os.makedirs(self.staging, mode=0o700)
        except OSError as exc:
            raise _store_error("create staging directory", self.staging, exc) from exc
        self.sinks = []

    def sink(self, filename):
        sink = LocalFileSink(os.path.join(self.staging, check_file_name(filename)))
        self.sinks.append(sink)
        return sink

    def final_location(self, filename):
        return os.path.join(self.final, filename)

    def staging_dir(self):
        """A private scratch directory on the repository's filesystem."""
        return self.staging

    def commit(self, manifest):
        try:
            atomic_write(os.path.join(self.staging, MANIFEST), dump_json(manifest))
            fsync_dir(self.staging)
            os.rename(self.staging, self.final)
            fsync_dir(os.path.dirname(self.final))
        except OSError as exc:
            raise _store_error("commit backup set in", self.repo.path, exc) from exc

    def abort(self):
        for sink in self.sinks:
            sink.abort()
        shutil.rmtree(self.staging, ignore_errors=True)


class LocalRepository(object):
    kind = "local"

    def __init__(self, path, must_exist=True, create_parents=False):
        if not path or not os.path.isabs(path):
            raise ConfigError(
                "repository path %r must be absolute" % (path,), "e.g. /var/backups/clinic/db"
            )
        self.path = os.path.normpath(path)
        # A missing repository is created, but not a missing parent: with a backup disk
        # unmounted or a typo in the path, sets would land on the wrong disk.
        self.create_parents = bool(create_parents)
        if must_exist and not os.path.isdir(self.path):
            raise ConfigError(
                "repository %s does not exist" % self.path,
                "run a backup first or fix the repository path",
            )

    def ensure_layout(self):
        """Create what is missing (0700: PHI is for the backup user alone); returns
        warnings. A directory this tool did not create is never changed: a world-writable
        one is refused (anyone could plant or delete sets), a group/other-accessible one
        reported."""
        warnings = []
        self._refuse_world_writable()
        if os.path.isdir(self.path):
            mode = stat.S_IMODE(os.stat(self.path).st_mode)
            if mode & 0o077:
                warnings.append(
                    "repository %s is open to other users (mode %s); its sets hold patient "
                    "data: chmod 0700 %s (clinic.backup does not change directories it did "
                    "not create)" % (self.path, oct(mode), self.path)
                )
        for sub in ("", SETS, LATEST, STAGING):
            path = os.path.join(self.path, sub)
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise _store_error("create", path, exc) from exc
        return warnings

    def _refuse_world_writable(self):
        if os.path.isdir(self.path):
            mode = stat.S_IMODE(os.stat(self.path).st_mode)
            if mode & 0o002:
                raise ConfigError(
                    "repository %s is writable by every user (mode %s): anyone could plant or "
                    "delete backup sets" % (self.path, oct(mode)),
                    "make it the backup user's alone: chmod 0700 %s" % self.path,
                )

    def check_writable(self):
        """Fail before any work if the repository cannot take a new set."""
        self._refuse_world_writable()
        parent_dir = os.path.dirname(self.path)
        if (
            not self.create_parents
            and not os.path.isdir(self.path)
            and not os.path.isdir(parent_dir)
        ):
            raise ConfigError(
                "repository %s does not exist, and neither does its parent directory %s"
                % (self.path, parent_dir),
                "is the backup disk mounted? Check the path for a typo; to create the whole "
                "path on purpose, set create_repository: true",
            )
        parent = self.path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise StoreError(
                "repository %s is not writable by this user" % self.path,
                "fix ownership or choose another repository path",
            )

    @property
    def url(self):
        return self.path

    def set_ids(self):
        """Ids of complete sets (those with a manifest), newest first."""
        root = os.path.join(self.path, SETS)
        try:
            names = os.listdir(root)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return []
            raise _store_error("list", root, exc) from exc
        return sorted(
            (
                n
                for n in names
                if SET_ID_RE.fullmatch(n) and os.path.isfile(os.path.join(root, n, MANIFEST))
            ),
            reverse=True,
        )

    def read_file(self, set_id, filename):
        path = self.location(set_id, filename)
        try:
            with _open_regular(path) as handle:
                return handle.read()
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise _store_error("read", path, exc) from exc

    def open_artifact(self, set_id, filename):
        path = self.location(set_id, filename)
        try:
            return _open_regular(path)
        except OSError as exc:
            raise _store_error("open", path, exc) from exc

    def artifact_size(self, set_id, filename):
        try:
            return os.path.getsize(self.location(set_id, filename))
        except OSError:
            return None

    def location(self, set_id, filename):
        return os.path.join(self.path, SETS, check_set_id(set_id), check_file_name(filename))

    def archived_artifacts(self, set_id, filenames):
        return []

    def object_lock_of(self, set_id, filenames=(MANIFEST,)):
        return None  # S3 Object Lock only

    def write_verification(self, set_id, data):
        self.write_record(set_id, VERIFICATION, data)

    def write_record(self, set_id, name, data):
        """A (sealed) record next to a set: its verification, its last restore test."""
        atomic_write(self.location(set_id, name), dump_json(data))

    def begin(self, set_id):
        self.ensure_layout()
        return LocalSetWriter(self, set_id)

    def write_latest(self, database, set_id, pointer=None):
        """Point ``latest`` at ``set_id``; ``pointer``: the (sealed) record to store."""
        pointer = pointer or {"database": database, "set_id": set_id}
        atomic_write(os.path.join(self.path, LATEST, latest_file(database)), dump_json(pointer))

    def read_latest_record(self, database):
        try:
            with _open_regular(os.path.join(self.path, LATEST, latest_file(database))) as handle:
                return _pointer_record(handle.read(), database)
        except (OSError, StoreError):
            return None

    def read_latest(self, database, key=None):
        return _pointer_set_id(self.read_latest_record(database), key)

    # Objects outside sets/ (the WAL archive): written in place, one atomic rename each.
    def object_location(self, path):
        return os.path.join(self.path, *check_object_path(path).split("/"))

    def write_object(self, path, data):
        """Store ``data`` at ``path`` durably (temp + fsync + rename + directory fsync)."""
        target = self.object_location(path)
        self._refuse_world_writable()
        try:
            make_private_dirs(os.path.dirname(target), "repository directory")
            atomic_write(target, data)
        except OSError as exc:
            raise _store_error("write", target, exc) from exc

    def read_object(self, path):
        """The bytes at ``path``, or None when there is no such object."""
        target = self.object_location(path)
        try:
            with _open_regular(target) as handle:
                return handle.read()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise _store_error("read", target, exc) from exc

    def object_size(self, path):
        """Size of the object at ``path``, or None when there is none."""
        try:
            info = os.lstat(self.object_location(path))
        except OSError:
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def list_objects(self, prefix):
        """{path: size} of every object under ``prefix`` (recursively; temp files of
        interrupted writes are not objects)."""
        root = self.object_location(prefix)
        found = {}
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = os.path.relpath(folder, self.path).replace(os.sep, "/")
            for name in files:
                if name.startswith("."):
                    continue
                try:
                    info = os.lstat(os.path.join(folder, name))
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    found[rel + "/" + name] = info.st_size
        return found

    def delete_objects(self, paths):
        """Delete objects in the order given (records before their data)."""
        folders = set()
        for path in paths:
            target = self.object_location(path)
            try:
                os.unlink(target)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _store_error("delete", target, exc) from exc
            folders.add(os.path.dirname(target))
        for folder in folders:
            try:
                fsync_dir(folder)
            except OSError:
                pass

    def remove_stale_temp_objects(self, prefix, older_than_seconds=3600):
        """Temp files of killed writes under ``prefix``; returns their paths."""
        root = self.object_location(prefix)
        removed = []
        now = time.time()
        for folder, _dirs, files in os.walk(root):
            for name in files:
                if name.startswith(".") and ".tmp-" in name:
                    path = os.path.join(folder, name)
                    try:
                        if now - os.lstat(path).st_mtime >= older_than_seconds:
                            os.unlink(path)
                            removed.append(path)
                    except OSError:
                        pass
        return removed

    def cleanup_incomplete(self, keep=(), older_than_seconds=0):
        """Remove staging leftovers of killed runs. The caller holds the repository lock."""
        root = os.path.join(self.path, STAGING)
        removed = []
        if not os.path.isdir(root):
            return removed
        now = time.time()
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name in keep:
                continue
            try:
                if now - os.lstat(path).st_mtime < older_than_seconds:
                    continue
            except OSError:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                _unlink_quietly(path)
            removed.append(name)
        # Temp files of interrupted atomic writes.
        for sub in (LATEST,):
            folder = os.path.join(self.path, sub)
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                if name.startswith(".") and ".tmp-" in name:
                    _unlink_quietly(os.path.join(folder, name))
                    removed.append(os.path.join(sub, name))
        return removed

    def delete_set(self, set_id):
        """Delete a set so that no crash can leave it half-deleted but listed.

        The set directory is first renamed into .staging (one atomic step, made
        durable with a directory fsync), then removed.  A run killed in between
        leaves a leftover under .staging that no listing sees and that the next
        cleanup_incomplete() removes.  Deleting a set that is gone is a no-op.
        """
        sets = os.path.join(self.path, SETS)
        path = os.path.join(sets, check_set_id(set_id))
        if not os.path.lexists(path):
            return
        staging = os.path.join(self.path, STAGING)
        trash = os.path.join(staging, set_id + ".deleting")
        try:
            os.makedirs(staging, mode=0o700, exist_ok=True)
            if os.path.lexists(trash):
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(path, trash)
        except OSError as exc:
            if not os.path.lexists(path):
                return  # deleted by someone else meanwhile
            if exc.errno != errno.EXDEV:
                raise _store_error("delete backup set", path, exc) from exc
            # .staging on another filesystem: drop the manifest first, so that a
            # half-deleted set never looks complete.
            trash = path
            try:
                try:
                    os.unlink(os.path.join(path, MANIFEST))
                except FileNotFoundError:
                    pass
                fsync_dir(path)
            except OSError as inner:
                raise _store_error("delete backup set", path, inner) from inner
        else:
            try:
                fsync_dir(sets)
                fsync_dir(staging)
            except OSError as exc:
                raise _store_error("delete backup set", path, exc) from exc
        shutil.rmtree(trash, ignore_errors=True)


class S3SetWriter(object):
    def __init__(self, repo, set_id):
        self.repo = repo
        self.set_id = set_id
        self.sinks = []
        # One retain-until date for every object of the set (artifacts and manifest), so
        # the whole set unlocks at one moment: retention then never finds half a set.
        self.lock_args = {}
        if repo.object_lock is not None:
            mode, days = repo.object_lock
            self.lock_args = s3util.lock_args(mode, utc_now() + datetime.timedelta(days=days))

    def sink(self, filename):
        key = self.repo.key(self.set_id, check_file_name(filename))
        sink = s3util.MultipartSink(
            self.repo.client,
            self.repo.bucket,
            key,
            self.repo.part_size,
            self.repo.concurrency,
            dict(self.repo.extra_args, **self.lock_args),
        )
        self.sinks.append(sink)
        return sink

    def final_location(self, filename):
        return "s3://%s/%s" % (self.repo.bucket, self.repo.key(self.set_id, filename))

    def commit(self, manifest):
        s3util.put_bytes(
            self.repo.client,
            self.repo.bucket,
            self.repo.key(self.set_id, MANIFEST),
            dump_json(manifest),
            dict(self.repo.record_args, **self.lock_args),
        )

    def abort(self):
        for sink in self.sinks:
            sink.abort()


class S3Repository(object):
    kind = "s3"

    def __init__(
        self,
        client,
        bucket,
        prefix="",
        part_size=s3util.DEFAULT_PART_SIZE,
        concurrency=s3util.DEFAULT_CONCURRENCY,
        extra_args=None,
        object_lock=None,
    ):
        if not bucket or "/" in bucket:
            raise ConfigError(
                "invalid bucket name %r" % (bucket,),
                "give the bare bucket name; put paths in prefix",
            )
        self.client = client
        self.bucket = bucket
        self.prefix = (prefix or "").strip("/")
        self.part_size = s3util.check_part_size(part_size)
        self.concurrency = concurrency
        self.extra_args = dict(extra_args or {})
        # Manifests, verification records and pointers stay readable (STANDARD) whatever
        # class the artifacts go to: a catalog must never need a restore from archive.
        self.record_args = {k: v for k, v in self.extra_args.items() if k != "StorageClass"}
        # (mode, days) every object of a new set is locked with; None: no lock asked for.
        # Only artifacts and manifests are locked: they are written once and are the
        # backup. Verification and restore-test records and ``latest`` pointers are
        # rewritten by design and sealed (a forged one is refused), and losing one loses
        # no data: a set can always be verified again.
        self.object_lock = s3util.check_object_lock(object_lock)
        self._lock_enabled = None
        self._first_versions = {}

    @property
    def url(self):
        return s3util.s3_url(self.bucket, self.prefix)

    def key(self, set_id, filename):
        return s3util.join_key(self.prefix, SETS, check_set_id(set_id), filename)

    def check_writable(self):
        s3util.check_bucket(self.client, self.bucket)
        if self.object_lock is not None:
            s3util.require_object_lock(self.client, self.bucket)

    def ensure_layout(self):
        return []

    def versioned_reads(self):
        """Whether sets are read as first written (bucket with Object Lock enabled).

        There, someone with the backup's credentials can still put a new version over a
        locked object or a delete marker on it (only the stored version is immutable):
        reading the oldest version of each write-once object (artifacts, manifest) and
        listing sets from versions restores the set as written, whatever was put over it.
        An identity that may not read the lock configuration reads current versions.
        """
        if self._lock_enabled is None:
            try:
                self._lock_enabled = s3util.bucket_object_lock(self.client, self.bucket) is not None
            except StoreError:
                self._lock_enabled = False
        return self._lock_enabled

    def _first_version(self, key):
        """VersionId of the object as first written (versioned reads), or None."""
        if not self.versioned_reads():
            return None
        if key not in self._first_versions:
            versions = s3util.list_versions(self.client, self.bucket, key)
            self._first_versions.update(
                s3util.first_versions(v for v in versions if v["Key"] == key)
            )
        return self._first_versions.get(key)

    def set_ids(self):
        sets_prefix = s3util.join_key(self.prefix, SETS) + "/"
        if self.versioned_reads():
            versions = s3util.list_versions(self.client, self.bucket, sets_prefix)
            self._first_versions.update(s3util.first_versions(versions))
            keys = list(self._first_versions)
        else:
            keys = s3util.list_keys(self.client, self.bucket, sets_prefix)
        ids = set()
        for key in keys:
            parts = key.split("/")
            if len(parts) >= 2 and parts[-1] == MANIFEST and SET_ID_RE.fullmatch(parts[-2]):
                ids.add(parts[-2])
        return sorted(ids, reverse=True)

    def read_file(self, set_id, filename):
        key = self.key(set_id, check_file_name(filename))
        # The manifest is written once: read it as first written. Records next to it
        # (verification, restore test) are rewritten: read the current one.
        version = self._first_version(key) if filename == MANIFEST else None
        if s3util.object_info(self.client, self.bucket, key, version) is None:
            return None
        return s3util.get_bytes(self.client, self.bucket, key, version)

    def open_artifact(self, set_id, filename):
        key = self.key(set_id, check_file_name(filename))
        return s3util.open_stream(self.client, self.bucket, key, self._first_version(key))

    def _artifact_info(self, set_id, filename):
        key = self.key(set_id, check_file_name(filename))
        return s3util.object_info(self.client, self.bucket, key, self._first_version(key))

    def artifact_size(self, set_id, filename):
        info = self._artifact_info(set_id, filename)
        return None if info is None else info.get("ContentLength")

    def object_lock_of(self, set_id, filenames=(MANIFEST,)):
        """The Object Lock still holding ``filenames`` of a set (as first written):
        {"mode", "retain_until" (the latest of them), "legal_hold"}, or None when none
        of them is locked any more (or the bucket has no Object Lock)."""
        if not self.versioned_reads():
            return None
        now = utc_now()
        modes, until, hold = set(), None, False
        for name in filenames:
            mode, retain_until, legal_hold = s3util.object_lock_state(
                self._artifact_info(set_id, name), now
            )
            if mode:
                modes.add(mode)
                until = retain_until if until is None else max(until, retain_until)
            hold = hold or bool(legal_hold)
        if not modes and not hold:
            return None
        return {
            "mode": "COMPLIANCE" if "COMPLIANCE" in modes else (modes.pop() if modes else None),
            "retain_until": isoformat(until) if until is not None else None,
            "legal_hold": hold,
        }

    def location(self, set_id, filename):
        return "s3://%s/%s" % (self.bucket, self.key(set_id, check_file_name(filename)))

    def archived_artifacts(self, set_id, filenames):
        """Those of ``filenames`` that sit in archive storage, not readable now."""
        return [name for name in filenames if s3util.archived(self._artifact_info(set_id, name))]

    def write_verification(self, set_id, data):
        self.write_record(set_id, VERIFICATION, data)

    def write_record(self, set_id, name, data):
        """A (sealed) record next to a set: its verification, its last restore test."""
        s3util.put_bytes(
            self.client, self.bucket, self.key(set_id, name), dump_json(data), self.record_args
        )

    def begin(self, set_id):
        return S3SetWriter(self, set_id)

    def write_latest(self, database, set_id, pointer=None):
        """Point ``latest`` at ``set_id``; ``pointer``: the (sealed) record to store."""
        key = s3util.join_key(self.prefix, LATEST, latest_file(database))
        s3util.put_bytes(
            self.client,
            self.bucket,
            key,
            dump_json(pointer or {"database": database, "set_id": set_id}),
            self.record_args,
        )

    def read_latest_record(self, database):
        key = s3util.join_key(self.prefix, LATEST, latest_file(database))
        if s3util.object_info(self.client, self.bucket, key) is None:
            return None
        return _pointer_record(s3util.get_bytes(self.client, self.bucket, key), database)

    def read_latest(self, database, key=None):
        return _pointer_set_id(self.read_latest_record(database), key)

    # Objects outside sets/ (the WAL archive): one PutObject each, checked by its MD5.
    def object_key(self, path):
        return s3util.join_key(self.prefix, check_object_path(path))

    def object_location(self, path):
        return "s3://%s/%s" % (self.bucket, self.object_key(path))

    def write_object(self, path, data):
        s3util.put_bytes(self.client, self.bucket, self.object_key(path), data, self.record_args)

    def read_object(self, path):
        """The bytes at ``path``, or None when there is no such object."""
        return s3util.get_bytes_if_exists(self.client, self.bucket, self.object_key(path))

    def object_size(self, path):
        """Size of the object at ``path``, or None when there is none."""
        info = s3util.object_info(self.client, self.bucket, self.object_key(path))
        return None if info is None else info.get("ContentLength")

    def list_objects(self, prefix):
        """{path: size} of every object under ``prefix``."""
        base = self.object_key(prefix) + "/"
        skip = len(self.prefix) + 1 if self.prefix else 0
        return {
            key[skip:]: item["Size"]
            for key, item in s3util.list_keys(self.client, self.bucket, base).items()
        }

    def delete_objects(self, paths):
        """Delete objects in the order given (records before their data)."""
        for path in paths:
            s3util.delete_keys(self.client, self.bucket, [self.object_key(path)])

    def remove_stale_temp_objects(self, prefix, older_than_seconds=3600):
        return []

    def cleanup_incomplete(self, keep=(), older_than_seconds=0):
        """Abort stale multipart uploads and delete artifacts of sets that never got a manifest."""
        cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
            seconds=older_than_seconds
        )
        sets_prefix = s3util.join_key(self.prefix, SETS) + "/"

        def ours(key):
            # Only what this tool writes: sets/<set id>/<artifact name>. Anything else
            # under the prefix belongs to someone else and is never deleted here.
            parts = key[len(sets_prefix) :].split("/") if key.startswith(sets_prefix) else []
            return (
                len(parts) == 2
                and SET_ID_RE.fullmatch(parts[0]) is not None
                and FILE_NAME_RE.fullmatch(parts[1]) is not None
                and ".." not in parts[1]
                and parts[0] not in keep
            )

        removed = s3util.abort_stale_uploads(self.client, self.bucket, sets_prefix, cutoff, ours)
        by_set = {}
        for key, item in s3util.list_keys(self.client, self.bucket, sets_prefix).items():
            parts = key[len(sets_prefix) :].split("/")
            if len(parts) == 2:
                by_set.setdefault(parts[0], []).append((parts[1], item))
        orphans = []
        for set_id, files in by_set.items():
            if any(name == MANIFEST for name, _item in files):
                continue
            if not all(ours(sets_prefix + set_id + "/" + name) for name, _item in files):
                continue  # not (only) ours: leave the whole folder alone
            if all(item["LastModified"] < cutoff for _name, item in files):
                orphans.extend(sets_prefix + set_id + "/" + name for name, _item in files)
        if orphans:
            s3util.delete_keys(self.client, self.bucket, orphans)
        return removed + orphans

    def delete_set(self, set_id):
        prefix = s3util.join_key(self.prefix, SETS, check_set_id(set_id)) + "/"
        manifest = prefix + MANIFEST
        if self.versioned_reads():
            # Sets are listed from versions here: delete every version and delete marker
            # (the manifest's first), or the set would still be listed, and still stored.
            versions = s3util.list_versions(self.client, self.bucket, prefix)
            pairs = [(v["Key"], v["VersionId"]) for v in versions]
            s3util.delete_versions(self.client, self.bucket, [p for p in pairs if p[0] == manifest])
            s3util.delete_versions(self.client, self.bucket, [p for p in pairs if p[0] != manifest])
            for key in list(self._first_versions):
                if key.startswith(prefix):
                    del self._first_versions[key]
            return
        keys = list(s3util.list_keys(self.client, self.bucket, prefix))
        if manifest in keys:
            s3util.delete_keys(self.client, self.bucket, [manifest])
        s3util.delete_keys(self.client, self.bucket, [k for k in keys if k != manifest])


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def isoformat(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc
    )


def new_set_id(database, moment=None):
    moment = moment or utc_now()
    return "%s-%s-%s" % (
        moment.strftime("%Y%m%dT%H%M%SZ"),
        safe_name(database),
        os.urandom(3).hex(),
    )
