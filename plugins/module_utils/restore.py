# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restore a backup set into PostgreSQL, and rehearse restores.

A restore never writes into the database it is meant to produce. It builds a
work database (``<target>__restoring_<hex>``), streams the artifact into it
(stored bytes -> sha256 -> gpg -> decompress -> pg_restore / psql), checks the
sha256 against the manifest and the row count of every table against the
counts taken in the backup's snapshot, and only then:

* ``create``: renames the work database to the target (which must not exist);
* ``replace``: renames the current target aside (``<target>__pre_restore_<time>``,
  kept as the rollback unless told otherwise), then the work database to the target;
* ``rehearse``: drops the work database and reports the measured restore time
  (the RTO the clinic would see today) and the RPO of the chosen set.

Whatever fails, the work database is dropped and the target is untouched.

Without an explicit ``set_id`` the newest complete set is chosen (optionally
only verified ones, or ones finished before a moment - the ransomware case), and
a set that turns out damaged is passed over for the next older one, each one
reported with its reason.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import errno
import os
import shutil
import tarfile
import tempfile
import time

from . import authentication, dbproperties, pipeline, sqlguard
from .catalog import load_manifest
from .errors import BackupError, ConfigError, IntegrityError, SourceError, StoreError
from .lifecycle import (
    ReadOptions,
    ReadSession,
    check_readable_now,
    check_restorable,
    choose_sets,
    stream_into,
    try_newest_first,
)
from .pgsource import find_pg_bin_dir
from .repository import RESTORE_TEST, isoformat, parse_time, utc_now
from .tarsafety import unsafe_member
from .units import human_duration
from .verify import FAIL, verify_artifact

WORK_SUFFIX = "__restoring_"
PREVIOUS_SUFFIX = "__pre_restore_"
NAME_LIMIT = 63  # NAMEDATALEN - 1: PostgreSQL truncates longer names silently
OBJECT_IN_USE = "55006"  # SQLSTATE of "database is being accessed by other users"
UNDEFINED_OBJECT = "42704"  # SQLSTATE of e.g. role "x" does not exist
COPY_CHUNK = 1024 * 1024
LOCAL_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


# ---------------------------------------------------------------------- options
def check_database_name(name, what="target_database"):
    if not isinstance(name, str) or not name:
        raise ConfigError("%s must be a non-empty database name" % what)
    if any(ord(ch) < 32 for ch in name):
        raise ConfigError(
            "%s %r contains a control character (newline, tab...)" % (what, name),
            "name databases with printable characters only",
        )
    if len(name.encode("utf-8")) > NAME_LIMIT:
        raise ConfigError(
            "%s %r is longer than %d bytes" % (what, name, NAME_LIMIT),
            "PostgreSQL would truncate it: choose a shorter name",
        )
    return name


def parse_moment(value, what="not_after"):
    """A timezone-aware UTC datetime from a datetime or an ISO 8601 string."""
    if value is None or isinstance(value, datetime.datetime):
        moment = value
    else:
        text = str(value).strip().replace("Z", "+00:00")
        try:
            moment = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(
                "%s %r is not an ISO 8601 time" % (what, value),
                "e.g. 2026-11-30T08:00:00Z",
            ) from None
    if moment is not None and moment.tzinfo is None:
        raise ConfigError(
            "%s %r has no time zone" % (what, value), "add Z (UTC) or an offset like +01:00"
        )
    return moment.astimezone(datetime.timezone.utc) if moment is not None else None


