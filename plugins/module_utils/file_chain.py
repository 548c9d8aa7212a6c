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

A run first compares an lstat walk of the tree with the parent's ``fingerprint`` (a MAC,
keyed from the passphrase, of every entry's name, type, mode, owner, mtime, size and
stamp): when nothing changed, the new set is the parent's index artifact copied as
stored (``index_from`` names the set that wrote it) and no archive - no file opened, no
gpg run. Otherwise the parent's index is decrypted and the tree read as above; a set
that stores no file and deletes nothing has no archive either.

File names may be patient data: they are only in the encrypted index, never in the
manifest.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import io
import json
import queue
import re
import tarfile
import threading

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
# One entry a line, keys sorted: readable with a pager, diffable between two sets.
_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=True, separators=(",", ":"))


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
    if INDEX not in names or (chain["level"] == FULL and "files" not in names):
        raise IntegrityError("set %s of a chain lacks its index or its archive" % set_id)
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
    lines.extend(_ENCODER.encode(entry) for entry in entries)
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


def decode_index(data, set_id, holders, written_by=None):
    """(entries in archive order, deleted names) of an index artifact's bytes, every
    entry checked (``holders``: the sets a file's bytes may come from; ``written_by``:
    the set whose run wrote these bytes, when a set reuses an earlier set's index)."""
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
        or header.get("set_id") != (written_by or set_id)
        or header.get("entries") != len(lines) - 1
    ):
        raise _bad(set_id, "its header does not describe an index of this set")
    try:
        # One parse for the whole list: a line that is not one JSON value breaks it.
        parsed = json.loads("[" + ",".join(lines[1:]) + "]")
    except (ValueError, RecursionError):
        raise _bad(set_id, "an entry is not JSON") from None
    if len(parsed) != len(lines) - 1:
        raise _bad(set_id, "its entries are not one a line")
    entries, names = [], set()
    for number, entry in enumerate(parsed, 2):
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
    if name[0] == "/" or ".." in name:  # the full rule only where it may apply
        why = unsafe_member(name)
        if why:
            return "name %r is unsafe (%s)" % (name, why)
    kind = entry.get("type")
    if kind not in TYPES:
        return "%r has an unknown type" % name
    if not (
        _int(entry.get("mode"))
        and _int(entry.get("uid"))
        and _int(entry.get("gid"))
        and _int(entry.get("mtime"))
    ):
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
    return decode_index(collector.data(), manifest["id"], holders, written_by(manifest))


def written_by(manifest):
    """The set whose run wrote ``manifest``'s index bytes (an unchanged set reuses them)."""
    chain = chain_of(manifest)
    return (chain or {}).get("index_from") or manifest["id"]


def fingerprint(key, entries, salt=None):
    """What the change detection of a whole tree compares (every entry's name, type,
    mode, owner, mtime, link, size and stamp), as a MAC keyed from the passphrase: in
    the clear manifest it tells nothing about the tree. None without a key."""
    if key is None:
        return None
    digest = hashlib.sha256()
    for e in entries:
        fields = [e["name"], e["type"], e["mode"], e["uid"], e["gid"], e["mtime"]]
        fields += [e.get("link"), e.get("size"), e.get("stamp")]
        digest.update(_ENCODER.encode(fields).encode("ascii") + b"\n")
    salt = salt if salt is not None else key.seal_salt()
    return {"salt": salt.hex(), "mac": key.mac(salt, "tree", {"sha256": digest.hexdigest()})}


def unchanged_since(parent_manifest, key, entries):
    """Whether ``entries`` (an lstat walk) are exactly the tree ``parent_manifest``'s set
    stored, judged by its fingerprint; never for a set that missed or caught a file
    changing (its next run must read again)."""
    files = parent_manifest.get("files") or {}
    recorded = (chain_of(parent_manifest) or {}).get("fingerprint")
    if (
        key is None
        or not isinstance(recorded, dict)
        or files.get("unreadable")
        or files.get("changed")
        or files.get("skipped")
    ):
        return False
    try:
        salt = bytes.fromhex(recorded["salt"])
    except (KeyError, TypeError, ValueError):
        return False
    return fingerprint(key, entries, salt) == recorded


