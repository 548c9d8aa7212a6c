# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Putting a file set (configuration: ``.env``, the nginx site, systemd units,
certificates) back where it came from, validated before anything is reloaded.

A placement declares, per backed-up path, how it goes back: where (``dest``, by
default the path itself), owner, group, mode, a ``validate`` command and a
``reload`` command (argv lists; ``{path}`` in an argument becomes the placed path).
The run:

1. checks every placement against this host before touching anything (parent
   directories, owners, commands on PATH, no symbolic link as destination);
2. restores the set with file_restore.restore_files into a private (0700) staging
   directory - the usual checks: sha256, authentication, counts, safe extraction -
   and finds each placement's path in it;
3. compares: a destination already equal in content, mode and owner is left alone;
4. for each changed destination: copies the current version into the run's
   ``keep_dir`` directory (0700), links it aside under a hidden name next to it
   (``.<name>.pre-restore-<hex>``: no ``*`` glob of nginx or systemd matches it), and
   writes the new version atomically (hidden temporary file, owner and mode set,
   fsync, rename over the destination, directory fsync; a directory is built beside
   and swapped in with two renames);
5. runs every changed placement's validate command; if one fails, every destination
   is put back as it was (the aside renamed back, new ones removed) and NOTHING is
   reloaded;
6. only when every validation passed: removes the asides and runs the reload commands
   (each distinct command once, in the order declared).

Secret files (``.env``, keys and certificates, or ``secret: true``) get mode 0600 at
most; their contents and their validate command's output never appear in a result.
The staging directory is removed whatever happens. Nothing here imports Ansible.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import glob
import grp
import os
import pwd
import shutil
import stat
import subprocess
import tempfile

from .errors import BackupError, ConfigError, IntegrityError, StoreError
from .file_backup import check_set_name, is_inside
from .file_restore import FileRestoreOptions, remove_tree, restore_files
from .lifecycle import ReadOptions, ReadSession, choose_sets
from .repository import fsync_dir, isoformat, make_private_dirs, parse_time, utc_now
from .restore import parse_moment

STAGING_PREFIX = "clinic-backup-place-"
ASIDE_MARK = ".pre-restore-"
TEMP_MARK = ".placing-"
OUTPUT_LIMIT = 2000  # characters of a failed command's output kept in the error
SECRET_NAMES = (".env",)
SECRET_SUFFIXES = (".env", ".key", ".pem", ".crt", ".p12", ".pfx")
DEFAULT_KEEP_DIR = "/var/backups/clinic-backup/config-pre-restore"
DEFAULT_TIMEOUT = 120


class ValidationError(BackupError):
    """A placed file failed its validate command: everything was put back, nothing reloaded."""


class ReloadError(BackupError):
    """The files are in place and validated, but a reload command failed."""


# ---------------------------------------------------------------------- options
def _absolute(value, what):
    if not isinstance(value, str) or not value or not os.path.isabs(value):
        raise ConfigError("%s %r must be an absolute path" % (what, value))
    normal = os.path.normpath(value)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if normal == "/" or any(ord(ch) < 32 for ch in normal):
        raise ConfigError("%s %r cannot be placed" % (what, value))
    return normal


def _mode(value, what):
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        text = str(value).strip()
        try:
            number = int(text, 8)
        except ValueError:
            raise ConfigError(
                "%s %r is not an octal mode" % (what, value), "quote it: '0644'"
            ) from None
    if not 0 <= number <= 0o7777:
        raise ConfigError("%s %r is not a file mode" % (what, value))
    if number & (stat.S_ISUID | stat.S_ISGID):
        raise ConfigError(
            "%s %r sets the setuid/setgid bit" % (what, value), "configuration never needs it"
        )
    return number


def _argv(value, what):
    if value is None or value == []:
        return None
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(part, str) and part and "\0" not in part for part in value
    ):
        raise ConfigError(
            "%s must be a list of non-empty strings (an argv, never a shell line), got %r"
            % (what, value),
            "e.g. [nginx, -t] or [systemctl, reload, nginx]",
        )
    return list(value)