class RestoreOptions(ReadOptions):
    """What to restore, where and how; validated on construction (ConfigError)."""

    def __init__(
        self,
        target_database=None,
        database=None,
        require_verified=False,
        not_after=None,
        jobs=1,
        include_globals=False,
        no_owner=False,
        owner=None,
        keep_previous=True,
        check_row_counts=True,
        pg_bin_dir=None,
        scratch_dir=None,
        **read_options,
    ):
        """``read_options``: those of lifecycle.ReadOptions (mode, set_id, passphrase_file...)."""
        self._set_read_options(**read_options)
        mode = self.mode
        if mode == "rehearse" and target_database is None:
            target_database = "%s_restore_test" % (database or "clinic")[:40]
        self.target_database = check_database_name(target_database)
        if database is not None:
            check_database_name(database, "database")
        if owner is not None:
            check_database_name(owner, "owner")
        jobs = int(jobs)
        if jobs < 1:
            raise ConfigError("jobs must be at least 1 (got %d)" % jobs)
        if scratch_dir is not None and not os.path.isabs(scratch_dir):
            raise ConfigError("scratch_dir %r must be an absolute path" % (scratch_dir,))
        self.database = database
        self.require_verified = bool(require_verified)
        self.not_after = parse_moment(not_after)
        self.jobs = jobs
        # Roles are server-wide: a rehearsal must not create or alter any.
        self.include_globals = bool(include_globals) and mode != "rehearse"
        self.no_owner = bool(no_owner)
        self.owner = owner
        self.keep_previous = bool(keep_previous)
        self.check_row_counts = bool(check_row_counts)
        self.pg_bin_dir = pg_bin_dir
        self.scratch_dir = scratch_dir


def _short(name, limit):
    """Cut ``name`` to at most ``limit`` UTF-8 bytes without splitting a character."""
    data = name.encode("utf-8")[:limit]
    return data.decode("utf-8", "ignore")


def work_database_name(target):
    suffix = WORK_SUFFIX + os.urandom(3).hex()
    return _short(target, NAME_LIMIT - len(suffix)) + suffix


def previous_database_name(target, moment):
    suffix = PREVIOUS_SUFFIX + moment.strftime("%Y%m%dT%H%M%SZ")
    return _short(target, NAME_LIMIT - len(suffix)) + suffix


# ---------------------------------------------------------------------- choosing a set
def candidates(repo, options, session):
    """(set ids to try in order, ids passed over and why)."""

    def accept(entry):
        if options.require_verified and entry["verification"] != "ok":
            return "verification is %s" % entry["verification"]
        if options.not_after is not None and parse_time(entry["finished_at"]) > options.not_after:
            return "finished %s, after not_after %s" % (
                entry["finished_at"],
                isoformat(options.not_after),
            )
        return None

    chosen, passed, _entries = choose_sets(repo, session, options, "database", "database", accept)
    if not chosen:
        what = "no complete%s backup set%s%s in %s" % (
            " verified" if options.require_verified else "",
            " of database %r" % options.database if options.database else "",
            " finished before %s" % isoformat(options.not_after) if options.not_after else "",
            repo.url,
        )
        raise IntegrityError(
            what,
            "passed over: %s" % "; ".join("%(set_id)s (%(reason)s)" % p for p in passed)
            if passed
            else "run a backup (and backup_verify) first",
        )
    return chosen, passed


