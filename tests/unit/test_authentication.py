"""Sealed records: what a repository writer without the passphrase cannot forge."""

from __future__ import annotations

import copy
import json

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import authentication, catalog
from ansible_collections.clinic.backup.plugins.module_utils.errors import IntegrityError
from ansible_collections.clinic.backup.plugins.module_utils.repository import (
    LocalRepository,
    atomic_write,
    dump_json,
)

SET_ID = "20261122T010000Z-clinic_db-1a2b3c"


def manifest(set_id=SET_ID, **changes):
    data = {
        "format_version": 1,
        "id": set_id,
        "database": "clinic_db",
        "format": "custom",
        "compression": {"algorithm": "zstd", "level": 3},
        "encryption": {"method": "gpg-symmetric", "cipher": "AES256"},
        "artifacts": [
            {
                "name": "database",
                "file": "clinic_db.dump.zst.gpg",
                "content": "pg_dump-custom",
                "size": 30171,
                "sha256": "ab" * 32,
            }
        ],
        "row_counts": {"public.patients": 12},
        "started_at": "2026-11-22T01:00:00.000000Z",
        "finished_at": "2026-11-22T01:00:05.250000Z",
        "duration_seconds": 5.25,
    }
    data.update(changes)
    return data


@pytest.fixture(scope="module")
def key():
    return authentication.RecordKey(b"correct horse battery staple")


def test_a_sealed_record_checks_and_keeps_its_content(key):
    sealed = authentication.seal(manifest(), key, "manifest")
    assert authentication.check(sealed, key, "manifest") == (authentication.AUTHENTICATED, None)
    # JSON round trip (what storage does) keeps the MAC valid.
    stored = json.loads(dump_json(sealed))
    assert authentication.check(stored, key, "manifest")[0] == authentication.AUTHENTICATED
    assert {k: v for k, v in sealed.items() if k != "authentication"} == manifest()
    assert "correct horse" not in json.dumps(sealed)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["artifacts"][0].update(size=30172),
        lambda m: m["artifacts"][0].update(sha256="cd" * 32),
        lambda m: m["artifacts"][0].update(file="other.dump.zst.gpg"),
        lambda m: m.update(database="billing_db"),
        lambda m: m.update(finished_at="2026-11-30T01:00:05.250000Z"),
        lambda m: m.update(encryption={"method": "none"}),
        lambda m: m.update(row_counts={"public.patients": 0}),
        lambda m: m.update(kind="files"),
        lambda m: m["authentication"].update(purpose="pointer"),
        lambda m: m["authentication"].update(salt="00" * 16),
    ],
)
def test_any_change_to_a_sealed_manifest_fails_its_check(key, edit):
    sealed = authentication.seal(manifest(), key, "manifest")
    forged = copy.deepcopy(sealed)
    edit(forged)
    outcome, problem = authentication.check(forged, key, "manifest")
    assert outcome is None and problem


def test_a_record_sealed_for_one_purpose_does_not_pass_for_another(key):
    pointer = authentication.seal({"database": "clinic_db", "set_id": SET_ID}, key, "pointer")
    forged = dict(pointer)
    forged["authentication"] = dict(pointer["authentication"], purpose="verification")
    assert authentication.check(forged, key, "verification")[0] is None


def test_another_passphrase_is_named_as_such(key):
    sealed = authentication.seal(
        manifest(), authentication.RecordKey(b"old passphrase"), "manifest"
    )
    outcome, problem = authentication.check(sealed, key, "manifest")
    assert outcome is None and "another passphrase" in problem


def test_unsealed_and_unchecked_records_are_told_apart(key):
    assert authentication.check(manifest(), key, "manifest") == (authentication.UNSEALED, None)
    sealed = authentication.seal(manifest(), key, "manifest")
    assert authentication.check(sealed, None, "manifest") == (authentication.NOT_CHECKED, None)


@pytest.mark.parametrize(
    "block",
    [
        "not a dict",
        {"scheme": "hmac-sha256/scrypt", "n": 2**30, "r": 8, "p": 1},  # a cost meant to hang us
        {"scheme": "hmac-sha256/scrypt", "n": 32768, "r": 8, "p": True},
        {"scheme": "md5"},
    ],
)
def test_malformed_or_costly_authentication_blocks_are_refused_without_deriving(key, block):
    record = manifest(authentication=block)
    outcome, problem = authentication.check(record, key, "manifest")
    assert outcome is None and problem


