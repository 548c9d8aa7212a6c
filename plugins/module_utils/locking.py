# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One writer per repository: overlapping runs (a slow backup and the next
cron tick) must not interleave.  flock is released by the kernel when the
holder dies, so a killed run never leaves a stale lock."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import fcntl
import hashlib
import os
import tempfile

from .errors import LockedError, StoreError


def lock_path_for(repositories):
    """The lock file: inside the first local repository, else in the temp dir."""
    for repo in repositories:
        if repo.kind == "local":
            return os.path.join(repo.path, ".lock")
    digest = hashlib.sha256(
        "|".join(sorted(r.url for r in repositories)).encode("utf-8")
    ).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "clinic-backup-%s.lock" % digest)


class RunLock(object):
    def __init__(self, path):
        self.path = path
        self.fd = None

    def acquire(self):
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self.fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600
            )
        except OSError as exc:
            raise StoreError("cannot open lock file %s: %s" % (self.path, exc.strerror)) from exc
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self.fd)
            self.fd = None
            raise LockedError(
                "already running: another backup holds %s (pid %s)" % (self.path, holder),
                "wait for it to finish; a killed run releases the lock by itself",
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode("ascii"), 0)
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