# ---------------------------------------------------------------------- the server side
class Server(object):
    """Administrative statements on the target server (autocommit: CREATE/DROP DATABASE)."""

    def __init__(self, connection):
        self.connection = connection
        self.conn = connection.connect()
        self.conn.autocommit = True

    def close(self):
        try:
            self.conn.close()
        except Exception:  # closing must not hide the real error
            pass

    def _sql(self):
        from psycopg2 import sql

        return sql

    def query(self, statement, args=None):
        cur = self.conn.cursor()
        cur.execute(statement, args)
        return cur.fetchall() if cur.description else None

    def execute(self, statement, args=None, what="statement"):
        import psycopg2

        try:
            cur = self.conn.cursor()
            cur.execute(statement, args)
        except psycopg2.Error as exc:
            error = SourceError("%s failed: %s" % (what, " ".join(str(exc).split())))
            error.sqlstate = exc.pgcode
            raise error from exc

    def exists(self, name):
        return bool(self.query("SELECT 1 FROM pg_database WHERE datname = %s", (name,)))

    def server_major(self):
        return self.conn.server_version // 10000

    def check_can_create(self):
        row = self.query(
            "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user"
        )
        if not row or not row[0][0]:
            raise ConfigError(
                "role %r may not create databases" % self.connection.params.get("user", "?"),
                "connect as a role with CREATEDB (or a superuser) to restore",
            )

    def create(self, name, owner=None):
        sql = self._sql()
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
        if owner:
            statement += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        self.execute(statement, what="CREATE DATABASE %s" % name)

    def disconnect_all(self, name):
        self.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )

    def allow_connections(self, name, allow):
        sql = self._sql()
        self.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                sql.Identifier(name), sql.SQL("true" if allow else "false")
            ),
            what="ALTER DATABASE %s ALLOW_CONNECTIONS" % name,
        )

    def rename(self, old, new):
        sql = self._sql()
        statement = sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(old), sql.Identifier(new)
        )
        # Sessions that were terminated may take a moment to go away.
        for attempt in range(50):
            try:
                self.execute(statement, what="renaming database %s to %s" % (old, new))
                return
            except SourceError as exc:
                if getattr(exc, "sqlstate", None) != OBJECT_IN_USE or attempt == 49:
                    raise
                self.disconnect_all(old)
                time.sleep(0.1)

    def drop(self, name):
        sql = self._sql()
        self.disconnect_all(name)
        self.execute(
            sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)),
            what="DROP DATABASE %s" % name,
        )


def _restored_counts(connection, expected):
    """Row counts in the restored database for the manifest's tables.

    Manifest keys are looked up with to_regclass() as parameters, never pasted
    into SQL: a manifest is data read back from storage.
    """
    from psycopg2 import sql

    conn = connection.connect()
    try:
        cur = conn.cursor()
        counts, missing = {}, []
        for key in sorted(expected):
            cur.execute(
                "SELECT n.nspname, c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
                (key,),
            )
            row = cur.fetchone()
            if row is None:
                missing.append(key)
                continue
            cur.execute(
                sql.SQL("SELECT count(*) FROM {}.{}").format(
                    sql.Identifier(row[0]), sql.Identifier(row[1])
                )
            )
            counts[key] = cur.fetchone()[0]
        conn.rollback()
        return counts, missing
    finally:
        conn.close()


def compare_row_counts(manifest, counts, missing):
    """Per-table comparison and the list of problems (empty when all match)."""
    expected = manifest.get("row_counts") or {}
    options = manifest.get("options") or {}
    partial = bool(options.get("tables") or options.get("exclude_tables"))
    table = []
    problems = []
    for key in sorted(expected):
        if key in missing:
            # A partial dump legitimately lacks the tables it left out.
            table.append({"table": key, "expected": expected[key], "restored": None})
            if not partial:
                problems.append("table %s is missing after the restore" % key)
            continue
        table.append({"table": key, "expected": expected[key], "restored": counts[key]})
        if counts[key] != expected[key]:
            problems.append(
                "table %s has %d rows, the backup's snapshot had %d"
                % (key, counts[key], expected[key])
            )
    return table, problems