def _user(value, what):
    """A uid (or gid) from a name or a number; None stays None."""
    if value is None or value == "":
        return None
    lookup = pwd.getpwnam if what == "owner" else grp.getgrnam
    text = str(value)
    if text.isdigit():
        return int(text)
    try:
        entry = lookup(text)
    except KeyError:
        raise ConfigError(
            "%s %r does not exist on this host" % (what, value),
            "create it first (install the application), or give a number",
        ) from None
    return entry.pw_uid if what == "owner" else entry.gr_gid


def looks_secret(path):
    """``.env`` files, keys and certificates: 0600 and never shown, unless told otherwise."""
    name = os.path.basename(path)
    return name in SECRET_NAMES or name.startswith(".env.") or name.endswith(SECRET_SUFFIXES)


class Placement(object):
    """How one backed-up path goes back; validated on construction (ConfigError)."""

    KEYS = (
        "path",
        "dest",
        "owner",
        "group",
        "mode",
        "directory_mode",
        "validate",
        "reload",
        "secret",
    )

    def __init__(
        self,
        path,
        dest=None,
        owner=None,
        group=None,
        mode=None,
        directory_mode=None,
        validate=None,
        reload=None,
        secret=None,
    ):
        self.path = _absolute(path, "place path")
        self.dest = _absolute(dest, "place dest") if dest else self.path
        what = "placement of %s" % self.path
        self.owner_name, self.group_name = owner, group
        self.uid = _user(owner, "owner")
        self.gid = _user(group, "group")
        self.mode = _mode(mode, "%s: mode" % what)
        self.directory_mode = _mode(directory_mode, "%s: directory_mode" % what)
        self.validate = _argv(validate, "%s: validate" % what)
        self.reload = _argv(reload, "%s: reload" % what)
        self.secret = looks_secret(self.dest) if secret is None else bool(secret)
        if self.secret:
            for label, value in (("mode", self.mode), ("directory_mode", self.directory_mode)):
                if value is not None and value & 0o077:
                    raise ConfigError(
                        "%s: %s %s lets other users read a secret file" % (what, label, oct(value)),
                        "use 0600 (0700 for directories), or secret: false if it is not secret",
                    )

    @classmethod
    def from_dict(cls, entry):
        if not isinstance(entry, dict):
            raise ConfigError("each entry of place must be a mapping, got %r" % (entry,))
        unknown = sorted(set(entry) - set(cls.KEYS))
        if unknown:
            raise ConfigError(
                "unknown key(s) %s in the placement of %s"
                % (", ".join(unknown), entry.get("path")),
                "known keys: %s" % ", ".join(cls.KEYS),
            )
        if "path" not in entry:
            raise ConfigError("a placement has no path", "give the path as it was backed up")
        return cls(**entry)

    def file_mode(self, stored):
        mode = self.mode if self.mode is not None else stored
        return mode & ~0o077 if self.secret else mode

    def dir_mode(self, stored):
        mode = self.directory_mode if self.directory_mode is not None else stored
        return mode & ~0o077 if self.secret else mode


