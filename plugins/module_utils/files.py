# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""File system backup sets (user uploads, configuration) and their restore.

Backup: one tar stream, written by Python while walking the given paths, fed
straight into the same pipeline as the database dumps (compression -> gpg ->
sha256 -> every target); no temporary copy, no plaintext on disk. The set gets
the same layout, manifest (written last), lock, latest pointer and retention
as a database set; its manifest says ``kind: files`` and its ``database``
field holds the set's name (``uploads``, ``config``...).

Archive layout: the i-th path is stored under ``<i>-<basename>`` (``0-uploads/``,
``1-.env``), so two paths with one basename never collide. Members carry the
numeric owner, the mode and the mtime. Regular files, directories and symbolic
links are stored (links as links, never followed); sockets, FIFOs and devices
are skipped. A link whose target lies outside its path is skipped too (restore
would refuse it); an absolute link to a place inside the path is stored as the
equivalent relative link. A local repository lying inside a path is left out.

A file that changes while it is read is stored the way GNU tar does it: the
header declares the size seen when the file was opened and exactly that many
bytes follow - a file that shrank is padded with zero bytes, one that grew is
cut at the declared size - and the file is reported as changed. The archive
therefore always stays readable. A file that vanished before it was opened is
reported and left out. A file or directory that cannot be read (permissions,
I/O error) is an error: the set is still stored with everything else, and the
run fails naming the paths.

File names may be patient data: the manifest (stored in clear) records only
counts of what was skipped or changed; the paths are in the run's result.

Restore: the stored bytes are streamed (sha256, gpg, decompression) into a
safe extractor that writes into a new sibling of the target,
``<target>.restoring-<hex>``; the sha256 and the file count and bytes are
checked against the manifest; then the directory is renamed into place
(``create``), swapped in with the current one renamed aside to
``<target>.pre-restore-<UTC time>`` and kept (``replace``), or removed after
measuring the restore (``rehearse``). A set of one directory is restored as that
directory's content; a set of several paths (or of a single file) is restored
as its archive layout (one entry per path).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import fnmatch
import glob
import os
import posixpath
import re
import shutil
import stat
import tarfile
import time

from . import pipeline
from .catalog import (
    load_manifest,
)
from .errors import BackupError, ConfigError, IntegrityError, StoreError
from .lifecycle import (
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
from .repository import fsync_dir, isoformat, new_set_id, parse_time, utc_now
from .tarsafety import unsafe_member

KIND = "files"
ARTIFACT_NAME = "files"
CONTENT = "files-tar"
FORMAT = "tar"
MODES = ("create", "replace", "rehearse")
WORK_MARK = ".restoring-"
PREVIOUS_MARK = ".pre-restore-"
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,47}$")
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
CHUNK = pipeline.CHUNK_SIZE
REPORT_LIMIT = 200  # paths listed per kind in a result; the counts are always complete
NO_SET_ID_BITS = ~(stat.S_ISUID | stat.S_ISGID) & 0o7777

# Why an entry was left out of the archive.
SPECIAL = "special file"
VANISHED = "vanished"
LINK_OUTSIDE = "link outside the path"
REPOSITORY = "backup repository"
UNREADABLE = "unreadable"

