# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Take one backup set: database dump + cluster globals, streamed through
compression, encryption and sha256 into every target at once, then the
manifest, last.

Order of work, chosen so that bad input changes nothing:
validate options -> load passphrase -> check targets -> connect and open a
snapshot -> (check mode stops here) -> stream artifacts -> commit manifests.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import shutil
import socket
import tempfile
import threading
import time

from . import authentication, pipeline
from .catalog import FORMAT_VERSION
from .errors import BackupError, ConfigError, SourceError, StoreError, UnreachableError
from .locking import RunLock, lock_path_for
from .passphrase import load_passphrase
from .pgsource import Snapshot, find_pg_bin_dir, table_pattern, tool_version
from .repository import isoformat, new_set_id, safe_name, utc_now
from .version import TOOL_NAME, TOOL_VERSION

# format -> (pg_dump --format, file extension, manifest content type)
FORMATS = {
    "custom": ("custom", ".dump", "pg_dump-custom"),
    "plain": ("plain", ".sql", "pg_dump-plain"),
    "directory": ("directory", ".dir.tar", "pg_dump-directory-tar"),
}
GLOBALS_CONTENT = "pg_dumpall-globals"


class StreamOptions(object):
    """How any set's artifacts are stored: compression, encryption, label, leftovers' age."""

    def _set_stream_options(
        self,
        compression,
        compression_level,
        compression_threads,
        encrypt,
        passphrase_file,
        label,
        stale_seconds,
    ):
        self.compression = compression
        self.compress_argv = pipeline.compress_argv(
            compression, compression_level, compression_threads
        )
        self.compression_level = (
            None
            if compression == "none"
            else int(
                compression_level
                if compression_level is not None
                else pipeline.DEFAULT_LEVEL[compression]
            )
        )
        self.encrypt = bool(encrypt)
        self.passphrase_file = passphrase_file
        if self.encrypt and not passphrase_file:
            raise ConfigError(
                "encryption is on but no passphrase_file is set",
                "set passphrase_file to a 0600 file, or encrypt: false to store plaintext on purpose",
            )
        self.label = label
        self.stale_seconds = int(stale_seconds)


class BackupOptions(StreamOptions):
    """What to dump and how; validated on construction (ConfigError)."""

    def __init__(
        self,
        format="custom",
        jobs=1,
        schema_only=False,
        data_only=False,
        tables=None,
        exclude_tables=None,
        compression="zstd",
        compression_level=None,
        compression_threads=0,
        encrypt=True,
        passphrase_file=None,
        include_globals=True,
        row_counts=True,
        pg_bin_dir=None,
        label=None,
        stale_seconds=3600,
    ):
        if format not in FORMATS:
            raise ConfigError(
                "unknown dump format %r" % (format,), "choose custom, plain or directory"
            )
        jobs = int(jobs)
        if jobs < 1:
            raise ConfigError("jobs must be at least 1 (got %d)" % jobs)
        if jobs > 1 and format != "directory":
            raise ConfigError(
                "parallel jobs need format=directory", "set format: directory or jobs: 1"
            )
        if schema_only and data_only:
            raise ConfigError("schema_only and data_only exclude each other", "choose one")
        self.format = format
        self.jobs = jobs
        self.schema_only = bool(schema_only)
        self.data_only = bool(data_only)
        self.tables = list(tables or [])
        self.exclude_tables = list(exclude_tables or [])
        self.table_patterns = [table_pattern(t) for t in self.tables]
        self.exclude_patterns = [table_pattern(t) for t in self.exclude_tables]
        self._set_stream_options(
            compression,
            compression_level,
            compression_threads,
            encrypt,
            passphrase_file,
            label,
            stale_seconds,
        )
        self.include_globals = bool(include_globals)
        self.row_counts = bool(row_counts) and not self.schema_only
        self.pg_bin_dir = pg_bin_dir

    def artifact_file(self, stem, extension):
        name = safe_name(stem) + extension + pipeline.COMPRESSION_SUFFIX[self.compression]
        return name + (".gpg" if self.encrypt else "")

    def describe(self):
        return {
            "jobs": self.jobs,
            "schema_only": self.schema_only,
            "data_only": self.data_only,
            "tables": self.tables,
            "exclude_tables": self.exclude_tables,
            "include_globals": self.include_globals,
        }


def pg_dump_argv(bin_dir, options, snapshot_id, output_dir=None):
    fmt = FORMATS[options.format][0]
    argv = [os.path.join(bin_dir, "pg_dump"), "--no-password", "--format=%s" % fmt]
    if snapshot_id:
        argv.append("--snapshot=%s" % snapshot_id)
    if options.schema_only:
        argv.append("--schema-only")
    if options.data_only:
        argv.append("--data-only")
    for pattern in options.table_patterns:
        argv.append("--table=%s" % pattern)
    for pattern in options.exclude_patterns:
        argv.append("--exclude-table=%s" % pattern)
    if options.table_patterns:
        # A misspelt table must fail the backup, not produce an empty one.
        argv.append("--strict-names")
    if fmt in ("custom", "directory") and options.compression != "none":
        argv.append("--compress=0")  # compressed once, by the pipeline
    if fmt == "directory":
        argv += ["--jobs=%d" % options.jobs, "--file=%s" % output_dir]
    return argv


