# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fast path of ``wal-push`` / ``wal-fetch``: PostgreSQL runs them once per WAL file.

PostgreSQL calls archive_command for one segment at a time and waits for it. Importing
the engine (~0.2 s) and deriving keys for every segment would cap archiving far below
what a write burst produces, so the work is done ahead, in parallel, by a background
worker (the design of pgBackRest's asynchronous archive-push / archive-get):

- ``wal-push PATH``: a worker (``python -m ...walspool push``) pushes EVERY file that
  PostgreSQL has marked ``.ready`` in ``pg_wal/archive_status``, with ``wal.workers``
  threads, and writes ``<spool>/push/<file>.ok`` only after the file is durably stored
  in every repository (or ``.error`` with the reason). This foreground call answers 0
  only when its own file's ``.ok`` is there and describes this very file (size, inode,
  mtime); ``.error`` -> 1; nothing within ``wal.push_timeout`` seconds -> 1. PostgreSQL
  keeps a file until its archive_command returned 0, so nothing is reported archived
  that is not.
- ``wal-fetch NAME DEST``: a worker fetches the segment asked for and prefetches the
  ``wal.fetch_prefetch`` segments after it, ``wal.workers`` at a time, each checked
  (sealed record, sha256) before it is renamed into ``<spool>/fetch/``; only such
  verified files are served from there. The foreground call waits for its own segment
  while the worker is alive (``wal.fetch_timeout`` at most); a segment the worker could
  not get (``<name>.missing``), a worker that died, or a history file goes to the full
  engine, whose answer is authoritative (1: not archived, 126: damaged).

This module imports nothing of the engine: answering from a status file costs a Python
start-up and a few system calls. Whatever it cannot decide returns None, and the full
engine (agent.py) handles the call synchronously.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import fcntl
import json
import os
import re
import stat
import subprocess
import sys
import time

DEFAULT_SPOOL_ROOT = "/var/spool/clinic-backup"
DEFAULTS = {
    "workers": 2,
    "fetch_prefetch": 8,
    "push_timeout": 60,
    "fetch_timeout": 60,
    "async": True,
}
PUSH, FETCH = "push", "fetch"
PUSH_LOCK, FETCH_LOCK = "push.lock", "fetch.lock"
WORKER_LOG = "worker.log"
CURSOR = ".cursor"
MAX_WORKER_LOG = 1024 * 1024
# A prefetched file older than this is not served (it may belong to another recovery).
FETCH_MAX_AGE = 600
EXIT_OK, EXIT_FAILED = 0, 1
MAX_CONFIG_BYTES = 1024 * 1024
_NAME_RE = re.compile(
    r"^(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)$"
)
_SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")


def valid_name(name):
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def wal_settings(config):
    """The config's ``wal`` options with their defaults."""
    settings = dict(DEFAULTS)
    given = config.get("wal")
    if isinstance(given, dict):
        settings.update({k: v for k, v in given.items() if v is not None})
    return settings


def spool_dir(config):
    """``wal.spool_dir``, else /var/spool/clinic-backup/<cluster>."""
    settings = wal_settings(config)
    if isinstance(settings.get("spool_dir"), str) and settings["spool_dir"]:
        return settings["spool_dir"]
    return os.path.join(DEFAULT_SPOOL_ROOT, str(config.get("cluster") or "main"))


def make_spool(spool):
    """The spool and its push/ and fetch/ folders, 0700 (it holds WAL: patient data)."""
    for path in (spool, os.path.join(spool, PUSH), os.path.join(spool, FETCH)):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    info = os.lstat(spool)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise OSError(
            errno.EPERM,
            "spool %s must be a directory of this user with mode 0700" % spool,
        )


