# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Verify a backup set: manifest, sha256 of every artifact, a full decrypt +
decompress + content check (pg_restore --list, tar listing, SQL trailer),
age, and size against recent history.

Each artifact is read once: the stored bytes are hashed while being fed
through gpg and the decompressor into the content checker.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

from . import authentication, basebackup, file_chain, pipeline, sqlguard, wal
from .catalog import list_catalog, load_manifest, manifest_authentication
from .errors import BackupError, ConfigError, IntegrityError
from .lifecycle import check_readable_now
from .pgsource import find_pg_bin_dir
from .repository import isoformat, parse_time, utc_now
from .tarsafety import unsafe_link, unsafe_member

OK, WARN, FAIL = "ok", "warn", "fail"
PLAIN_TRAILER = b"PostgreSQL database dump complete"
GLOBALS_TRAILER = b"PostgreSQL database cluster dump complete"
FILES_CONTENT = "files-tar"  # a file set's archive (file_backup.py)
BASE_CONTENT = "pg_basebackup-tar"  # a base backup's data directory (basebackup.py)


class Check(object):
    def __init__(self, name, status, detail, artifact=None):
        self.name = name
        self.status = status
        self.detail = detail
        self.artifact = artifact

    def as_dict(self):
        data = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.artifact:
            data["artifact"] = self.artifact
        return data


class TailKeeper(object):
    """Consumer of a SQL script: keeps its last bytes (to find the trailer) and names the
    first psql meta-command outside COPY data (pg_dump writes none there)."""

    def __init__(self, keep=4096):
        self.keep = keep
        self.tail = b""
        self.size = 0
        self.guard = sqlguard.MetaCommandGuard()

    def __call__(self, chunk):
        self.size += len(chunk)
        self.tail = (self.tail + chunk)[-self.keep :]
        self.guard(chunk)


def _content_reader(content, bin_dir):
    """argv of the program that parses the decrypted, decompressed artifact, or None."""
    if content == "pg_dump-custom":
        return [os.path.join(bin_dir, "pg_restore"), "--list"]
    if content in ("pg_dump-directory-tar", FILES_CONTENT, BASE_CONTENT):
        # --numeric-owner: owner names may contain spaces, which would shift the
        # whitespace-split fields of each line and hide the member name from the checks.
        return [pipeline.which_or_fail("tar", "tar"), "--numeric-owner", "-tvf", "-"]
    return None


class ParserConsumer(object):
    """Feed the stream to a parser (pg_restore --list, tar -tv) while reading
    it to the end ourselves: those parsers stop early, but gpg only checks the
    integrity code (MDC) and zstd the frame checksum once all bytes went through."""

    def __init__(self, content, argv):
        self.content = content
        self.size = 0
        self.entries = 0
        self.names = []
        self.links = []  # files-tar: (name, "target" as listed)
        self.odd = []  # files-tar: (name, type letter) of members a file restore refuses
        self.regular = 0
        self.head = ""
        self._program = os.path.basename(argv[0])
        # The parser's own locale: tar lists non-ASCII member names as they are, which
        # the member checks read (in C it would escape them).
        self._feeder = pipeline.StdinFeeder(argv, os.environ, untranslated=False, keep_output=True)

    def __call__(self, chunk):
        self.size += len(chunk)
        self._feeder(chunk)  # a parser that stopped early has all it wanted

    def finish(self):
        """Wait for the parser; return an error text or None."""
        code, errors = self._feeder.finish()
        if code != 0:
            tail = errors[-pipeline.STDERR_TAIL :].strip()
            return "%s exited with %d: %s" % (self._program, code, tail)
        for line in self._feeder.output.splitlines():
            self._line(line)
        return None

    def abort(self):
        self._feeder.abort()

    def _line(self, line):
        if len(self.head) < 2000:
            self.head += line + "\n"
        if self.content == "pg_dump-custom":
            if line and not line.startswith(";"):
                self.entries += 1
            return
        # tar -tv: the name is the last field; "x -> y" marks a link.
        fields = line.split(None, 5)
        if len(fields) == 6 and self.content in (FILES_CONTENT, BASE_CONTENT):
            self._file_member(line[:1], fields[5])
            return
        if len(fields) == 6:
            name = fields[5].split(" -> ")[0]
            self.names.append(name[2:] if name.startswith("./") else name)
            if line[:1] in ("l", "h"):
                self.names.append("/" + name)  # links are never part of a pg_dump directory

    def _file_member(self, kind, text):
        """One member of a file set: links may point anywhere inside the archive."""
        if kind == "l":
            # "name -> target": either side may itself hold " -> "; check both readings.
            first, second = text.split(" -> ", 1), text.rsplit(" -> ", 1)
            self.names.append(first[0] if len(first) == 2 else text)
            self.links.extend(tuple(reading) for reading in (first, second) if len(reading) == 2)
            return
        if kind == "h":
            text = text.split(" link to ", 1)[0]
        if kind not in ("-", "d"):
            self.odd.append((text, kind))
        self.regular += kind == "-"
        self.names.append(text)