def pg_dumpall_globals_argv(bin_dir, connection, superuser):
    argv = [
        os.path.join(bin_dir, "pg_dumpall"),
        "--no-password",
        "--globals-only",
        # --dbname takes a connection string: the name goes in quoted, so a name holding
        # '=' is a name, not settings (host, user...) of another server.
        "--dbname=%s" % connection.conninfo_dbname(),
    ]
    if not superuser:
        # Non-superusers cannot read pg_authid; roles are kept, their passwords are not.
        argv.append("--no-role-passwords")
    return argv


class TargetStream(object):
    """One target's sink, isolated: a failing target stops receiving data
    while the others go on (an S3 outage must not cost the local copy)."""

    def __init__(self, writer, filename):
        self.writer = writer
        self.error = None
        self.location = None
        try:
            self.sink = writer.sink(filename)
        except BackupError as exc:
            self.sink = None
            self.error = exc

    def write(self, chunk):
        if self.error is not None:
            return
        try:
            self.sink.write(chunk)
        except Exception as exc:
            self.fail(exc)

    def close(self):
        if self.error is not None:
            return
        try:
            self.location = self.sink.close()
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc):
        self.error = (
            exc
            if isinstance(exc, BackupError)
            else StoreError("%s: %s" % (exc.__class__.__name__, exc))
        )
        if self.sink is not None:
            self.sink.abort()


class MultiTarget(object):
    def __init__(self, streams):
        self.streams = streams

    def __call__(self, chunk):
        for stream in self.streams:
            stream.write(chunk)
        if all(stream.error is not None for stream in self.streams):
            raise StoreError(
                "every target failed: %s" % "; ".join(str(s.error) for s in self.streams)
            )


class Background(object):
    """Run ``func(*args)`` on a thread; ``join`` returns its result or raises its error."""

    def __init__(self, func, *args):
        self._outcome = {}
        self._thread = threading.Thread(target=self._run, args=(func, args))
        self._thread.daemon = True
        self._thread.start()

    def _run(self, func, args):
        try:
            self._outcome["result"] = func(*args)
        except BaseException as exc:  # re-raised by join in the caller's thread
            self._outcome["error"] = exc

    def join(self, quiet=False):
        self._thread.join()
        if "error" in self._outcome and not quiet:
            raise self._outcome["error"]
        return self._outcome.get("result")


class Target(object):
    def __init__(self, repo):
        self.repo = repo
        self.writer = None
        self.error = None
        self.committed = False

    def report(self):
        return {
            "repository": self.repo.url,
            "kind": self.repo.kind,
            "ok": self.committed,
            "error": str(self.error) if self.error else None,
        }


def _stream_artifact(targets, filename, stages, source=None):
    """Run ``stages`` (fed from ``source``, an iterable of bytes, if given) into every
    healthy target; returns (StreamResult, {repository url: location})."""
    live = [t for t in targets if t.error is None]
    streams = [TargetStream(t.writer, filename) for t in live]
    result = pipeline.run_stream(stages, MultiTarget(streams), source=source)
    for stream in streams:
        stream.close()
    locations = {}
    for target, stream in zip(live, streams):
        if stream.error is not None:
            target.error = stream.error
        else:
            locations[target.repo.url] = target.writer.final_location(filename)
    if not locations:
        raise StoreError("every target failed: %s" % "; ".join(str(t.error) for t in targets))
    return result, locations


def commit_manifests(targets, manifest, name, set_id, key=None):
    """Seal the manifest with ``key`` (authentication.RecordKey; None: unsealed) and write
    it - last - into every healthy target, then point ``latest`` at the set; returns
    (the manifest as stored, warnings). A target whose commit fails is aborted and keeps
    its error."""
    manifest = authentication.seal(manifest, key, "manifest")
    pointer = authentication.seal(
        {"database": name, "set_id": set_id, "manifest_mac": authentication.record_mac(manifest)},
        key,
        "pointer",
    )
    for target in targets:
        if target.error is not None:
            if target.writer is not None:
                target.writer.abort()
            continue
        try:
            target.writer.commit(manifest)
            target.committed = True
        except BackupError as exc:
            target.error = exc
            target.writer.abort()
    warnings = []
    for target in targets:
        if target.committed:
            try:
                target.repo.write_latest(name, set_id, pointer)
            except (BackupError, OSError) as exc:
                warnings.append(
                    "could not update the newest-set pointer in %s: %s" % (target.repo.url, exc)
                )
    return manifest, warnings