# ---------------------------------------------------------------------- directory archives
class SafeTarExtractor(pipeline.ThreadedConsumer):
    """Stream consumer that extracts a tar archive into ``root``.

    Only regular files and directories below ``root`` are accepted: an absolute
    name, a ``..`` component, a link, a device or a FIFO fails the whole restore
    (IntegrityError naming the member) before anything is written for it. Files
    are created 0600 with O_EXCL|O_NOFOLLOW, so nothing can be redirected.
    """

    stopped_message = "the tar extractor stopped early"

    def __init__(self, root):
        self.root = root
        self.files = 0
        self._start_thread()

    def _run(self):
        try:
            with tarfile.open(fileobj=self._reader, mode="r|") as archive:
                for member in archive:
                    self._extract(archive, member)
            while self._reader.read(COPY_CHUNK):
                pass  # the zero blocks after the end marker
        except IntegrityError as exc:
            self.error = exc
        except OSError as exc:
            if exc.errno in LOCAL_STORAGE_ERRNOS:
                # The scratch disk, not the set: an older set would fail the same way.
                self.error = StoreError(
                    "cannot unpack into %s: %s" % (self.root, exc.strerror),
                    "free space in scratch_dir or point it at a larger filesystem",
                )
            else:
                self.error = IntegrityError("the directory archive cannot be extracted: %s" % exc)
        except (tarfile.TarError, EOFError) as exc:
            self.error = IntegrityError("the directory archive cannot be extracted: %s" % exc)
        finally:
            self._reader.close()

    def _extract(self, archive, member):
        name = member.name[2:] if member.name.startswith("./") else member.name
        why = unsafe_member(name)
        if why:
            raise IntegrityError(
                "tar member %r is unsafe (%s); nothing was restored from this set" % (name, why)
            )
        if name in ("", "."):
            return
        path = os.path.join(self.root, name)
        if member.isdir():
            os.makedirs(path, mode=0o700, exist_ok=True)
            return
        if not member.isfile():
            raise IntegrityError(
                "tar member %r is not a regular file (type %r); a pg_dump directory holds only "
                "files" % (name, member.type.decode("ascii", "replace"))
            )
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        source = archive.extractfile(member)
        with os.fdopen(os.open(path, flags, 0o600), "wb") as handle:
            shutil.copyfileobj(source, handle, COPY_CHUNK)
        self.files += 1


# ---------------------------------------------------------------------- streaming one artifact
def _artifact(manifest, name):
    for artifact in manifest["artifacts"]:
        if artifact["name"] == name:
            return artifact
    return None


def _pg_restore_argv(bin_dir, connection, options, jobs, directory=None):
    argv = [
        os.path.join(bin_dir, "pg_restore"),
        "--no-password",
        "--exit-on-error",
        "--dbname=%s" % connection.conninfo_dbname(),
    ]
    if options.no_owner:
        argv.append("--no-owner")
    if jobs > 1:
        argv.append("--jobs=%d" % jobs)
    else:
        argv.append("--single-transaction")
    if directory:
        argv.append(directory)
    return argv


def _psql_argv(bin_dir, connection, stop_on_error=True):
    argv = [
        os.path.join(bin_dir, "psql"),
        "--no-password",
        "--no-psqlrc",
        "--quiet",
        "--dbname=%s" % connection.conninfo_dbname(),
        "--output=/dev/null",
    ]
    if stop_on_error:
        argv += ["--set=ON_ERROR_STOP=1", "--single-transaction"]
    return argv


def _restore_database(
    repo, set_id, manifest, work, options, gpg_session, bin_dir, warnings, archive
):
    """Restore the database artifact into ``work``; returns the stored size. Appends
    to ``archive`` what dbproperties reads (TOC bytes, or the database's SQL)."""
    artifact = _artifact(manifest, "database")
    env = work.child_env()
    content = artifact["content"]
    if content == "pg_dump-custom":
        if options.jobs > 1:
            warnings.append(
                "jobs=%d ignored: a custom-format dump is restored from a stream, and parallel "
                "pg_restore needs a seekable file (plaintext PHI on disk); use format "
                "directory for parallel restores" % options.jobs
            )
        # Fed from Python (not a pipeline stage) so that the start of the stream, the
        # TOC, is kept for the database's own properties (dbproperties).
        feeder = ArchiveFeeder(_pg_restore_argv(bin_dir, work, options, 1), env)
        size, code, errors = _feed(repo, set_id, artifact, manifest, gpg_session, feeder)
        if code != 0:
            raise SourceError(
                "pg_restore failed with exit code %d: %s"
                % (code, errors[-pipeline.STDERR_TAIL :].strip() or "no message")
            )
        archive.append(feeder.prefix)
        return size
    if content == "pg_dump-plain":
        if options.no_owner:
            warnings.append("no_owner has no effect on a plain-format dump")
        code, errors, size = _run_script(
            repo, set_id, artifact, manifest, gpg_session, _psql_argv(bin_dir, work), env
        )
        if code != 0:
            raise SourceError(
                "psql failed with exit code %d: %s"
                % (code, errors[-pipeline.STDERR_TAIL :].strip() or "no message")
            )
        return size
    if content == "pg_dump-directory-tar":
        # pg_restore needs the directory on disk: a private scratch directory,
        # removed whatever happens.
        scratch = tempfile.mkdtemp(prefix="clinic-restore-", dir=options.scratch_dir)
        try:
            os.chmod(scratch, 0o700)
            extractor = SafeTarExtractor(scratch)
            try:
                size = stream_into(
                    repo, set_id, artifact, manifest, gpg_session, consumer=extractor
                )
                extractor.finish()
            except BaseException:
                extractor.abort()
                raise
            if not os.path.isfile(os.path.join(scratch, "toc.dat")):
                raise IntegrityError("the directory archive of %s has no toc.dat" % set_id)
            stage = pipeline.Stage(
                "pg_restore",
                _pg_restore_argv(bin_dir, work, options, options.jobs, directory=scratch),
                env=env,
            )
            pipeline.run_stream([stage], lambda chunk: None)
            archive.append(_database_sql(bin_dir, scratch, manifest, work, options))
            return size
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    raise IntegrityError("set %s holds an unknown database artifact %r" % (set_id, content))


