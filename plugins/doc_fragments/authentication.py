# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # How modules that read sets treat records a repository writer could have forged.
    DOCUMENTATION = r"""
options:
  passphrase_file:
    description:
      - File holding the backup passphrase (V(0600) or stricter, owned by this user or root).
      - Besides decrypting, its key (derived with scrypt, never the passphrase itself) checks the MAC that
        every manifest, verification record and C(latest) pointer carries, so that someone who can write to
        the repository or bucket but does not know the passphrase cannot plant a set, mark one verified or
        pass an older set off as the newest. A record that fails the check is treated as damaged and named.
    type: path
  old_passphrase_files:
    description:
      - After a passphrase rotation, the files (same rules as O(passphrase_file)) of the passphrases older sets
        were written with. Each set's records name which key sealed them (a fingerprint, never the key), so
        every set is checked and decrypted with its own passphrase; new sets only ever use O(passphrase_file).
    type: list
    elements: path
    default: []
"""

    # Modules that choose or check sets may be told to take unsealed ones.
    UNAUTHENTICATED = r"""
options:
  allow_unauthenticated:
    description:
      - Accept a set whose manifest carries no MAC (written before clinic.backup sealed its records, or
        planted by someone who can write to the repository), with a warning.
      - A decision for one run, never a default. A set whose MAC is present but wrong is refused whatever
        this says.
    type: bool
    default: false
"""

    # Restores also refuse plaintext sets unless told.
    RESTORE = r"""
options:
  allow_unencrypted:
    description:
      - Restore a set that was stored without encryption (O(clinic.backup.pg_dump#module:encrypt=false)).
        Anyone with access to the repository could have read or rewritten such a set.
      - A decision for one run, never a default.
    type: bool
    default: false
"""