class PlacementOptions(ReadOptions):
    """Which file set, how each of its paths goes back, where the previous versions are
    kept; validated on construction (ConfigError)."""

    def __init__(
        self,
        name,
        place,
        keep_dir=DEFAULT_KEEP_DIR,
        work_dir=None,
        require_verified=False,
        not_after=None,
        command_timeout=DEFAULT_TIMEOUT,
        **read_options,
    ):
        """``read_options``: lifecycle.ReadOptions' (set_id, passphrase_file, fallback...)."""
        read_options.pop("mode", None)
        self._set_read_options(mode="create", **read_options)
        self.read_options = dict(read_options)
        self.name = check_set_name(name)
        if not isinstance(place, (list, tuple)) or not place:
            raise ConfigError(
                "place must list at least one path to put back",
                "e.g. [{path: /etc/nginx/sites-available/clinic, validate: [nginx, -t]}]",
            )
        self.place = [Placement.from_dict(entry) for entry in place]
        seen = {}
        for placement in self.place:
            for other in seen.values():
                if is_inside(placement.dest, other.dest) or is_inside(other.dest, placement.dest):
                    raise ConfigError(
                        "placements of %s and %s overlap (%s, %s)"
                        % (other.path, placement.path, other.dest, placement.dest),
                        "place each destination once",
                    )
            seen[placement.dest] = placement
        self.keep_dir = _absolute(keep_dir, "keep_dir")
        self.work_dir = _absolute(work_dir, "work_dir") if work_dir else None
        self.require_verified = bool(require_verified)
        self.not_after = parse_moment(not_after)
        timeout = int(command_timeout)
        if timeout < 1:
            raise ConfigError("command_timeout must be at least 1 second (got %d)" % timeout)
        self.command_timeout = timeout


# ---------------------------------------------------------------------- checks on this host
def _owner_of(placement, current):
    """(uid, gid) the placed entry gets: as declared, else the current version's, else ours."""
    uid = placement.uid
    gid = placement.gid
    if uid is None:
        uid = current.st_uid if current is not None else os.geteuid()
    if gid is None:
        gid = current.st_gid if current is not None else os.getegid()
    return uid, gid


def _check_host(options):
    """Everything that can be judged before the set is read; raises ConfigError."""
    euid = os.geteuid()
    for placement in options.place:
        dest = placement.dest
        parent = os.path.dirname(dest)
        if not os.path.isdir(parent):
            raise ConfigError(
                "the directory %s (for %s) does not exist" % (parent, dest),
                "install the application or service first, or create it",
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError("%s is not writable by this user (for %s)" % (parent, dest))
        if os.path.islink(dest):
            raise ConfigError(
                "%s is a symbolic link (to %s)" % (dest, os.path.realpath(dest)),
                "place the file it points to: set dest to the real path",
            )
        if os.path.ismount(dest):
            raise ConfigError("%s is a mount point and cannot be swapped" % dest)
        current = os.lstat(dest) if os.path.lexists(dest) else None
        uid, gid = _owner_of(placement, current)
        if euid != 0 and (
            uid != euid
            or (placement.gid is not None and gid != os.getegid() and gid not in os.getgroups())
        ):
            raise ConfigError(
                "%s would belong to %s:%s; only root can give files away"
                % (dest, placement.owner_name or uid, placement.group_name or gid),
                "run the task as root (become: true)",
            )
        for label, argv in (("validate", placement.validate), ("reload", placement.reload)):
            if argv and shutil.which(argv[0]) is None:
                raise ConfigError(
                    "the %s command %s (for %s) is not on PATH" % (label, argv[0], dest),
                    "install it, or give its absolute path",
                )


def _leftovers(options):
    found = []
    for placement in options.place:
        base = os.path.join(os.path.dirname(placement.dest), "." + os.path.basename(placement.dest))
        for mark in (ASIDE_MARK, TEMP_MARK):
            found.extend(glob.glob(glob.escape(base + mark) + "*"))
    work = options.work_dir or tempfile.gettempdir()
    found.extend(glob.glob(os.path.join(glob.escape(work), STAGING_PREFIX + "*")))
    return sorted(found)


# ---------------------------------------------------------------------- comparing
def _same_file(source, dest, mode, uid, gid):
    try:
        info = os.lstat(dest)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode) or (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) != (
        mode,
        uid,
        gid,
    ):
        return False
    if info.st_size != os.lstat(source).st_size:
        return False
    with open(source, "rb") as first, open(dest, "rb") as second:
        while True:
            left, right = first.read(1 << 16), second.read(1 << 16)
            if left != right:
                return False
            if not left:
                return True