def _check_files(consumer, expected):
    """Judge a file set's listing (``expected``: the manifest's ``files`` record)."""
    for name in consumer.names:
        why = unsafe_member(name)
        if why:
            return FAIL, "tar member %r is unsafe (%s)" % (name, why)
    for name, target in consumer.links:
        why = unsafe_link(name, target)
        if why:
            return FAIL, "tar member %r is unsafe (%s)" % (name, why)
    for name, kind in consumer.odd:
        return FAIL, (
            "tar member %r is unsafe (type %r: a file set holds only files, directories and "
            "symbolic links)" % (name, kind)
        )
    count = expected.get("count") if isinstance(expected, dict) else None
    if count is not None and consumer.regular != count:
        return FAIL, "tar archive lists %d files, the manifest records %s" % (
            consumer.regular,
            count,
        )
    return OK, "tar archive lists %d members (%d files)" % (len(consumer.names), consumer.regular)


def _check_base(consumer, expected):
    """Judge a base backup's listing (``expected``: the manifest's ``tar`` record): safe
    names, plain files and directories only, backup_label and the server's manifest."""
    for name in consumer.names:
        why = unsafe_member(name)
        if why:
            return FAIL, "tar member %r is unsafe (%s)" % (name, why)
    for name, _target in consumer.links:
        return FAIL, "tar member %r is a link: a base backup restore refuses it" % name
    for name, kind in consumer.odd:
        return FAIL, "tar member %r is unsafe (type %r)" % (name, kind)
    for needed in ("backup_label", "backup_manifest"):
        if needed not in consumer.names:
            return FAIL, "the base backup holds no %s: it cannot be %s" % (
                needed,
                "started" if needed == "backup_label" else "checked with pg_verifybackup",
            )
    files = expected.get("files") if isinstance(expected, dict) else None
    if files is not None and consumer.regular != files:
        return FAIL, "tar archive lists %d files, the manifest records %s" % (
            consumer.regular,
            files,
        )
    return OK, "tar archive lists %d files including backup_label and backup_manifest" % (
        consumer.regular
    )


def _check_content(content, consumer, expected_files=None):
    """Judge what the parser saw; return (status, detail)."""
    if content == FILES_CONTENT:
        return _check_files(consumer, expected_files)
    if content == BASE_CONTENT:
        return _check_base(consumer, expected_files)
    if content == file_chain.INDEX_CONTENT:
        return consumer.judge()
    if content == "pg_dump-custom":
        if "; Archive created at" not in consumer.head:
            return FAIL, "pg_restore --list printed no table of contents"
        return OK, "pg_restore --list read %d TOC entries" % consumer.entries
    if content == "pg_dump-directory-tar":
        if "toc.dat" not in consumer.names:
            return FAIL, "the directory archive has no toc.dat"
        for name in consumer.names:
            why = unsafe_member(name)
            if why:
                return FAIL, "tar member %r is unsafe (%s)" % (name, why)
        return OK, "tar archive lists %d files including toc.dat" % len(consumer.names)
    trailer = GLOBALS_TRAILER if content == "pg_dumpall-globals" else PLAIN_TRAILER
    consumer.guard.flush()
    if consumer.guard.found:
        return FAIL, (
            "SQL script holds a psql meta-command (%s): pg_dump never writes one there; the "
            "set was tampered with" % consumer.guard.found
        )
    if trailer not in consumer.tail:
        return FAIL, "SQL script is truncated (no '%s' trailer)" % trailer.decode()
    return OK, "SQL script complete (%d bytes)" % consumer.size


