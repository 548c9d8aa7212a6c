# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Records a repository writer cannot forge: manifests, verification records and
``latest`` pointers carry a MAC keyed from the backup passphrase.

Someone who can write to the bucket (leaked S3 keys: the ransomware case) but does
not know the passphrase could otherwise plant a set, mark a set verified, or pass
an older set off as the newest.  Every record is sealed with HMAC-SHA256 over its
canonical JSON (sorted keys, no whitespace, ASCII) and the purpose of the record,
under a key derived from the passphrase with scrypt and a salt stored beside the
MAC.  The key is never the passphrase itself, and the scrypt cost keeps a MAC from
being a cheaper oracle for guessing the passphrase than the gpg artifacts are.

A manifest binds the set id, database (file-group name) and kind, timestamps,
options, row counts and every artifact's name, file, size and sha256: everything
in it.  A verification record binds its set id and the MAC of the manifest it
checked; a pointer binds the database, the set id and that manifest's MAC. A WAL
record (purpose "wal") binds a cluster's archived WAL file: its name, sizes, both
sha256 sums and the data key it was encrypted with.

After a passphrase rotation the old passphrases stay in a keyring (``old_passphrase_files``):
an encrypted set's manifest records ``encryption.key_id`` (``RecordKey.passphrase_id``, a
one-way identifier), so reading picks the passphrase that encrypted it.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import hmac
import json
import os
import re

from .errors import IntegrityError
from .passphrase import load_passphrase

FIELD = "authentication"
SCHEME = "hmac-sha256/scrypt"
# The only parameters accepted on reading: a record naming a huge cost must not make
# the reader spend minutes and gigabytes deriving a key.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
KEY_LABEL = b"clinic.backup record key v1"
KEY_ID_LABEL = b"clinic.backup key id v1"
# The salt of a passphrase's identifier (manifest "encryption.key_id", the keyring's file
# names): fixed, so that one passphrase always has one identifier. It is a scrypt-derived
# fingerprint like the records' key_id, so it tells no more about the passphrase than
# any sealed record does.
PASSPHRASE_ID_SALT = hashlib.sha256(b"clinic.backup passphrase id v1").digest()[:16]
PURPOSES = ("manifest", "verification", "pointer", "restore_test", "wal")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# Outcomes of check(): a valid MAC, no MAC at all (written before records were
# sealed, or planted), and no key to check with.
AUTHENTICATED, UNSEALED, NOT_CHECKED = "ok", "none", "not checked"
OTHER_PASSPHRASE = (
    "it was sealed with another passphrase, or forged (if the passphrase was rotated, "
    "give the passphrase this set was written with)"
)


class OtherPassphraseError(IntegrityError):
    """A record sealed under another key: most often the operator's passphrase file is
    not the one the set was written with (an operator error, not damage)."""


def canonical(record):
    """The bytes a MAC covers: ``record`` without its authentication block."""
    body = {k: v for k, v in record.items() if k != FIELD}
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


class RecordKey(object):
    """The MAC key of one passphrase: derived once per salt and cached.

    New records are sealed with one salt per key object (``adopt_salt`` takes the
    salt of a record this key already authenticated, so that a repository's records
    share a salt and listing a catalog derives the key once, not once per set).
    """

    def __init__(self, passphrase, older=()):
        if not passphrase:
            raise ValueError("a record key needs a passphrase")
        self._passphrase = passphrase
        self._keys = {}
        self._salt = None
        # After a rotation: the passphrases of older sets, to check (never to seal) with.
        self._older = [RecordKey(p) for p in older]

    @classmethod
    def from_file(cls, passphrase_file, old_passphrase_files=()):
        """The key of a passphrase file (and of the older ones a rotation kept), each
        checked like every passphrase file; None without a passphrase file."""
        if not passphrase_file:
            return None
        return cls(
            load_passphrase(passphrase_file),
            [load_passphrase(path) for path in old_passphrase_files or ()],
        )

    def passphrase_id(self):
        """The identifier of this passphrase (16 hex digits, one-way: scrypt then HMAC)
        that a set's manifest records as ``encryption.key_id``: which key encrypted it,
        never the key."""
        return self.key_id(PASSPHRASE_ID_SALT)

    def with_passphrase_id(self, key_id):
        """The key (this one or an older one) whose passphrase_id() is ``key_id``, or None."""
        if not isinstance(key_id, str):
            return None
        for key in [self] + self._older:
            if hmac.compare_digest(key.passphrase_id(), key_id):
                return key
        return None

    def signer(self, salt, key_id):
        """The key (this passphrase's or an older one's) whose fingerprint for ``salt``
        is ``key_id``, or None."""
        for key in [self] + self._older:
            if hmac.compare_digest(key.key_id(salt), key_id):
                return key
        return None

    def identify(self, record):
        """The key that encrypted and sealed ``record`` (a manifest): by the identifier its
        ``encryption.key_id`` records, else by its seal's fingerprint; None when the record
        names neither (a set written before either existed, or one of a stranger)."""
        if not isinstance(record, dict):
            return None
        encryption = record.get("encryption")
        if isinstance(encryption, dict) and encryption.get("key_id"):
            found = self.with_passphrase_id(encryption["key_id"])
            if found is not None:
                return found
        block = record.get(FIELD)
        try:
            return self.signer(bytes.fromhex(block["salt"]), block["key_id"])
        except (TypeError, KeyError, ValueError, AttributeError):
            return None

    def passphrase_for(self, record):
        """The passphrase that encrypted ``record``'s artifacts (after a rotation, an older
        one); this key's own for a record it cannot place."""
        return (self.identify(record) or self)._passphrase

    def candidates_for(self, record):
        """The passphrases to try on ``record``'s artifacts: the one it names, or, for a
        set that names none, every passphrase of the keyring (this one first)."""
        found = self.identify(record)
        if found is not None:
            return [found._passphrase]
        return [key._passphrase for key in [self] + self._older]

    def _key(self, salt):
        key = self._keys.get(salt)
        if key is None:
            master = hashlib.scrypt(
                self._passphrase,
                salt=salt,
                n=SCRYPT_N,
                r=SCRYPT_R,
                p=SCRYPT_P,
                maxmem=SCRYPT_MAXMEM,
                dklen=32,
            )
            key = hmac.new(master, KEY_LABEL, hashlib.sha256).digest()
            self._keys[salt] = key
        return key

    def key_id(self, salt):
        """A public fingerprint of the key for ``salt``: tells "another passphrase"
        apart from "altered" without revealing anything the MAC does not."""
        return hmac.new(self._key(salt), KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]

    def mac(self, salt, purpose, record):
        message = b"clinic.backup/" + purpose.encode("ascii") + b"\n" + canonical(record)
        return hmac.new(self._key(salt), message, hashlib.sha256).hexdigest()

    def seal_salt(self):
        if self._salt is None:
            self._salt = os.urandom(16)
        return self._salt

    def adopt_salt(self, record, purpose="pointer"):
        """Seal later records with the salt of ``record`` if this key authenticates it."""
        if (
            self._salt is None
            and check(record, self, purpose)[0] == AUTHENTICATED
            and self.signer(bytes.fromhex(record[FIELD]["salt"]), record[FIELD]["key_id"]) is self
        ):
            self._salt = bytes.fromhex(record[FIELD]["salt"])