_SPECIAL_NAMES = (
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


# ---------------------------------------------------------------------- options
def check_set_name(name, what="name"):
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(
            "%s %r is not a valid file set name" % (what, name),
            "use letters, digits, '_', '.' and '-' (at most 48, not starting with '.' or '-'), "
            "e.g. uploads or config",
        )
    return name


def _inside(path, root):
    """True if the absolute ``path`` is ``root`` or below it (both normalised)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def member_prefixes(paths):
    """The archive name of each path: ``<index>-<basename>``, unique by construction."""
    return ["%d-%s" % (index, os.path.basename(path)) for index, path in enumerate(paths)]


class FileBackupOptions(StreamOptions):
    """What to archive and how; validated on construction (ConfigError)."""

    def __init__(
        self,
        name,
        paths,
        exclude=(),
        compression="zstd",
        compression_level=None,
        encrypt=True,
        passphrase_file=None,
        label=None,
        stale_seconds=3600,
    ):
        self.name = check_set_name(name)
        if isinstance(paths, str) or not paths:
            raise ConfigError("paths must be a non-empty list of absolute paths")
        self.paths = [check_source_path(p) for p in paths]
        check_overlaps(self.paths)
        self.exclude = []
        for pattern in exclude or ():
            if not isinstance(pattern, str) or not pattern.strip():
                raise ConfigError(
                    "exclude patterns must be non-empty strings (got %r)" % (pattern,)
                )
            self.exclude.append(pattern)
        self._set_stream_options(
            compression, compression_level, 0, encrypt, passphrase_file, label, stale_seconds
        )

    def artifact_file(self):
        name = self.name + ".tar" + pipeline.COMPRESSION_SUFFIX[self.compression]
        return name + (".gpg" if self.encrypt else "")

    def describe(self):
        return {"paths": list(self.paths), "exclude": list(self.exclude)}


def check_source_path(path):
    """A normalised absolute path that exists as a directory or regular file."""
    if not isinstance(path, str) or not path:
        raise ConfigError("paths must be absolute paths (got %r)" % (path,))
    if not os.path.isabs(path):
        raise ConfigError(
            "path %r is relative" % path, "give absolute paths, e.g. /var/www/clinic/uploads"
        )
    normal = os.path.normpath(path)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if normal == "/":
        raise ConfigError("refusing to back up the whole file system (/)", "name directories")
    try:
        info = os.stat(normal)
    except FileNotFoundError:
        raise ConfigError(
            "path %s does not exist" % normal, "fix the path or remove it from paths"
        ) from None
    except OSError as exc:
        raise ConfigError("cannot read path %s: %s" % (normal, exc.strerror)) from None
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        raise ConfigError(
            "path %s is neither a directory nor a regular file" % normal,
            "back up directories and files only",
        )
    return normal


def check_overlaps(paths):
    """Refuse the same place twice or one path inside another (compared after links)."""
    real = [os.path.realpath(p) for p in paths]
    for i, first in enumerate(real):
        for j, second in enumerate(real):
            if i == j:
                continue
            if first == second and i < j:
                raise ConfigError(
                    "paths %s and %s are the same place" % (paths[i], paths[j]),
                    "list each path once",
                )
            if first != second and _inside(first, second):
                raise ConfigError(
                    "path %s lies inside %s" % (paths[i], paths[j]),
                    "give only %s (use exclude to leave parts of it out)" % paths[j],
                )


# ---------------------------------------------------------------------- reading files
# Module-level so that tests can simulate files changing under the reader.
def _open_for_reading(path):
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    # O_NONBLOCK: a FIFO swapped in after lstat must not hang the backup.
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def _read_chunk(fd, size):
    return os.read(fd, size)


class _Root(object):
    def __init__(self, index, path, member):
        self.index = index
        self.path = path
        self.real = os.path.realpath(path)
        self.member = member
        self.kind = "directory" if os.path.isdir(self.real) else "file"

    def as_dict(self):
        return {"path": self.path, "member": self.member, "type": self.kind}


def _padding(size):
    return (BLOCK - size % BLOCK) % BLOCK


class TarProducer(object):
    """Iterable of the bytes of one tar archive of ``paths``, built while walking them.

    ``read=False`` walks and counts without opening a file (check mode).
    After iteration, the counters and lists describe what was stored and left out.
    """

    def __init__(self, paths, exclude=(), skip_dirs=(), read=True, chunk_size=CHUNK):
        self.roots = [_Root(i, p, m) for i, (p, m) in enumerate(zip(paths, member_prefixes(paths)))]
        self.exclude = list(exclude)
        self.skip_dirs = {os.path.realpath(d) for d in skip_dirs}
        self.read = read
        self.chunk_size = chunk_size
        self.files = 0
        self.bytes = 0
        self.directories = 0
        self.symlinks = 0
        self.excluded = 0
        self.skipped = []  # {"path", "reason", "detail"}
        self.changed = []  # {"path", "detail"}
        self.errors = []  # {"path", "detail"}: unreadable
        self.size = 0

    # -- reporting
    def skip(self, path, reason, detail):
        self.skipped.append({"path": path, "reason": reason, "detail": detail})
        if reason == UNREADABLE:
            self.errors.append({"path": path, "detail": detail})

    def summary(self):
        """What the manifest records: counts only (file names may be patient data)."""
        reasons = {}
        for item in self.skipped:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        return {
            "count": self.files,
            "bytes": self.bytes,
            "directories": self.directories,
            "symlinks": self.symlinks,
            "excluded": self.excluded,
            "roots": [r.as_dict() for r in self.roots],
            "skipped": [{"reason": k, "count": reasons[k]} for k in sorted(reasons)],
            "changed": len(self.changed),
            "unreadable": len(self.errors),
        }

    # -- iteration
    def __iter__(self):
        buf = bytearray()
        for piece in self._pieces():
            if not buf and len(piece) >= self.chunk_size:
                self.size += len(piece)
                yield piece
                continue
            buf += piece
            if len(buf) >= self.chunk_size:
                self.size += len(buf)
                yield bytes(buf)
                buf = bytearray()
        end = bytes(2 * BLOCK)
        total = self.size + len(buf) + len(end)
        end += bytes((RECORD - total % RECORD) % RECORD)
        buf += end
        self.size += len(buf)
        yield bytes(buf)

    def _pieces(self):
        for root in self.roots:
            try:
                info = os.stat(root.real)
            except OSError as exc:
                self._unreadable(root.path, exc)
                continue
            if root.kind == "directory":
                yield from self._directory(root, info)
            else:
                yield from self._file(root.real, root.member, root.path)

    def _excluded(self, root, relative):
        base = posixpath.basename(relative)
        absolute = posixpath.join(root.path, relative)
        for pattern in self.exclude:
            if pattern.startswith("/"):
                if fnmatch.fnmatchcase(absolute, pattern):
                    return True
            elif "/" in pattern:
                if fnmatch.fnmatchcase(relative, pattern.rstrip("/")):
                    return True
            elif fnmatch.fnmatchcase(base, pattern):
                return True
        return False

    def _directory(self, root, info):
        self.directories += 1
        yield self._header(root.member, tarfile.DIRTYPE, info)
        # Depth first, names sorted; an explicit stack (no recursion limit).
        stack = [(root.real, "", self._listing(root.real, root.path))]
        while stack:
            real_dir, relative_dir, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            relative = posixpath.join(relative_dir, entry) if relative_dir else entry
            real = os.path.join(real_dir, entry)
            shown = os.path.join(root.path, relative)
            member = root.member + "/" + relative
            if self._excluded(root, relative):
                self.excluded += 1
                continue
            try:
                info = os.lstat(real)
            except FileNotFoundError:
                self.skip(shown, VANISHED, "removed before it could be read")
                continue
            except OSError as exc:
                self._unreadable(shown, exc)
                continue
            if stat.S_ISDIR(info.st_mode):
                if real in self.skip_dirs:
                    self.skip(
                        shown, REPOSITORY, "the backup repository is not backed up into itself"
                    )
                    continue
                self.directories += 1
                yield self._header(member, tarfile.DIRTYPE, info)
                stack.append((real, relative, self._listing(real, shown)))
            elif stat.S_ISREG(info.st_mode):
                yield from self._file(real, member, shown)
            elif stat.S_ISLNK(info.st_mode):
                piece = self._link(root, real, member, shown, info)
                if piece:
                    yield piece
            else:
                kind = next(
                    (name for test, name in _SPECIAL_NAMES if test(info.st_mode)), "special file"
                )
                self.skip(shown, SPECIAL, "%s, not backed up" % kind)

    def _listing(self, real_dir, shown):
        try:
            names = sorted(os.listdir(real_dir))
        except FileNotFoundError:
            self.skip(shown, VANISHED, "directory removed before it could be read")
            names = []
        except OSError as exc:
            self._unreadable(shown, exc)
            names = []
        return iter(names)

    def _unreadable(self, shown, exc):
        self.skip(shown, UNREADABLE, exc.strerror or str(exc))

    def _link(self, root, real, member, shown, info):
        try:
            target = os.readlink(real)
        except FileNotFoundError:
            self.skip(shown, VANISHED, "removed before it could be read")
            return None
        except OSError as exc:
            self._unreadable(shown, exc)
            return None
        if target.startswith("/"):
            # An absolute link into the path itself is stored as the same relative link.
            resolved = os.path.normpath(target)
            base = next((b for b in (root.real, root.path) if _inside(resolved, b)), None)
            if base is None:
                self.skip(shown, LINK_OUTSIDE, "points to %s, outside %s" % (target, root.path))
                return None
            resolved = root.real + resolved[len(base) :]
            target = os.path.relpath(resolved, os.path.dirname(real))
        lexical = os.path.normpath(os.path.join(os.path.dirname(real), target))
        if not _inside(lexical, root.real) or not _inside(os.path.realpath(real), root.real):
            self.skip(shown, LINK_OUTSIDE, "points to %s, outside %s" % (target, root.path))
            return None
        self.symlinks += 1
        return self._header(member, tarfile.SYMTYPE, info, linkname=target)

    def _file(self, real, member, shown):
        if not self.read:
            try:
                info = os.stat(real, follow_symlinks=False)
            except OSError as exc:
                self._unreadable(shown, exc)
                return
            self.files += 1
            self.bytes += info.st_size
            return
        try:
            fd = _open_for_reading(real)
        except FileNotFoundError:
            self.skip(shown, VANISHED, "removed before it could be read")
            return
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self.skip(shown, VANISHED, "replaced by a link before it could be read")
            else:
                self._unreadable(shown, exc)
            return
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                self.skip(shown, VANISHED, "replaced by another kind of file before it was read")
                return
            declared = before.st_size
            yield self._header(member, tarfile.REGTYPE, before, size=declared)
            remaining = declared
            failure = None
            while remaining:
                try:
                    data = _read_chunk(fd, min(self.chunk_size, remaining))
                except OSError as exc:
                    failure = exc
                    break
                if not data:
                    break
                remaining -= len(data)
                yield data
            if remaining:
                stored = declared - remaining
                # The header is out: exactly ``declared`` bytes must follow.
                while remaining:
                    step = min(self.chunk_size, remaining)
                    remaining -= step
                    yield bytes(step)
                if failure is not None:
                    self.skip(
                        shown,
                        UNREADABLE,
                        "read error after %d of %d bytes (%s); the stored copy is padded with "
                        "zero bytes" % (stored, declared, failure.strerror or failure),
                    )
                else:
                    self.changed.append(
                        {
                            "path": shown,
                            "detail": "file shrank while being read (%d bytes when opened); "
                            "the stored copy is padded with zero bytes" % declared,
                        }
                    )
            else:
                after = os.fstat(fd)
                grew = after.st_size > declared
                if grew or after.st_mtime_ns != before.st_mtime_ns:
                    self.changed.append(
                        {
                            "path": shown,
                            "detail": (
                                "file grew while being read; the first %d bytes are stored"
                                % declared
                                if grew
                                else "file changed while being read; the stored copy may mix "
                                "old and new content"
                            ),
                        }
                    )
            pad = _padding(declared)
            if pad:
                yield bytes(pad)
            self.files += 1
            self.bytes += declared
        finally:
            os.close(fd)

    @staticmethod
    def _header(name, kind, info, size=0, linkname=""):
        member = tarfile.TarInfo(name)
        member.type = kind
        member.mode = stat.S_IMODE(info.st_mode)
        member.uid = info.st_uid
        member.gid = info.st_gid
        member.uname = ""
        member.gname = ""
        member.mtime = int(info.st_mtime)
        member.size = size
        member.linkname = linkname
        return member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


# ---------------------------------------------------------------------- backup
def _check_name_is_free(repo, name):
    """Refuse a name whose newest set in ``repo`` is a database backup: both would share one
    latest pointer and one retention group."""
    try:
        set_id = repo.read_latest(name)
        if set_id is None:
            return
        manifest = load_manifest(repo, set_id)
    except BackupError:
        return  # unreadable pointer or manifest: nothing to protect here
    if manifest.get("kind", "database") != KIND:
        raise ConfigError(
            "%s already holds database backups named %r" % (repo.url, name),
            "choose another name for the file set, or another repository",
        )


def _limited(items):
    return items[:REPORT_LIMIT]


def _warnings(producer):
    warnings = []
    groups = {}
    for item in producer.skipped:
        if item["reason"] != UNREADABLE:
            groups.setdefault(item["reason"], []).append(item)
    for reason in sorted(groups):
        items = groups[reason]
        warnings.append(
            "%d %s left out: %s%s"
            % (
                len(items),
                "entry" if len(items) == 1 else "entries",
                "; ".join("%s (%s)" % (i["path"], i["detail"]) for i in items[:10]),
                " ..." if len(items) > 10 else "",
            )
        )
    if producer.changed:
        warnings.append(
            "%d file(s) changed while being read: %s%s"
            % (
                len(producer.changed),
                "; ".join("%(path)s (%(detail)s)" % c for c in producer.changed[:10]),
                " ..." if len(producer.changed) > 10 else "",
            )
        )
    return warnings


def run_file_backup(repositories, options, check_mode=False, now=None):
    """Take one file set into every repository; returns a result dict.

    Raises ConfigError/StoreError before anything is written when input is wrong;
    raises BackupError after committing when some target failed or some file could
    not be read (the result is attached as ``exc.result``).
    """
    if not repositories:
        check_targets(repositories)  # names what is missing
    paths = [check_source_path(p) for p in options.paths]  # again: time passed since
    passphrase = load_passphrase(options.passphrase_file) if options.encrypt else None
    key = record_key(options)
    unreachable = check_targets(repositories)
    for repo in repositories:
        if repo.url not in unreachable:
            _check_name_is_free(repo, options.name)
    local_paths = [r.path for r in repositories if r.kind == "local"]
    for path in paths:
        for repo_path in local_paths:
            if _inside(os.path.realpath(path), os.path.realpath(repo_path)):
                raise ConfigError(
                    "path %s lies inside the repository %s" % (path, repo_path),
                    "back up the data, not the backup repository",
                )
    started = now or utc_now()
    set_id = new_set_id(options.name, started)
    if check_mode:
        counter = TarProducer(paths, options.exclude, local_paths, read=False)
        for _piece in counter:
            pass
        return {
            "changed": True,
            "check_mode": True,
            "set_id": set_id,
            "name": options.name,
            "database": options.name,
            "targets": [r.url for r in repositories],
            "files": counter.summary(),
            "left_out": _limited(counter.skipped),
            "warnings": ["%s is unreachable: %s" % item for item in unreachable.items()]
            + _warnings(counter),
        }
    with RunLock(lock_path_for(repositories)):
        layout_warnings = prepare_targets(
            repositories, unreachable, options.stale_seconds, key, options.name
        )
        local = [r.path for r in repositories if r.kind == "local"]
        producer = TarProducer(paths, options.exclude, local)
        with SetWriting(repositories, unreachable, set_id, options, passphrase, key) as writing:
            result = _take_file_set(options, producer, writing, started)
        result["warnings"] = layout_warnings + result["warnings"]
        problems, hints = [], []
        failure = writing.failure("file set")
        if failure:
            problems.append(failure[0])
            hints.append(failure[1])
        if producer.errors:
            problems.append(
                "%d path(s) could not be read and are missing from set %s: %s%s"
                % (
                    len(producer.errors),
                    set_id,
                    "; ".join("%(path)s (%(detail)s)" % e for e in producer.errors[:10]),
                    " ..." if len(producer.errors) > 10 else "",
                )
            )
            hints.append("everything else is stored; fix the permissions and run the backup again")
        if problems:
            error = BackupError("; ".join(problems), "; ".join(hints))
            error.result = result
            raise error
        return result


def _take_file_set(options, producer, writing, started):
    """Stream the tar of ``producer`` into ``writing``; commit the manifest."""
    clock = time.time()
    entry, locations = writing.stream(options.artifact_file(), [], producer)
    artifacts = [dict(entry, name=ARTIFACT_NAME, content=CONTENT, locations=locations)]
    manifest = manifest_header(KIND, writing.set_id, options.name, options, started, clock)
    manifest.update(
        {
            "format": FORMAT,
            "options": options.describe(),
            "artifacts": [{k: v for k, v in a.items() if k != "locations"} for a in artifacts],
            "files": producer.summary(),
        }
    )
    manifest, warnings = writing.commit(manifest, options.name)
    return {
        "changed": writing.changed,
        "set_id": writing.set_id,
        "name": options.name,
        "database": options.name,
        "manifest": manifest,
        "artifacts": artifacts,
        "targets": writing.reports(),
        "files": manifest["files"],
        "left_out": _limited(producer.skipped),
        "changed_files": _limited(producer.changed),
        "size": artifacts[0]["size"],
        "duration_seconds": manifest["duration_seconds"],
        "warnings": warnings + _warnings(producer),
    }


# ---------------------------------------------------------------------- extraction
_TYPE_NAMES = {
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
}


def _store_failure(path, exc):
    hint = None
    if exc.errno == errno.ENOSPC:
        hint = "the file system of the restore is full: free space (the restore needs room for a full copy)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = "this user cannot write there"
    return StoreError("cannot write %s: %s" % (path, exc.strerror or exc), hint)


class FileTarExtractor(pipeline.ThreadedConsumer):
    """Stream consumer extracting a file set's tar archive into ``root`` (a new, empty
    directory), accepting only regular files, directories and symbolic links whose
    target stays inside ``root``.

    Nothing is ever written outside ``root``: every path is opened component by
    component from ``root`` with O_NOFOLLOW (a link inside the archive is never
    followed while extracting), files are created O_EXCL, names that are absolute
    or hold ``..`` and links pointing out fail the whole restore (IntegrityError
    naming the member). ``strip``: the archive prefix that maps to ``root`` itself.
    Modes are restored without setuid/setgid bits; owners only with
    ``preserve_owner`` (which needs root). Directory modes and times are applied by
    ``apply_directories`` once everything is checked.
    """

    stopped_message = "the file extractor stopped early"

    def __init__(self, root, strip=None, preserve_owner=False, limit_files=None, limit_bytes=None):
        self.root = root
        self.strip = strip
        self.preserve_owner = bool(preserve_owner)
        self.limit_files = limit_files
        self.limit_bytes = limit_bytes
        self.files = 0
        self.bytes = 0
        self.directories = 0
        self.symlinks = 0
        self._dirs = {}
        self._links = []
        self._cache = (None, None)
        self._root_fd = os.open(
            root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
        )
        self._start_thread()

    # -- the consumer side (pipeline thread)
    def finish(self):
        """Wait for the end of the archive; then check where every link leads."""
        super(FileTarExtractor, self).finish()
        root = os.path.realpath(self.root)
        for name, relative in self._links:
            resolved = os.path.realpath(os.path.join(self.root, relative))
            if not _inside(resolved, root):
                raise IntegrityError(
                    "tar member %r is a link that leads outside the restored directory "
                    "(through other links); nothing was restored from this set" % name
                )

    def close(self):
        self._drop_cache()
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    # -- the extracting thread
    def _run(self):
        try:
            with tarfile.open(
                fileobj=self._reader, mode="r|", encoding="utf-8", errors="surrogateescape"
            ) as archive:
                for member in archive:
                    self._extract(archive, member)
            while self._reader.read(CHUNK):
                pass  # the zero blocks after the end marker
        except BackupError as exc:
            self.error = exc
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            self.error = IntegrityError("the file archive cannot be read: %s" % exc)
        finally:
            self._drop_cache()
            self._reader.close()

    def _relative(self, member):
        name = member.name
        while name.startswith("./"):
            name = name[2:]
        name = name.rstrip("/")
        why = unsafe_member(member.name) or unsafe_member(name)
        if why is None and "\0" in name:
            why = "NUL character"
        if why:
            raise IntegrityError(
                "tar member %r is unsafe (%s); nothing was restored from this set"
                % (member.name, why)
            )
        if self.strip:
            if name == self.strip:
                return []
            if not name.startswith(self.strip + "/"):
                raise IntegrityError(
                    "tar member %r lies outside the set's root %r; nothing was restored from "
                    "this set" % (member.name, self.strip)
                )
            name = name[len(self.strip) + 1 :]
        return [part for part in name.split("/") if part not in ("", ".")]

    def _drop_cache(self):
        fd = self._cache[1]
        self._cache = (None, None)
        if fd is not None:
            os.close(fd)

    def _open_dir(self, parts, name, create=True):
        """An fd of root/parts..., every component a real directory (created 0700 if missing)."""
        flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
        fd = os.dup(self._root_fd)
        try:
            for index, part in enumerate(parts):
                if create:
                    try:
                        os.mkdir(part, 0o700, dir_fd=fd)
                    except FileExistsError:
                        pass
                    except OSError as exc:
                        raise _store_failure(
                            os.path.join(self.root, *parts[: index + 1]), exc
                        ) from exc
                try:
                    child = os.open(part, flags, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise IntegrityError(
                            "tar member %r would be written through %r, which is a link or a "
                            "file; nothing was restored from this set"
                            % (name, "/".join(parts[: index + 1]))
                        ) from None
                    raise _store_failure(os.path.join(self.root, *parts[: index + 1]), exc) from exc
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _parent(self, parts, member):
        key = tuple(parts)
        if self._cache[0] != key:
            self._drop_cache()
            self._cache = (key, self._open_dir(parts, member.name))
        return self._cache[1]

    def _check_limits(self, member):
        if (self.limit_files is not None and self.files > self.limit_files) or (
            self.limit_bytes is not None and self.bytes > self.limit_bytes
        ):
            raise IntegrityError(
                "the archive holds more than its manifest records (%s files, %s bytes) at member "
                "%r; nothing was restored from this set"
                % (self.limit_files, self.limit_bytes, member.name)
            )

    def _extract(self, archive, member):
        parts = self._relative(member)
        meta = (member.mode & NO_SET_ID_BITS, member.mtime, member.uid, member.gid)
        if member.isdir():
            if parts:
                parent = self._parent(parts[:-1], member)
                try:
                    os.mkdir(parts[-1], 0o700, dir_fd=parent)
                except FileExistsError:
                    info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
                    if not stat.S_ISDIR(info.st_mode):
                        raise IntegrityError(
                            "tar member %r is a directory where the archive already put another "
                            "kind of file; nothing was restored from this set" % member.name
                        ) from None
                except OSError as exc:
                    raise _store_failure(os.path.join(self.root, *parts), exc) from exc
            self.directories += 1
            self._dirs[tuple(parts)] = meta
            return
        if not parts:
            raise IntegrityError(
                "tar member %r is not a directory but stands for the set's root; nothing was "
                "restored from this set" % member.name
            )
        if member.isreg():
            self._file(archive, member, parts, meta)
        elif member.issym():
            self._symlink(member, parts, meta)
        else:
            kind = _TYPE_NAMES.get(member.type, "member of type %r" % member.type)
            raise IntegrityError(
                "tar member %r is a %s; a file set holds only files, directories and symbolic "
                "links; nothing was restored from this set" % (member.name, kind)
            )

    def _file(self, archive, member, parts, meta):
        self.files += 1
        self.bytes += member.size
        self._check_limits(member)
        parent = self._parent(parts[:-1], member)
        path = os.path.join(self.root, *parts)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
        try:
            fd = os.open(parts[-1], flags, 0o600, dir_fd=parent)
        except FileExistsError:
            raise IntegrityError(
                "tar member %r appears twice in the archive; nothing was restored from this set"
                % member.name
            ) from None
        except OSError as exc:
            raise _store_failure(path, exc) from exc
        try:
            source = archive.extractfile(member)
            remaining = member.size
            while remaining:
                data = source.read(min(CHUNK, remaining))
                if not data:
                    raise IntegrityError("tar member %r is truncated" % member.name)
                remaining -= len(data)
                view = memoryview(data)
                try:
                    while view:
                        view = view[os.write(fd, view) :]
                except OSError as exc:
                    raise _store_failure(path, exc) from exc
            try:
                if self.preserve_owner:
                    os.fchown(fd, meta[2], meta[3])
                os.fchmod(fd, meta[0])
                os.utime(fd, (meta[1], meta[1]))
            except OSError as exc:
                raise _store_failure(path, exc) from exc
        finally:
            os.close(fd)

    def _symlink(self, member, parts, meta):
        target = member.linkname
        relative = "/".join(parts)
        outside = (
            not target
            or "\0" in target
            or target.startswith("/")
            or posixpath.normpath(posixpath.join(posixpath.dirname(relative), target)).split("/")[0]
            == ".."
        )
        if outside:
            raise IntegrityError(
                "tar member %r is a link pointing outside the restored directory (%r); nothing "
                "was restored from this set" % (member.name, target)
            )
        parent = self._parent(parts[:-1], member)
        try:
            os.symlink(target, parts[-1], dir_fd=parent)
        except FileExistsError:
            raise IntegrityError(
                "tar member %r appears twice in the archive; nothing was restored from this set"
                % member.name
            ) from None
        except OSError as exc:
            raise _store_failure(os.path.join(self.root, *parts), exc) from exc
        try:
            if self.preserve_owner:
                os.chown(parts[-1], meta[2], meta[3], dir_fd=parent, follow_symlinks=False)
            if os.utime in os.supports_follow_symlinks:
                os.utime(parts[-1], (meta[1], meta[1]), dir_fd=parent, follow_symlinks=False)
        except OSError:
            pass  # a link's own time and owner are cosmetic
        self.symlinks += 1
        self._links.append((member.name, relative))

    def apply_directories(self):
        """Give every directory of the archive its mode, time (and owner), deepest first."""
        for parts in sorted(self._dirs, key=len, reverse=True):
            mode, mtime, uid, gid = self._dirs[parts]
            fd = self._open_dir(list(parts), "/".join(parts), create=False)
            try:
                if self.preserve_owner:
                    os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
                os.utime(fd, (mtime, mtime))
            except OSError as exc:
                raise _store_failure(os.path.join(self.root, *parts), exc) from exc
            finally:
                os.close(fd)


def remove_tree(path):
    """Remove a restore's work directory whatever modes its directories got."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        for current, dirs, _files in os.walk(path):
            for name in dirs:
                full = os.path.join(current, name)
                if not os.path.islink(full):
                    try:
                        os.chmod(full, 0o700)
                    except OSError:
                        pass
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)