def summarize(entries):
    """Counts of a whole tree as the manifest records them."""
    files = [e for e in entries if e["type"] == "f"]
    return {
        "count": len(files),
        "bytes": sum(e["size"] for e in files),
        "directories": sum(1 for e in entries if e["type"] == "d"),
        "symlinks": sum(1 for e in entries if e["type"] == "l"),
    }


def same_layout(previous, entries):
    """Whether the directories and links of ``entries`` are those of the previous index
    (names, modes, owners, times, targets): then a set storing no file needs no archive."""
    ours = [e for e in entries if e["type"] != "f"]
    theirs = [e for e in previous.values() if e["type"] != "f"]
    return ours == theirs


def deleted_names(previous, entries):
    """Names of the previous set gone from ``entries`` or now of another type, in the
    previous set's order (a directory before what was inside it)."""
    now = {e["name"]: e["type"] for e in entries}
    return [name for name, entry in previous.items() if now.get(name) != entry["type"]]


# ---------------------------------------------------------------------- choosing a parent
class Parent(object):
    """The set a new incremental set builds on: its manifest, the chain record the new
    set gets, and the previous index by name."""

    unchanged = False  # the tree is exactly the parent's: reuse its index as it is
    source = None  # the repository to copy the parent's index from

    def __init__(self, manifest, entries):
        self.manifest = manifest
        self.entries = {e["name"]: e for e in entries}
        chain = chain_of(manifest)
        self.sets = list(chain["sets"]) + [manifest["id"]]
        self.macs = list(chain["macs"]) + [authentication.record_mac(manifest)]


def full_chain_record():
    return {"level": FULL, "sets": [], "macs": []}


def index_source(repositories, unreachable):
    """The repository a new set reads its parent's index from: a local one if any."""
    reachable = [r for r in repositories if r.url not in unreachable]
    reachable.sort(key=lambda r: r.kind != "local")
    return reachable[0], reachable


class BackgroundArtifact(object):
    """An artifact streamed on a thread from now on, its bytes given later (``finish``):
    gpg derives its key while the archive is still being written."""

    def __init__(self, writing, filename):
        self._queue = queue.Queue(maxsize=1)
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(writing, filename))
        self.thread.daemon = True
        self.thread.start()

    def _source(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        yield item

    def _run(self, writing, filename):
        try:
            self.result = writing.stream(filename, [], self._source())
        except BaseException as exc:  # raised again by finish()
            self.error = exc

    def finish(self, data):
        """(artifact entry, locations) once ``data`` went through; raises its failure."""
        self._queue.put(data)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self):
        if self.thread.is_alive():
            self._queue.put(IntegrityError("the set was abandoned before its index was written"))
            self.thread.join()


def choose_parent(repositories, unreachable, options, key, unchanged=None):
    """(Parent or None, why a full set is taken instead or None), its index not read yet
    (``load_index``). ``unchanged(manifest)``: whether the tree is exactly the
    candidate's; then the new set reuses its index as it is (``Parent.unchanged``)."""
    first, reachable = index_source(repositories, unreachable)
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
        if (
            unchanged is not None
            and manifest["compression"]["algorithm"] == options.compression
            and unchanged(manifest)
        ):
            parent.unchanged = True
        parent.source = first
    except BackupError as exc:
        return None, "the previous set could not be used as a parent: %s" % exc
    return parent, None


def load_index(parent, gpg_session):
    """(parent with its index entries, None), or (None, why a full set is taken)."""
    try:
        entries, _deleted = read_index(parent.source, parent.manifest, gpg_session)
    except BackupError as exc:
        return None, "the previous set could not be used as a parent: %s" % exc
    parent.entries = {e["name"]: e for e in entries}
    return parent, None


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
            entries, deleted = decode_index(
                self.collector.data(), set_id, holders, written_by(manifest)
            )
        except IntegrityError as exc:
            return "fail", str(exc)
        if written_by(manifest) != set_id:
            deleted = []  # the reused index's list belongs to the set that wrote it
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