def try_lock(path):
    """An open fd holding an exclusive flock on ``path``, or None when another process
    holds it (the kernel drops it when the holder dies, however it dies)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def worker_running(spool, lock_name):
    fd = try_lock(os.path.join(spool, lock_name))
    if fd is None:
        return True
    os.close(fd)
    return False


def spawn_worker(spool, kind, config_path, argument):
    """Start a detached worker (its own session: it outlives this call); its Popen."""
    log_path = os.path.join(spool, WORKER_LOG)
    try:
        if os.path.getsize(log_path) > MAX_WORKER_LOG:
            os.replace(log_path, log_path + ".1")
    except OSError:
        pass
    log = os.open(
        log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o600
    )
    try:
        return subprocess.Popen(
            [sys.executable, "-m", __name__.rsplit(".", 1)[0] + ".walspool", kind, config_path]
            + [argument],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            close_fds=True,
            start_new_session=True,
        )
    finally:
        os.close(log)


def status_path(spool, name, outcome):
    return os.path.join(spool, PUSH, "%s.%s" % (name, outcome))


def file_identity(info):
    """What tells one WAL file from another of the same name (a recycled segment, a
    restored cluster) without reading it."""
    return {
        "size": info.st_size,
        "dev": info.st_dev,
        "ino": info.st_ino,
        "mtime_ns": info.st_mtime_ns,
    }


def write_status(spool, name, outcome, data):
    """Atomically write push/<name>.<outcome> (a JSON document)."""
    path = status_path(spool, name, outcome)
    tmp = os.path.join(os.path.dirname(path), ".%s.tmp-%d" % (os.path.basename(path), os.getpid()))
    with open(tmp, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, path)


def read_status(path):
    try:
        with open(path) as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _say(text):
    try:
        sys.stderr.write("clinic-backup: %s\n" % text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def read_config_quick(path):
    """The config as JSON, or None when it is not plainly readable (the full agent then
    reports why, with its checks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CONFIG_BYTES:
            return None
        raw = os.read(fd, MAX_CONFIG_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        config = json.loads(raw.decode("utf-8"))
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


def push_foreground(config_path, config, wal_path):
    """archive_command's answer from the spool (see the module doc), or None when this
    call must be handled by the engine synchronously (no archive_status beside the file,
    ``wal.async`` false, a spool that cannot be used)."""
    settings = wal_settings(config)
    name = os.path.basename(wal_path)
    status_dir = os.path.join(os.path.dirname(os.path.abspath(wal_path)), "archive_status")
    if settings.get("async") is False or not valid_name(name) or not os.path.isdir(status_dir):
        return None
    spool = spool_dir(config)
    try:
        make_spool(spool)
        info = os.stat(wal_path)
    except OSError:
        return None
    identity = file_identity(info)
    ok_path, error_path = status_path(spool, name, "ok"), status_path(spool, name, "error")
    timeout = settings.get("push_timeout")
    timeout = timeout if isinstance(timeout, (int, float)) and timeout > 0 else 60
    deadline = time.monotonic() + timeout
    spawned, pause, child = 0, 0.01, None
    while True:
        done = read_status(ok_path)
        if done is not None:
            if all(done.get(k) == v for k, v in identity.items()):
                # Left in place: the worker removes it once PostgreSQL marked the file
                # .done (removing it here would let the worker push the file again).
                return EXIT_OK
            # Another file of that name (recycled, or a restored cluster): push it again.
            _unlink(ok_path)
        failed = read_status(error_path)
        if failed is not None:
            _unlink(error_path)
            _say("wal-push %s failed: %s" % (name, failed.get("msg") or "see %s" % WORKER_LOG))
            return EXIT_FAILED
        # A worker just started holds no lock yet: it counts as running while alive.
        if (child is None or child.poll() is not None) and not worker_running(spool, PUSH_LOCK):
            if spawned >= 3:
                _say(
                    "wal-push %s: the push worker stopped without an answer; see %s"
                    % (name, os.path.join(spool, WORKER_LOG))
                )
                return EXIT_FAILED
            child = spawn_worker(
                spool, PUSH, config_path, os.path.dirname(os.path.abspath(wal_path))
            )
            spawned += 1
            pause = 0.01
        if time.monotonic() > deadline:
            _say(
                "wal-push %s: not stored in every repository within %s s (push_timeout); "
                "PostgreSQL will retry" % (name, timeout)
            )
            return EXIT_FAILED
        time.sleep(pause)
        pause = min(pause * 1.5, 0.2)


def fetch_path(spool, name):
    return os.path.join(spool, FETCH, name)


def missing_path(spool, name):
    """The worker's note that it could not get ``name`` (the engine decides why)."""
    return fetch_path(spool, name) + ".missing"


def write_cursor(spool, name, wanted=False):
    """Tell the prefetch worker which file recovery asked for last; ``wanted``: a
    foreground call is waiting for that file itself (else it is already served)."""
    path = os.path.join(spool, FETCH, CURSOR)
    tmp = path + ".tmp-%d" % os.getpid()
    with open(tmp, "w") as handle:
        handle.write(name + (" +" if wanted else ""))
    os.rename(tmp, path)


def read_cursor(spool):
    """(name, wanted) of the cursor, or (None, False)."""
    try:
        with open(os.path.join(spool, FETCH, CURSOR)) as handle:
            text = handle.read().strip()
    except OSError:
        return None, False
    name, _space, mark = text.partition(" ")
    return (name, mark == "+") if valid_name(name) else (None, False)


def prefetching(settings):
    prefetch = settings.get("fetch_prefetch")
    return settings.get("async") is not False and isinstance(prefetch, int) and prefetch >= 1


def start_prefetch(config_path, config, name, wanted=False):
    """Move the prefetch window to ``name`` and make sure a worker fills it; the worker's
    Popen when this call started one."""
    if not _SEGMENT_RE.fullmatch(name) or not prefetching(wal_settings(config)):
        return None
    spool = spool_dir(config)
    make_spool(spool)
    write_cursor(spool, name, wanted)
    if not worker_running(spool, FETCH_LOCK):
        return spawn_worker(spool, FETCH, config_path, name)
    return None


def _move_into(source, dest):
    """Rename a verified spool file to dest (copy + fsync + rename across filesystems)."""
    try:
        os.rename(source, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = os.path.join(
        os.path.dirname(os.path.abspath(dest)), ".%s.tmp-%d" % (os.path.basename(dest), os.getpid())
    )
    try:
        with open(source, "rb") as src, open(tmp, "wb") as out:
            while True:
                chunk = src.read(1024 * 1024)
                if not chunk:
                    break
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, dest)
    except BaseException:
        _unlink(tmp)
        raise
    _unlink(source)


def _serve(source, dest):
    """EXIT_OK once the verified spool file ``source`` is at dest; None when it is not
    there (or too old to be trusted to belong to this recovery)."""
    try:
        info = os.lstat(source)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime > FETCH_MAX_AGE:
        _unlink(source)
        return None
    _move_into(source, dest)
    return EXIT_OK


def fetch_foreground(config_path, config, name, dest):
    """restore_command's answer from the prefetch spool, or None (the engine fetches)."""
    settings = wal_settings(config)
    if not valid_name(name) or settings.get("async") is False:
        return None
    spool = spool_dir(config)
    source = fetch_path(spool, name)
    if not _SEGMENT_RE.fullmatch(name) or not prefetching(settings):
        return _serve(source, dest)
    # The worker fetches this very segment too (the cursor says a call waits for it) and
    # the ones after it; waiting for it costs less than a second engine fetching it.
    child = start_prefetch(config_path, config, name, wanted=True)
    timeout = settings.get("fetch_timeout")
    timeout = timeout if isinstance(timeout, (int, float)) and timeout > 0 else 60
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        served = _serve(source, dest)
        if served is not None:
            # Served: the worker must not fetch it again for this call.
            write_cursor(spool, name)
            return served
        if os.path.exists(missing_path(spool, name)):
            return None
        if (child is None or child.poll() is not None) and not worker_running(spool, FETCH_LOCK):
            if child is None:
                # The worker seen a moment ago ended idle before it read the cursor.
                child = spawn_worker(spool, FETCH, config_path, name)
                continue
            # The worker this call started ended: one last look, then the engine.
            return _serve(source, dest)
        if time.monotonic() > deadline:
            return None
        time.sleep(pause)
        pause = min(pause * 1.5, 0.05)


def parse_fast_argv(argv):
    """(command, config path, positionals) of a plain wal-push / wal-fetch call, or None
    for anything else (other options: the full agent parses those)."""
    if not argv or argv[0] not in ("wal-push", "wal-fetch"):
        return None
    config, positionals = None, []
    rest = list(argv[1:])
    while rest:
        item = rest.pop(0)
        if item == "--config" and rest and config is None:
            config = rest.pop(0)
        elif item.startswith("--config=") and config is None:
            config = item[len("--config=") :]
        elif item.startswith("-"):
            return None
        else:
            positionals.append(item)
    wanted = 1 if argv[0] == "wal-push" else 2
    if config is None or len(positionals) != wanted:
        return None
    return argv[0], config, positionals


def fast_main(argv):
    """Exit code of a wal-push / wal-fetch answered without the engine, or None."""
    parsed = parse_fast_argv(argv)
    if parsed is None:
        return None
    command, config_path, positionals = parsed
    config = read_config_quick(config_path)
    if config is None:
        return None
    try:
        if command == "wal-push":
            return push_foreground(config_path, config, positionals[0])
        return fetch_foreground(config_path, config, positionals[0], positionals[1])
    except (OSError, ValueError, TypeError):
        return None


if __name__ == "__main__":
    # python -m ...walspool {push WAL_DIR | fetch NAME} CONFIG: a background worker.
    from .wal import worker_main

    raise SystemExit(worker_main(sys.argv[1:]))