def _tree(root, placement, uid, gid, staged):
    """{relative path: (kind, mode, uid, gid, link target or None)} of a directory; for
    the staged copy, with the modes and owners the placement gives."""
    out = {}
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(current, name)
            rel = os.path.relpath(path, root)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                out[rel] = (
                    "link",
                    0,
                    uid if staged else info.st_uid,
                    gid if staged else info.st_gid,
                    os.readlink(path),
                )
            elif stat.S_ISDIR(info.st_mode):
                mode = (
                    placement.dir_mode(stat.S_IMODE(info.st_mode))
                    if staged
                    else stat.S_IMODE(info.st_mode)
                )
                out[rel] = (
                    "dir",
                    mode,
                    uid if staged else info.st_uid,
                    gid if staged else info.st_gid,
                    None,
                )
            else:
                mode = (
                    placement.file_mode(stat.S_IMODE(info.st_mode))
                    if staged
                    else stat.S_IMODE(info.st_mode)
                )
                out[rel] = (
                    "file",
                    mode,
                    uid if staged else info.st_uid,
                    gid if staged else info.st_gid,
                    None,
                )
    return out


def _same_directory(source, dest, placement, uid, gid):
    try:
        info = os.lstat(dest)
    except FileNotFoundError:
        return False
    top = placement.dir_mode(stat.S_IMODE(os.lstat(source).st_mode))
    if not stat.S_ISDIR(info.st_mode) or (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) != (
        top,
        uid,
        gid,
    ):
        return False
    wanted = _tree(source, placement, uid, gid, staged=True)
    if wanted != _tree(dest, placement, uid, gid, staged=False):
        return False
    for rel, entry in wanted.items():
        if entry[0] == "file" and not _same_file(
            os.path.join(source, rel), os.path.join(dest, rel), entry[1], uid, gid
        ):
            return False
    return True


# ---------------------------------------------------------------------- writing
def _copy_bytes(source, fd):
    with open(source, "rb") as handle:
        while True:
            data = handle.read(1 << 20)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]


def _hidden(dest, mark):
    return os.path.join(
        os.path.dirname(dest), "." + os.path.basename(dest) + mark + os.urandom(3).hex()
    )


def _write_file(source, path, mode, uid, gid, mtime=None):
    """A new file at ``path`` (must not exist): bytes, owner, mode, fsync."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        _copy_bytes(source, fd)
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
        os.fsync(fd)
    finally:
        os.close(fd)


def _build_directory(source, path, placement, uid, gid):
    """A copy of the staged directory ``source`` at ``path`` (must not exist), with the
    placement's owner and modes, every file fsynced."""
    os.mkdir(path, 0o700)
    for current, dirs, files in os.walk(source):
        rel = os.path.relpath(current, source)
        target_dir = path if rel == "." else os.path.join(path, rel)
        for name in dirs + files:
            src = os.path.join(current, name)
            dst = os.path.join(target_dir, name)
            info = os.lstat(src)
            if stat.S_ISLNK(info.st_mode):
                os.symlink(os.readlink(src), dst)
                if os.geteuid() == 0:
                    os.lchown(dst, uid, gid)
            elif stat.S_ISDIR(info.st_mode):
                os.mkdir(dst, 0o700)
            else:
                _write_file(
                    src,
                    dst,
                    placement.file_mode(stat.S_IMODE(info.st_mode)),
                    uid,
                    gid,
                    int(info.st_mtime),
                )
    # Directory modes last, deepest first: a 0500 directory must not stop the copy.
    for current, _dirs, _files in sorted(os.walk(source), key=lambda item: -len(item[0])):
        rel = os.path.relpath(current, source)
        target_dir = path if rel == "." else os.path.join(path, rel)
        info = os.lstat(current)
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.chown(target_dir, uid, gid)
        os.chmod(target_dir, placement.dir_mode(stat.S_IMODE(info.st_mode)))
        fsync_dir(target_dir)