def record_key(options):
    """The key that seals a new set's records: from the passphrase file, which an
    unencrypted set may still name for exactly that purpose."""
    return authentication.RecordKey.from_file(options.passphrase_file)


def prepare_targets(repositories, unreachable, stale_seconds, key, name):
    """Under the lock: lay out every reachable target, remove leftovers of killed runs,
    and seal with the salt the newest pointer of ``name`` already uses (so a catalog
    listing derives the key once). Returns warnings about the repositories."""
    warnings = []
    for repo in repositories:
        if repo.url in unreachable:
            continue
        warnings.extend(repo.ensure_layout())
        repo.cleanup_incomplete(older_than_seconds=stale_seconds)
        if key is not None:
            pointer = repo.read_latest_record(name)
            if pointer is not None:
                key.adopt_salt(pointer)
    return warnings


def _filter_stages(options, gpg_session):
    stages = []
    if options.compress_argv:
        stages.append(pipeline.Stage(options.compression, options.compress_argv))
    if gpg_session is not None:
        argv, fd = gpg_session.encrypt_stage()
        stages.append(pipeline.Stage("gpg encryption", argv, pass_fds=(fd,)))
    return stages


def run_backup(connection, repositories, options, check_mode=False, now=None):
    """Take one backup set into every repository; returns a result dict.

    Raises ConfigError/SourceError/StoreError before anything is written when
    input is wrong; raises BackupError after committing the healthy targets
    when some target failed (the result is attached as ``exc.result``).
    """
    if not repositories:
        raise ConfigError(
            "no backup target given", "set a local repository and/or at least one S3 target"
        )
    passphrase = load_passphrase(options.passphrase_file) if options.encrypt else None
    key = record_key(options)
    unreachable = {}
    for repo in repositories:
        try:
            repo.check_writable()
        except UnreachableError as exc:
            # An outage of one target must not cost the others tonight's backup;
            # a misconfiguration (missing bucket, bad credentials) still stops here.
            unreachable[repo.url] = exc
    if len(unreachable) == len(repositories):
        raise next(iter(unreachable.values()))
    started = now or utc_now()
    clock = time.time()
    with Snapshot(connection) as snapshot:
        bin_dir = find_pg_bin_dir(snapshot.server_major, options.pg_bin_dir)
        missing = snapshot.missing_tables(options.table_patterns)
        if missing:
            raise ConfigError(
                "table(s) not found in database %r: %s" % (connection.dbname, ", ".join(missing)),
                "check the names (schema.table, case-sensitive) against \\dt",
            )
        set_id = new_set_id(connection.dbname, started)
        if check_mode:
            return {
                "changed": True,
                "set_id": set_id,
                "database": connection.dbname,
                "targets": [r.url for r in repositories],
                "check_mode": True,
                "warnings": ["%s is unreachable: %s" % item for item in unreachable.items()],
            }
        with RunLock(lock_path_for(repositories)):
            layout_warnings = prepare_targets(
                repositories, unreachable, options.stale_seconds, key, connection.dbname
            )
            result = _take_set(
                connection,
                repositories,
                options,
                snapshot,
                bin_dir,
                (passphrase, key),
                set_id,
                (started, clock),
                unreachable,
            )
            result["warnings"] = layout_warnings + result["warnings"]
            return result


