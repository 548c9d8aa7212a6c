# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The passphrase file on a host and its keyring of older passphrases.

New sets are encrypted with the passphrase file; after a rotation the passphrase
it held moves into the keyring directory as ``<key_id>`` (the one-way identifier a
set's manifest records as ``encryption.key_id``, see authentication.RecordKey), so
every set taken before stays restorable: the agent configs list the keyring's files
as ``old_passphrase_files``. Everything is written atomically (temp file, fsync,
rename), root-only (or the backup user's): the file 0600, the keyring 0700, its
files 0400. No passphrase is ever part of a message or a result.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re
import stat

from .authentication import RecordKey
from .errors import ConfigError
from .passphrase import MAX_PASSPHRASE_BYTES
from .repository import fsync_dir

MIN_LENGTH = 20
FILE_MODE, KEYRING_MODE, KEYRING_FILE_MODE = 0o600, 0o700, 0o400
KEY_ID = re.compile(r"^[0-9a-f]{16}$")
# Values that are no passphrase: placeholders and the examples of docs and templates,
# compared without case and without anything but letters and digits; a passphrase that
# contains one of the fragments is refused as well ("changeme-changeme-changeme").
PLACEHOLDERS = (
    "changeme",
    "changemeplease",
    "password",
    "passphrase",
    "secret",
    "example",
    "examplepassphrase",
    "yourpassphrase",
    "yourpassphrasehere",
    "backuppassphrase",
    "clinicbackuppassphrase",
    "correcthorsebatterystaple",
    "todo",
    "xxx",
)
PLACEHOLDER_FRAGMENTS = (
    "changeme",
    "replaceme",
    "placeholder",
    "yourpassphrase",
    "examplepassphrase",
    "notsecret",
    "insecure",
)


def _normal(text):
    return re.sub(r"[^a-z0-9]", "", text.lower())


def check_new_passphrase(passphrase, min_length=MIN_LENGTH, placeholders=()):
    """ConfigError (never quoting it) unless ``passphrase`` (str) is one line of at least
    ``min_length`` characters that is no placeholder; returns it as bytes."""
    if not isinstance(passphrase, str) or not passphrase.strip():
        raise ConfigError(
            "the backup passphrase is missing or empty",
            "give it from Ansible Vault, e.g. ansible-vault encrypt_string "
            '"$(openssl rand -base64 48)" --name vault_clinic_backup_passphrase',
        )
    if passphrase.endswith("\n"):
        passphrase = passphrase[:-1]  # a YAML block scalar's newline is not part of it
    if "\n" in passphrase or "\r" in passphrase or "\0" in passphrase:
        raise ConfigError(
            "the backup passphrase is not one line (it holds a line break, CR or NUL byte)",
            "gpg reads the first line only: use one line (e.g. openssl rand -base64 48)",
        )
    normal = _normal(passphrase)
    refused = set(PLACEHOLDERS) | {_normal(p) for p in placeholders or () if _normal(p)}
    if (
        "{{" in passphrase
        or normal in refused
        or any(fragment in normal for fragment in PLACEHOLDER_FRAGMENTS)
    ):
        raise ConfigError(
            "the backup passphrase is a placeholder or an example value, not a secret",
            "generate one (openssl rand -base64 48) and keep it in Ansible Vault",
        )
    if len(passphrase) < min_length:
        raise ConfigError(
            "the backup passphrase has %d characters, fewer than %d"
            % (len(passphrase), min_length),
            "generate a longer one (openssl rand -base64 48 gives 64 characters)",
        )
    data = passphrase.encode("utf-8")
    if len(data) > MAX_PASSPHRASE_BYTES:
        raise ConfigError(
            "the backup passphrase is longer than %d bytes" % MAX_PASSPHRASE_BYTES,
            "use a shorter one (openssl rand -base64 48)",
        )
    return data


def passphrase_id(passphrase):
    """The identifier a set's manifest records for ``passphrase`` (bytes)."""
    return RecordKey(passphrase).passphrase_id()


def _read_existing(path):
    """The passphrase in ``path`` (one trailing newline stripped) and its stat, or
    (None, None) when there is none. Read whatever its mode (the role fixes it), but a
    symlink or a non-regular file is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise ConfigError(
            "cannot open the passphrase file %s: %s%s"
            % (path, exc.strerror, " (it is a symlink)" if os.path.islink(path) else ""),
            "replace it with a regular file, or remove it",
        ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(
                "the passphrase file %s is not a regular file" % path,
                "remove it; the passphrase is written as a regular 0600 file",
            )
        data = os.read(fd, MAX_PASSPHRASE_BYTES + 2)
    finally:
        os.close(fd)
    if data.endswith(b"\n"):
        data = data[:-1]
    return data, info


def _write(path, data, mode, uid, gid):
    """Atomically replace ``path`` with ``data`` (owner uid:gid, ``mode``)."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, ".%s.tmp-%d" % (os.path.basename(path), os.getpid()))
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(directory)


def _fix(path, info, mode, uid, gid, check_mode):
    """Enforce owner and mode; returns whether anything was (or would be) changed."""
    changed = False
    if (info.st_uid, info.st_gid) != (uid, gid):
        changed = True
        if not check_mode:
            os.chown(path, uid, gid, follow_symlinks=False)
    if stat.S_IMODE(info.st_mode) != mode:
        changed = True
        if not check_mode:
            os.chmod(path, mode)
    return changed


def _keyring_dir(path, uid, gid, check_mode):
    """Create or fix the keyring directory (0700); returns whether it changed."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if not check_mode:
            os.mkdir(path, KEYRING_MODE)
            os.chown(path, uid, gid)
            os.chmod(path, KEYRING_MODE)
        return True
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(
            "the keyring %s is not a directory" % path,
            "move it away; the keyring is a 0700 directory of old passphrase files",
        )
    return _fix(path, info, KEYRING_MODE, uid, gid, check_mode)


def keyring_files(keyring_dir):
    """The old passphrase files of the keyring (named by key id), sorted."""
    try:
        names = os.listdir(keyring_dir)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(keyring_dir, name) for name in names if KEY_ID.match(name))


def install_passphrase(
    path,
    passphrase=None,
    keyring_dir=None,
    rotate=False,
    uid=0,
    gid=0,
    check_mode=False,
    required=True,
    min_length=MIN_LENGTH,
    placeholders=(),
):
    """Make ``path`` hold ``passphrase`` (str; None: keep what the host has).

    A different passphrase already in ``path`` is refused unless ``rotate``; with it, the
    old one first goes into the keyring as ``<key_id>`` (0400), then the new one replaces
    it, so a run killed in between leaves both passphrases on the host. Returns
    ``{"changed", "key_id", "rotated", "retired_key_id", "old_passphrase_files"}``.
    """
    new = None
    if passphrase is not None:
        new = check_new_passphrase(passphrase, min_length, placeholders)
    if rotate and not keyring_dir:
        raise ConfigError(
            "a rotation needs a keyring directory for the old passphrase",
            "set the keyring directory (e.g. /etc/clinic-backup/keyring)",
        )
    current, info = _read_existing(path)
    if current is None and new is None:
        if required:
            raise ConfigError(
                "%s does not exist and no passphrase was given" % path,
                "give the backup passphrase from Ansible Vault",
            )
        return {
            "changed": False,
            "key_id": None,
            "rotated": False,
            "retired_key_id": None,
            "old_passphrase_files": keyring_files(keyring_dir) if keyring_dir else [],
        }
    changed = False
    if keyring_dir:
        changed |= _keyring_dir(keyring_dir, uid, gid, check_mode)
    retired = None
    if new is not None and current and current != new:
        if not rotate:
            raise ConfigError(
                "%s holds a different passphrase than the one given; every set taken so far "
                "needs the one on the host" % path,
                "to rotate, set the rotate option: the old passphrase is kept in the keyring "
                "(or fix the vault value); nothing was changed",
            )
        retired = passphrase_id(current) if current else None
    if retired is not None:
        kept = os.path.join(keyring_dir, retired)
        held, _info = _read_existing(kept)
        if held is not None and held != current:
            raise ConfigError(
                "%s exists with other content than the passphrase it is named after" % kept,
                "move it away and look into how it got there; nothing was changed",
            )
        if held is None and not check_mode:
            _write(kept, current + b"\n", KEYRING_FILE_MODE, uid, gid)
        changed = True
    if new is not None and (current is None or current != new):
        if not check_mode:
            _write(path, new + b"\n", FILE_MODE, uid, gid)
        changed = True
    else:
        changed |= _fix(path, info, FILE_MODE, uid, gid, check_mode)
    old_files = keyring_files(keyring_dir) if keyring_dir else []
    for old in old_files:
        old_info = os.lstat(old)
        if not stat.S_ISREG(old_info.st_mode):
            raise ConfigError(
                "the keyring entry %s is not a regular file" % old,
                "move it away: the keyring holds only 0400 passphrase files",
            )
        changed |= _fix(old, old_info, KEYRING_FILE_MODE, uid, gid, check_mode)
    if check_mode and retired is not None:
        old_files = sorted(set(old_files) | {os.path.join(keyring_dir, retired)})
    return {
        "changed": changed,
        "key_id": passphrase_id(new if new is not None else current) if (new or current) else None,
        "rotated": retired is not None,
        "retired_key_id": retired,
        "old_passphrase_files": old_files,
    }