def _keep_copy(dest, kept_root):
    """Copy the current ``dest`` (file or directory) below ``kept_root`` (0700), modes,
    times and (as root) owners kept; returns the copy's path."""
    copy = os.path.join(kept_root, dest.lstrip("/"))
    make_private_dirs(os.path.dirname(copy), "keep_dir")
    if os.path.isdir(dest):
        shutil.copytree(dest, copy, symlinks=True)
        walk = [copy] + [os.path.join(c, n) for c, d, f in os.walk(copy) for n in d + f]
        pairs = [(os.path.join(dest, os.path.relpath(p, copy)), p) for p in walk]
    else:
        shutil.copy2(dest, copy, follow_symlinks=False)
        pairs = [(dest, copy)]
    if os.geteuid() == 0:
        for original, kept in pairs:
            info = os.lstat(original)
            os.lchown(kept, info.st_uid, info.st_gid)
    return copy


class _Step(object):
    """One destination being placed, and how to undo it."""

    def __init__(self, placement, source, kind, state):
        self.placement = placement
        self.dest = placement.dest
        self.source = source
        self.kind = kind  # file | directory
        self.state = state  # created | replaced | unchanged
        self.aside = None  # the previous version, under a hidden name next to dest
        self.placed = False
        self.kept = None
        self.mode = None
        self.uid = self.gid = None

    def place(self, kept_root):
        dest, placement = self.dest, self.placement
        if self.state == "replaced":
            self.kept = _keep_copy(dest, kept_root)
        temp = _hidden(dest, TEMP_MARK)
        try:
            if self.kind == "file":
                _write_file(
                    self.source,
                    temp,
                    self.mode,
                    self.uid,
                    self.gid,
                    int(os.lstat(self.source).st_mtime),
                )
                if self.state == "replaced":
                    self.aside = _hidden(dest, ASIDE_MARK)
                    os.link(dest, self.aside)  # the same inode: put back exactly as it was
                os.rename(temp, dest)  # atomic: dest is the old or the new file, never neither
            else:
                _build_directory(self.source, temp, placement, self.uid, self.gid)
                if self.state == "replaced":
                    self.aside = _hidden(dest, ASIDE_MARK)
                    os.rename(dest, self.aside)
                try:
                    os.rename(temp, dest)
                except BaseException:
                    if self.aside:
                        os.rename(self.aside, dest)
                        self.aside = None
                    raise
        except BaseException:
            remove_tree(temp)
            if self.aside and self.kind == "file":
                os.unlink(self.aside)
                self.aside = None
            raise
        self.placed = True
        fsync_dir(os.path.dirname(dest))

    def undo(self):
        if not self.placed:
            return
        dest = self.dest
        if self.kind == "file":
            if self.aside:
                os.rename(self.aside, dest)
            else:
                os.unlink(dest)
        else:
            trash = _hidden(dest, TEMP_MARK)
            os.rename(dest, trash)
            if self.aside:
                os.rename(self.aside, dest)
            remove_tree(trash)
        self.aside = None
        self.placed = False
        fsync_dir(os.path.dirname(dest))

    def commit(self):
        if self.aside:
            remove_tree(self.aside)
            self.aside = None

    def describe(self, current):
        """One line for the diff: names, owners and modes; never contents."""
        if current is None:
            return "%s: absent" % self.dest
        kind = "directory" if stat.S_ISDIR(current.st_mode) else "file"
        return "%s: %s, mode %04o, owner %d:%d" % (
            self.dest,
            kind,
            stat.S_IMODE(current.st_mode),
            current.st_uid,
            current.st_gid,
        )

    def as_dict(self):
        return {
            "path": self.placement.path,
            "dest": self.dest,
            "type": self.kind,
            "state": self.state,
            "secret": self.placement.secret,
            "mode": "%04o" % self.mode,
            "owner": self.uid,
            "group": self.gid,
            "kept": self.kept,
        }