def test_salt_is_adopted_only_from_records_the_key_authenticates(key):
    other = authentication.RecordKey(b"someone else")
    planted = authentication.seal({"database": "d", "set_id": SET_ID}, other, "pointer")
    fresh = authentication.RecordKey(b"correct horse battery staple")
    fresh.adopt_salt(planted)
    assert fresh.seal_salt().hex() != planted["authentication"]["salt"]
    own = authentication.seal({"database": "d", "set_id": SET_ID}, key, "pointer")
    again = authentication.RecordKey(b"correct horse battery staple")
    again.adopt_salt(own)
    assert again.seal_salt().hex() == own["authentication"]["salt"]


# ---------------------------------------------------------------------- the catalog
def _store(repo_dir, set_id, data):
    folder = repo_dir / "sets" / set_id
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(str(folder / "manifest.json"), dump_json(data))


def test_catalog_lists_forged_manifests_as_corrupt_and_unsealed_ones_as_such(tmp_path, key):
    repo_dir = tmp_path / "repo"
    good, forged, old = (
        "20261122T010000Z-clinic_db-aaaaaa",
        "20261123T010000Z-clinic_db-bbbbbb",
        "20261121T010000Z-clinic_db-cccccc",
    )
    _store(repo_dir, good, authentication.seal(manifest(good), key, "manifest"))
    bad = authentication.seal(manifest(forged), key, "manifest")
    bad["artifacts"][0]["size"] += 1
    _store(repo_dir, forged, bad)
    _store(repo_dir, old, manifest(old))
    repo = LocalRepository(str(repo_dir))
    entries = {e["id"]: e for e in catalog.list_catalog(repo, key=key)}
    assert entries[good]["authentication"] == "ok"
    assert entries[forged]["state"] == "corrupt"
    assert "fails its authentication check" in entries[forged]["error"]
    assert entries[old]["authentication"] == "none"
    assert "no MAC" in catalog.unusable_reason(entries[old])
    assert catalog.unusable_reason(entries[old], allow_unauthenticated=True) is None
    unchecked = {e["id"]: e for e in catalog.list_catalog(repo)}
    assert unchecked[forged]["state"] == "complete"  # without the key nothing can tell
    assert unchecked[good]["authentication"] == "not checked"
    with pytest.raises(IntegrityError, match=forged):
        catalog.load_manifest(repo, forged, key)


def test_verification_records_count_only_for_their_own_set(tmp_path, key):
    repo_dir = tmp_path / "repo"
    first, second = "20261122T010000Z-clinic_db-aaaaaa", "20261123T010000Z-clinic_db-bbbbbb"
    for set_id in (first, second):
        _store(repo_dir, set_id, authentication.seal(manifest(set_id), key, "manifest"))
    repo = LocalRepository(str(repo_dir))
    m1 = catalog.load_manifest(repo, first, key)
    record = authentication.seal(
        {
            "state": "ok",
            "verified_at": "2026-11-22T02:00:00.000000Z",
            "checks": [],
            "set_id": first,
            "manifest_mac": authentication.record_mac(m1),
        },
        key,
        "verification",
    )
    repo.write_verification(first, record)
    repo.write_verification(second, record)  # copied from the first set
    entries = {e["id"]: e for e in catalog.list_catalog(repo, key=key)}
    assert entries[first]["verification"] == "ok"
    assert entries[second]["verification"] == "forged"
    # An unsealed "ok" beside a sealed manifest counts for nothing.
    repo.write_verification(second, {"state": "ok", "verified_at": "2026-11-23T02:00:00.000000Z"})
    entry = catalog.catalog_entry(repo, second, key)
    assert (
        entry["verification"] == "unverified"
        and "not authenticated" in entry["verification_detail"]
    )
    assert catalog.newest_complete(repo, require_verified=True, key=key)["id"] == first


def test_pointers_count_only_when_sealed_by_the_key(tmp_path, key):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    repo.ensure_layout()
    repo.write_latest("clinic_db", SET_ID)
    assert repo.read_latest("clinic_db") == SET_ID
    assert repo.read_latest("clinic_db", key) is None
    sealed = authentication.seal({"database": "clinic_db", "set_id": SET_ID}, key, "pointer")
    repo.write_latest("clinic_db", SET_ID, sealed)
    assert repo.read_latest("clinic_db", key) == SET_ID


