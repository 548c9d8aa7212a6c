# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Copy a backup set between repositories (local -> S3, S3 -> local, S3 -> S3).

Artifacts are streamed and their sha256 checked against the manifest on the
way; the manifest is written last, so an interrupted copy leaves no set at
the destination.  A set already present with the same manifest is left alone.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from . import authentication, pipeline
from .catalog import list_catalog, load_manifest
from .errors import BackupError, IntegrityError
from .repository import MANIFEST, dump_json


def resolve_set_id(repo, set_id=None, database=None):
    """The given id, or the newest complete set in ``repo``."""
    if set_id:
        return set_id
    for entry in list_catalog(repo, database):
        if entry["state"] == "complete":
            return entry["id"]
    raise IntegrityError(
        "no complete backup set%s in %s"
        % (" of database %r" % database if database else "", repo.url),
        "run a backup first",
    )


def same_set_present(source_manifest, dest, set_id):
    raw = dest.read_file(set_id, MANIFEST)
    if raw is None or raw != dump_json(source_manifest):
        return False
    return all(
        dest.artifact_size(set_id, a["file"]) == a["size"] for a in source_manifest["artifacts"]
    )


def copy_set(source, dest, set_id, check_mode=False):
    """Copy one set; returns {'changed', 'set_id', 'source', 'destination', 'artifacts'}."""
    manifest = load_manifest(source, set_id)
    result = {
        "set_id": set_id,
        "source": source.url,
        "destination": dest.url,
        "changed": False,
        "artifacts": [dest.location(set_id, a["file"]) for a in manifest["artifacts"]],
    }
    if same_set_present(manifest, dest, set_id):
        return result
    result["changed"] = True
    if check_mode:
        return result
    dest.check_writable()
    writer = dest.begin(set_id)
    try:
        for artifact in manifest["artifacts"]:
            sink = writer.sink(artifact["file"])
            reader = pipeline.HashingReader(source.open_artifact(set_id, artifact["file"]))
            try:
                pipeline.run_stream([], sink.write, source=reader)
                if reader.sha256 != artifact["sha256"] or reader.size != artifact["size"]:
                    raise IntegrityError(
                        "%s does not match its manifest (sha256 %s, %d bytes; expected %s, %d bytes)"
                        % (
                            source.location(set_id, artifact["file"]),
                            reader.sha256,
                            reader.size,
                            artifact["sha256"],
                            artifact["size"],
                        ),
                        "the source copy is damaged: copy another set or repair it from another repository",
                    )
                sink.close()
            finally:
                reader.fileobj.close()
        writer.commit(manifest)
    except BaseException:
        writer.abort()
        raise
    try:
        _update_pointer(source, dest, manifest["database"], set_id)
    except (BackupError, OSError):
        pass  # the pointer is a convenience; the catalog is built from manifests
    return result


def _update_pointer(source, dest, database, set_id):
    """Point dest's ``latest`` at its newest set. A sealed pointer can only be copied (no
    passphrase here): the source's, when it names that set; a sealed pointer at the
    destination is never replaced by an unsealed one."""
    newest = _newest_id(dest, database, set_id)
    pointer = source.read_latest_record(database)
    if pointer is not None and pointer.get("set_id") == newest:
        dest.write_latest(database, newest, pointer)
        return
    current = dest.read_latest_record(database)
    if current is None or authentication.record_mac(current) is None:
        dest.write_latest(database, newest)


def _newest_id(repo, database, fallback):
    for entry in list_catalog(repo, database):
        if entry["state"] == "complete":
            return entry["id"]
    return fallback
