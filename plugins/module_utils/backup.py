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
import tempfile
import threading
import time

from . import pipeline
from .errors import BackupError, ConfigError, SourceError
from .lifecycle import (
    SetWriting,
    StreamOptions,
    check_targets,
    manifest_header,
    prepare_targets,
    record_key,
    set_summary,
)
from .locking import RunLock, lock_path_for
from .passphrase import load_passphrase
from .pgsource import Snapshot, find_pg_bin_dir, table_pattern, tool_version
from .repository import new_set_id, safe_name, utc_now

# format -> (pg_dump --format, file extension, manifest content type)
FORMATS = {
    "custom": ("custom", ".dump", "pg_dump-custom"),
    "plain": ("plain", ".sql", "pg_dump-plain"),
    "directory": ("directory", ".dir.tar", "pg_dump-directory-tar"),
}
GLOBALS_CONTENT = "pg_dumpall-globals"


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


def run_backup(connection, repositories, options, check_mode=False, now=None):
    """Take one backup set into every repository; returns a result dict.

    Raises ConfigError/SourceError/StoreError before anything is written when
    input is wrong; raises BackupError after committing the healthy targets
    when some target failed (the result is attached as ``exc.result``).
    """
    passphrase = load_passphrase(options.passphrase_file) if options.encrypt else None
    key = record_key(options)
    unreachable = check_targets(repositories)
    started = now or utc_now()
    clock = time.time()
    began = time.monotonic()
    with Snapshot(connection) as snapshot:
        bin_dir = find_pg_bin_dir(snapshot.server_major, options.pg_bin_dir)
        missing = snapshot.missing_tables(options.table_patterns)
        if missing:
            raise ConfigError(
                "table(s) not found in database %r: %s" % (connection.dbname, ", ".join(missing)),
                "check the names (schema.table, case-sensitive) against \\dt",
            )
        refused = snapshot.unreadable(options.table_patterns, options.exclude_patterns)
        if refused:
            raise SourceError(
                "role %s may not read everything it would back up in database %r: %s%s"
                % (
                    connection.params.get("user", "(current user)"),
                    connection.dbname,
                    ", ".join(refused[:10]),
                    " and %d more" % (len(refused) - 10) if len(refused) > 10 else "",
                ),
                "grant it USAGE on those schemas and SELECT on those tables (or the "
                "pg_read_all_data role), back up as a role that can read them, or leave them "
                "out with exclude_tables",
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
        preflight = time.monotonic() - began
        with RunLock(lock_path_for(repositories)):
            layout_warnings = prepare_targets(
                repositories, unreachable, options.stale_seconds, key, connection.dbname
            )
            locked = time.monotonic() - began - preflight
            with SetWriting(repositories, unreachable, set_id, options, passphrase, key) as writing:
                result = _take_set(connection, options, snapshot, bin_dir, writing, started, clock)
            result["phases"] = writing.phases(preflight_seconds=preflight, lock_seconds=locked)
            result["summary"] = set_summary("backup set", result)
            result["warnings"] = layout_warnings + result["warnings"]
            if options.include_globals and not snapshot.is_superuser:
                result["warnings"].append(
                    "taken as %s, not a superuser: the set holds the roles and grants but no "
                    "role passwords; after a restore on a new server set them with "
                    "clinic.backup.role_passwords" % connection.params.get("user", "this role")
                )
            failure = writing.failure("backup set")
            if failure:
                error = BackupError(*failure)
                error.result = result
                raise error
            return result


def _take_set(connection, options, snapshot, bin_dir, writing, started, clock):
    """Stream the dump (and the globals alongside) into ``writing``; commit the manifest."""
    scratch = None
    counts = {}
    counter = None
    globals_job = None
    globals_file = options.artifact_file("globals", ".sql")
    try:
        if options.row_counts:
            counter = threading.Thread(target=_count_rows, args=(snapshot, counts))
            counter.daemon = True
            counter.start()
        env = connection.child_env()
        fmt, extension, content = FORMATS[options.format]
        if options.include_globals:
            # Small and independent of the dump: stream it alongside, not after.
            globals_job = Background(
                writing.stream,
                globals_file,
                [
                    pipeline.Stage(
                        "pg_dumpall",
                        pg_dumpall_globals_argv(bin_dir, connection, snapshot.is_superuser),
                        env=env,
                    )
                ],
            )
        db_file = options.artifact_file(connection.dbname, extension)
        if options.format == "directory":
            scratch = _scratch_dir(writing.targets)
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
        entry, locations = writing.stream(db_file, [producer])
        artifacts = [dict(entry, name="database", content=content, locations=locations)]
        if scratch:
            scratch.close()
            scratch = None
        if globals_job is not None:
            entry, locations = globals_job.join()
            artifacts.append(
                dict(
                    entry,
                    name="globals",
                    content=GLOBALS_CONTENT,
                    locations=locations,
                    role_passwords=bool(snapshot.is_superuser),
                )
            )
        if counter is not None:
            counter.join()
            if "error" in counts:
                raise SourceError("row counts failed: %s" % counts["error"])
        manifest = manifest_header(
            "database", writing.set_id, connection.dbname, options, started, clock
        )
        manifest.update(
            {
                "server": {
                    "version": snapshot.server_version,
                    "version_num": snapshot.server_version_num,
                    "host": connection.params.get("host"),
                    "port": connection.params.get("port"),
                },
                "pg_dump_version": tool_version(bin_dir),
                "format": options.format,
                "options": options.describe(),
                "snapshot": {"consistent": snapshot.snapshot_id is not None},
                "artifacts": [{k: v for k, v in a.items() if k != "locations"} for a in artifacts],
                "row_counts": counts.get("counts"),
            }
        )
        manifest, warnings = writing.commit(manifest, connection.dbname)
    except BaseException:
        if globals_job is not None:
            globals_job.join(quiet=True)  # it writes to the sinks about to be aborted
        raise
    finally:
        if counter is not None and counter.is_alive():
            snapshot.close()  # unblocks the counting thread
        if scratch:
            scratch.close()
    return {
        "changed": writing.changed,
        "set_id": writing.set_id,
        "database": connection.dbname,
        "manifest": manifest,
        "artifacts": artifacts,
        "targets": writing.reports(),
        "size": sum(a["size"] for a in artifacts),
        "duration_seconds": manifest["duration_seconds"],
        "warnings": warnings,
    }


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