def verify_artifact(repo, set_id, artifact, manifest, gpg_session, bin_dir, deep=True):
    """Checks for one artifact: presence + size, sha256, and (deep) content."""
    checks = []
    name = artifact["file"]
    size = repo.artifact_size(set_id, name)
    if size is None:
        return [Check("present", FAIL, "%s is missing" % repo.location(set_id, name), name)]
    if size != artifact["size"]:
        checks.append(
            Check(
                "size",
                FAIL,
                "%s is %d bytes, manifest says %d"
                % (repo.location(set_id, name), size, artifact["size"]),
                name,
            )
        )
    reader = pipeline.HashingReader(repo.open_artifact(set_id, name))
    stages = []
    consumer = None
    encrypted = manifest["encryption"].get("method") != "none"
    if deep:
        if encrypted:
            stages.append(gpg_session.decryption())
        decompress = pipeline.decompress_argv(manifest["compression"]["algorithm"])
        if decompress:
            stages.append(pipeline.Stage("decompression", decompress))
        parser = _content_reader(artifact["content"], bin_dir)
        consumer = ParserConsumer(artifact["content"], parser) if parser else TailKeeper()
        if artifact["content"] == file_chain.INDEX_CONTENT:
            consumer = file_chain.ContentCheck(manifest)
    content_error = None
    try:
        pipeline.run_stream(
            stages,
            consumer or (lambda chunk: None),
            source=reader,
            what="verifying " + artifact["file"],
        )
        if isinstance(consumer, ParserConsumer):
            content_error = consumer.finish()
    except BackupError as exc:
        content_error = str(exc)
        if isinstance(consumer, ParserConsumer):
            consumer.abort()
    finally:
        reader.fileobj.close()
    if (
        deep
        and encrypted
        and content_error
        and "Bad session key" in content_error
        and reader.sha256 == artifact["sha256"]
    ):
        # Intact bytes gpg cannot open: the passphrase is wrong, not the set. Raised (not
        # recorded) so that an operator error does not mark a good set as failed.
        raise ConfigError(
            "the passphrase does not decrypt %s" % repo.location(set_id, name),
            "use the passphrase this set was encrypted with; the set is intact (sha256 matches)",
        )
    if reader.sha256 != artifact["sha256"]:
        checks.append(
            Check(
                "sha256",
                FAIL,
                "%s has sha256 %s, manifest says %s"
                % (repo.location(set_id, name), reader.sha256, artifact["sha256"]),
                name,
            )
        )
    else:
        checks.append(Check("sha256", OK, "sha256 matches (%d bytes)" % reader.size, name))
    if deep:
        if content_error:
            checks.append(
                Check(
                    "readable",
                    FAIL,
                    "%s cannot be decrypted/decompressed/read: %s"
                    % (repo.location(set_id, name), content_error),
                    name,
                )
            )
        else:
            expected = manifest.get("tar" if artifact["content"] == BASE_CONTENT else "files")
            status, detail = _check_content(artifact["content"], consumer, expected)
            checks.append(Check("readable", status, "%s: %s" % (name, detail), name))
    return checks


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2.0


