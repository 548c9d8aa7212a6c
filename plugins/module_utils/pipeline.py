# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The streaming pipeline: producer | compressor | gpg  ->  sha256  ->  sinks.

Each stage is a separate process joined by OS pipes, so compression and
encryption run on other cores while Python only hashes and forwards the
encrypted bytes.  Plaintext never reaches the disk: the last process writes
ciphertext (or, with encryption disabled on purpose, compressed data) into a
pipe that this module reads.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import fcntl
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time

from .errors import BackupError, ConfigError, IntegrityError
from .units import human_duration, human_rate, human_size

CHUNK_SIZE = 1024 * 1024
COMPRESSIONS = ("zstd", "gzip", "none")
COMPRESSION_SUFFIX = {"zstd": ".zst", "gzip": ".gz", "none": ""}
DEFAULT_LEVEL = {"zstd": 3, "gzip": 6, "none": None}
STDERR_TAIL = 2000


def which_or_fail(tool, package):
    path = shutil.which(tool)
    if not path:
        raise ConfigError(
            "%s was not found on this host" % tool, "install the %s package" % package
        )
    return path


def compress_argv(compression, level=None, threads=0):
    """argv of the compressor stage, or None for no compression."""
    if compression not in COMPRESSIONS:
        raise ConfigError(
            "unknown compression %r" % compression, "choose one of %s" % ", ".join(COMPRESSIONS)
        )
    if compression == "none":
        return None
    level = DEFAULT_LEVEL[compression] if level is None else int(level)
    if compression == "zstd":
        if not 1 <= level <= 19:
            raise ConfigError(
                "zstd level %d is out of range" % level, "use 1 (fastest) to 19 (smallest)"
            )
        return [which_or_fail("zstd", "zstd"), "-q", "-c", "-%d" % level, "-T%d" % int(threads)]
    if not 1 <= level <= 9:
        raise ConfigError(
            "gzip level %d is out of range" % level, "use 1 (fastest) to 9 (smallest)"
        )
    return [which_or_fail("gzip", "gzip"), "-c", "-%d" % level]


def decompress_argv(compression):
    if compression == "none":
        return None
    if compression == "zstd":
        return [which_or_fail("zstd", "zstd"), "-q", "-d", "-c"]
    if compression == "gzip":
        return [which_or_fail("gzip", "gzip"), "-d", "-c"]
    raise IntegrityError("manifest names unknown compression %r" % compression)


GNUPG_HOME_PREFIX = "clinic-backup-gnupg-"


