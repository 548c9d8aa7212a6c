# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lifecycle every kind of backup set shares (database dumps, file sets, and any
kind added later), so that none of it is written twice:

1. ``check_targets``: every repository is reachable and writable, or the run stops
   before anything is written (an outage of some targets only is tolerated);
2. under the repository lock, ``prepare_targets``: layout, leftovers of killed runs;
3. ``SetWriting``: one writer per target; each artifact is streamed through the
   same stages (compression, gpg) into every healthy target at once
   (``stream_artifact``), a failing target is isolated from the others;
4. ``manifest_header`` + the kind's own fields, then ``commit``: the manifest is
   sealed and written last, the ``latest`` pointer after it;
5. ``failure``: what did not reach every target, as one error naming them.
Anything that goes wrong before the commit aborts every writer: no half set is
ever listed.

Reading a set back (restore of any kind) is one lifecycle too: ``ReadSession``
(the record key, one gpg session), ``choose_sets`` (newest first, passing over
damaged, unauthenticated, unencrypted and other kinds' sets, each with its reason;
an explicit set id checked by ``check_restorable`` before anything), ``stream_into``
(stored bytes -> sha256 -> gpg -> decompression -> the kind's consumer, the sha256
checked at the end) and ``try_newest_first`` (a damaged set falls back to the next
older one, anything else stops).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import socket
import sys
import time

from . import authentication, pipeline
from .catalog import (
    FORMAT_VERSION,
    check_passphrase_opens,
    list_catalog,
    load_manifest,
    manifest_authentication,
    unusable_reason,
)
from .errors import BackupError, ConfigError, IntegrityError, StoreError, UnreachableError
from .repository import check_set_id, isoformat, utc_now
from .units import human_duration, human_rate, human_size
from .version import TOOL_NAME, TOOL_VERSION


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


def stream_artifact(targets, filename, stages, source=None):
    """Run ``stages`` (fed from ``source``, an iterable of bytes, if given) into every
    healthy target; returns (StreamResult, {repository url: location})."""
    live = [t for t in targets if t.error is None]
    streams = [TargetStream(t.writer, filename) for t in live]
    result = pipeline.run_stream(stages, MultiTarget(streams), source=source, what=filename)
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
    encryption = manifest.get("encryption")
    if key is not None and isinstance(encryption, dict) and encryption.get("method") != "none":
        # Which passphrase encrypted the set (an identifier, never the key), sealed with the
        # rest: after a rotation, reading picks the right one from the keyring.
        manifest = dict(manifest, encryption=dict(encryption, key_id=key.passphrase_id()))
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


def filter_stages(options, gpg_session):
    stages = []
    if options.compress_argv:
        stages.append(pipeline.Stage(options.compression, options.compress_argv))
    if gpg_session is not None:
        stages.append(gpg_session.encryption())
    return stages


def check_targets(repositories):
    """{url: UnreachableError} of the targets that cannot be reached; raises when none
    can, or when one is misconfigured (missing bucket, bad credentials, not writable)."""
    if not repositories:
        raise ConfigError(
            "no backup target given", "set a local repository and/or at least one S3 target"
        )
    unreachable = {}
    for repo in repositories:
        try:
            repo.check_writable()
        except UnreachableError as exc:
            # An outage of one target must not cost the others tonight's backup;
            # a misconfiguration still stops here.
            unreachable[repo.url] = exc
    if len(unreachable) == len(repositories):
        raise next(iter(unreachable.values()))
    return unreachable


def manifest_header(kind, set_id, name, options, started, clock):
    """The manifest fields every kind of set has (the kind adds its own)."""
    return {
        "format_version": FORMAT_VERSION,
        "id": set_id,
        "kind": kind,
        "tool": {"name": TOOL_NAME, "version": TOOL_VERSION},
        "host": socket.gethostname(),
        "database": name,
        "label": options.label,
        "compression": {"algorithm": options.compression, "level": options.compression_level},
        "encryption": (
            {"method": "gpg-symmetric", "cipher": "AES256"}
            if options.encrypt
            else {"method": "none"}
        ),
        "started_at": isoformat(started),
        "finished_at": isoformat(utc_now()),
        "duration_seconds": round(time.time() - clock, 3),
    }