def size_check(repo, manifest, tolerance_percent, history=7, key=None):
    """Compare the database artifact (a file set's archive) with the median of recent sets
    of the same kind."""
    main = {"files": "files", "basebackup": "base"}.get(manifest.get("kind"), "database")
    if file_chain.level(manifest) == file_chain.INCREMENTAL:
        # Its size is what changed that hour: no history it could be an anomaly against.
        return Check("size_anomaly", OK, "incremental set: its size follows the changes")

    def db_size(m):
        return sum(a["size"] for a in m["artifacts"] if a["name"] == main)

    previous = []
    for entry in list_catalog(repo, manifest["database"], key=key):
        if entry["state"] != "complete" or entry["id"] >= manifest["id"]:
            continue
        other = entry["manifest"]
        if (
            other["format"] == manifest["format"]
            and other.get("options") == manifest.get("options")
            and file_chain.level(other) == file_chain.level(manifest)  # full vs incremental
        ):
            previous.append(db_size(other))
        if len(previous) >= history:
            break
    if not previous:
        return Check("size_anomaly", OK, "no earlier set to compare with")
    median = _median(previous)
    size = db_size(manifest)
    ratio = size / median if median else float("inf")
    limit = 1.0 + tolerance_percent / 100.0
    detail = "%s artifact is %d bytes, %.2fx the median (%d) of the previous %d sets" % (
        main,
        size,
        ratio,
        median,
        len(previous),
    )
    if ratio > limit or ratio < 1.0 / limit:
        return Check(
            "size_anomaly", FAIL, detail + "; allowed range %.2fx-%.2fx" % (1.0 / limit, limit)
        )
    return Check("size_anomaly", OK, detail)


def verify_set(
    repo,
    set_id=None,
    database=None,
    passphrase_file=None,
    deep=True,
    max_age_hours=25.0,
    size_tolerance_percent=50.0,
    pg_bin_dir=None,
    record=True,
    now=None,
    allow_unauthenticated=False,
    old_passphrase_files=(),
):
    """Run every check on one set (default: the newest) and record the outcome.

    With a passphrase_file the manifest's MAC is checked (a set without one fails the
    ``authentication`` check unless ``allow_unauthenticated``) and the outcome is
    recorded sealed, bound to this set and manifest."""
    now = now or utc_now()
    key = authentication.RecordKey.from_file(passphrase_file, old_passphrase_files)
    if set_id is None:
        entries = list_catalog(repo, database, key=key)
        if not entries:
            raise IntegrityError(
                "no backup set%s found in %s"
                % (" of database %r" % database if database else "", repo.url),
                "run a backup first",
            )
        set_id = entries[0]["id"]
    checks = []
    try:
        manifest = load_manifest(repo, set_id, key)
    except authentication.OtherPassphraseError:
        # Most often the wrong passphrase file: an operator error must not mark the set.
        raise ConfigError(
            "the passphrase in %s does not open set %s: it was sealed with another passphrase "
            "(or forged)" % (passphrase_file, set_id),
            "use the passphrase file this set was written with; nothing was recorded",
        ) from None
    except IntegrityError as exc:
        checks.append(Check("manifest", FAIL, str(exc), "manifest.json"))
        return _finish(repo, set_id, checks, record, now, key=key)
    checks.append(
        Check(
            "manifest", OK, "manifest present and valid (%d artifacts)" % len(manifest["artifacts"])
        )
    )
    checks.append(_authentication_check(manifest, key, allow_unauthenticated))
    # Archived (GLACIER) artifacts are not damaged: say what to do, record nothing.
    check_readable_now(repo, manifest)
    encrypted = manifest["encryption"].get("method") != "none"
    # After a rotation, the passphrase the manifest names; for a set that names none,
    # each passphrase of the keyring in turn until one decrypts every artifact.
    candidates = [None]
    if deep and encrypted:
        if not passphrase_file:
            raise ConfigError(
                "set %s is encrypted: a passphrase_file is needed for the decrypt test" % set_id,
                "set passphrase_file, or deep: false for checksums only",
            )
        candidates = key.candidates_for(manifest)
    # File sets and base backups need tar, not PostgreSQL's tools (a web host may
    # have none).
    needs_pg = deep and manifest.get("kind") not in ("files", "basebackup")
    bin_dir = find_pg_bin_dir(None, pg_bin_dir) if needs_pg else None
    for index, passphrase in enumerate(candidates):
        gpg_session = pipeline.GpgSession(passphrase) if passphrase is not None else None
        try:
            artifact_checks = []
            for artifact in manifest["artifacts"]:
                artifact_checks.extend(
                    verify_artifact(repo, set_id, artifact, manifest, gpg_session, bin_dir, deep)
                )
        except ConfigError:
            # gpg's "Bad session key" on intact bytes: the next passphrase, if any.
            if index == len(candidates) - 1:
                raise
            continue
        finally:
            if gpg_session is not None:
                gpg_session.close()
        if index == len(candidates) - 1 or all(c.status != FAIL for c in artifact_checks):
            break
    checks.extend(artifact_checks)
    chain = file_chain.chain_check(repo, manifest, key)
    if chain is not None:
        checks.append(Check("chain", chain[0], chain[1]))
    if manifest.get("kind") == "basebackup":
        checks.append(_wal_check(repo, manifest, key, deep))
    if max_age_hours:
        age = (now - parse_time(manifest["finished_at"])).total_seconds() / 3600.0
        status = OK if age <= max_age_hours else FAIL
        checks.append(
            Check("age", status, "finished %.1f hours ago (limit %.1f)" % (age, max_age_hours))
        )
    if size_tolerance_percent:
        checks.append(size_check(repo, manifest, size_tolerance_percent, key=key))
    return _finish(repo, set_id, checks, record, now, manifest, key)


