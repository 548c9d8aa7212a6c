# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Manifests and the catalog built from them.

A set exists only through its manifest; the catalog lists sets newest first
with their verification state. A manifest that does not parse or lacks a
field is listed as ``corrupt`` so that verify can name it, and is never
chosen as "newest".
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


from . import authentication
from .errors import ConfigError, IntegrityError, StoreError
from .repository import (
    MANIFEST,
    RESTORE_TEST,
    VERIFICATION,
    check_file_name,
    load_json,
    parse_time,
)

FORMAT_VERSION = 1
REQUIRED_FIELDS = (
    "format_version",
    "id",
    "database",
    "format",
    "compression",
    "encryption",
    "artifacts",
    "started_at",
    "finished_at",
)
ARTIFACT_FIELDS = ("name", "file", "content", "size", "sha256")
COMPRESSIONS = ("zstd", "gzip", "none")
ENCRYPTIONS = ("gpg-symmetric", "none")
SHA256_LENGTH = 64


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(data, set_id):
    """Every field the engine reads has the type it expects: a manifest is data read
    back from storage, and one malformed set must not break the catalog of the others."""

    def bad(field, expected):
        raise IntegrityError(
            "manifest of %s has a malformed %s (%s expected, got %s)"
            % (set_id, field, expected, repr(data.get(field))[:80]),
            "the manifest was damaged or tampered with: use another set",
        )

    if not _is_int(data["format_version"]) or data["format_version"] < 1:
        bad("format_version", "a whole number")
    for field in ("id", "database", "format", "started_at", "finished_at"):
        if not isinstance(data[field], str) or not data[field]:
            bad(field, "a non-empty string")
    for field in ("started_at", "finished_at"):
        try:
            parse_time(data[field])
        except ValueError:
            bad(field, "a UTC time like 2026-11-22T01:00:00.000000Z")
    for field in ("kind", "label"):
        if data.get(field) is not None and not isinstance(data[field], str):
            bad(field, "a string")
    for field in ("options", "files", "server", "snapshot", "tool"):
        if data.get(field) is not None and not isinstance(data[field], dict):
            bad(field, "an object")
    compression = data["compression"]
    if not isinstance(compression, dict) or compression.get("algorithm") not in COMPRESSIONS:
        bad("compression", "an object whose algorithm is one of %s" % ", ".join(COMPRESSIONS))
    encryption = data["encryption"]
    if not isinstance(encryption, dict) or encryption.get("method") not in ENCRYPTIONS:
        bad("encryption", "an object whose method is one of %s" % ", ".join(ENCRYPTIONS))
    counts = data.get("row_counts")
    if counts is not None and (
        not isinstance(counts, dict)
        or not all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in counts.items())
    ):
        bad("row_counts", "an object of table names and whole numbers")
    if data.get("duration_seconds") is not None and (
        isinstance(data["duration_seconds"], bool)
        or not isinstance(data["duration_seconds"], (int, float))
    ):
        bad("duration_seconds", "a number")


def _check_artifact(artifact, set_id):
    if not isinstance(artifact, dict) or any(field not in artifact for field in ARTIFACT_FIELDS):
        raise IntegrityError("manifest of %s has a malformed artifact entry" % set_id)
    for field in ("name", "file", "content"):
        if not isinstance(artifact[field], str):
            raise IntegrityError(
                "manifest of %s has an artifact whose %s is not a string" % (set_id, field)
            )
    if not _is_int(artifact["size"]) or artifact["size"] < 0:
        raise IntegrityError(
            "manifest of %s records size %r for %s (a whole number expected)"
            % (set_id, artifact["size"], artifact["file"]),
            "the manifest was damaged or tampered with: use another set",
        )
    digest = artifact["sha256"]
    if (
        not isinstance(digest, str)
        or len(digest) != SHA256_LENGTH
        or digest.strip("0123456789abcdef")
    ):
        raise IntegrityError(
            "manifest of %s records a malformed sha256 for %s" % (set_id, artifact["file"])
        )
    check_file_name(artifact["file"])