# ---------------------------------------------------------------------- restore
def check_target_dir(target_dir, mode):
    if mode not in MODES:
        raise ConfigError("unknown restore mode %r" % (mode,), "choose create, replace or rehearse")
    if not isinstance(target_dir, str) or not target_dir or not os.path.isabs(target_dir):
        raise ConfigError(
            "target_dir %r must be an absolute path" % (target_dir,),
            "e.g. /var/www/clinic/uploads",
        )
    target = os.path.normpath(target_dir)
    if target.startswith("//"):
        target = "/" + target.lstrip("/")
    if target == "/" or any(ord(ch) < 32 for ch in target):
        raise ConfigError("target_dir %r cannot be restored into" % target_dir)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise ConfigError(
            "the parent directory %s of target_dir does not exist" % parent, "create it first"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            "%s is not writable by this user" % parent,
            "the restore builds its new directory next to target_dir",
        )
    exists = os.path.lexists(target)
    if mode == "create" and exists:
        raise ConfigError(
            "target_dir %s already exists" % target,
            "restore into another target_dir, or use mode: replace "
            "(the current directory is kept aside)",
        )
    if mode == "replace" and exists:
        if os.path.islink(target):
            raise ConfigError(
                "target_dir %s is a symbolic link" % target,
                "point target_dir at the real directory (%s)" % os.path.realpath(target),
            )
        if not os.path.isdir(target):
            raise ConfigError("target_dir %s exists and is not a directory" % target)
        if os.path.ismount(target):
            raise ConfigError(
                "target_dir %s is a mount point and cannot be renamed aside" % target,
                "restore with mode: create into a new directory inside it, then switch over",
            )
    return target, exists


