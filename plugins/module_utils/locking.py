# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One writer per repository: overlapping runs (a slow backup and the next
cron tick) must not interleave.  flock is released by the kernel when the
holder dies, so a killed run never leaves a stale lock.

Where the lock lives: inside the first local repository (``<repo>/.lock``), else
(S3 only) in the lock directory of the running user: ``/run/clinic-backup`` for
root (``/var/lib/clinic-backup/locks`` where there is no ``/run``), and
``~/.cache/clinic-backup/locks`` (from the passwd entry, so cron and a login
shell agree) for anyone else.  Never the shared temp directory: any local user
could pre-create and hold the lock there, or plant a symlink that root follows.
The directory is created 0700 and refused when it is a symlink, owned by
another user, or writable by group or others.  ``LOCK_DIR`` (module setting) or
``$CLINIC_BACKUP_LOCK_DIR`` points it elsewhere (tests); the same checks apply.

Every lock file is opened with O_NOFOLLOW and without blocking (a FIFO or a
device planted in its place is refused, never waited on), and only a regular
file with one link that the running user owns is truncated and gets our pid.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import fcntl
import hashlib
import os
import pwd
import stat

from .errors import LockedError, StoreError
from .repository import make_private_dirs

LOCK_DIR = None
LOCK_DIR_ENV = "CLINIC_BACKUP_LOCK_DIR"
_OPEN_FLAGS = (
    os.O_RDWR
    | os.O_CREAT
    | os.O_NOFOLLOW
    | os.O_NONBLOCK
    | os.O_NOCTTY
    | getattr(os, "O_CLOEXEC", 0)
)


def lock_directory():
    """The directory that holds the locks of S3-only configs (see the module docstring)."""
    override = LOCK_DIR or os.environ.get(LOCK_DIR_ENV)
    if override:
        return os.path.abspath(override)
    uid = os.geteuid()
    if uid == 0:
        return "/run/clinic-backup" if os.path.isdir("/run") else "/var/lib/clinic-backup/locks"
    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        home = os.path.expanduser("~")
    return os.path.join(home, ".cache", "clinic-backup", "locks")


def lock_path_for(repositories):
    """The lock file: inside the first local repository, else in lock_directory()."""
    for repo in repositories:
        if repo.kind == "local":
            return os.path.join(repo.path, ".lock")
    digest = hashlib.sha256(
        "|".join(sorted(r.url for r in repositories)).encode("utf-8")
    ).hexdigest()[:16]
    return os.path.join(lock_directory(), "clinic-backup-%s.lock" % digest)


def open_lock_directory(directory):
    """An O_DIRECTORY fd of ``directory``, created 0700 if missing; StoreError unless it
    is a real directory of the running user that group and others cannot write."""
    make_private_dirs(directory, "lock directory")
    hint = "remove it (it only ever holds lock files) and let the agent create it again"
    try:
        fd = os.open(
            directory,
            os.O_RDONLY
            | getattr(os, "O_DIRECTORY", 0)
            | os.O_NOFOLLOW
            | getattr(os, "O_CLOEXEC", 0),
        )
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            what = "a symlink" if os.path.islink(directory) else "not a directory"
            raise StoreError("lock directory %s is %s" % (directory, what), hint) from exc
        raise StoreError(
            "cannot open lock directory %s: %s" % (directory, exc.strerror), hint
        ) from exc
    info = os.fstat(fd)
    problem = None
    if info.st_uid != os.geteuid():
        problem = "is owned by uid %d, not by this user (uid %d)" % (info.st_uid, os.geteuid())
    elif info.st_mode & 0o022:
        problem = "is writable by group or others (mode %s)" % oct(stat.S_IMODE(info.st_mode))
    if problem:
        os.close(fd)
        # Anyone who can write there can hold our lock or plant a link in it.
        raise StoreError(
            "lock directory %s %s" % (directory, problem),
            "%s, or chmod 0700 it if it is yours" % hint,
        )
    return fd


def _open_lock_file(path):
    directory = os.path.dirname(path)
    dir_fd = None
    try:
        if directory == lock_directory():
            dir_fd = open_lock_directory(directory)
            # Relative to the checked directory: a rename of it cannot redirect us.
            return os.open(os.path.basename(path), _OPEN_FLAGS, 0o600, dir_fd=dir_fd)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        return os.open(path, _OPEN_FLAGS, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(
                "lock file %s is a symlink" % path,
                "remove it: a lock file is never a link, and following one could clobber its target",
            ) from exc
        raise StoreError("cannot open lock file %s: %s" % (path, exc.strerror)) from exc
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


class RunLock(object):
    def __init__(self, path):
        self.path = path
        self.fd = None

    def acquire(self):
        fd = _open_lock_file(self.path)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            what = (
                "has %d hard links" % info.st_nlink
                if stat.S_ISREG(info.st_mode)
                else ("is not a regular file")
            )
            raise StoreError(
                "lock file %s %s" % (self.path, what),
                "remove it; the agent creates a fresh one",
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                "already running: another backup holds %s (pid %s)" % (self.path, holder),
                "wait for it to finish; a killed run releases the lock by itself",
            ) from None
        self.fd = fd
        if info.st_uid == os.geteuid():
            # Only our own file gets our pid; another user's is locked, never rewritten.
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        return self

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()