def _feed(repo, set_id, artifact, manifest, gpg_session, feeder):
    """Stream an artifact into a StdinFeeder (killed if the stream fails); returns
    (stored bytes, exit code, stderr text)."""
    try:
        size = stream_into(repo, set_id, artifact, manifest, gpg_session, consumer=feeder)
    except BaseException:
        feeder.abort()
        raise
    code, errors = feeder.finish()
    return size, code, errors


def _run_script(repo, set_id, artifact, manifest, gpg_session, argv, env):
    """Stream a plain SQL artifact into psql in restricted mode (sqlguard); returns
    (exit code, stderr text, stored bytes). A script holding a meta-command was not
    written by pg_dump: IntegrityError, the set is damaged or planted."""
    sqlguard.check_psql_restricts(argv[0])
    feeder = sqlguard.PsqlFeeder(argv, env)
    size, code, errors = _feed(repo, set_id, artifact, manifest, gpg_session, feeder)
    found = feeder.guard.found
    if not found and sqlguard.RESTRICTED_REFUSAL in errors:
        found = "one the guard did not see, refused by psql"  # e.g. after SQL on its line
    if found:
        raise IntegrityError(
            "%s holds a psql meta-command (%s): pg_dump never writes one there; psql refused "
            "it (restricted mode)" % (repo.location(set_id, artifact["file"]), found),
            "the set was tampered with: restore another set and find out who can write to the "
            "repository",
        )
    return code, errors, size


def _apply_globals(repo, set_id, manifest, server, gpg_session, bin_dir):
    """Replay roles and tablespaces; roles that exist already are kept as they are.

    Errors are told apart by SQLSTATE (42710 duplicate_object: already there), never by
    their text, which the server translates (lc_messages)."""
    artifact = _artifact(manifest, "globals")
    if artifact is None:
        return {"applied": False, "detail": "the set holds no globals"}
    code, stderr_text, _size = _run_script(
        repo,
        set_id,
        artifact,
        manifest,
        gpg_session,
        _psql_argv(bin_dir, server.connection, stop_on_error=False),
        server.connection.child_env(),
    )
    errors = sqlguard.server_errors(stderr_text)
    if code != 0 and not errors:
        raise SourceError(
            "psql (globals) failed with exit code %d: %s"
            % (code, stderr_text[-pipeline.STDERR_TAIL :].strip() or "no message")
        )
    return {
        "applied": True,
        "already_present": [m for state, m in errors if state == sqlguard.DUPLICATE_OBJECT],
        "errors": [
            "%s (SQLSTATE %s)" % (m, state)
            for state, m in errors
            if state != sqlguard.DUPLICATE_OBJECT
        ],
        "role_passwords": bool(artifact.get("role_passwords")),
    }