def _manifest_files(manifest):
    files = manifest.get("files")
    return files if isinstance(files, dict) else {}


def _strip_prefix(manifest):
    """The archive prefix that becomes the target itself (one directory), or None."""
    roots = _manifest_files(manifest).get("roots")
    if not isinstance(roots, list) or len(roots) != 1 or not isinstance(roots[0], dict):
        return None
    if roots[0].get("type") != "directory":
        return None
    member = roots[0].get("member")
    if (
        not isinstance(member, str)
        or not member
        or "/" in member
        or "\0" in member
        or member in (".", "..")
    ):
        raise IntegrityError("the manifest names an invalid archive root %r" % (member,))
    return member


def _is_file_set(entry_or_manifest):
    manifest = entry_or_manifest.get("manifest", entry_or_manifest)
    return isinstance(manifest, dict) and manifest.get("kind") == KIND


class FileRestoreOptions(object):
    """What a file restore may take (the names choose_sets and check_restorable read)."""

    def __init__(
        self,
        name=None,
        set_id=None,
        passphrase_file=None,
        preserve_owner=False,
        allow_unauthenticated=False,
        allow_unencrypted=False,
    ):
        if name is not None:
            check_set_name(name)
        self.name = name
        self.set_id = set_id
        self.passphrase_file = passphrase_file
        self.preserve_owner = bool(preserve_owner)
        self.allow_unauthenticated = bool(allow_unauthenticated)
        self.allow_unencrypted = bool(allow_unencrypted)


