# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""File system backup sets (user uploads, configuration): taking them.

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

Restoring a file set: file_restore.py.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import fnmatch
import hashlib
import itertools
import os
import posixpath
import re
import stat
import tarfile
import time

from . import file_chain, pipeline
from .catalog import (
    load_manifest,
)
from .errors import BackupError, ConfigError, IntegrityError
from .lifecycle import (
    SetWriting,
    StreamOptions,
    check_targets,
    manifest_header,
    prepare_targets,
    record_key,
    stream_artifact,
)
from .locking import RunLock, lock_path_for
from .passphrase import load_passphrase
from .repository import new_set_id, utc_now

KIND = "files"
ARTIFACT_NAME = "files"
CONTENT = "files-tar"
FORMAT = "tar"
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,47}$")
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
CHUNK = pipeline.CHUNK_SIZE
REPORT_LIMIT = 200  # paths listed per kind in a result; the counts are always complete

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


def is_inside(path, root):
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
        incremental=False,
        full_every=file_chain.DEFAULT_FULL_EVERY,
    ):
        self.name = check_set_name(name)
        # Off by default: every set stays a self-contained full set unless asked.
        self.incremental = bool(incremental)
        self.full_every = file_chain.check_full_every(full_every)
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

    def index_file(self):
        return file_chain.index_file(
            self.name, pipeline.COMPRESSION_SUFFIX[self.compression], self.encrypt
        )

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
            if first != second and is_inside(first, second):
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
    ``index=True`` records every entry (``self.index``: file_chain's index entries, the
    sha256 of each file read); ``previous`` (archive name -> entry of the previous set's
    index) leaves out each regular file whose size, mtime, ctime and inode are unchanged
    and records the previous entry instead: an incremental set.
    After iteration, the counters and lists describe what was stored and left out.
    """

    def __init__(
        self,
        paths,
        exclude=(),
        skip_dirs=(),
        read=True,
        chunk_size=CHUNK,
        index=False,
        previous=None,
    ):
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
        self.previous = previous
        self.index = [] if (index or previous is not None) else None
        self.reused = 0
        self.reused_bytes = 0

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
                yield from self._file(root.real, root.member, root.path, info)

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
        self._note(root.member, "d", info)
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
                self._note(member, "d", info)
                yield self._header(member, tarfile.DIRTYPE, info)
                stack.append((real, relative, self._listing(real, shown)))
            elif stat.S_ISREG(info.st_mode):
                yield from self._file(real, member, shown, info)
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
            base = next((b for b in (root.real, root.path) if is_inside(resolved, b)), None)
            if base is None:
                self.skip(shown, LINK_OUTSIDE, "points to %s, outside %s" % (target, root.path))
                return None
            resolved = root.real + resolved[len(base) :]
            target = os.path.relpath(resolved, os.path.dirname(real))
        lexical = os.path.normpath(os.path.join(os.path.dirname(real), target))
        if not is_inside(lexical, root.real) or not is_inside(os.path.realpath(real), root.real):
            self.skip(shown, LINK_OUTSIDE, "points to %s, outside %s" % (target, root.path))
            return None
        self.symlinks += 1
        self._note(member, "l", info, link=target)
        return self._header(member, tarfile.SYMTYPE, info, linkname=target)

    def _note(self, member, kind, info, link=None):
        if self.index is not None:
            self.index.append(file_chain.entry_for(member, kind, info, link))

    def _unchanged(self, member, info):
        """The previous set's entry of a regular file that did not change, or None."""
        if self.previous is None or info is None:
            return None
        entry = self.previous.get(member)
        if entry is None or entry.get("type") != "f" or entry.get("stamp") is None:
            return None
        if entry["stamp"] != file_chain.stamp_of(info):
            return None
        if (entry["mode"], entry["uid"], entry["gid"]) != (
            info.st_mode & 0o7777,
            info.st_uid,
            info.st_gid,
        ):
            return None
        return entry

    def _file(self, real, member, shown, info=None):
        if self.read:
            kept = self._unchanged(member, info)
            if kept is not None:
                self.reused += 1
                self.reused_bytes += kept["size"]
                self.index.append(dict(kept))
                return
        if not self.read:
            try:
                info = os.stat(real, follow_symlinks=False)
            except OSError as exc:
                self._unreadable(shown, exc)
                return
            self.files += 1
            self.bytes += info.st_size
            if self.index is not None:
                entry = file_chain.entry_for(member, "f", info)
                entry.update(size=info.st_size, stamp=file_chain.stamp_of(info))
                self.index.append(entry)
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
            digest = hashlib.sha256() if self.index is not None else None
            changing = False
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
                if digest is not None:
                    digest.update(data)
                yield data
            if remaining:
                stored = declared - remaining
                # The header is out: exactly ``declared`` bytes must follow.
                changing = True
                while remaining:
                    step = min(self.chunk_size, remaining)
                    remaining -= step
                    if digest is not None:
                        digest.update(bytes(step))
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
                    changing = True
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
            if self.index is not None:
                entry = file_chain.entry_for(member, "f", before)
                # A file caught changing is read again next time, whatever its times say.
                entry.update(
                    size=declared,
                    sha256=digest.hexdigest(),
                    set=None,
                    stamp=None if changing else file_chain.stamp_of(before),
                )
                self.index.append(entry)
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
            if is_inside(os.path.realpath(path), os.path.realpath(repo_path)):
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
            "incremental": options.incremental,
            "left_out": _limited(counter.skipped),
            "warnings": ["%s is unreachable: %s" % item for item in unreachable.items()]
            + _warnings(counter),
        }
    with RunLock(lock_path_for(repositories)):
        layout_warnings = prepare_targets(
            repositories, unreachable, options.stale_seconds, key, options.name
        )
        local = [r.path for r in repositories if r.kind == "local"]
        with SetWriting(repositories, unreachable, set_id, options, passphrase, key) as writing:
            parent, why_full, background, listing = None, None, None, []

            def unchanged(manifest):
                # An lstat walk, no file opened: the tree against the parent's fingerprint.
                walker = TarProducer(paths, options.exclude, local, read=False, index=True)
                for _piece in walker:
                    pass
                listing.append(walker)
                return not walker.skipped and file_chain.unchanged_since(
                    manifest, key, walker.index
                )

            try:
                if options.incremental:
                    parent, why_full = file_chain.choose_parent(
                        repositories, unreachable, options, key, unchanged
                    )
                if parent is not None and parent.unchanged:
                    producer = listing[0]
                    result = _reuse_parent_index(options, producer, writing, started, parent)
                else:
                    if options.incremental:
                        # Its gpg derives its key while the parent's index and the tree are read.
                        background = file_chain.BackgroundArtifact(writing, options.index_file())
                    if parent is not None:
                        parent, why_full = file_chain.load_index(parent, writing.gpg_session)
                    producer = TarProducer(
                        paths,
                        options.exclude,
                        local,
                        index=options.incremental,
                        previous=parent.entries if parent else None,
                    )
                    result = _take_file_set(options, producer, writing, started, parent, background)
            finally:
                if background is not None:
                    background.cancel()
        if why_full and parent is None and not why_full.startswith("no earlier set"):
            result["warnings"].append("a full set was taken: %s" % why_full)
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