class ArchiveFeeder(pipeline.StdinFeeder):
    """Stream consumer feeding pg_restore's stdin, keeping the first bytes (the TOC of a
    custom-format archive, at most dbproperties.TOC_PREFIX_LIMIT) in memory only."""

    def __init__(self, argv, env):
        super(ArchiveFeeder, self).__init__(argv, env)
        self._prefix = []
        self._kept = 0

    @property
    def prefix(self):
        return b"".join(self._prefix)

    def __call__(self, chunk):
        if self._kept < dbproperties.TOC_PREFIX_LIMIT:
            piece = chunk[: dbproperties.TOC_PREFIX_LIMIT - self._kept]
            self._prefix.append(piece)
            self._kept += len(piece)
        self._send(chunk)


def _database_sql(bin_dir, archive, manifest, work, options):
    """(statements, problems) giving ``work`` the source database's own ACL, settings,
    comment and (unless the restore sets or drops owners) owner."""
    return dbproperties.database_sql(
        os.path.join(bin_dir, "pg_restore"),
        archive,
        manifest["database"],
        work.dbname,
        with_owner=not options.owner and not options.no_owner,
    )


def _apply_database_sql(archive, manifest, work, server, options, bin_dir, warnings):
    """Apply the database's own privileges and properties to the work database (they
    follow it through the rename). A statement the server refuses (a granted role
    missing here: SQLSTATE 42704) is a warning naming it, never a failed restore."""
    if not archive:
        warnings.append(
            "a plain-format set holds no database-level privileges, settings or comment "
            "(pg_dump -Fp writes them only with --create): re-issue GRANT/REVOKE ... ON "
            "DATABASE, ALTER DATABASE ... SET and COMMENT ON DATABASE by hand"
        )
        return {"applied": False, "detail": "a plain-format set holds none"}
    found = archive[0]
    if isinstance(found, bytes):
        found = _database_sql(bin_dir, found, manifest, work, options)
    statements, problems = found
    for problem in problems:
        warnings.append("database privileges/properties not carried over: %s" % problem)
    if not statements:
        return {"applied": False, "statements": 0, "problems": problems}
    psql = _psql_argv(bin_dir, server.connection, stop_on_error=False)
    sqlguard.check_psql_restricts(psql[0])
    feeder = sqlguard.PsqlFeeder(psql, server.connection.child_env())
    try:
        feeder(("\n".join(statements) + "\n").encode("utf-8"))
    except BaseException:
        feeder.abort()
        raise
    code, stderr_text = feeder.finish()
    errors = sqlguard.server_errors(stderr_text)
    if code != 0 and not errors:
        raise SourceError(
            "psql (database privileges) failed with exit code %d: %s"
            % (code, stderr_text[-pipeline.STDERR_TAIL :].strip() or "no message")
        )
    for state, message in errors:
        warnings.append(
            "database privilege/property not applied: %s (SQLSTATE %s)%s"
            % (
                message,
                state,
                ": create the role and re-run the GRANT" if state == UNDEFINED_OBJECT else "",
            )
        )
    return {
        "applied": True,
        "statements": len(statements),
        "errors": ["%s (SQLSTATE %s)" % (m, state) for state, m in errors],
        "problems": problems,
    }


def _check_other_artifacts(repo, set_id, manifest, gpg_session, bin_dir):
    for artifact in manifest["artifacts"]:
        if artifact["name"] == "database":
            continue
        checks = verify_artifact(repo, set_id, artifact, manifest, gpg_session, bin_dir)
        failed = [c.detail for c in checks if c.status == FAIL]
        if failed:
            raise IntegrityError("; ".join(failed))