def file_candidates(repo, options, session):
    """(set ids to try, newest first; sets passed over and why)."""
    chosen, passed, entries = choose_sets(repo, session, options, KIND, "name")
    names = {e["database"] for e in entries if e["id"] in chosen}
    if options.name is None and len(names) > 1:
        raise ConfigError(
            "%s holds file sets of several names (%s)" % (repo.url, ", ".join(sorted(names))),
            "set name to the one to restore",
        )
    if not chosen:
        raise IntegrityError(
            "no complete file set%s in %s"
            % (" named %r" % options.name if options.name else "", repo.url),
            "passed over: %s" % "; ".join("%(set_id)s (%(reason)s)" % p for p in passed)
            if passed
            else "run files_backup first",
        )
    return chosen, passed


def _extract(repo, set_id, work, options, session):
    """Extract ``set_id`` into the new directory ``work``, checked against its manifest;
    returns (result, manifest). The caller removes ``work`` if this fails."""
    manifest = load_manifest(repo, set_id, session.key)
    restorable_warnings = check_restorable(manifest, options, session.key, KIND, "name")
    artifact = next((a for a in manifest["artifacts"] if a["name"] == ARTIFACT_NAME), None)
    if artifact is None or artifact.get("content") != CONTENT:
        raise IntegrityError("set %s holds no %s artifact" % (set_id, CONTENT))
    if repo.artifact_size(set_id, artifact["file"]) is None:
        raise IntegrityError("%s is missing" % repo.location(set_id, artifact["file"]))
    check_readable_now(repo, manifest)
    gpg_session = session.gpg_for(manifest)
    recorded = _manifest_files(manifest)
    count, size = recorded.get("count"), recorded.get("bytes")
    os.mkdir(work, 0o700)
    extractor = FileTarExtractor(
        work,
        strip=_strip_prefix(manifest),
        preserve_owner=options.preserve_owner,
        limit_files=count if isinstance(count, int) else None,
        limit_bytes=size if isinstance(size, int) else None,
    )
    try:
        try:
            stored = stream_into(repo, set_id, artifact, manifest, gpg_session, consumer=extractor)
            extractor.finish()
        except BaseException:
            extractor.abort()
            raise
        if (count, size) != (extractor.files, extractor.bytes):
            raise IntegrityError(
                "set %s restored %d files (%d bytes), its manifest records %s files (%s bytes)"
                % (set_id, extractor.files, extractor.bytes, count, size)
            )
        extractor.apply_directories()
    finally:
        extractor.close()
    warnings = list(restorable_warnings)
    if recorded.get("changed"):
        warnings.append(
            "%d file(s) were changing while set %s was taken; their stored copies may be "
            "inconsistent (the backup's result named them)" % (recorded["changed"], set_id)
        )
    if recorded.get("unreadable"):
        warnings.append(
            "%d path(s) could not be read when set %s was taken and are not in it"
            % (recorded["unreadable"], set_id)
        )
    return {
        "set_id": set_id,
        "name": manifest["database"],
        "database": manifest["database"],
        "roots": recorded.get("roots", []),
        "files": extractor.files,
        "bytes": extractor.bytes,
        "directories": extractor.directories,
        "symlinks": extractor.symlinks,
        "stored_bytes": stored,
        "layout": "content" if extractor.strip else "roots",
        "backup_started_at": manifest["started_at"],
        "warnings": warnings,
    }, manifest


