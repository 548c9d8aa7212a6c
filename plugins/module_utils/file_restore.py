# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restoring a file set (see file_backup.py for what a file set holds).

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
import glob
import hashlib
import io
import os
import posixpath
import shutil
import stat
import tarfile
import time

from . import file_chain, pipeline
from .catalog import (
    load_manifest,
)
from .errors import BackupError, ConfigError, IntegrityError, StoreError
from .file_backup import ARTIFACT_NAME, CONTENT, KIND, check_set_name, is_inside
from .lifecycle import (
    RESTORE_MODES,
    ReadOptions,
    ReadSession,
    check_readable_now,
    check_restorable,
    choose_sets,
    stream_into,
    try_newest_first,
)
from .repository import fsync_dir, isoformat, parse_time, utc_now
from .tarsafety import unsafe_member

WORK_MARK = ".restoring-"
PREVIOUS_MARK = ".pre-restore-"
CHUNK = pipeline.CHUNK_SIZE
NO_SET_ID_BITS = ~(stat.S_ISUID | stat.S_ISGID) & 0o7777


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
            if not is_inside(resolved, root):
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

    def _file(self, archive, member, parts, meta, digest=None):
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
                if digest is not None:
                    digest.update(data)
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


class ChainTarExtractor(FileTarExtractor):
    """Extracts from one set of an incremental chain only the regular files that the
    restored set's index says this set holds (``wanted``: archive name -> index entry),
    with the index's mode, time and owner, each checked against its sha256. Every
    member is still checked for safety; directories and links come from the index
    (``index_tree``). ``limit_files``/``limit_bytes``: what this set's manifest records."""

    def __init__(
        self, root, wanted, strip=None, preserve_owner=False, limit_files=None, limit_bytes=None
    ):
        self.wanted = dict(wanted)
        self.seen_files = 0
        self.seen_bytes = 0
        self.seen_limits = (limit_files, limit_bytes)
        super(ChainTarExtractor, self).__init__(root, strip=strip, preserve_owner=preserve_owner)

    def _extract(self, archive, member):
        parts = self._relative(member)
        if member.isdir() or member.issym():
            return
        if not member.isreg() or not parts:
            return super(ChainTarExtractor, self)._extract(archive, member)  # refuses it
        self.seen_files += 1
        self.seen_bytes += member.size
        limit_files, limit_bytes = self.seen_limits
        if (limit_files is not None and self.seen_files > limit_files) or (
            limit_bytes is not None and self.seen_bytes > limit_bytes
        ):
            raise IntegrityError(
                "the archive holds more than its manifest records (%s files, %s bytes) at member "
                "%r; nothing was restored from this set" % (limit_files, limit_bytes, member.name)
            )
        entry = self.wanted.pop(member.name, None)
        if entry is None:
            return  # changed or deleted later in the chain: not part of the restored tree
        if member.size != entry["size"]:
            raise IntegrityError(
                "tar member %r is %d bytes, the index records %d; nothing was restored"
                % (member.name, member.size, entry["size"])
            )
        digest = hashlib.sha256()
        meta = (entry["mode"] & NO_SET_ID_BITS, entry["mtime"], entry["uid"], entry["gid"])
        self._file(archive, member, parts, meta, digest)
        if digest.hexdigest() != entry["sha256"]:
            raise IntegrityError(
                "tar member %r does not match the sha256 its index records; nothing was "
                "restored" % member.name
            )