class SetWriting(object):
    """One set being written into every reachable target (a context manager).

    Leaving the block with an exception aborts every writer that did not commit;
    the gpg session is closed either way.
    """

    def __init__(self, repositories, unreachable, set_id, options, passphrase, key):
        self.set_id = set_id
        self.options = options
        self.key = key
        self.targets = [Target(repo) for repo in repositories]
        for target in self.targets:
            target.error = unreachable.get(target.repo.url)
        self.gpg_session = pipeline.GpgSession(passphrase) if passphrase else None
        self.stream_seconds = {}
        self.commit_seconds = None

    def __enter__(self):
        try:
            for target in self.targets:
                if target.error is None:
                    target.writer = target.repo.begin(self.set_id)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, traceback):
        try:
            if exc_type is not None:
                for target in self.targets:
                    if target.writer is not None and not target.committed:
                        target.writer.abort()
        finally:
            if self.gpg_session is not None:
                self.gpg_session.close()
                self.gpg_session = None
        return False

    def stages(self):
        """The compression and encryption stages every artifact goes through."""
        return filter_stages(self.options, self.gpg_session)

    def stream(self, filename, producer_stages, source=None):
        """Stream one artifact (``producer_stages`` then ours) into every healthy target;
        returns its artifact entry (without name and content) and its locations."""
        began = time.monotonic()
        result, locations = stream_artifact(
            self.targets, filename, list(producer_stages) + self.stages(), source
        )
        self.stream_seconds[filename] = round(time.monotonic() - began, 3)
        return {"file": filename, "size": result.size, "sha256": result.sha256}, locations

    def commit(self, manifest, name):
        """Seal and write the manifest last, then the pointer; returns (manifest, warnings)."""
        began = time.monotonic()
        try:
            return commit_manifests(self.targets, manifest, name, self.set_id, self.key)
        finally:
            self.commit_seconds = round(time.monotonic() - began, 3)

    def phases(self, **before):
        """How long each phase took, for the result: ``before`` (e.g. preflight_seconds,
        lock_seconds, measured by the kind), each artifact's stream, the commit."""
        phases = {k: round(v, 3) for k, v in before.items()}
        phases.update(stream_seconds=dict(self.stream_seconds), commit_seconds=self.commit_seconds)
        return phases

    @property
    def changed(self):
        return any(t.committed for t in self.targets)

    def reports(self):
        return [t.report() for t in self.targets]

    def failure(self, what):
        """(problem, hint) when some target did not get the set, else None."""
        failed = [t for t in self.targets if not t.committed]
        if not failed:
            return None
        return (
            "%s %s was not stored in %s: %s"
            % (
                what,
                self.set_id,
                ", ".join(t.repo.url for t in failed),
                "; ".join(str(t.error) for t in failed),
            ),
            "the set is complete in %s; the next run retries"
            % ", ".join(t.repo.url for t in self.targets if t.committed),
        )


def set_summary(what, result):
    """One line for a playbook's summary: ``what`` (e.g. "backup set"), the set, its
    size, how long it took and at what rate, and where it went."""
    return "%s %s - %s in %s (%s) into %s" % (
        what,
        result.get("set_id"),
        human_size(result.get("size")),
        human_duration(result.get("duration_seconds")),
        human_rate(result.get("size"), result.get("duration_seconds")),
        ", ".join(t["repository"] for t in result.get("targets") or [] if t.get("ok")) or "-",
    )


# ---------------------------------------------------------------------- reading sets back
UNENCRYPTED_REASON = "not encrypted: allow_unencrypted: true restores it"