def seal(record, key, purpose):
    """``record`` with its authentication block (a new dict); unchanged when key is None."""
    if key is None:
        return dict(record)
    if purpose not in PURPOSES:
        raise ValueError("unknown record purpose %r" % purpose)
    salt = key.seal_salt()
    body = {k: v for k, v in record.items() if k != FIELD}
    # The MAC covers the record without this block (canonical()); the salt and the
    # scrypt parameters are bound through the key they derive.
    body[FIELD] = {
        "scheme": SCHEME,
        "n": SCRYPT_N,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
        "salt": salt.hex(),
        "key_id": key.key_id(salt),
        "purpose": purpose,
        "mac": key.mac(salt, purpose, body),
    }
    return body


def seal_for_set(data, key, purpose, set_id, manifest):
    """``data`` bound to one set and its manifest (its id and the manifest's MAC), sealed:
    what a verification record or a restore-test record is. Sealed with the salt the
    manifest uses, so that a catalog derives one key per set, not one per record."""
    bound = dict(data, set_id=set_id, manifest_mac=record_mac(manifest) if manifest else None)
    if key is not None and manifest:
        key.adopt_salt(manifest, "manifest")
    return seal(bound, key, purpose)


def bound_to_set(record, set_id, manifest):
    """Whether a record (see seal_for_set) names this set and this very manifest: one
    copied from another set, or from before the manifest changed, is not."""
    return record.get("set_id") == set_id and record.get("manifest_mac") == (
        record_mac(manifest) if manifest is not None else None
    )


def record_mac(record):
    """The MAC a sealed record carries (what later records bind to), or None."""
    block = record.get(FIELD) if isinstance(record, dict) else None
    mac = block.get("mac") if isinstance(block, dict) else None
    return mac if isinstance(mac, str) and _HEX64.fullmatch(mac) else None


def check(record, key, purpose):
    """(outcome, problem): AUTHENTICATED, UNSEALED or NOT_CHECKED with problem None, or
    (None, text saying why the record fails: altered, planted or another passphrase)."""
    block = record.get(FIELD) if isinstance(record, dict) else None
    if block is None:
        return UNSEALED, None
    if key is None:
        return NOT_CHECKED, None
    if not isinstance(block, dict):
        return None, "its authentication block is malformed"
    if (
        block.get("scheme") != SCHEME
        or block.get("purpose") != purpose
        or (block.get("n"), block.get("r"), block.get("p")) != (SCRYPT_N, SCRYPT_R, SCRYPT_P)
        or any(isinstance(block.get(k), bool) for k in ("n", "r", "p"))
    ):
        return None, "its authentication block has unsupported parameters (not a %s %s)" % (
            SCHEME,
            purpose,
        )
    salt, key_id, mac = block.get("salt"), block.get("key_id"), block.get("mac")
    if not (
        isinstance(salt, str)
        and _HEX32.fullmatch(salt)
        and isinstance(key_id, str)
        and isinstance(mac, str)
        and _HEX64.fullmatch(mac)
    ):
        return None, "its authentication block is malformed"
    salt = bytes.fromhex(salt)
    signer = key.signer(salt, key_id)
    if signer is None:
        return None, OTHER_PASSPHRASE
    try:
        expected = signer.mac(salt, purpose, record)
    except (TypeError, ValueError, RecursionError):
        return None, "it cannot be put in canonical form"
    if not hmac.compare_digest(expected, mac):
        return None, "its MAC does not match: it was altered after it was written"
    return AUTHENTICATED, None


def require(record, key, purpose, what):
    """Raise IntegrityError naming ``what`` when the record fails its check; returns the
    outcome (AUTHENTICATED, UNSEALED or NOT_CHECKED)."""
    outcome, problem = check(record, key, purpose)
    if outcome is None:
        raise (OtherPassphraseError if problem == OTHER_PASSPHRASE else IntegrityError)(
            "%s fails its authentication check: %s" % (what, problem),
            "treat the set as damaged or planted: restore another set and find out who "
            "can write to the repository",
        )
    return outcome