@pytest.mark.parametrize(
    "changes",
    [
        {"format_version": "1"},
        {"format_version": True},
        {"encryption": "none"},
        {"compression": {"algorithm": "lz4"}},
        {"started_at": 0},
        {"finished_at": "yesterday"},
        {"database": ["clinic_db"]},
        {"row_counts": {"public.patients": "12"}},
        {"duration_seconds": "5"},
        {"options": []},
        {
            "artifacts": [
                {
                    "name": "database",
                    "file": "x.dump",
                    "content": "pg_dump-custom",
                    "size": "30171",
                    "sha256": "ab" * 32,
                }
            ]
        },
        {
            "artifacts": [
                {
                    "name": "database",
                    "file": "x.dump",
                    "content": "pg_dump-custom",
                    "size": 1,
                    "sha256": "not hex",
                }
            ]
        },
    ],
)
def test_a_malformed_manifest_is_one_corrupt_entry_not_a_broken_catalog(tmp_path, changes):
    repo_dir = tmp_path / "repo"
    good, bad = "20261122T010000Z-clinic_db-aaaaaa", "20261123T010000Z-clinic_db-bbbbbb"
    _store(repo_dir, good, manifest(good))
    _store(repo_dir, bad, manifest(bad, **changes))
    repo = LocalRepository(str(repo_dir))
    entries = {e["id"]: e for e in catalog.list_catalog(repo)}
    assert entries[bad]["state"] == "corrupt" and bad in entries[bad]["error"]
    assert entries[good]["state"] == "complete"
    assert catalog.newest_complete(repo)["id"] == good


def test_an_older_key_checks_what_it_sealed_but_never_seals(key):
    old = authentication.RecordKey(b"the 2026 passphrase")
    sealed_by_old = authentication.seal(manifest(), old, "manifest")
    ring = authentication.RecordKey(b"correct horse battery staple", [b"the 2026 passphrase"])
    assert authentication.check(sealed_by_old, ring, "manifest")[0] == authentication.AUTHENTICATED
    assert ring.passphrase_for(sealed_by_old) == b"the 2026 passphrase"
    new = authentication.seal(manifest(), ring, "manifest")
    assert authentication.check(new, key, "manifest")[0] == authentication.AUTHENTICATED
    assert ring.passphrase_for(new) == b"correct horse battery staple"
    # A record sealed by the old key never lends its salt to new records.
    ring2 = authentication.RecordKey(b"correct horse battery staple", [b"the 2026 passphrase"])
    ring2.adopt_salt(sealed_by_old, "manifest")
    assert ring2.seal_salt().hex() != sealed_by_old["authentication"]["salt"]


def test_a_passphrase_has_one_stable_one_way_identifier():
    one = authentication.RecordKey(b"correct horse battery staple")
    again = authentication.RecordKey(b"correct horse battery staple")
    other = authentication.RecordKey(b"the 2026 passphrase")
    assert one.passphrase_id() == again.passphrase_id() != other.passphrase_id()
    assert len(one.passphrase_id()) == 16 and int(one.passphrase_id(), 16) >= 0
    assert b"correct" not in one.passphrase_id().encode()


def test_the_key_a_manifest_names_is_picked_before_its_seal_and_unnamed_sets_try_each():
    ring = authentication.RecordKey(b"the 2027 passphrase", [b"the 2026 passphrase", b"2025"])
    old = authentication.RecordKey(b"the 2026 passphrase")
    named = manifest()
    named["encryption"] = dict(named["encryption"], key_id=old.passphrase_id())
    # Named, unsealed (an id is only a hint there, but the right one to try first).
    assert ring.candidates_for(named) == [b"the 2026 passphrase"]
    # Sealed by the old key without an id (written before ids): the seal names it.
    sealed = authentication.seal(manifest(), old, "manifest")
    assert ring.passphrase_for(sealed) == b"the 2026 passphrase"
    assert ring.candidates_for(sealed) == [b"the 2026 passphrase"]
    # Neither: every passphrase of the keyring, the current one first.
    assert ring.candidates_for(manifest()) == [
        b"the 2027 passphrase",
        b"the 2026 passphrase",
        b"2025",
    ]
    # An id no key of the keyring has falls back to the seal, then to trying each.
    stranger = manifest()
    stranger["encryption"] = dict(stranger["encryption"], key_id="0" * 16)
    assert ring.identify(stranger) is None
    assert len(ring.candidates_for(stranger)) == 3