# ---------------------------------------------------------------------- commands
def _substitute(argv, path):
    return [part.replace("{path}", path) for part in argv]


def run_command(argv, timeout):
    """(exit status, combined output) of ``argv``; 127 when it cannot be started, 124 on
    timeout."""
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return 124, "timed out after %d s" % timeout
    except OSError as exc:
        return 127, "cannot run %s: %s" % (argv[0], exc.strerror or exc)
    text = proc.stdout.decode("utf-8", "replace").strip()
    return proc.returncode, text[-OUTPUT_LIMIT:]


# ---------------------------------------------------------------------- the run
def _staged_source(placement, result, staged_root):
    """The staged copy of ``placement.path`` in the restored set, or None."""
    roots = result.get("roots") or []
    if result.get("layout") == "content":
        bases = [(roots[0].get("path"), staged_root)] if roots else []
    else:
        bases = [(r.get("path"), os.path.join(staged_root, r.get("member", ""))) for r in roots]
    for root_path, base in bases:
        if not isinstance(root_path, str):
            continue
        root_path = os.path.normpath(root_path)
        if placement.path == root_path:
            return base
        if is_inside(placement.path, root_path):
            inner = os.path.join(base, os.path.relpath(placement.path, root_path))
            if os.path.lexists(inner):
                return inner
    return None


def _restore_into(repo, options, staged_root):
    """Restore the set into ``staged_root`` (file_restore), honouring not_after and
    require_verified by choosing the set first; returns file_restore's result."""
    read = dict(options.read_options)

    def restore(set_id=None):
        chosen = dict(read)
        if set_id is not None:
            chosen["set_id"] = set_id
        return restore_files(
            repo,
            FileRestoreOptions(target_dir=staged_root, name=options.name, mode="create", **chosen),
        )

    if options.set_id is not None or not (options.require_verified or options.not_after):
        return restore()

    def accept(entry):
        if options.require_verified and entry["verification"] != "ok":
            return "verification is %s" % entry["verification"]
        if options.not_after is not None and parse_time(entry["finished_at"]) > options.not_after:
            return "finished %s, after not_after %s" % (
                entry["finished_at"],
                isoformat(options.not_after),
            )
        return None

    with ReadSession(options.passphrase_file, options.old_passphrase_files) as session:
        chosen, passed, _entries = choose_sets(repo, session, options, "files", "name", accept)
    if not chosen:
        raise IntegrityError(
            "no%s file set named %r%s in %s"
            % (
                " verified" if options.require_verified else "",
                options.name,
                " finished before %s" % isoformat(options.not_after) if options.not_after else "",
                repo.url,
            ),
            "passed over: %s" % "; ".join("%(set_id)s (%(reason)s)" % p for p in passed)
            if passed
            else "run files_backup (and backup_verify) first",
        )
    damaged = []
    for set_id in chosen:
        try:
            result = restore(set_id)
        except IntegrityError as exc:
            if not options.fallback:
                raise
            damaged.append({"set_id": set_id, "reason": str(exc)})
            remove_tree(staged_root)
            continue
        result["damaged"] = damaged + result.get("damaged", [])
        result["passed_over"] = passed
        return result
    raise IntegrityError(
        "no file set named %r could be restored" % options.name,
        "tried: %s" % "; ".join("%(set_id)s (%(reason)s)" % d for d in damaged),
    )