def validate_manifest(data, set_id):
    """Return the manifest dict or raise IntegrityError naming what is wrong."""
    if not isinstance(data, dict):
        raise IntegrityError("manifest of %s is not a JSON object" % set_id)
    missing = [field for field in REQUIRED_FIELDS if field not in data]
    if missing:
        raise IntegrityError("manifest of %s lacks %s" % (set_id, ", ".join(missing)))
    if data["id"] != set_id:
        raise IntegrityError(
            "manifest of %s names another set (%r)" % (set_id, data["id"]),
            "the manifest was copied or tampered with",
        )
    if _is_int(data["format_version"]) and data["format_version"] > FORMAT_VERSION:
        raise IntegrityError(
            "manifest of %s has format %s, newer than this tool understands"
            % (set_id, data["format_version"]),
            "upgrade clinic.backup",
        )
    _check_types(data, set_id)
    if not isinstance(data["artifacts"], list) or not data["artifacts"]:
        raise IntegrityError("manifest of %s lists no artifacts" % set_id)
    for artifact in data["artifacts"]:
        _check_artifact(artifact, set_id)
    names = [a["name"] for a in data["artifacts"]]
    files = [a["file"] for a in data["artifacts"]]
    if len(set(files)) != len(files):
        raise IntegrityError("manifest of %s lists one artifact file twice" % set_id)
    kind = data.get("kind", "database")  # database manifests carry no kind
    if kind == "files":
        # A file set is one tar archive of files (and, in an incremental chain, the
        # index of its tree, alone when nothing changed: file_chain.py); it never holds
        # a database dump.
        if names not in (["files"], ["files", "index"], ["index"]):
            raise IntegrityError(
                "manifest of %s (a file set) does not list exactly one files artifact" % set_id,
                "the manifest was truncated or tampered with: use another set",
            )
    elif kind == "basebackup":
        # A base backup is one tar archive of a cluster's data directory.
        if names != ["base"]:
            raise IntegrityError(
                "manifest of %s (a base backup) does not list exactly one base artifact" % set_id,
                "the manifest was truncated or tampered with: use another set",
            )
    elif kind != "database":
        raise IntegrityError(
            "manifest of %s is of unknown kind %r" % (set_id, kind), "upgrade clinic.backup"
        )
    elif names.count("database") != 1:
        # Every set has exactly one database dump; a set without it restores nothing.
        raise IntegrityError(
            "manifest of %s does not list exactly one database artifact" % set_id,
            "the manifest was truncated or tampered with: use another set",
        )
    return data


def load_manifest(repo, set_id, key=None):
    """The validated manifest of ``set_id``; with ``key`` (authentication.RecordKey) a
    sealed manifest whose MAC fails raises IntegrityError like any other damage."""
    raw = repo.read_file(set_id, MANIFEST)
    if raw is None:
        raise IntegrityError(
            "backup set %s has no manifest in %s" % (set_id, repo.url),
            "a set without a manifest is incomplete: use another set",
        )
    try:
        data = load_json(raw)
    except ValueError as exc:
        raise IntegrityError(
            "manifest of %s in %s is not valid JSON: %s" % (set_id, repo.url, exc)
        ) from exc
    validate_manifest(data, set_id)
    authentication.require(data, key, "manifest", "manifest of %s in %s" % (set_id, repo.url))
    return data


def manifest_authentication(manifest, key):
    """authentication.AUTHENTICATED, UNSEALED or NOT_CHECKED for a loaded manifest."""
    return authentication.require(manifest, key, "manifest", "manifest of %s" % manifest["id"])


VERIFICATION_STATES = ("ok", "failed")


def load_verification(repo, set_id, manifest=None, key=None):
    """The verification record of a set as the catalog may trust it, or None.

    With ``key``: a sealed record counts only if its MAC holds and it names this set
    and this manifest (a record copied from another set is forged); an unsealed one
    counts only beside an unsealed manifest (a set written before records were
    sealed), otherwise the set is ``unverified``.
    """
    try:
        raw = repo.read_file(set_id, VERIFICATION)
    except StoreError as exc:
        return {"state": "unknown", "detail": "verification record unreadable: %s" % exc}
    if raw is None:
        return None
    try:
        record = load_json(raw)
    except ValueError:
        return {"state": "unknown", "detail": "verification record is not valid JSON"}
    if (
        not isinstance(record, dict)
        or record.get("state") not in VERIFICATION_STATES
        or not isinstance(record.get("verified_at"), str)
    ):
        return {"state": "unknown", "detail": "verification record is malformed"}
    if key is None:
        return record
    outcome, problem = authentication.check(record, key, "verification")
    if outcome is None:
        return {"state": "forged", "detail": "verification record %s" % problem}
    if outcome == authentication.UNSEALED:
        if manifest is not None and authentication.record_mac(manifest) is None:
            return record  # both written before sealing: the set itself is unauthenticated
        return {
            "state": "unverified",
            "detail": "verification record is not authenticated (written before records "
            "were sealed, or planted): verify the set again",
        }
    if not authentication.bound_to_set(record, set_id, manifest):
        return {
            "state": "forged",
            "detail": "verification record belongs to another set or manifest",
        }
    return record


