# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Loading the encryption passphrase from a root-only file.

The passphrase never travels in argv or the environment: it is read here and
handed to gpg through an inherited pipe (see pipeline.GpgPassphrase).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import stat

from .errors import ConfigError

MAX_PASSPHRASE_BYTES = 4096


def load_passphrase(path):
    """Return the passphrase bytes stored in ``path``.

    Refuses symlinks, non-regular files, files readable or writable by group or
    others, files owned by another user than the caller or root, and empty files.
    One trailing newline is stripped, as ``gpg --passphrase-file`` does.
    """
    if not path:
        raise ConfigError(
            "no passphrase file given",
            "set passphrase_file to a root-only file holding the backup passphrase, "
            "or disable encryption explicitly",
        )
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(
                "passphrase file %s is a symlink" % path,
                "point passphrase_file at the real file",
            ) from exc
        raise ConfigError(
            "cannot open passphrase file %s: %s" % (path, exc.strerror),
            "create it with mode 0600 (e.g. install -m 0600 /dev/null %s, then write the passphrase)"
            % path,
        ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("passphrase file %s is not a regular file" % path)
        if info.st_mode & 0o077:
            raise ConfigError(
                "passphrase file %s has loose permissions %s"
                % (path, oct(stat.S_IMODE(info.st_mode))),
                "run: chmod 0600 %s" % path,
            )
        if info.st_uid not in (0, os.geteuid()):
            raise ConfigError(
                "passphrase file %s is owned by uid %d, not by this user or root"
                % (path, info.st_uid),
                "chown it to the user that runs the backup",
            )
        data = os.read(fd, MAX_PASSPHRASE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_PASSPHRASE_BYTES:
        raise ConfigError(
            "passphrase file %s is larger than %d bytes" % (path, MAX_PASSPHRASE_BYTES)
        )
    if data.endswith(b"\n"):
        data = data[:-1]
    if data.endswith(b"\r"):
        data = data[:-1]
    if not data.strip():
        raise ConfigError(
            "passphrase file %s is empty" % path,
            "write a long random passphrase into it (e.g. openssl rand -base64 48)",
        )
    if b"\n" in data or b"\0" in data:
        raise ConfigError(
            "passphrase file %s holds more than one line" % path,
            "keep exactly one line: gpg reads only the first",
        )
    return data
