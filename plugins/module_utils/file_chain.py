# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Incremental file sets: a chain of one full set and sets that store only what changed.

Like restic's parent snapshot and borg's files cache, a file whose size, mtime, ctime
and inode match the previous set's record is not read again; unlike them there is no
chunk store: every set stays two plain artifacts a person can open with gpg, zstd and
tar (the README's hand-restore procedure), as the runbook's rsync ``--backup-dir``
layout could be read by hand.

A set of a chain (``incremental: true``) holds:

* ``files``: a tar of its new and modified regular files, and of every directory and
  symbolic link of the tree (headers only: they make the sets, extracted in chain
  order over one directory, reproduce directory modes and times);
* ``index``: a tar of two members, ``index.jsonl`` (every path of the tree with its
  type, mode, owner, mtime, size, sha256 and the set holding its bytes) and
  ``deleted`` (the archive names gone since the previous set, NUL-separated, for the
  hand procedure), compressed and encrypted like the files.

The manifest's ``files.chain`` record (sealed with the manifest) names the full set,
the parent and every set before it with the MAC of its manifest: a set restores only
if every set of its chain is there and is the very set it was taken against.
``full_every`` caps the chain: every N-th set is a full set again.

File names may be patient data: they are only in the encrypted index, never in the
manifest.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import io
import json
import re
import tarfile

from . import authentication
from .catalog import load_manifest, manifest_authentication
from .errors import BackupError, ConfigError, IntegrityError
from .lifecycle import stream_into
from .tarsafety import unsafe_link, unsafe_member

INDEX = "index"
INDEX_CONTENT = "files-index"
INDEX_MEMBER = "index.jsonl"
DELETED_MEMBER = "deleted"
INDEX_FORMAT = "clinic.backup file index"
INDEX_VERSION = 1
FULL, INCREMENTAL = "full", "incremental"
DEFAULT_FULL_EVERY = 24
MAX_FULL_EVERY = 1000
TYPES = ("f", "d", "l")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# An index is read whole into memory: refuse absurd sizes (about 300 bytes an entry).
MAX_INDEX_BYTES = 2 * 1024 * 1024 * 1024


def check_full_every(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_FULL_EVERY:
        raise ConfigError(
            "full_every must be a whole number from 1 to %d (got %r)" % (MAX_FULL_EVERY, value),
            "e.g. 24: with hourly runs, one full set a day and incremental sets in between",
        )
    return value


def index_file(name, suffix, encrypt):
    return name + ".index.tar" + suffix + (".gpg" if encrypt else "")


# ---------------------------------------------------------------------- the chain record
def chain_of(manifest):
    """The manifest's chain record (dict) or None for a set outside any chain; raises
    IntegrityError for a malformed one."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    chain = files.get("chain") if isinstance(files, dict) else None
    if chain is None:
        return None
    set_id = manifest.get("id")
    sets, macs = (chain.get("sets"), chain.get("macs")) if isinstance(chain, dict) else (0, 0)
    if (
        not isinstance(chain, dict)
        or chain.get("level") not in (FULL, INCREMENTAL)
        or not isinstance(sets, list)
        or not isinstance(macs, list)
        or len(sets) != len(macs)
        or not all(isinstance(s, str) and s for s in sets)
        or not all(m is None or isinstance(m, str) for m in macs)
        or (chain["level"] == FULL) != (not sets)
        or set_id in sets
        or len(set(sets)) != len(sets)
    ):
        raise IntegrityError(
            "manifest of %s has a malformed chain record" % set_id,
            "the manifest was damaged or tampered with: use another set",
        )
    names = [a.get("name") for a in manifest.get("artifacts", ())]
    if INDEX not in names:
        raise IntegrityError("set %s of a chain has no index artifact" % set_id)
    return chain


def dependencies(manifest):
    """The sets ``manifest``'s set needs to restore, oldest first ([] if none or malformed)."""
    try:
        chain = chain_of(manifest)
    except IntegrityError:
        return []
    return list(chain["sets"]) if chain else []


def level(manifest):
    """FULL, INCREMENTAL, or None (a set outside any chain)."""
    try:
        chain = chain_of(manifest)
    except IntegrityError:
        return None
    return chain["level"] if chain else None


def load_chain(repo, manifest, key):
    """The manifests of the sets ``manifest`` builds on, oldest first, each checked to be
    the very set it was taken against; IntegrityError naming the first missing one."""
    chain = chain_of(manifest)
    if not chain:
        return []
    set_id = manifest["id"]
    loaded = []
    for position, (parent_id, mac) in enumerate(zip(chain["sets"], chain["macs"])):
        try:
            parent = load_manifest(repo, parent_id, key)
        except IntegrityError as exc:
            raise IntegrityError(
                "set %s cannot be restored: it builds on set %s, which is missing or damaged "
                "in %s (%s)" % (set_id, parent_id, repo.url, exc),
                "restore a set older than %s, or the first full set taken after it; "
                "backup_verify names every broken chain" % parent_id,
            ) from None
        parent_chain = chain_of(parent)
        if (
            parent.get("kind") != manifest.get("kind")
            or parent["database"] != manifest["database"]
            or authentication.record_mac(parent) != mac
            or parent_chain is None
            or parent_chain["sets"] != chain["sets"][:position]
        ):
            raise IntegrityError(
                "set %s cannot be restored: set %s in %s is not the set it was taken against"
                % (set_id, parent_id, repo.url),
                "the repository was altered: restore a full set you trust",
            )
        loaded.append(parent)
    return loaded


# ---------------------------------------------------------------------- the index
def entry_for(name, kind, info, link=None):
    """The index entry of one tar member (``info``: os.stat_result)."""
    entry = {
        "name": name,
        "type": kind,
        "mode": info.st_mode & 0o7777,
        "uid": info.st_uid,
        "gid": info.st_gid,
        "mtime": int(info.st_mtime),
    }
    if link is not None:
        entry["link"] = link
    return entry


def stamp_of(info):
    """What says a file is unchanged (restic's and borg's choice: size, mtime, ctime,
    inode); ctime moves on any write, chmod or chown, and cannot be set back."""
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def encode_index(set_id, entries, deleted):
    """The bytes of the index artifact (before compression and encryption): a tar of
    ``index.jsonl`` and ``deleted``."""
    lines = [
        json.dumps(
            {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "set_id": set_id,
                "entries": len(entries),
            },
            sort_keys=True,
        )
    ]
    lines.extend(json.dumps(entry, sort_keys=True, ensure_ascii=True) for entry in entries)
    index = ("\n".join(lines) + "\n").encode("ascii")
    gone = b"".join(name.encode("utf-8", "surrogateescape") + b"\0" for name in deleted)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for member, data in ((INDEX_MEMBER, index), (DELETED_MEMBER, gone)):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o600
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


class IndexCollector(object):
    """Stream consumer keeping an index artifact's (decoded) bytes."""

    def __init__(self):
        self.parts = []
        self.size = 0

    def __call__(self, chunk):
        self.size += len(chunk)
        if self.size > MAX_INDEX_BYTES:
            raise IntegrityError("the index artifact is larger than any index this tool writes")
        self.parts.append(chunk)

    def data(self):
        return b"".join(self.parts)


def _bad(set_id, what):
    return IntegrityError(
        "the index of set %s is malformed: %s" % (set_id, what),
        "the set was damaged or tampered with: use another set",
    )


def _int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def decode_index(data, set_id, holders):
    """(entries in archive order, deleted names) of an index artifact's bytes, every
    entry checked (``holders``: the sets a file's bytes may come from)."""
    members = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for info in archive:
                if info.name in members or info.name not in (INDEX_MEMBER, DELETED_MEMBER):
                    raise _bad(set_id, "unexpected member %r" % info.name)
                if not info.isreg():
                    raise _bad(set_id, "member %r is not a file" % info.name)
                members[info.name] = archive.extractfile(info).read()
    except (tarfile.TarError, EOFError, ValueError) as exc:
        raise _bad(set_id, "not a readable tar (%s)" % exc) from None
    if set(members) != {INDEX_MEMBER, DELETED_MEMBER}:
        raise _bad(
            set_id,
            "it lacks %s" % " and ".join(sorted({INDEX_MEMBER, DELETED_MEMBER} - set(members))),
        )
    try:
        lines = members[INDEX_MEMBER].decode("ascii").splitlines()
        header = json.loads(lines[0]) if lines else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad(set_id, "its header is not JSON") from None
    if (
        not isinstance(header, dict)
        or header.get("format") != INDEX_FORMAT
        or header.get("version") != INDEX_VERSION
        or header.get("set_id") != set_id
        or header.get("entries") != len(lines) - 1
    ):
        raise _bad(set_id, "its header does not describe an index of this set")
    entries, names = [], set()
    for number, line in enumerate(lines[1:], 2):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            raise _bad(set_id, "line %d is not JSON" % number) from None
        problem = _entry_problem(entry, holders)
        if problem is None and entry["name"] in names:
            problem = "it lists %r twice" % entry["name"]
        if problem:
            raise _bad(set_id, "line %d: %s" % (number, problem))
        names.add(entry["name"])
        entries.append(entry)
    deleted = [
        name.decode("utf-8", "surrogateescape")
        for name in members[DELETED_MEMBER].split(b"\0")[:-1]
    ]
    if members[DELETED_MEMBER] and not members[DELETED_MEMBER].endswith(b"\0"):
        raise _bad(set_id, "its deleted list is truncated")
    for name in deleted:
        why = unsafe_member(name) if name else "empty name"
        if why:
            raise _bad(set_id, "deleted name %r is unsafe (%s)" % (name, why))
    return entries, deleted


def _entry_problem(entry, holders):
    if not isinstance(entry, dict):
        return "not an object"
    name = entry.get("name")
    if not isinstance(name, str) or not name or "\0" in name or name.endswith("/"):
        return "malformed name"
    why = unsafe_member(name)
    if why:
        return "name %r is unsafe (%s)" % (name, why)
    kind = entry.get("type")
    if kind not in TYPES:
        return "%r has an unknown type" % name
    if not all(_int(entry.get(field)) for field in ("mode", "uid", "gid", "mtime")):
        return "%r has a malformed mode, owner or mtime" % name
    if kind == "l":
        why = (
            unsafe_link(name, entry.get("link"))
            if isinstance(entry.get("link"), str)
            else "no target"
        )
        if why:
            return "link %r is unsafe (%s)" % (name, why)
    if kind == "f":
        if not _int(entry.get("size")):
            return "%r has a malformed size" % name
        if not isinstance(entry.get("sha256"), str) or not _HEX64.fullmatch(entry["sha256"]):
            return "%r has a malformed sha256" % name
        if entry.get("set") not in holders:
            return "%r is held by set %r, which is not in the chain" % (name, entry.get("set"))
    return None


def index_artifact(manifest):
    return next((a for a in manifest["artifacts"] if a["name"] == INDEX), None)


def read_index(repo, manifest, gpg_session):
    """(entries, deleted) of a chain set, its artifact's sha256 checked."""
    artifact = index_artifact(manifest)
    if artifact is None:
        raise IntegrityError("set %s of a chain has no index artifact" % manifest["id"])
    collector = IndexCollector()
    stream_into(repo, manifest["id"], artifact, manifest, gpg_session, consumer=collector)
    holders = set(dependencies(manifest)) | {manifest["id"]}
    return decode_index(collector.data(), manifest["id"], holders)


def summarize(entries):
    """Counts of a whole tree as the manifest records them."""
    files = [e for e in entries if e["type"] == "f"]
    return {
        "count": len(files),
        "bytes": sum(e["size"] for e in files),
        "directories": sum(1 for e in entries if e["type"] == "d"),
        "symlinks": sum(1 for e in entries if e["type"] == "l"),
    }


def deleted_names(previous, entries):
    """Names of the previous set gone from ``entries`` or now of another type, in the
    previous set's order (a directory before what was inside it)."""
    now = {e["name"]: e["type"] for e in entries}
    return [name for name, entry in previous.items() if now.get(name) != entry["type"]]


# ---------------------------------------------------------------------- choosing a parent
class Parent(object):
    """The set a new incremental set builds on: its manifest, the chain record the new
    set gets, and the previous index by name."""

    def __init__(self, manifest, entries):
        self.manifest = manifest
        self.entries = {e["name"]: e for e in entries}
        chain = chain_of(manifest)
        self.sets = list(chain["sets"]) + [manifest["id"]]
        self.macs = list(chain["macs"]) + [authentication.record_mac(manifest)]


def full_chain_record():
    return {"level": FULL, "sets": [], "macs": []}


def choose_parent(repositories, unreachable, options, key, gpg_session):
    """(Parent or None, why a full set is taken instead or None)."""
    reachable = [r for r in repositories if r.url not in unreachable]
    # Read the index from a local copy when there is one: no download.
    reachable.sort(key=lambda r: r.kind != "local")
    first = reachable[0]
    try:
        parent_id = first.read_latest(options.name, key)
        if parent_id is None:
            return None, "no earlier set of %r in %s" % (options.name, first.url)
        manifest = load_manifest(first, parent_id, key)
        outcome = manifest_authentication(manifest, key)
        expected = authentication.NOT_CHECKED if key is None else authentication.AUTHENTICATED
        chain = chain_of(manifest)
        if manifest.get("kind") != "files" or manifest["database"] != options.name:
            return None, "the newest set of %r is not a file set of that name" % options.name
        if outcome != expected:
            return None, "the newest set %s is not authenticated with this passphrase" % parent_id
        if chain is None:
            return None, "the newest set %s is not part of a chain" % parent_id
        if manifest.get("options") != options.describe():
            return None, "the paths or exclude patterns changed since set %s" % parent_id
        if (manifest["encryption"]["method"] != "none") != bool(options.encrypt):
            return None, "encryption changed since set %s" % parent_id
        if len(chain["sets"]) + 2 > options.full_every:
            return None, "the chain of %s reached full_every (%d sets)" % (
                parent_id,
                options.full_every,
            )
        parent = Parent(manifest, [])
        for repo in reachable:
            problem = _chain_problem(repo, parent, key)
            if problem:
                return None, problem
        entries, _deleted = read_index(first, manifest, gpg_session)
    except BackupError as exc:
        return None, "the previous set could not be used as a parent: %s" % exc
    return Parent(manifest, entries), None


def _chain_problem(repo, parent, key):
    """Why ``parent``'s chain is not complete in ``repo`` (then a full set is taken), or None."""
    for set_id, mac in zip(parent.sets, parent.macs):
        try:
            manifest = load_manifest(repo, set_id, key)
        except BackupError as exc:
            return "set %s of the chain is missing or damaged in %s (%s)" % (set_id, repo.url, exc)
        if authentication.record_mac(manifest) != mac:
            return "set %s in %s is not the set the chain was taken against" % (set_id, repo.url)
        for artifact in manifest["artifacts"]:
            if repo.artifact_size(set_id, artifact["file"]) != artifact["size"]:
                return "%s is missing or of the wrong size" % repo.location(
                    set_id, artifact["file"]
                )
    return None


# ---------------------------------------------------------------------- verify
class ContentCheck(object):
    """verify's consumer of an index artifact: keeps its bytes, then judges them against
    the manifest."""

    def __init__(self, manifest):
        self.manifest = manifest
        self.collector = IndexCollector()
        self.size = 0

    def __call__(self, chunk):
        self.size += len(chunk)
        self.collector(chunk)

    def judge(self):
        manifest = self.manifest
        set_id = manifest["id"]
        try:
            holders = set(dependencies(manifest)) | {set_id}
            entries, deleted = decode_index(self.collector.data(), set_id, holders)
        except IntegrityError as exc:
            return "fail", str(exc)
        files = manifest.get("files") or {}
        tree = summarize(entries)
        own = [e for e in entries if e["type"] == "f" and e.get("set") == set_id]
        expected_tree = files.get("tree")
        if expected_tree != tree:
            return "fail", "the index lists %s, the manifest records %s" % (tree, expected_tree)
        if len(own) != files.get("count") or sum(e["size"] for e in own) != files.get("bytes"):
            return (
                "fail",
                "the index says this set holds %d files (%d bytes), the manifest %s (%s)"
                % (
                    len(own),
                    sum(e["size"] for e in own),
                    files.get("count"),
                    files.get("bytes"),
                ),
            )
        if len(deleted) != files.get("deleted"):
            return "fail", "the index lists %d deleted names, the manifest %s" % (
                len(deleted),
                files.get("deleted"),
            )
        return "ok", "index lists %d entries (%d files, %d held by this set), %d deleted" % (
            len(entries),
            tree["count"],
            len(own),
            len(deleted),
        )


def chain_check(repo, manifest, key):
    """(status, detail) of a chain set's chain in ``repo``, or None outside a chain."""
    try:
        chain = chain_of(manifest)
    except IntegrityError as exc:
        return "fail", str(exc)
    if chain is None:
        return None
    if not chain["sets"]:
        return "ok", "full set: the start of its chain"
    try:
        parents = load_chain(repo, manifest, key)
    except IntegrityError as exc:
        return "fail", str(exc)
    for parent in parents:
        for artifact in parent["artifacts"]:
            if repo.artifact_size(parent["id"], artifact["file"]) != artifact["size"]:
                return "fail", (
                    "set %s cannot be restored: %s, which it builds on, is missing or of the "
                    "wrong size" % (manifest["id"], repo.location(parent["id"], artifact["file"]))
                )
    return "ok", "the %d set(s) it builds on are present: %s" % (
        len(parents),
        ", ".join(chain["sets"]),
    )