def stop_gpg_home(home):
    """Stop the gpg-agent serving ``home`` and remove the directory."""
    gpgconf = shutil.which("gpgconf")
    if gpgconf:
        subprocess.run(
            [gpgconf, "--homedir", home, "--kill", "gpg-agent"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    shutil.rmtree(home, ignore_errors=True)


OWNER_LOCK = ".owner.lock"
SCRATCH_PREFIX = "clinic-backup-scratch-"


class OwnedDir(object):
    """A private (0700) temporary directory that a later run can tell is abandoned.

    The live run holds an flock on a lock file inside; the kernel drops it when the
    process dies, however it dies (SIGKILL included), so ``reap_owned_dirs`` removes
    exactly the directories of dead runs. gpg homes and the plaintext scratch space
    of directory-format dumps and restores both live in such directories: patient
    rows left in /tmp by a killed run are gone at the next run.
    """

    def __init__(self, prefix, base=None, remove=None):
        self._remove = remove or _remove_tree
        self.path = tempfile.mkdtemp(prefix=prefix, dir=base)
        os.chmod(self.path, 0o700)
        self._owner_fd = os.open(
            os.path.join(self.path, OWNER_LOCK),
            os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
            0o600,
        )
        fcntl.flock(self._owner_fd, fcntl.LOCK_EX)

    def close(self):
        if self._owner_fd is not None:
            self._remove(self.path)
            os.close(self._owner_fd)
            self._owner_fd = None


def _remove_tree(path):
    shutil.rmtree(path, ignore_errors=True)


def reap_owned_dirs(prefix, remove=None, base=None, min_age_seconds=60):
    """Remove the OwnedDirs of killed runs (their lock can be taken).

    (A pid check would misjudge runs in other containers sharing /tmp.)
    """
    remove = remove or _remove_tree
    base = base or tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        if not name.startswith(prefix):
            continue
        try:
            info = os.lstat(path)
        except OSError:
            continue  # removed meanwhile by its owner
        if info.st_uid != os.geteuid() or not stat.S_ISDIR(info.st_mode):
            continue
        try:
            fd = os.open(
                os.path.join(path, OWNER_LOCK),
                os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
            )
        except FileNotFoundError:
            # Not locked yet (just created) or an old layout: judge by age.
            if time.time() - info.st_mtime > min_age_seconds:
                remove(path)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its run is alive
        finally:
            os.close(fd)
        remove(path)


def scratch_dir(base=None):
    """A private scratch directory for plaintext that cannot be streamed (pg_dump and
    pg_restore --format=directory); leftovers of killed runs are removed first."""
    reap_owned_dirs(SCRATCH_PREFIX, base=base)
    return OwnedDir(SCRATCH_PREFIX, base=base)


def reap_stale_gpg_homes(min_age_seconds=60):
    """Remove the gpg homes of killed runs (stopping their agents)."""
    reap_owned_dirs(GNUPG_HOME_PREFIX, stop_gpg_home, min_age_seconds=min_age_seconds)


class GpgSession(object):
    """A private GNUPGHOME and the passphrase handed to gpg over a pipe.

    gpg reads the passphrase from an inherited file descriptor
    (``--passphrase-fd``), never from argv or the environment, and the private
    home keeps the operator's keyring and agent untouched.  The agent gpg
    starts in that home is stopped on close.
    """

    def __init__(self, passphrase):
        if not passphrase:
            raise ConfigError("encryption needs a passphrase")
        self._passphrase = passphrase
        self.gpg = which_or_fail("gpg", "gnupg")
        reap_stale_gpg_homes()
        self._dir = OwnedDir(GNUPG_HOME_PREFIX, remove=stop_gpg_home)
        self.home = self._dir.path

    def _argv(self, fd, *action):
        return [
            self.gpg,
            "--homedir",
            self.home,
            "--batch",
            "--no-tty",
            "--quiet",
            "--no-options",
            "--pinentry-mode",
            "loopback",
            "--passphrase-fd",
            str(fd),
            "--no-symkey-cache",
        ] + list(action)

    def encrypt_stage(self):
        """(argv, fd) for a symmetric AES256 encryption stage; fd is passed to the child."""
        fd = self._passphrase_fd()
        return self._argv(
            fd,
            "--symmetric",
            "--cipher-algo",
            "AES256",
            "--s2k-digest-algo",
            "SHA512",
            # An explicit count spares gpg from starting an agent just to calibrate
            # one (1-2 s per artifact); 65011712 is the maximum, what agents pick.
            "--s2k-count",
            "65011712",
            "--compress-algo",
            "none",
            "--output",
            "-",
        ), fd

    def decrypt_stage(self):
        fd = self._passphrase_fd()
        return self._argv(fd, "--decrypt", "--output", "-"), fd

    def encryption(self):
        """The encryption Stage of a pipeline."""
        argv, fd = self.encrypt_stage()
        return Stage("gpg encryption", argv, env=_untranslated(), pass_fds=(fd,))

    def decryption(self):
        """The decryption Stage of a pipeline. Its messages stay untranslated: a wrong
        passphrase is told from damage by gpg's "Bad session key"."""
        argv, fd = self.decrypt_stage()
        return Stage("gpg decryption", argv, env=_untranslated(), pass_fds=(fd,))

    def _passphrase_fd(self):
        read_fd, write_fd = os.pipe()
        try:
            os.write(write_fd, self._passphrase + b"\n")
        finally:
            os.close(write_fd)
        return read_fd

    def close(self):
        self._dir.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _untranslated():
    env = dict(os.environ)
    env.pop("LANGUAGE", None)
    env["LC_ALL"] = "C"
    return env


class Stage(object):
    """One process of a pipeline, with its stderr collected for error messages."""

    def __init__(self, name, argv, env=None, pass_fds=(), cwd=None):
        self.name = name
        self.argv = argv
        self.env = env
        self.pass_fds = tuple(pass_fds)
        self.cwd = cwd
        self.proc = None
        self._stderr = tempfile.TemporaryFile()
        self._final_tail = ""

    def start(self, stdin, stdout):
        self.proc = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=stdout,
            stderr=self._stderr,
            env=self.env,
            pass_fds=self.pass_fds,
            cwd=self.cwd,
            close_fds=True,
        )
        for fd in self.pass_fds:
            os.close(fd)
        return self.proc

    def stderr_tail(self):
        if self._stderr.closed:
            return self._final_tail
        self._stderr.seek(0)
        data = self._stderr.read()
        text = data[-STDERR_TAIL:].decode("utf-8", "replace").strip()
        return text

    def close(self):
        """Release the stderr file, keeping its tail for whoever reports afterwards."""
        if not self._stderr.closed:
            self._final_tail = self.stderr_tail()
            self._stderr.close()


class StdinFeeder(object):
    """Stream consumer writing every chunk to the stdin of ``argv`` (its stderr kept in a
    private temp file; its output discarded, or with ``keep_output`` kept and read into
    ``output`` by ``finish``; its messages untranslated unless ``untranslated`` is false).
    ``finish`` waits and returns (exit code, stderr text); ``abort`` kills it. A program
    that stops reading (an exit on error) is not written to again: its exit code says why."""

    def __init__(self, argv, env, untranslated=True, keep_output=False):
        env = dict(env)
        if untranslated:
            env["LC_ALL"] = "C"
        self._err = tempfile.TemporaryFile()
        self._out = tempfile.TemporaryFile() if keep_output else None
        self.output = None
        self._proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=self._out if keep_output else subprocess.DEVNULL,
            stderr=self._err,
            env=env,
            close_fds=True,
        )
        self._open = True

    def _send(self, data):
        if self._open and data:
            try:
                self._proc.stdin.write(data)
            except (BrokenPipeError, OSError):
                self._open = False

    def __call__(self, chunk):
        self._send(chunk)

    def finish(self):
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        code = self._proc.wait()
        self._err.seek(0)
        text = self._err.read().decode("utf-8", "replace")
        self._err.close()
        if self._out is not None:
            self._out.seek(0)
            self.output = self._out.read().decode("utf-8", "replace")
            self._out.close()
        return code, text

    def abort(self):
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for handle in (self._err, self._out):
            if handle is not None and not handle.closed:
                handle.close()