def index_tree(entries):
    """A tar of the directories and links of an index (headers only), for a
    FileTarExtractor to create them with the same checks as any archive's."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            if entry["type"] == "f":
                continue
            member = tarfile.TarInfo(entry["name"])
            member.type = tarfile.DIRTYPE if entry["type"] == "d" else tarfile.SYMTYPE
            member.linkname = entry.get("link", "")
            member.mode = entry["mode"]
            member.uid, member.gid = entry["uid"], entry["gid"]
            member.mtime = entry["mtime"]
            archive.addfile(member)
    return out.getvalue()


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
    if mode not in RESTORE_MODES:
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


class FileRestoreOptions(ReadOptions):
    """What to restore, where and how; validated on construction (ConfigError), like
    restore.RestoreOptions. The target directory is checked when the restore runs (it
    may appear or vanish meanwhile)."""

    def __init__(self, target_dir, name=None, preserve_owner=False, **read_options):
        """``read_options``: those of lifecycle.ReadOptions (mode, set_id, passphrase_file...)."""
        self._set_read_options(**read_options)
        if name is not None:
            check_set_name(name)
        self.target_dir = target_dir
        self.name = name
        self.preserve_owner = bool(preserve_owner)


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
    if file_chain.chain_of(manifest) is not None:
        return _extract_chain(repo, manifest, work, options, session, restorable_warnings)
    artifact = next((a for a in manifest["artifacts"] if a["name"] == ARTIFACT_NAME), None)
    if artifact is None or artifact.get("content") != CONTENT:
        raise IntegrityError("set %s holds no %s artifact" % (set_id, CONTENT))
    if repo.artifact_size(set_id, artifact["file"]) is None:
        raise IntegrityError("%s is missing" % repo.location(set_id, artifact["file"]))
    check_readable_now(repo, manifest)
    gpg_session = session.gpg_for(manifest, repo)
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


def _stream_extractor(repo, manifest, artifact, session, extractor):
    try:
        try:
            stored = stream_into(
                repo,
                manifest["id"],
                artifact,
                manifest,
                session.gpg_for(manifest),
                consumer=extractor,
            )
            extractor.finish()
        except BaseException:
            extractor.abort()
            raise
        return stored
    finally:
        extractor.close()


def _extract_chain(repo, manifest, work, options, session, warnings):
    """Restore a set of an incremental chain into the new directory ``work``: its index
    says what the tree holds and which set of the chain holds each file's bytes; each
    such set's archive is read once, oldest first. Refuses (IntegrityError naming it)
    when a set of the chain is missing or not the one it was taken against."""
    set_id = manifest["id"]
    chain = file_chain.load_chain(repo, manifest, session.key) + [manifest]
    for member in chain:
        if member is not manifest:
            warnings.extend(check_restorable(member, options, session.key, KIND, "name"))
        for artifact in member["artifacts"]:
            if repo.artifact_size(member["id"], artifact["file"]) is None:
                raise IntegrityError(
                    "set %s cannot be restored: %s is missing"
                    % (set_id, repo.location(member["id"], artifact["file"])),
                    "restore a set older than %s, or a full set taken after it" % member["id"],
                )
        check_readable_now(repo, member)
    entries, _deleted = file_chain.read_index(repo, manifest, session.gpg_for(manifest))
    strip = _strip_prefix(manifest)
    wanted = {}
    for entry in entries:
        if entry["type"] == "f":
            wanted.setdefault(entry["set"], {})[entry["name"]] = entry
    os.mkdir(work, 0o700)
    stored = files = size = 0
    for member in chain:
        holds = wanted.pop(member["id"], None)
        if not holds:
            continue
        artifact = next((a for a in member["artifacts"] if a["name"] == ARTIFACT_NAME), None)
        if artifact is None:
            raise IntegrityError(
                "the index of %s names files in set %s, which stores none" % (set_id, member["id"])
            )
        recorded = _manifest_files(member)
        extractor = ChainTarExtractor(
            work,
            holds,
            strip=strip,
            preserve_owner=options.preserve_owner,
            limit_files=recorded.get("count") if isinstance(recorded.get("count"), int) else None,
            limit_bytes=recorded.get("bytes") if isinstance(recorded.get("bytes"), int) else None,
        )
        stored += _stream_extractor(repo, member, artifact, session, extractor)
        if extractor.wanted:
            raise IntegrityError(
                "set %s lacks %d file(s) that the index of %s says it holds"
                % (member["id"], len(extractor.wanted), set_id)
            )
        files += extractor.files
        size += extractor.bytes
    tree = FileTarExtractor(work, strip=strip, preserve_owner=options.preserve_owner)
    try:
        try:
            tree(index_tree(entries))
            tree.finish()
        except BaseException:
            tree.abort()
            raise
        tree.apply_directories()
    finally:
        tree.close()
    summary = file_chain.summarize(entries)
    recorded = _manifest_files(manifest)
    if (files, size) != (summary["count"], summary["bytes"]) or recorded.get("tree") != summary:
        raise IntegrityError(
            "set %s restored %d files (%d bytes), its manifest records %s"
            % (set_id, files, size, recorded.get("tree"))
        )
    if recorded.get("changed"):
        warnings.append(
            "%d file(s) were changing while set %s was taken; their stored copies may be "
            "inconsistent (the backup's result named them)" % (recorded["changed"], set_id)
        )
    return {
        "set_id": set_id,
        "name": manifest["database"],
        "database": manifest["database"],
        "roots": recorded.get("roots", []),
        "files": files,
        "bytes": size,
        "directories": summary["directories"],
        "symlinks": summary["symlinks"],
        "stored_bytes": stored,
        "layout": "content" if strip else "roots",
        "chain": [m["id"] for m in chain],
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


def restore_files(repo, options, check_mode=False, now=None):
    """Restore (or rehearse restoring) a file set as ``options`` (FileRestoreOptions)
    say; returns a result dict.

    Sets are authenticated with the passphrase's key; an unauthenticated or unencrypted
    set is only restored when this run allows it (see lifecycle.check_restorable)."""
    now = now or utc_now()
    clock = time.time()
    mode = options.mode
    target, target_exists = check_target_dir(options.target_dir, mode)
    warnings = []
    if options.preserve_owner and os.geteuid() != 0:
        warnings.append("preserve_owner needs root: the restored files belong to this user")
        options.preserve_owner = False
    leftovers = sorted(glob.glob(glob.escape(target) + WORK_MARK + "*"))
    if leftovers:
        warnings.append(
            "work directories of interrupted restores are still there (they may hold patient "
            "data; remove them): %s" % ", ".join(leftovers)
        )
    with ReadSession(options.passphrase_file, options.old_passphrase_files) as session:
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

        result, damaged = try_newest_first(to_try, attempt, options.fallback, target)
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