def _finalize(target, work, mode, now):
    if mode == "rehearse":
        remove_tree(work)
        return {"changed": False, "removed": work}
    os.sync()  # the restored files are durable before they take the target's name
    parent = os.path.dirname(target)
    if mode == "create":
        if os.path.lexists(target):
            raise ConfigError(
                "target_dir %s appeared while restoring" % target,
                "another process created it; choose another target_dir",
            )
        os.rename(work, target)
        fsync_dir(parent)
        return {"changed": True, "previous_dir": None}
    previous = None
    if os.path.lexists(target):
        previous = target + PREVIOUS_MARK + now.strftime("%Y%m%dT%H%M%SZ")
        if os.path.lexists(previous):
            previous += "-" + os.urandom(3).hex()
        os.rename(target, previous)
    try:
        os.rename(work, target)
    except BaseException:
        if previous:
            os.rename(previous, target)  # put the original back before reporting
        raise
    fsync_dir(parent)
    return {"changed": True, "previous_dir": previous}


def restore_files(
    repo,
    target_dir,
    set_id=None,
    name=None,
    passphrase_file=None,
    mode="create",
    check_mode=False,
    preserve_owner=False,
    fallback=True,
    now=None,
    allow_unauthenticated=False,
    allow_unencrypted=False,
):
    """Restore (or rehearse restoring) a file set into ``target_dir``; returns a result dict.

    Sets are authenticated with the passphrase's key; an unauthenticated or unencrypted
    set is only restored when this run allows it (see restore.check_restorable)."""
    now = now or utc_now()
    clock = time.time()
    if name is not None:
        check_set_name(name)
    target, target_exists = check_target_dir(target_dir, mode)
    warnings = []
    if preserve_owner and os.geteuid() != 0:
        warnings.append("preserve_owner needs root: the restored files belong to this user")
        preserve_owner = False
    leftovers = sorted(glob.glob(glob.escape(target) + WORK_MARK + "*"))
    if leftovers:
        warnings.append(
            "work directories of interrupted restores are still there (they may hold patient "
            "data; remove them): %s" % ", ".join(leftovers)
        )
    options = FileRestoreOptions(
        name, set_id, passphrase_file, preserve_owner, allow_unauthenticated, allow_unencrypted
    )
    with ReadSession(passphrase_file) as session:
        to_try, passed = file_candidates(repo, options, session)
        if check_mode:
            manifest = load_manifest(repo, to_try[0], session.key)
            return {
                "changed": mode != "rehearse",
                "check_mode": True,
                "set_id": to_try[0],
                "name": manifest["database"],
                "database": manifest["database"],
                "candidates": to_try,
                "passed_over": passed,
                "target_dir": target,
                "target_exists": target_exists,
                "mode": mode,
                "warnings": warnings,
            }

        def attempt(candidate):
            work = target + WORK_MARK + os.urandom(3).hex()
            try:
                result, manifest = _extract(repo, candidate, work, options, session)
                result.update(_finalize(target, work, mode, now))
            except OSError as exc:
                remove_tree(work)
                raise _store_failure(target, exc) from exc
            except BaseException:
                remove_tree(work)
                raise
            result["rpo_seconds"] = round(
                (now - parse_time(manifest["started_at"])).total_seconds(), 1
            )
            return result

        result, damaged = try_newest_first(
            to_try, attempt, bool(fallback) and set_id is None, target
        )
    result["warnings"] = warnings + result["warnings"]
    result.update(
        {
            "mode": mode,
            "target_dir": target,
            "duration_seconds": round(time.time() - clock, 3),
            "damaged": damaged,
            "passed_over": passed,
            "restored_at": isoformat(now),
        }
    )
    return result
