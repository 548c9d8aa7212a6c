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
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import socket
import sys
import time

from . import authentication, pipeline
from .catalog import FORMAT_VERSION
from .errors import BackupError, ConfigError, StoreError, UnreachableError
from .repository import isoformat, utc_now
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


def filter_stages(options, gpg_session):
    stages = []
    if options.compress_argv:
        stages.append(pipeline.Stage(options.compression, options.compress_argv))
    if gpg_session is not None:
        argv, fd = gpg_session.encrypt_stage()
        stages.append(pipeline.Stage("gpg encryption", argv, pass_fds=(fd,)))
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
        result, locations = stream_artifact(
            self.targets, filename, list(producer_stages) + self.stages(), source
        )
        return {"file": filename, "size": result.size, "sha256": result.sha256}, locations

    def commit(self, manifest, name):
        """Seal and write the manifest last, then the pointer; returns (manifest, warnings)."""
        return commit_manifests(self.targets, manifest, name, self.set_id, self.key)

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