def _take_set(
    connection, repositories, options, snapshot, bin_dir, secrets, set_id, times, unreachable
):
    passphrase, key = secrets
    started, clock = times
    targets = [Target(repo) for repo in repositories]
    for target in targets:
        target.error = unreachable.get(target.repo.url)
    gpg_session = pipeline.GpgSession(passphrase) if passphrase else None
    scratch = None
    counts = {}
    counter = None
    globals_job = None
    try:
        for target in targets:
            if target.error is None:
                target.writer = target.repo.begin(set_id)
        if options.row_counts:
            counter = threading.Thread(target=_count_rows, args=(snapshot, counts))
            counter.daemon = True
            counter.start()
        env = connection.child_env()
        fmt, extension, content = FORMATS[options.format]
        if options.include_globals:
            # Small and independent of the dump: stream it alongside, not after.
            globals_job = Background(
                _stream_artifact,
                targets,
                options.artifact_file("globals", ".sql"),
                [
                    pipeline.Stage(
                        "pg_dumpall",
                        pg_dumpall_globals_argv(bin_dir, connection, snapshot.is_superuser),
                        env=env,
                    )
                ]
                + _filter_stages(options, gpg_session),
            )
        db_file = options.artifact_file(connection.dbname, extension)
        if options.format == "directory":
            scratch = _scratch_dir(targets)
            dump_dir = os.path.join(scratch.path, "dump")
            _run_checked(
                pg_dump_argv(bin_dir, options, snapshot.snapshot_id, dump_dir), env, "pg_dump"
            )
            producer = pipeline.Stage(
                "tar", [shutil.which("tar") or "tar", "-C", dump_dir, "-cf", "-", "."]
            )
        else:
            producer = pipeline.Stage(
                "pg_dump", pg_dump_argv(bin_dir, options, snapshot.snapshot_id), env=env
            )
        result, locations = _stream_artifact(
            targets, db_file, [producer] + _filter_stages(options, gpg_session)
        )
        artifacts = [
            {
                "name": "database",
                "file": db_file,
                "content": content,
                "size": result.size,
                "sha256": result.sha256,
                "locations": locations,
            }
        ]
        if scratch:
            scratch.close()
            scratch = None
        if globals_job is not None:
            result, locations = globals_job.join()
            artifacts.append(
                {
                    "name": "globals",
                    "file": options.artifact_file("globals", ".sql"),
                    "content": GLOBALS_CONTENT,
                    "size": result.size,
                    "sha256": result.sha256,
                    "locations": locations,
                    "role_passwords": bool(snapshot.is_superuser),
                }
            )
        if counter is not None:
            counter.join()
            if "error" in counts:
                raise SourceError("row counts failed: %s" % counts["error"])
        finished = utc_now()
        manifest = {
            "format_version": FORMAT_VERSION,
            "id": set_id,
            "tool": {"name": TOOL_NAME, "version": TOOL_VERSION},
            "host": socket.gethostname(),
            "database": connection.dbname,
            "label": options.label,
            "server": {
                "version": snapshot.server_version,
                "version_num": snapshot.server_version_num,
                "host": connection.params.get("host"),
                "port": connection.params.get("port"),
            },
            "pg_dump_version": tool_version(bin_dir),
            "format": options.format,
            "options": options.describe(),
            "compression": {"algorithm": options.compression, "level": options.compression_level},
            "encryption": (
                {"method": "gpg-symmetric", "cipher": "AES256"}
                if options.encrypt
                else {"method": "none"}
            ),
            "snapshot": {"consistent": snapshot.snapshot_id is not None},
            "artifacts": [{k: v for k, v in a.items() if k != "locations"} for a in artifacts],
            "row_counts": counts.get("counts"),
            "started_at": isoformat(started),
            "finished_at": isoformat(finished),
            "duration_seconds": round(time.time() - clock, 3),
        }
        manifest, warnings = commit_manifests(targets, manifest, connection.dbname, set_id, key)
    except BaseException:
        if globals_job is not None:
            globals_job.join(quiet=True)  # it writes to the sinks about to be aborted
        for target in targets:
            if target.writer is not None and not target.committed:
                target.writer.abort()
        raise
    finally:
        if counter is not None and counter.is_alive():
            snapshot.close()  # unblocks the counting thread
        if scratch:
            scratch.close()
        if gpg_session is not None:
            gpg_session.close()
    result = {
        "changed": any(t.committed for t in targets),
        "set_id": set_id,
        "database": connection.dbname,
        "manifest": manifest,
        "artifacts": artifacts,
        "targets": [t.report() for t in targets],
        "size": sum(a["size"] for a in artifacts),
        "duration_seconds": manifest["duration_seconds"],
        "warnings": warnings,
    }
    failed = [t for t in targets if not t.committed]
    if failed:
        error = BackupError(
            "backup set %s was not stored in %s: %s"
            % (
                set_id,
                ", ".join(t.repo.url for t in failed),
                "; ".join(str(t.error) for t in failed),
            ),
            "the set is complete in %s; the next run retries"
            % ", ".join(t.repo.url for t in targets if t.committed),
        )
        error.result = result
        raise error
    return result


def _count_rows(snapshot, out):
    try:
        out["counts"] = snapshot.row_counts()
    except Exception as exc:  # reported by the main thread
        out["error"] = str(exc).strip()


def _scratch_dir(targets):
    """Private scratch space for pg_dump --format=directory (it cannot stream).

    pg_dump writes its uncompressed directory here before it is tarred,
    compressed and encrypted; the directory is 0700 and removed right after, and a
    killed run's is removed by the next run. A local repository's staging area is
    preferred (same disk, same access rules, cleaned with the staging leftovers).
    """
    for target in targets:
        if target.repo.kind == "local" and target.writer is not None:
            return pipeline.OwnedDir(".pgdump-", base=target.writer.staging_dir())
    return pipeline.scratch_dir()


def _run_checked(argv, env, name):
    import subprocess

    with tempfile.TemporaryFile() as err:
        proc = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            check=False,
        )
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read()[-pipeline.STDERR_TAIL :].decode("utf-8", "replace").strip()
            raise BackupError("%s failed with exit code %d: %s" % (name, proc.returncode, tail))