def _reuse_parent_index(options, listing, writing, started, parent):
    """The tree is exactly the parent's: the new set is the parent's index, copied as
    stored (no archive, no gpg), under a manifest of its own."""
    clock = time.time()
    previous = parent.manifest
    artifact = file_chain.index_artifact(previous)
    reader = pipeline.HashingReader(parent.source.open_artifact(previous["id"], artifact["file"]))
    try:
        stored, locations = stream_artifact(writing.targets, options.index_file(), [], reader)
    finally:
        reader.fileobj.close()
    if (reader.sha256, reader.size) != (artifact["sha256"], artifact["size"]):
        raise IntegrityError(
            "the index of set %s does not match its manifest (sha256 %s)"
            % (previous["id"], reader.sha256),
            "run backup_verify on it; the next run takes a full set if it is damaged",
        )
    entry = {"file": options.index_file(), "size": stored.size, "sha256": stored.sha256}
    artifacts = [
        dict(entry, name=file_chain.INDEX, content=file_chain.INDEX_CONTENT, locations=locations)
    ]
    tree = previous["files"]["tree"]
    files = listing.summary()
    files.update(
        {
            "count": 0,
            "bytes": 0,
            "tree": tree,
            "reused": tree["count"],
            "reused_bytes": tree["bytes"],
            "deleted": 0,
            "chain": {
                "level": file_chain.INCREMENTAL,
                "sets": parent.sets,
                "macs": parent.macs,
                "full_every": options.full_every,
                "fingerprint": file_chain.chain_of(previous)["fingerprint"],
                "index_from": file_chain.written_by(previous),
            },
        }
    )
    return _commit(options, writing, started, clock, artifacts, files, listing)