def _plan(options, result, staged_root):
    steps = []
    missing = []
    for placement in options.place:
        source = _staged_source(placement, result, staged_root)
        if source is None:
            missing.append(placement.path)
            continue
        info = os.lstat(source)
        if stat.S_ISDIR(info.st_mode):
            kind = "directory"
        elif stat.S_ISREG(info.st_mode):
            kind = "file"
        else:
            raise ConfigError(
                "%s is a symbolic link in set %s; place a file or directory"
                % (placement.path, result["set_id"])
            )
        current = os.lstat(placement.dest) if os.path.lexists(placement.dest) else None
        if current is not None and stat.S_ISDIR(current.st_mode) != (kind == "directory"):
            raise ConfigError(
                "%s is a %s here but a %s in set %s"
                % (
                    placement.dest,
                    "directory" if stat.S_ISDIR(current.st_mode) else "file",
                    kind,
                    result["set_id"],
                ),
                "move it away first, or set dest",
            )
        step = _Step(placement, source, kind, "created" if current is None else "replaced")
        step.uid, step.gid = _owner_of(placement, current)
        if kind == "file":
            step.mode = placement.file_mode(stat.S_IMODE(info.st_mode))
            same = _same_file(source, placement.dest, step.mode, step.uid, step.gid)
        else:
            step.mode = placement.dir_mode(stat.S_IMODE(info.st_mode))
            same = _same_directory(source, placement.dest, placement, step.uid, step.gid)
        if same:
            step.state = "unchanged"
        steps.append((step, current))
    if missing:
        set_paths = sorted(
            r.get("path") for r in result.get("roots") or [] if isinstance(r.get("path"), str)
        )
        raise ConfigError(
            "set %s of %r does not hold %s" % (result["set_id"], options.name, ", ".join(missing)),
            "the set holds: %s; give those paths (or paths inside its directories)"
            % ", ".join(set_paths),
        )
    return steps


def _diff(steps):
    before, after = [], []
    for step, current in steps:
        before.append(step.describe(current))
        if step.state == "unchanged":
            after.append(step.describe(current))
            continue
        after.append(
            "%s: %s (%s), mode %04o, owner %d:%d%s"
            % (
                step.dest,
                step.kind,
                step.state,
                step.mode,
                step.uid,
                step.gid,
                ", secret: contents not shown" if step.placement.secret else "",
            )
        )
    return {"before": "\n".join(before) + "\n", "after": "\n".join(after) + "\n"}


def _commands(steps, attribute):
    """The distinct commands of the changed steps, in declaration order, with the paths
    they stand for."""
    out = []
    for step in steps:
        argv = getattr(step.placement, attribute)
        if not argv or step.state == "unchanged":
            continue
        argv = _substitute(argv, step.dest)
        for entry in out:
            if entry["argv"] == argv:
                entry["paths"].append(step.dest)
                entry["secret"] = entry["secret"] or step.placement.secret
                break
        else:
            out.append({"argv": argv, "paths": [step.dest], "secret": step.placement.secret})
    return out


def _undo_all(steps):
    """Undo every placed step, newest first; returns the destinations that could not be
    put back (with why)."""
    failed = []
    for step in reversed(steps):
        try:
            step.undo()
        except OSError as exc:
            failed.append(
                "%s (%s; the previous version is kept at %s)" % (step.dest, exc, step.kept or "-")
            )
    return failed