def load_explicit(repo, set_id, key, options):
    """The manifest of a set asked for by id; a wrong passphrase is the operator's error."""
    try:
        return load_manifest(repo, set_id, key)
    except authentication.OtherPassphraseError:
        raise ConfigError(
            "the passphrase in %s does not open set %s: it was sealed with another passphrase "
            "(or forged)" % (options.passphrase_file, set_id),
            "use the passphrase file this set was written with; nothing was changed",
        ) from None


KIND_NAMES = {
    "database": "a database backup",
    "files": "a file set (uploads or configuration)",
    "basebackup": "a base backup of a whole cluster",
}
RESTORED_WITH = {
    "database": "backup_restore",
    "files": "files_restore",
    "basebackup": "the point-in-time restore (playbooks/dr_point_in_time.yml)",
}


def check_restorable(manifest, options, key, kind="database", name_option="database"):
    """Refuse a set of another kind or database, an unauthenticated or an unencrypted
    one unless this run allows it (ConfigError: the operator's call); returns warnings."""
    set_id = manifest["id"]
    if manifest.get("kind", "database") != kind:
        raise ConfigError(
            "set %s is %s, not %s"
            % (set_id, KIND_NAMES.get(manifest.get("kind"), "a database backup"), KIND_NAMES[kind]),
            "restore it with %s"
            % (
                "clinic.backup." + RESTORED_WITH[manifest.get("kind", "database")]
                if manifest.get("kind", "database") in ("database", "files")
                else RESTORED_WITH.get(manifest.get("kind"), "the tool that wrote it")
            ),
        )
    wanted = getattr(options, name_option, None)
    if wanted is not None and manifest["database"] != wanted:
        raise ConfigError(
            "set %s is a backup of %r, not of %r" % (set_id, manifest["database"], wanted),
            "leave %s out or give the set's own %s" % (name_option, name_option),
        )
    warnings = []
    outcome = manifest_authentication(manifest, key)
    if outcome != authentication.AUTHENTICATED:
        if not options.allow_unauthenticated:
            raise ConfigError(
                "set %s is not authenticated (%s)"
                % (
                    set_id,
                    "no passphrase_file to check it with"
                    if outcome == authentication.NOT_CHECKED
                    else "its manifest carries no MAC",
                ),
                "it was written before clinic.backup sealed its records, or planted by someone "
                "who can write to the repository: if you know it is yours, restore it with "
                "allow_unauthenticated: true",
            )
        warnings.append(
            "set %s is NOT authenticated: nothing proves it was written by clinic.backup with "
            "this passphrase (restored because allow_unauthenticated is set)" % set_id
        )
    if manifest["encryption"]["method"] == "none":
        if not options.allow_unencrypted:
            raise ConfigError(
                "set %s is not encrypted" % set_id,
                "anyone with access to the repository could read or rewrite it: if you know it "
                "is yours, restore it with allow_unencrypted: true",
            )
        warnings.append(
            "set %s is not encrypted (restored because allow_unencrypted is set)" % set_id
        )
    return warnings


def decode_stages(manifest, gpg_session):
    stages = []
    if manifest["encryption"].get("method") != "none":
        stages.append(gpg_session.decryption())
    decompress = pipeline.decompress_argv(manifest["compression"]["algorithm"])
    if decompress:
        stages.append(pipeline.Stage("decompression", decompress))
    return stages