def load_restore_test(repo, set_id, manifest=None, key=None):
    """The last successful restore test of a set (its measured RTO and RPO), or None.

    Trusted as a verification record is: with ``key`` only when sealed, bound to this set
    and manifest; anything else is ignored (a test is only evidence if it is ours)."""
    try:
        raw = repo.read_file(set_id, RESTORE_TEST)
        record = load_json(raw) if raw is not None else None
    except (StoreError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("tested_at"), str):
        return None
    if key is None:
        return record
    if authentication.check(record, key, "restore_test")[0] != authentication.AUTHENTICATED:
        return None
    if not authentication.bound_to_set(record, set_id, manifest):
        return None
    return record


def catalog_entry(repo, set_id, key=None):
    try:
        manifest = load_manifest(repo, set_id, key)
    except authentication.OtherPassphraseError as exc:
        return {
            "id": set_id,
            "state": "corrupt",
            "error": str(exc),
            "repository": repo.url,
            "other_passphrase": True,
        }
    except IntegrityError as exc:
        return {"id": set_id, "state": "corrupt", "error": str(exc), "repository": repo.url}
    except StoreError as exc:
        return {
            "id": set_id,
            "state": "corrupt",
            "error": "manifest of %s unreadable: %s" % (set_id, exc),
            "repository": repo.url,
        }
    verification = load_verification(repo, set_id, manifest, key)
    entry = {
        "id": set_id,
        "state": "complete",
        "repository": repo.url,
        "database": manifest["database"],
        "format": manifest["format"],
        "started_at": manifest["started_at"],
        "finished_at": manifest["finished_at"],
        "size": sum(a["size"] for a in manifest["artifacts"]),
        "encrypted": manifest["encryption"]["method"] != "none",
        # Which passphrase of the keyring encrypted it (an identifier; None before sets named it).
        "key_id": manifest["encryption"].get("key_id"),
        "authentication": manifest_authentication(manifest, key),
        "verification": verification.get("state") if verification else "unverified",
        "verified_at": verification.get("verified_at") if verification else None,
        "manifest": manifest,
    }
    if verification and verification.get("detail"):
        entry["verification_detail"] = verification["detail"]
    # S3 Object Lock on the manifest as the store enforces it (None: not locked).
    entry["object_lock"] = repo.object_lock_of(set_id)
    restore_test = load_restore_test(repo, set_id, manifest, key)
    entry["restore_tested_at"] = restore_test.get("tested_at") if restore_test else None
    if restore_test:
        entry["restore_test_rto_seconds"] = restore_test.get("rto_seconds")
        entry["restore_test_rpo_seconds"] = restore_test.get("rpo_seconds")
    return entry


def unusable_reason(entry, allow_unauthenticated=False):
    """Why a restore must not pick this catalog entry on its own, or None."""
    if entry["state"] != "complete":
        return entry.get("error", "corrupt")
    if entry.get("authentication") != authentication.AUTHENTICATED and not allow_unauthenticated:
        return (
            "not authenticated (%s): written before clinic.backup sealed its records, or "
            "planted by someone who can write to the repository; allow_unauthenticated: true "
            "takes it anyway"
            % (
                "no passphrase to check it with"
                if entry.get("authentication") == authentication.NOT_CHECKED
                else "it carries no MAC"
            )
        )
    return None


def check_passphrase_opens(entries, repo, passphrase_file):
    """When no set could be chosen: raise ConfigError if the reason is the passphrase (it
    opens no sealed set of these entries, and some were sealed under another key) rather
    than damage, so that the operator fixes the input instead of chasing damage."""
    if any(e.get("authentication") == authentication.AUTHENTICATED for e in entries):
        return
    other = [e["id"] for e in entries if e.get("other_passphrase")]
    if other:
        raise ConfigError(
            "the passphrase in %s opens none of the %d set(s) in %s that it should: they were "
            "sealed with another passphrase" % (passphrase_file, len(other), repo.url),
            "use the passphrase file these sets were written with (after a rotation, the old "
            "one); nothing was changed",
        )


def _order_key(entry):
    """Newest-first order: the set id's UTC second, then the manifest's start time to the
    microsecond (two sets started within one second must not be ordered by the random
    suffix of their ids), then the id."""
    try:
        started = entry["started_at"]
    except KeyError:
        started = ""  # corrupt: no manifest to read
    return (entry["id"][:16], started, entry["id"])


def list_catalog(repo, database=None, limit=None, key=None):
    """Catalog entries, newest first (by start time, then set id)."""
    entries = []
    for set_id in repo.set_ids():
        entry = catalog_entry(repo, set_id, key)
        if database is not None and entry.get("database", database) != database:
            continue
        entries.append(entry)
    entries.sort(key=_order_key, reverse=True)
    return entries[:limit] if limit is not None else entries


def newest_complete(repo, database=None, require_verified=False, key=None):
    """The newest set whose manifest is valid (and verified ok, if asked)."""
    for entry in list_catalog(repo, database, key=key):
        if entry["state"] != "complete":
            continue
        if require_verified and entry["verification"] != "ok":
            continue
        return entry
    return None