def _take_file_set(options, producer, writing, started, parent=None, background=None):
    """Stream the tar of ``producer`` (and, in a chain, its index) into ``writing``;
    commit the manifest."""
    clock = time.time()
    chunks = iter(producer)
    # Up to two chunks: one means the walk is over (the last chunk holds the end marker).
    pulled = list(itertools.islice(chunks, 2))
    artifacts = []
    if not (
        parent is not None
        and len(pulled) < 2
        and producer.files == 0
        and not file_chain.deleted_names(parent.entries, producer.index)
        and file_chain.same_layout(parent.entries, producer.index)
    ):
        entry, locations = writing.stream(
            options.artifact_file(), [], itertools.chain(pulled, chunks)
        )
        artifacts.append(dict(entry, name=ARTIFACT_NAME, content=CONTENT, locations=locations))
    # else: nothing changed since the parent: the set is its index alone (no archive).
    files = producer.summary()
    if producer.index is not None:
        for item in producer.index:
            if item["type"] == "f" and item["set"] is None:
                item["set"] = writing.set_id
        deleted = file_chain.deleted_names(parent.entries, producer.index) if parent else []
        index = file_chain.encode_index(writing.set_id, producer.index, deleted)
        if background is not None:
            entry, locations = background.finish(index)
        else:
            entry, locations = writing.stream(options.index_file(), [], [index])
        artifacts.append(
            dict(
                entry,
                name=file_chain.INDEX,
                content=file_chain.INDEX_CONTENT,
                locations=locations,
            )
        )
        chain = (
            {"level": file_chain.INCREMENTAL, "sets": parent.sets, "macs": parent.macs}
            if parent
            else file_chain.full_chain_record()
        )
        chain["full_every"] = options.full_every
        chain["fingerprint"] = file_chain.fingerprint(writing.key, producer.index)
        files.update(
            {
                "tree": file_chain.summarize(producer.index),
                "reused": producer.reused,
                "reused_bytes": producer.reused_bytes,
                "deleted": len(deleted),
                "chain": chain,
            }
        )
    return _commit(options, writing, started, clock, artifacts, files, producer)


def _commit(options, writing, started, clock, artifacts, files, producer):
    manifest = manifest_header(KIND, writing.set_id, options.name, options, started, clock)
    manifest.update(
        {
            "format": FORMAT,
            "options": options.describe(),
            "artifacts": [{k: v for k, v in a.items() if k != "locations"} for a in artifacts],
            "files": files,
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
        "size": sum(a["size"] for a in artifacts),
        "duration_seconds": manifest["duration_seconds"],
        "warnings": warnings + _warnings(producer),
    }