# ---------------------------------------------------------------------- one attempt
class DatabaseRestore(object):
    """One restore run on one server: each attempt builds a fresh work database, named
    before it is created so that a failure can always drop it."""

    # The database's own ACL/settings/comment: for a database put in place (or
    # rehearsed), not for a work database only read from (table_restore).
    apply_database_properties = True

    def __init__(self, repo, server, connection, options, session, now):
        self.repo = repo
        self.server = server
        self.connection = connection
        self.options = options
        self.session = session
        self.now = now
        self.bin_dir = None
        self.work = None

    def check_report(self, set_id):
        """What check mode adds to its result about ``set_id`` (the kind's own plan)."""
        return {}

    def prepare(self):
        """Check the server and the target before anything; returns whether it exists."""
        options, server = self.options, self.server
        server.check_can_create()
        target_exists = server.exists(options.target_database)
        if options.mode == "create" and target_exists:
            raise ConfigError(
                "database %r already exists" % options.target_database,
                "restore into another target_database, or use mode: replace "
                "(the current database is kept aside as the rollback)",
            )
        if options.mode == "rehearse" and target_exists:
            raise ConfigError(
                "rehearsal database %r already exists" % options.target_database,
                "choose another target_database for the restore test or drop the old one",
            )
        self.bin_dir = find_pg_bin_dir(server.server_major(), options.pg_bin_dir)
        return target_exists

    def attempt(self, set_id):
        """Restore ``set_id`` and put it where it belongs; returns the result."""
        self.work = None
        try:
            result = self.restore_work(set_id)
            result.update(_finalize(self.server, self.options, self.work, self.now))
            return result
        except BaseException:
            drop_quietly(self.server, self.work)
            raise

    def restore_work(self, set_id):
        """Restore ``set_id`` into a fresh work database (``self.work``) and check it
        against the manifest; returns the result so far. Public for the kinds of
        restore that take what they need from the work database (table_restore)."""
        repo, options, bin_dir = self.repo, self.options, self.bin_dir
        manifest = load_manifest(repo, set_id, self.session.key)
        warnings = check_restorable(manifest, options, self.session.key)
        for artifact in manifest["artifacts"]:
            if repo.artifact_size(set_id, artifact["file"]) is None:
                raise IntegrityError("%s is missing" % repo.location(set_id, artifact["file"]))
        check_readable_now(repo, manifest)
        gpg_session = self.session.gpg_for(manifest, repo)
        result = {"set_id": set_id, "database": manifest["database"], "format": manifest["format"]}
        if options.include_globals:
            result["globals"] = _apply_globals(
                repo, set_id, manifest, self.server, gpg_session, bin_dir
            )
        else:
            # Not replayed, but a replacement server would need them: read them through.
            _check_other_artifacts(repo, set_id, manifest, gpg_session, bin_dir)
        self.work = work_database_name(options.target_database)
        self.server.create(self.work, options.owner)
        work = self.connection.for_database(self.work)
        archive = []
        result["restored_bytes"] = _restore_database(
            repo, set_id, manifest, work, options, gpg_session, bin_dir, warnings, archive
        )
        if options.check_row_counts and manifest.get("row_counts"):
            counts, missing = _restored_counts(work, manifest["row_counts"])
            table, problems = compare_row_counts(manifest, counts, missing)
            result["row_counts"] = table
            if problems:
                raise IntegrityError(
                    "the restored database does not match the backup's snapshot: %s"
                    % "; ".join(problems)
                )
        elif options.check_row_counts:
            warnings.append("the manifest of %s records no row counts to compare" % set_id)
        if self.apply_database_properties:
            result["database_properties"] = _apply_database_sql(
                archive, manifest, work, self.server, options, bin_dir, warnings
            )
        started = parse_time(manifest["started_at"])
        result["rpo_seconds"] = round((self.now - started).total_seconds(), 1)
        result["backup_started_at"] = manifest["started_at"]
        result["warnings"] = warnings
        return result


