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
    others, files owned by another user than the caller or root, and empty files,
    without blocking (a FIFO is refused, not waited on). One trailing newline is
    stripped, as ``gpg --passphrase-file`` does; a file that gpg would read
    differently (a CR before that newline, a second line, a NUL byte) is refused.
    """
    if not path:
        raise ConfigError(
            "no passphrase file given",
            "set passphrase_file to a root-only file holding the backup passphrase, "
            "or disable encryption explicitly",
        )
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer
        # forever; the fstat below refuses it (and devices) before any read.
        fd = os.open(
            path,
            os.O_RDONLY
            | os.O_NONBLOCK
            | getattr(os, "O_NOFOLLOW", 0)
            | getattr(os, "O_CLOEXEC", 0),
        )
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
            raise ConfigError(
                "passphrase file %s is not a regular file (it is %s)" % (path, _kind(info.st_mode)),
                "point passphrase_file at a regular 0600 file holding the passphrase on one line",
            )
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
    # The engine's passphrase must be exactly what stock ``gpg --passphrase-file``
    # reads (the emergency restore by hand): every byte up to the first newline, or
    # to the end of the file, spaces and all. Files whose reading would differ are
    # refused rather than silently "fixed".
    crlf = data.endswith(b"\r\n")
    if data.endswith(b"\n"):
        data = data[:-1]
    if data.endswith(b"\r"):
        raise ConfigError(
            "passphrase file %s %s: stock gpg --passphrase-file would read the CR as part of "
            "the passphrase, so the emergency restore by hand would fail with 'Bad session key'"
            % (
                path,
                "ends its line with CR LF (a Windows line ending)"
                if crlf
                else "ends with a carriage return (CR)",
            ),
            "run: sed -i 's/\\r$//' %s. Sets already written with this file were encrypted "
            "with the passphrase WITHOUT the CR, which is what the file holds after that command; "
            "until then stock gpg cannot decrypt them with this file" % path,
        )
    if not data.strip():
        raise ConfigError(
            "passphrase file %s is empty" % path,
            "write a long random passphrase into it (e.g. openssl rand -base64 48)",
        )
    if b"\n" in data:
        raise ConfigError(
            "passphrase file %s holds more than one line" % path,
            "keep exactly one line: gpg reads only the first",
        )
    if b"\0" in data:
        # gpg would stop at the NUL byte and use a shorter passphrase than ours.
        raise ConfigError(
            "passphrase file %s holds a NUL byte" % path,
            "write a passphrase of printable characters (e.g. openssl rand -base64 48)",
        )
    return data


def _kind(mode):
    """What a non-regular file is, for the error message."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"
