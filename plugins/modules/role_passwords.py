#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: role_passwords
short_description: Set PostgreSQL role passwords after a restore without sending them in clear
version_added: 0.1.0
description:
  - Gives each listed role its password, as the last step of a restore onto a replacement server
    (backups taken as a non-superuser hold no role passwords) or of a credential rotation after a breach.
  - The password is turned into a SCRAM-SHA-256 verifier on the managed host and only that salted hash is
    sent (C(ALTER ROLE ... PASSWORD 'SCRAM-SHA-256$...')), so the server, its statement log and any
    connection pooler never see the password.
  - When connected as a superuser, a role whose stored verifier already matches its password is left
    alone, so a second run reports no change. Without superuser rights every listed role is set again.
  - Every role must exist; one that does not fails the task before any password changes.
author:
  - Clinic Backup Team (@clinic-backup)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clinic.backup.audit
  - clinic.backup.connection
attributes:
  check_mode:
    support: full
    details: Reports which roles would get a new password; changes nothing.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  roles:
    description: The roles and their new passwords (from Ansible Vault).
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: Role name, taken literally.
        type: str
        required: true
      password:
        description: The new password; at least 12 printable ASCII characters.
        type: str
        required: true
  database:
    description: Database to connect to.
    type: str
    default: postgres
requirements:
  - psycopg2
notes:
  - Connect as a superuser (needed to read the current verifiers) or a role with CREATEROLE.
seealso:
  - module: clinic.backup.backup_restore
"""

EXAMPLES = r"""
- name: After a restore onto a replacement server, give the application its password back
  clinic.backup.role_passwords:
    login_user: postgres
    roles:
      - name: clinic_user
        password: "{{ vault_clinic_user_password }}"
"""

RETURN = r"""
roles:
  description: Each role and whether its password was (or, in check mode, would be) changed.
  returned: success
  type: list
  elements: dict
  sample:
    - name: clinic_user
      changed: true
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    AUDIT_ARGS,
    CONNECTION_ARGS,
    connection_from_params,
    exit_audited,
    fail_audited,
    missing_library,
)
from ansible_collections.clinic.backup.plugins.module_utils.role_passwords import set_passwords


def argument_spec():
    spec = dict(CONNECTION_ARGS)
    spec.update(AUDIT_ARGS)
    spec.update(
        database=dict(type="str", default="postgres"),
        roles=dict(
            type="list",
            elements="dict",
            required=True,
            options=dict(
                name=dict(type="str", required=True),
                password=dict(type="str", required=True, no_log=True),
            ),
        ),
    )
    return spec


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    missing = missing_library(module.params, psycopg2=True)
    if missing:
        module.fail_json(msg=missing_required_lib(missing[0]), exception=str(missing[1]))
    try:
        result = set_passwords(
            connection_from_params(module.params),
            module.params["roles"],
            check_mode=module.check_mode,
        )
    except BackupError as exc:
        fail_audited(module, "credentials", exc)
    exit_audited(module, "credentials", result)


if __name__ == "__main__":
    main()