def _wal_check(repo, manifest, key, deep):
    """WAL continuity of a base backup in this repository: every segment from its
    start_wal to the newest archived one is there and usable (``deep``: its sha256 read
    back too); each gap is named."""
    cluster = manifest.get("cluster") or manifest["database"]
    try:
        records = wal.list_wal(repo, cluster, key, deep=deep)
        missing, first, last = basebackup.wal_continuity(manifest, records)
    except (ConfigError, IntegrityError) as exc:
        return Check(
            "wal_continuity", FAIL, "the WAL of cluster %r cannot be checked: %s" % (cluster, exc)
        )
    if missing:
        return Check(
            "wal_continuity",
            FAIL,
            "%d WAL file(s) missing or unusable between %s and %s: %s%s"
            % (
                len(missing),
                first,
                last,
                "; ".join(missing[:20]),
                " ..." if len(missing) > 20 else "",
            ),
        )
    return Check("wal_continuity", OK, "WAL continuous from %s to %s" % (first, last))


def _authentication_check(manifest, key, allow_unauthenticated):
    outcome = manifest_authentication(manifest, key)
    if outcome == authentication.AUTHENTICATED:
        return Check("authentication", OK, "manifest authenticated (MAC keyed from the passphrase)")
    if outcome == authentication.NOT_CHECKED:
        return Check(
            "authentication",
            WARN,
            "manifest MAC not checked: no passphrase_file given (the outcome is not recorded)",
        )
    return Check(
        "authentication",
        WARN if allow_unauthenticated else FAIL,
        "manifest carries no MAC: written before clinic.backup sealed its records, or planted "
        "by someone who can write to the repository%s"
        % ("" if allow_unauthenticated else " (allow_unauthenticated: true accepts it)"),
    )


def _finish(repo, set_id, checks, record, now, manifest=None, key=None):
    failed = [c for c in checks if c.status == FAIL]
    outcome = {
        "set_id": set_id,
        "repository": repo.url,
        "database": manifest["database"] if manifest else None,
        "state": "failed" if failed else "ok",
        "ok": not failed,
        "verified_at": isoformat(now),
        "checks": [c.as_dict() for c in checks],
        "failures": [c.detail for c in failed],
    }
    manifest_mac = authentication.record_mac(manifest) if manifest else None
    if record and key is None and manifest_mac is not None:
        # An unsealed record would replace a sealed one and count for nothing.
        record = False
        outcome["warnings"] = [
            "the result was not recorded: without passphrase_file it cannot be sealed"
        ]
    if record:
        data = {k: outcome[k] for k in ("state", "verified_at", "checks")}
        try:
            repo.write_verification(
                set_id,
                authentication.seal_for_set(data, key, "verification", set_id, manifest),
            )
        except (BackupError, OSError) as exc:
            outcome["warnings"] = ["could not record the verification result: %s" % exc]
    return outcome
