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

import json

from .errors import IntegrityError
from .repository import MANIFEST, VERIFICATION, check_file_name

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


def validate_manifest(data, set_id):
    """Return the manifest dict or raise IntegrityError naming what is wrong."""
    if not isinstance(data, dict):
        raise IntegrityError("manifest of %s is not a JSON object" % set_id)
    missing = [field for field in REQUIRED_FIELDS if field not in data]
    if missing:
        raise IntegrityError("manifest of %s lacks %s" % (set_id, ", ".join(missing)))
    if data["id"] != set_id:
        raise IntegrityError(
            "manifest of %s names another set (%s)" % (set_id, data["id"]),
            "the manifest was copied or tampered with",
        )
    if data["format_version"] > FORMAT_VERSION:
        raise IntegrityError(
            "manifest of %s has format %s, newer than this tool understands"
            % (set_id, data["format_version"]),
            "upgrade clinic.backup",
        )
    if not isinstance(data["artifacts"], list) or not data["artifacts"]:
        raise IntegrityError("manifest of %s lists no artifacts" % set_id)
    for artifact in data["artifacts"]:
        if not isinstance(artifact, dict) or any(
            field not in artifact for field in ARTIFACT_FIELDS
        ):
            raise IntegrityError("manifest of %s has a malformed artifact entry" % set_id)
        check_file_name(artifact["file"])
    names = [a["name"] for a in data["artifacts"]]
    kind = data.get("kind", "database")  # database manifests carry no kind
    if kind == "files":
        # A file set is one tar archive of files; it never holds a database dump.
        if names != ["files"]:
            raise IntegrityError(
                "manifest of %s (a file set) does not list exactly one files artifact" % set_id,
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


def load_manifest(repo, set_id):
    raw = repo.read_file(set_id, MANIFEST)
    if raw is None:
        raise IntegrityError(
            "backup set %s has no manifest in %s" % (set_id, repo.url),
            "a set without a manifest is incomplete: use another set",
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(
            "manifest of %s in %s is not valid JSON: %s" % (set_id, repo.url, exc)
        ) from exc
    return validate_manifest(data, set_id)


def load_verification(repo, set_id):
    raw = repo.read_file(set_id, VERIFICATION)
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {"state": "unknown", "detail": "verification record is not valid JSON"}


def catalog_entry(repo, set_id):
    try:
        manifest = load_manifest(repo, set_id)
    except IntegrityError as exc:
        return {"id": set_id, "state": "corrupt", "error": str(exc), "repository": repo.url}
    verification = load_verification(repo, set_id)
    return {
        "id": set_id,
        "state": "complete",
        "repository": repo.url,
        "database": manifest["database"],
        "format": manifest["format"],
        "started_at": manifest["started_at"],
        "finished_at": manifest["finished_at"],
        "size": sum(a["size"] for a in manifest["artifacts"]),
        "encrypted": manifest["encryption"].get("method") != "none",
        "verification": verification.get("state") if verification else "unverified",
        "verified_at": verification.get("verified_at") if verification else None,
        "manifest": manifest,
    }


def _order_key(entry):
    """Newest-first order: the set id's UTC second, then the manifest's start time to the
    microsecond (two sets started within one second must not be ordered by the random
    suffix of their ids), then the id."""
    try:
        started = entry["started_at"]
    except KeyError:
        started = ""  # corrupt: no manifest to read
    return (entry["id"][:16], started, entry["id"])


def list_catalog(repo, database=None, limit=None):
    """Catalog entries, newest first (by start time, then set id)."""
    entries = []
    for set_id in repo.set_ids():
        entry = catalog_entry(repo, set_id)
        if database is not None and entry.get("database", database) != database:
            continue
        entries.append(entry)
    entries.sort(key=_order_key, reverse=True)
    return entries[:limit] if limit is not None else entries


def newest_complete(repo, database=None, require_verified=False):
    """The newest set whose manifest is valid (and verified ok, if asked)."""
    for entry in list_catalog(repo, database):
        if entry["state"] != "complete":
            continue
        if require_verified and entry["verification"] != "ok":
            continue
        return entry
    return None