class StreamResult(object):
    def __init__(self, size, sha256):
        self.size = size
        self.sha256 = sha256


def _terminate(stages):
    for stage in stages:
        if stage.proc is not None and stage.proc.poll() is None:
            try:
                stage.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
    for stage in stages:
        if stage.proc is not None:
            try:
                stage.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stage.proc.kill()
                stage.proc.wait()


def _check(stages, failure_hint=None):
    """Raise naming the first stage that failed, with its stderr tail."""
    for stage in stages:
        code = stage.proc.returncode if stage.proc is not None else None
        if code not in (0, None):
            # A stage killed by SIGPIPE failed because a later stage died: report that one.
            if code == -signal.SIGPIPE or code == 141:
                continue
            tail = stage.stderr_tail()
            raise BackupError(
                "%s failed with exit code %s%s" % (stage.name, code, (": " + tail) if tail else ""),
                failure_hint,
            )
    for stage in stages:
        code = stage.proc.returncode if stage.proc is not None else None
        if code not in (0, None):
            raise BackupError(
                "%s was killed (exit code %s) because a later stage stopped reading"
                % (stage.name, code)
            )


class ProgressLog(object):
    """Progress of long streams for the operator: every ``interval`` seconds a line with
    what is streaming, the bytes so far and the rate, and one when it ends. The agent
    turns it on (cron appends its stderr to the job's log); modules leave it off."""

    def __init__(self, write, interval=10.0, clock=time.monotonic):
        self.write = write
        self.interval = float(interval)
        self.clock = clock

    def stream(self, what):
        return _ProgressStream(self, what)


class _ProgressStream(object):
    def __init__(self, log, what):
        self.log = log
        self.what = what
        self.size = 0
        self.started = self.last = log.clock()

    def add(self, count):
        self.size += count
        now = self.log.clock()
        if now - self.last >= self.log.interval:
            self.last = now
            self._say("streaming", now)

    def done(self):
        self._say("done", self.log.clock())

    def _say(self, state, now):
        elapsed = now - self.started
        try:
            self.log.write(
                "%s %s: %s in %s (%s)"
                % (
                    self.what,
                    state,
                    human_size(self.size),
                    human_duration(elapsed),
                    human_rate(self.size, elapsed),
                )
            )
        except (OSError, ValueError):
            pass  # a closed stderr never stops a backup


_PROGRESS = [None]


def report_progress_to(progress):
    """Send the progress of every stream of this process to ``progress`` (a
    ProgressLog), or nowhere (None)."""
    _PROGRESS[0] = progress