def stream_into(repo, set_id, artifact, manifest, gpg_session, last_stage=None, consumer=None):
    """Stream one stored artifact through gpg/decompression into ``last_stage``
    (a process reading stdin) or ``consumer``; check its sha256 at the end."""
    name = artifact["file"]
    reader = pipeline.HashingReader(repo.open_artifact(set_id, name))
    stages = decode_stages(manifest, gpg_session)
    if last_stage is not None:
        stages.append(last_stage)
    failure = None
    try:
        pipeline.run_stream(
            stages, consumer or (lambda chunk: None), source=reader, what="reading " + name
        )
    except BackupError as exc:
        failure = exc
        # A consumer that stopped early (pg_restore on its first error) left bytes
        # unread: hash them too, so a good set is never blamed for a bad server.
        for _chunk in reader:
            pass
    finally:
        reader.fileobj.close()
    intact = reader.sha256 == artifact["sha256"] and reader.size == artifact["size"]
    if failure is not None:
        if intact and "Bad session key" in str(failure):
            raise ConfigError(
                "the passphrase does not decrypt %s" % repo.location(set_id, name),
                "use the passphrase this set was encrypted with; the set is intact",
            )
        if not intact and reader.size:
            # Damaged bytes make gpg/zstd/pg_restore fail: name the cause, not the symptom.
            raise IntegrityError(
                "%s does not match its manifest (sha256 %s, %d bytes read): %s"
                % (repo.location(set_id, name), reader.sha256, reader.size, failure)
            )
        raise failure
    if not intact:
        raise IntegrityError(
            "%s has sha256 %s (%d bytes), manifest says %s (%d bytes)"
            % (
                repo.location(set_id, name),
                reader.sha256,
                reader.size,
                artifact["sha256"],
                artifact["size"],
            )
        )
    return reader.size


def check_readable_now(repo, manifest):
    """Refuse, with the exact action, a set whose artifacts sit in archive storage
    (S3 GLACIER / DEEP_ARCHIVE): it is not damaged, and an older set is no better."""
    files = [a["file"] for a in manifest["artifacts"]]
    archived = repo.archived_artifacts(manifest["id"], files)
    if archived:
        raise StoreError(
            "set %s is in archive storage: %s cannot be read before S3 restores them"
            % (manifest["id"], ", ".join(repo.location(manifest["id"], f) for f in archived)),
            "request a restore of each, e.g. aws s3api restore-object --bucket BUCKET --key KEY "
            "--restore-request Days=7, and run again once it finished (hours for GLACIER); "
            "manifests stay readable, so the catalog still lists the set",
        )


RESTORE_MODES = ("create", "replace", "rehearse")


class ReadOptions(object):
    """What a restore of any kind chooses and allows (see choose_sets, check_restorable);
    the kind's options class adds where the set goes."""

    def _set_read_options(
        self,
        mode="create",
        set_id=None,
        passphrase_file=None,
        fallback=True,
        allow_unauthenticated=False,
        allow_unencrypted=False,
        old_passphrase_files=(),
    ):
        if mode not in RESTORE_MODES:
            raise ConfigError(
                "unknown restore mode %r" % (mode,), "choose create, replace or rehearse"
            )
        if set_id is not None:
            check_set_id(set_id)
        self.mode = mode
        self.set_id = set_id
        self.passphrase_file = passphrase_file
        self.old_passphrase_files = list(old_passphrase_files or ())
        # An explicit set is that set: never an older one instead.
        self.fallback = bool(fallback) and set_id is None
        # Both are decisions for one run, never defaults: a set without a MAC may be
        # planted, and an unencrypted one was readable (and writable) by anyone with
        # access to the repository.
        self.allow_unauthenticated = bool(allow_unauthenticated)
        self.allow_unencrypted = bool(allow_unencrypted)


