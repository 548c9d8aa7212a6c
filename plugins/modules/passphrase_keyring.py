#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: passphrase_keyring
short_description: Write the backup passphrase file root-only and rotate it, keeping old passphrases in a keyring
version_added: 0.1.0
description:
  - Makes O(path) hold O(passphrase) (one line, mode 0600, owned by O(owner)), written atomically
    (temporary file, fsync, rename).
  - Refuses a missing, empty, multi-line, placeholder (C(changeme), C(CHANGE_ME), example values of the
    docs, an unrendered C({{ ... }})) or short (fewer than O(min_length) characters) passphrase, naming
    the problem but never the value.
  - A different passphrase already in O(path) is refused unless O(rotate=true), since every set taken so
    far needs it. With O(rotate=true) the old passphrase first goes into the keyring O(keyring_dir)
    (mode 0700) as a file named after its key id (mode 0400), then the new one replaces it; new sets are
    encrypted with the new passphrase and every older set stays restorable with the keyring's files,
    which the agent configs list as C(old_passphrase_files) (RV(old_passphrase_files)).
  - The key id is the one-way identifier each set's manifest records as C(encryption.key_id)
    (scrypt, then HMAC); it names a passphrase and never reveals it.
  - Without O(passphrase) the file on the host is kept as it is (only its owner and mode are enforced).
author:
  - Clinic Backup Team (@clinic-backup)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Says whether the file would be written or rotated; changes nothing.
  diff_mode:
    support: none
    details: A passphrase is never shown, not even as a diff.
  platform:
    platforms: posix
options:
  path:
    description: The passphrase file the backups are encrypted with.
    type: path
    required: true
  passphrase:
    description:
      - The passphrase, from Ansible Vault. One trailing newline is ignored.
      - Omit it to keep the passphrase already in O(path).
    type: str
  keyring_dir:
    description: Directory (0700) of the old passphrases (0400 files named by key id).
    type: path
  rotate:
    description:
      - Replace a different passphrase in O(path), keeping the old one in O(keyring_dir) first.
    type: bool
    default: false
  must_exist:
    description: Fail when O(path) does not exist and no O(passphrase) is given.
    type: bool
    default: true
  owner:
    description: Owner of the file, the keyring and its files (the user the backups run as).
    type: str
    default: root
  group:
    description: Their group.
    type: str
    default: root
  min_length:
    description: Fewest characters a new passphrase may have.
    type: int
    default: 20
  placeholders:
    description:
      - Further values to refuse as placeholders (compared without case and punctuation), in addition to
        the built-in ones.
    type: list
    elements: str
    default: []
notes:
  - Run it as root (C(become)); the files are owned by O(owner), and their mode forbids others.
  - The role C(clinic.backup.backup_passphrase) runs it and lists the keyring in the agent configs.
seealso:
  - module: clinic.backup.backup_verify
  - module: clinic.backup.backup_restore
"""

EXAMPLES = r"""
- name: Write the backup passphrase
  clinic.backup.passphrase_keyring:
    path: /etc/clinic-backup/passphrase
    keyring_dir: /etc/clinic-backup/keyring
    passphrase: "{{ vault_clinic_backup_passphrase }}"

- name: Rotate it after a breach (the old one stays in the keyring)
  clinic.backup.passphrase_keyring:
    path: /etc/clinic-backup/passphrase
    keyring_dir: /etc/clinic-backup/keyring
    passphrase: "{{ vault_clinic_backup_passphrase_2027 }}"
    rotate: true
"""

RETURN = r"""
key_id:
  description: The identifier of the passphrase in O(path) now (as set manifests record it); null without one.
  returned: success
  type: str
  sample: 3f0c9a1b22d4e5f6
rotated:
  description: Whether the passphrase was (in check mode, would be) rotated.
  returned: success
  type: bool
retired_key_id:
  description: The key id of the passphrase moved into the keyring by this rotation, else null.
  returned: success
  type: str
old_passphrase_files:
  description: The keyring's files (the agent configs' C(old_passphrase_files)), sorted.
  returned: success
  type: list
  elements: str
  sample: [/etc/clinic-backup/keyring/0a1b2c3d4e5f6789]
"""

import grp
import pwd

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError, ConfigError
from ansible_collections.clinic.backup.plugins.module_utils.keyring import (
    MIN_LENGTH,
    install_passphrase,
)
from ansible_collections.clinic.backup.plugins.module_utils.module_support import error_result


def argument_spec():
    return dict(
        path=dict(type="path", required=True),
        passphrase=dict(type="str", no_log=True),
        keyring_dir=dict(type="path"),
        rotate=dict(type="bool", default=False),
        must_exist=dict(type="bool", default=True),
        owner=dict(type="str", default="root"),
        group=dict(type="str", default="root"),
        min_length=dict(type="int", default=MIN_LENGTH),
        placeholders=dict(type="list", elements="str", default=[], no_log=False),
    )


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        required_if=[("rotate", True, ("keyring_dir", "passphrase"))],
        supports_check_mode=True,
    )
    params = module.params
    try:
        try:
            uid = pwd.getpwnam(params["owner"]).pw_uid
            gid = grp.getgrnam(params["group"]).gr_gid
        except KeyError:
            raise ConfigError(
                "no such user or group: %s:%s" % (params["owner"], params["group"]),
                "create the backup user first, or give an existing one",
            ) from None
        result = install_passphrase(
            params["path"],
            passphrase=params["passphrase"],
            keyring_dir=params["keyring_dir"],
            rotate=params["rotate"],
            uid=uid,
            gid=gid,
            check_mode=module.check_mode,
            required=params["must_exist"],
            min_length=params["min_length"],
            placeholders=params["placeholders"],
        )
    except BackupError as exc:
        module.fail_json(**error_result(exc))
    except OSError as exc:
        module.fail_json(msg="cannot write the passphrase files: %s" % exc)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