def run_stream(stages, consume, source=None, chunk_size=CHUNK_SIZE, failure_hint=None, what=None):
    """Run ``stages`` as one pipeline and hand every output chunk to ``consume``.

    ``source``: optional iterable of bytes fed to the first stage's stdin (by a
    thread) — used to re-read a stored artifact through gpg/zstd for checks.
    When ``stages`` is empty, the source itself is consumed.
    Returns a StreamResult (size and sha256 of the bytes consumed).
    Raises BackupError if any stage exits non-zero; ``consume`` may raise to abort.
    ``what`` names the stream in progress lines (see report_progress_to).
    """
    digest = hashlib.sha256()
    size = 0
    feeder = None
    feed_error = []
    progress = _PROGRESS[0].stream(what) if _PROGRESS[0] is not None and what else None
    try:
        if not stages:
            for chunk in source:
                digest.update(chunk)
                size += len(chunk)
                consume(chunk)
                if progress is not None:
                    progress.add(len(chunk))
            if progress is not None:
                progress.done()
            return StreamResult(size, digest.hexdigest())
        prev_out = subprocess.PIPE if source is not None else subprocess.DEVNULL
        first = True
        for index, stage in enumerate(stages):
            stdin = prev_out if first else stages[index - 1].proc.stdout
            stage.start(stdin=stdin, stdout=subprocess.PIPE)
            if not first:
                # The parent's copy must close or the reader never sees EOF.
                stages[index - 1].proc.stdout.close()
            first = False
        if source is not None:
            feeder = threading.Thread(target=_feed, args=(stages[0].proc.stdin, source, feed_error))
            feeder.daemon = True
            feeder.start()
        out = stages[-1].proc.stdout
        read = out.read1 if hasattr(out, "read1") else out.read
        while True:
            chunk = read(chunk_size)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
            consume(chunk)
            if progress is not None:
                progress.add(len(chunk))
        out.close()
        for stage in stages:
            stage.proc.wait()
        if feeder is not None:
            feeder.join()
        _check(stages, failure_hint)
        if feed_error:
            raise feed_error[0]
        if progress is not None:
            progress.done()
        return StreamResult(size, digest.hexdigest())
    except BaseException:
        _terminate(stages)
        raise
    finally:
        if feeder is not None:
            feeder.join(timeout=5)
        for stage in stages:
            stage.close()


def _feed(pipe, source, errors):
    try:
        for chunk in source:
            pipe.write(chunk)
    except BrokenPipeError:
        pass  # the reader stopped early; its exit code tells why
    except BaseException as exc:  # reported by run_stream after the stages end
        errors.append(exc)
    finally:
        try:
            pipe.close()
        except OSError:
            pass


class HashingReader(object):
    """Iterate over a binary file object in chunks, hashing what passes."""

    def __init__(self, fileobj, chunk_size=CHUNK_SIZE):
        self.fileobj = fileobj
        self.chunk_size = chunk_size
        self.digest = hashlib.sha256()
        self.size = 0

    def __iter__(self):
        while True:
            chunk = self.fileobj.read(self.chunk_size)
            if not chunk:
                return
            self.digest.update(chunk)
            self.size += len(chunk)
            yield chunk

    @property
    def sha256(self):
        return self.digest.hexdigest()


class ThreadedConsumer(object):
    """Base of stream consumers whose parser pulls (tarfile): the pushed chunks go down a
    pipe to ``self._run`` on a thread, which reads ``self._reader`` and sets ``self.error``
    (a BackupError) when it must stop; the next push or ``finish`` raises it."""

    stopped_message = "the consumer stopped reading early"

    def _start_thread(self):
        self.error = None
        read_fd, write_fd = os.pipe()
        self._reader = os.fdopen(read_fd, "rb")
        self._writer = os.fdopen(write_fd, "wb")
        self._thread = threading.Thread(target=self._run)
        self._thread.daemon = True
        self._thread.start()

    def _run(self):
        raise NotImplementedError

    def __call__(self, chunk):
        if self.error is not None:
            raise self.error
        try:
            self._writer.write(chunk)
        except (BrokenPipeError, OSError):
            self._thread.join()
            raise self.error or IntegrityError(self.stopped_message) from None

    def _close_writer(self):
        try:
            self._writer.close()
        except OSError:
            pass

    def finish(self):
        """End of stream: wait for the thread and raise what stopped it, if anything."""
        self._close_writer()
        self._thread.join()
        if self.error is not None:
            raise self.error

    def abort(self):
        self._close_writer()
        self._thread.join(timeout=10)


class Tee(object):
    """Send each chunk to several sinks (one local file, N S3 uploads)."""

    def __init__(self, sinks):
        self.sinks = list(sinks)

    def __call__(self, chunk):
        for sink in self.sinks:
            sink.write(chunk)