class ReadSession(object):
    """What reading the sets of one run needs: the key that authenticates their records,
    and one gpg session from the first encrypted set on (a context manager)."""

    def __init__(self, passphrase_file, old_passphrase_files=()):
        self.passphrase_file = passphrase_file
        self.key = authentication.RecordKey.from_file(passphrase_file, old_passphrase_files)
        self._gpg = {}

    def gpg_for(self, manifest, repo=None):
        """The gpg session that decrypts ``manifest``'s artifacts (None: not encrypted),
        with the passphrase that encrypted it (after a rotation, an older one): the one
        its manifest names, or for a set that names none (and ``repo`` to read it from),
        the first of the keyring that decrypts its smallest artifact."""
        if manifest["encryption"]["method"] == "none":
            return None
        if self.key is None:
            raise ConfigError(
                "set %s is encrypted: a passphrase_file is needed to restore it" % manifest["id"],
                "set passphrase_file to the 0600 file the backups were made with",
            )
        candidates = self.key.candidates_for(manifest)
        passphrase = candidates[0]
        if len(candidates) > 1 and repo is not None:
            passphrase = self._probe(repo, manifest, candidates)
        if passphrase not in self._gpg:
            self._gpg[passphrase] = pipeline.GpgSession(passphrase)
        return self._gpg[passphrase]

    def _probe(self, repo, manifest, candidates):
        smallest = min(manifest["artifacts"], key=lambda a: a["size"])
        for passphrase in candidates:
            if passphrase not in self._gpg:
                self._gpg[passphrase] = pipeline.GpgSession(passphrase)
            try:
                stream_into(repo, manifest["id"], smallest, manifest, self._gpg[passphrase])
            except ConfigError:
                continue  # gpg's "Bad session key": not this passphrase
            except BackupError:
                break  # damaged: the restore itself names it
            return passphrase
        return candidates[0]

    def close(self):
        for session in self._gpg.values():
            session.close()
        self._gpg = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def choose_sets(repo, session, options, kind, name_option, accept=None):
    """(set ids to try, newest first; catalog entries passed over and why; the entries).

    ``options`` carries set_id, allow_unauthenticated, allow_unencrypted and the name
    attribute ``name_option`` (database, or a file group's name); ``accept(entry)``
    returns why a complete, usable entry must still be passed over (verified only, not
    after a moment), or None. An explicit set id is checked and refused before anything.
    """
    if options.set_id is not None:
        check_set_id(options.set_id)
        manifest = load_explicit(repo, options.set_id, session.key, options)
        check_restorable(manifest, options, session.key, kind, name_option)
        return [options.set_id], [], []
    chosen, passed = [], []
    entries = list_catalog(repo, getattr(options, name_option), key=session.key)
    for entry in entries:
        if entry["state"] == "complete" and entry["manifest"].get("kind", "database") != kind:
            continue  # another kind's set: its own restore's business
        reason = unusable_reason(entry, options.allow_unauthenticated)
        if reason is None and not entry["encrypted"] and not options.allow_unencrypted:
            reason = UNENCRYPTED_REASON
        if reason is None and accept is not None:
            reason = accept(entry)
        if reason is not None:
            passed.append({"set_id": entry["id"], "reason": reason})
            continue
        chosen.append(entry["id"])
    if not chosen:
        check_passphrase_opens(entries, repo, options.passphrase_file)
    return chosen, passed, entries


def try_newest_first(set_ids, attempt, fallback, what):
    """Run ``attempt(set_id)`` on each set in turn until one succeeds; returns (its result,
    the sets found damaged before it). ``attempt`` cleans up after itself when it fails.

    A damaged set (IntegrityError) is passed over for the next older one when
    ``fallback``; anything else (bad input, the server, the passphrase) stops at once: an
    older set would fail the same way, and older data must never be taken silently.
    """
    damaged = []
    for set_id in set_ids:
        try:
            return attempt(set_id), damaged
        except IntegrityError as exc:
            if not fallback:
                raise
            damaged.append({"set_id": set_id, "reason": str(exc)})
        except BackupError as exc:
            if damaged:
                exc.hint = (
                    ((exc.hint + "; ") if exc.hint else "")
                    + "damaged before: "
                    + "; ".join("%(set_id)s (%(reason)s)" % d for d in damaged)
                )
            raise
    raise IntegrityError(
        "no backup set could be restored into %s" % what,
        "tried: %s" % "; ".join("%(set_id)s (%(reason)s)" % d for d in damaged),
    )
