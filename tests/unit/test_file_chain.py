"""The incremental chain's records without I/O: the index codec refuses what a hostile
repository writer could plant, the chain record is checked, retention keeps what a
kept set builds on."""

from __future__ import annotations

import datetime

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import file_chain
from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.errors import IntegrityError
from ansible_collections.clinic.backup.plugins.module_utils.retention import (
    RetentionPolicy,
    plan,
)

SHA = "ab" * 32


def entry(name, kind="f", **extra):
    base = {"name": name, "type": kind, "mode": 0o644, "uid": 0, "gid": 0, "mtime": 1}
    if kind == "f":
        base.update(size=3, sha256=SHA, set="S1", stamp=[3, 1, 1, 7])
    if kind == "l":
        base["link"] = "a"
    base.update(extra)
    return base


def test_index_round_trip_keeps_every_entry_and_the_deleted_names():
    entries = [entry("0-up", "d"), entry("0-up/a"), entry("0-up/l", "l"), entry("0-up/\udcff")]
    data = file_chain.encode_index("S1", entries, ["0-up/gone", "0-up/old dir"])
    decoded, deleted = file_chain.decode_index(data, "S1", {"S1"})
    assert decoded == entries and deleted == ["0-up/gone", "0-up/old dir"]
    assert file_chain.summarize(decoded) == {
        "count": 2,
        "bytes": 6,
        "directories": 1,
        "symlinks": 1,
    }


@pytest.mark.parametrize(
    "bad, words",
    [
        (entry("/etc/passwd"), "unsafe"),
        (entry("0-up/../../x"), "unsafe"),
        (entry("0-up/l", "l", link="../../../etc"), "unsafe"),
        (entry("0-up/a", set="S9"), "not in the chain"),
        (entry("0-up/a", sha256="x"), "sha256"),
        (entry("0-up/a", mode=True), "malformed mode"),
        (entry("0-up/a", type="c"), "unknown type"),
    ],
)
def test_index_refuses_what_a_repository_writer_could_plant(bad, words):
    data = file_chain.encode_index("S1", [entry("0-up", "d"), bad], [])
    with pytest.raises(IntegrityError, match=words):
        file_chain.decode_index(data, "S1", {"S1"})


def test_index_of_another_set_or_twice_one_name_is_refused():
    data = file_chain.encode_index("S1", [entry("0-up/a"), entry("0-up/a")], [])
    with pytest.raises(IntegrityError, match="twice"):
        file_chain.decode_index(data, "S1", {"S1"})
    data = file_chain.encode_index("S1", [entry("0-up/a")], [])
    with pytest.raises(IntegrityError, match="header"):
        file_chain.decode_index(data, "S2", {"S1", "S2"})
    assert file_chain.decode_index(data, "S2", {"S1"}, written_by="S1")[0]


def manifest(set_id, sets=(), level=None):
    chain = {
        "level": level or ("incremental" if sets else "full"),
        "sets": list(sets),
        "macs": [None] * len(sets),
    }
    return {
        "id": set_id,
        "files": {"chain": chain},
        "artifacts": [{"name": "files"}, {"name": "index"}],
    }


def test_chain_record_is_checked():
    assert file_chain.dependencies(manifest("C", ["A", "B"])) == ["A", "B"]
    assert file_chain.level(manifest("A")) == "full"
    for broken in (
        manifest("C", ["A", "A"]),
        manifest("C", ["C"]),
        manifest("C", [], level="incremental"),
        manifest("C", ["A"], level="full"),
    ):
        with pytest.raises(IntegrityError, match="malformed chain"):
            file_chain.chain_of(broken)
        assert file_chain.dependencies(broken) == []
    index_only = dict(manifest("A"), artifacts=[{"name": "index"}])
    with pytest.raises(IntegrityError, match="archive"):
        file_chain.chain_of(index_only)


def test_fingerprint_moves_with_any_stamp_and_needs_the_key():
    key = RecordKey(b"passphrase")
    entries = [entry("0-up", "d"), entry("0-up/a")]
    recorded = file_chain.fingerprint(key, entries)
    parent = {
        "files": {"chain": dict(manifest("A")["files"]["chain"], fingerprint=recorded)},
        "artifacts": [{"name": "files"}, {"name": "index"}],
        "id": "A",
    }
    assert file_chain.unchanged_since(parent, key, entries)
    touched = [entries[0], entry("0-up/a", stamp=[3, 1, 2, 7])]  # only ctime moved
    assert not file_chain.unchanged_since(parent, key, touched)
    assert not file_chain.unchanged_since(parent, RecordKey(b"other"), entries)
    assert not file_chain.unchanged_since(parent, None, entries)
    parent["files"]["changed"] = 1  # a file caught changing is always read again
    assert not file_chain.unchanged_since(parent, key, entries)


def test_retention_plan_keeps_the_chain_of_a_kept_set():
    day = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
    entries = []
    chain = []
    for hour in range(4):
        set_id = "20261201T%02d0000Z-uploads-00000%d" % (hour, hour)
        entries.append(
            {
                "id": set_id,
                "state": "complete",
                "database": "uploads",
                "started_at": (day + datetime.timedelta(hours=hour)).isoformat(),
                "verification": "unverified",
                "manifest": manifest(set_id, list(chain)),
            }
        )
        chain.append(set_id)
    policy = RetentionPolicy(daily=1, weekly=0, monthly=0, yearly=0, min_keep=1)
    decisions = {d["id"]: d for d in plan(entries, policy, now=day + datetime.timedelta(days=1))}
    newest = chain[-1]
    assert all(decisions[s]["action"] == "keep" for s in chain)
    assert decisions[chain[0]]["reasons"] == ["needed by %s" % newest]