def _finalize(server, options, work_name, now):
    """Put the verified work database where it belongs; returns what happened."""
    target = options.target_database
    if options.mode == "rehearse":
        server.drop(work_name)
        return {"changed": False, "dropped": work_name}
    if options.mode == "create":
        if server.exists(target):
            raise ConfigError(
                "database %r appeared while restoring" % target,
                "another process created it; choose another target_database",
            )
        server.rename(work_name, target)
        return {"changed": True}
    previous = None
    if server.exists(target):
        previous = previous_database_name(target, now)
        # Refuse new sessions, end the current ones, then swap names.
        server.allow_connections(target, False)
        try:
            server.disconnect_all(target)
            server.rename(target, previous)
        except BaseException:
            server.allow_connections(target, True)
            raise
        server.allow_connections(previous, True)
    try:
        server.rename(work_name, target)
    except BaseException:
        if previous:
            server.rename(previous, target)  # put the original back before reporting
        raise
    report = {"changed": True, "previous_database": previous}
    if previous and not options.keep_previous:
        server.drop(previous)
        report["previous_database"] = None
        report["previous_dropped"] = previous
    return report


# ---------------------------------------------------------------------- entry point
def run_restore(repo, connection, options, check_mode=False, now=None, kind=None):
    """Restore (or rehearse restoring) a set; returns a result dict.

    ``connection``: the target server, connected to a maintenance database
    (``postgres``) as a role that may create databases. ``kind``: the DatabaseRestore
    class that runs each attempt (table_restore.TableRestore for chosen tables).
    """
    now = now or utc_now()
    clock = time.time()
    with ReadSession(options.passphrase_file, options.old_passphrase_files) as session:
        to_try, passed = candidates(repo, options, session)
        server = Server(connection)
        try:
            run = (kind or DatabaseRestore)(repo, server, connection, options, session, now)
            target_exists = run.prepare()
            if check_mode:
                report = {
                    "changed": options.mode != "rehearse",
                    "check_mode": True,
                    "set_id": to_try[0],
                    "candidates": to_try,
                    "passed_over": passed,
                    "target_database": options.target_database,
                    "target_exists": target_exists,
                    "mode": options.mode,
                }
                report.update(run.check_report(to_try[0]))
                return report
            result, damaged = try_newest_first(
                to_try, run.attempt, options.fallback, repr(options.target_database)
            )
        finally:
            server.close()
    result.update(
        {
            "mode": options.mode,
            "target_database": options.target_database,
            "duration_seconds": round(time.time() - clock, 3),
            "damaged": damaged,
            "passed_over": passed,
            "restored_at": isoformat(now),
        }
    )
    result["summary"] = "%s set %s into %s in %s; data as of %s (RPO %s)" % (
        "rehearsed" if options.mode == "rehearse" else "restored",
        result.get("set_id"),
        options.target_database,
        human_duration(result["duration_seconds"]),
        result.get("backup_started_at", "?"),
        human_duration(result.get("rpo_seconds")),
    )
    if options.mode == "rehearse":
        warning = record_restore_test(repo, session.key, result)
        if warning:
            result.setdefault("warnings", []).append(warning)
    return result


def record_restore_test(repo, key, result):
    """Seal the outcome of a successful rehearsal next to its set, whichever path ran it
    (playbook or cron): the catalog then shows the set as restore-tested with its
    measured RTO and RPO. Returns a warning when it cannot be recorded."""
    if key is None:
        return "the restore test was not recorded next to the set: no passphrase_file to seal it"
    try:
        set_id = result["set_id"]
        record = {
            "state": "ok",
            "tested_at": result["restored_at"],
            "rto_seconds": result["duration_seconds"],
            "rpo_seconds": result.get("rpo_seconds"),
        }
        manifest = load_manifest(repo, set_id, key)
        repo.write_record(
            set_id,
            RESTORE_TEST,
            authentication.seal_for_set(record, key, "restore_test", set_id, manifest),
        )
    except (BackupError, OSError) as exc:
        return "the restore test was not recorded next to the set: %s" % exc
    return None


def drop_quietly(server, name):
    if not name:
        return
    try:
        server.drop(name)
    except Exception:  # the original failure matters more; the name is in the report
        pass