def place_files(repo, options, check_mode=False, now=None, runner=None):
    """Restore the file set ``options.name`` and put its paths in place as
    ``options`` (PlacementOptions) say; returns a result dict. ``runner(argv, timeout)``
    runs validate and reload commands (default run_command)."""
    now = now or utc_now()
    runner = runner or run_command
    _check_host(options)
    warnings = []
    leftovers = _leftovers(options)
    if leftovers:
        warnings.append(
            "left by an interrupted placement (previous versions, temporary files or staging "
            "directories that may hold secrets; check and remove them): %s" % ", ".join(leftovers)
        )
    if options.work_dir:
        make_private_dirs(options.work_dir, "work_dir")
    try:
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=options.work_dir)
    except OSError as exc:
        raise StoreError("cannot create a staging directory: %s" % exc, "set work_dir") from exc
    try:
        staged_root = os.path.join(staging, "set")
        restored = _restore_into(repo, options, staged_root)
        steps = _plan(options, restored, staged_root)
        changing = [step for step, _current in steps if step.state != "unchanged"]
        result = {
            "set_id": restored["set_id"],
            "name": restored["name"],
            "backup_started_at": restored.get("backup_started_at"),
            "rpo_seconds": restored.get("rpo_seconds"),
            "damaged": restored.get("damaged", []),
            "passed_over": restored.get("passed_over", []),
            "changed": bool(changing),
            "diff": _diff(steps),
            "validated": [],
            "reloaded": [],
            "kept_dir": None,
            "warnings": warnings + list(restored.get("warnings", [])),
        }
        validations = _commands(changing, "validate")
        reloads = _commands(changing, "reload")
        if check_mode:
            result["placed"] = [step.as_dict() for step, _current in steps]
            result["would_validate"] = [v["argv"] for v in validations]
            result["would_reload"] = [r["argv"] for r in reloads]
            return result
        kept_root = None
        if any(step.state == "replaced" for step in changing):
            kept_root = os.path.join(
                options.keep_dir, "%s-%s" % (now.strftime("%Y%m%dT%H%M%SZ"), restored["set_id"])
            )
            if os.path.lexists(kept_root):
                kept_root += "-" + os.urandom(3).hex()
            make_private_dirs(kept_root, "keep_dir")
            result["kept_dir"] = kept_root
        placed = []
        try:
            for step in changing:
                step.place(kept_root)
                placed.append(step)
        except BaseException as exc:
            failed = _undo_all(placed)
            if not failed and kept_root:
                remove_tree(kept_root)
            if isinstance(exc, OSError):
                raise StoreError(
                    "cannot place %s: %s; every placed file was put back%s"
                    % (
                        step.dest,
                        exc.strerror or exc,
                        "" if not failed else " except " + "; ".join(failed),
                    ),
                    "nothing was validated or reloaded",
                ) from exc
            raise
        for validation in validations:
            try:
                status, output = runner(validation["argv"], options.command_timeout)
            except BaseException:
                _undo_all(placed)  # interrupted before every validation passed: put back
                raise
            result["validated"].append({"argv": validation["argv"], "rc": status})
            if status != 0:
                failed = _undo_all(placed)
                if not failed and kept_root:
                    remove_tree(kept_root)  # every file is back as it was: no copy needed
                shown = "output withheld (secret file)" if validation["secret"] else output
                error = ValidationError(
                    "validation of %s failed: %s exited %d: %s; the previous files were put back "
                    "and nothing was reloaded%s"
                    % (
                        ", ".join(validation["paths"]),
                        " ".join(validation["argv"]),
                        status,
                        shown or "no output",
                        ""
                        if not failed
                        else "; EXCEPT (put these back by hand): " + "; ".join(failed),
                    ),
                    "fix the file in a newer backup or choose another set (set_id); set %s "
                    "was not placed" % restored["set_id"],
                )
                error.result = {
                    "set_id": restored["set_id"],
                    "validated": result["validated"],
                    "reloaded": [],
                    "rolled_back": [step.dest for step in placed],
                    "changed": bool(failed),
                }
                raise error
        for step in placed:
            try:
                step.commit()
            except OSError as exc:
                result["warnings"].append("cannot remove %s: %s" % (step.aside, exc))
        result["placed"] = [step.as_dict() for step, _current in steps]
        for reload in reloads:
            status, output = runner(reload["argv"], options.command_timeout)
            result["reloaded"].append({"argv": reload["argv"], "rc": status})
            if status != 0:
                error = ReloadError(
                    "the files are in place and passed validation, but %s exited %d: %s"
                    % (" ".join(reload["argv"]), status, output or "no output"),
                    "reload or restart the service by hand; the previous versions are in %s"
                    % (kept_root or "- (there were none)"),
                )
                error.result = dict(result, changed=True)
                error.result.pop("diff", None)
                error.result.pop("warnings", None)
                raise error
        return result
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreError("no space left while placing files: %s" % exc) from exc
        raise StoreError("cannot place the files: %s" % exc) from exc
    finally:
        remove_tree(staging)
