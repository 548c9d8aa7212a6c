#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: backup_verify
short_description: Prove that a stored backup set is complete, intact, readable and recent
version_added: 0.1.0
description:
  - Verifies one backup set (by default the newest) in a local repository or an S3 prefix.
  - Checks that the manifest is present and valid, that every artifact exists with the recorded size and
    sha256, that it decrypts and decompresses completely and that its content parses
    (C(pg_restore --list) for custom dumps, a safe tar listing with C(toc.dat) for directory dumps, the
    end-of-dump trailer for SQL scripts), that the set is not older than O(max_age_hours), and that its
    size is in line with the recent sets of the same kind.
  - With O(passphrase_file) the manifest's MAC is checked (check C(authentication)); a set without one fails
    unless O(allow_unauthenticated=true). O(passphrase_file) is needed when O(deep=true) for encrypted sets,
    and to record the outcome of an authenticated set (the record is sealed too).
  - A plain SQL script holding a C(psql) meta-command outside COPY data fails (pg_dump writes none there).
  - Each artifact is read once; the result of every check is returned and recorded next to the set, so
    the catalog shows which sets are verified.
author:
  - Clinic Backup Team (@clinic-backup)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clinic.backup.audit
  - clinic.backup.authentication
  - clinic.backup.authentication.unauthenticated
  - clinic.backup.s3
  - clinic.backup.s3.location
attributes:
  check_mode:
    support: full
    details: Runs every check; does not record the result.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  repository:
    description: Local repository directory. Exactly one of O(repository) and O(bucket) is required.
    type: path
  set_id:
    description: Set to verify. By default the newest set (of O(database), if given).
    type: str
  database:
    description: Only consider sets of this database when choosing the newest.
    type: str
  deep:
    description: Decrypt, decompress and parse every artifact. With V(false) only sizes and sha256 are checked.
    type: bool
    default: true
  max_age_hours:
    description: Fail when the set finished longer ago than this. V(0) disables the check.
    type: float
    default: 25
  size_tolerance_percent:
    description:
      - Fail when the database artifact is more than this percent larger, or correspondingly smaller,
        than the median of up to seven earlier sets of the same format and options. V(0) disables the check.
    type: float
    default: 50
  on_failure:
    description: V(fail) fails the task when a check fails; V(warn) returns the result with a warning.
    type: str
    choices: [fail, warn]
    default: fail
  record:
    description: Store the outcome next to the set (C(verification.json)) for the catalog.
    type: bool
    default: true
  pg_bin_dir:
    description: Directory holding C(pg_restore). By default the newest installed PostgreSQL.
    type: path
requirements:
  - gpg, zstd/gzip, pg_restore, tar on the host
seealso:
  - module: clinic.backup.pg_dump
"""

EXAMPLES = r"""
- name: Verify the newest backup (the runbook's daily check, 25 hours maximum age)
  clinic.backup.backup_verify:
    repository: /var/backups/clinic/db
    passphrase_file: /root/.backup-passphrase

- name: Verify the newest set in S3 without failing the play
  clinic.backup.backup_verify:
    bucket: clinic-backups
    prefix: db/clinic-main
    database: clinic_db
    passphrase_file: /root/.backup-passphrase
    on_failure: warn
  register: s3_verify
"""

RETURN = r"""
set_id:
  description: The verified set.
  returned: always
  type: str
ok:
  description: Whether every check passed.
  returned: always
  type: bool
state:
  description: V(ok) or V(failed), as recorded in the catalog.
  returned: always
  type: str
checks:
  description: Every check with its status (V(ok), V(fail)), a detail, and the artifact it concerns.
  returned: always
  type: list
  elements: dict
  sample:
    - name: sha256
      status: fail
      artifact: clinic_db.dump.zst.gpg
      detail: /var/backups/clinic/db/sets/20261122T010000Z-clinic_db-1a2b3c/clinic_db.dump.zst.gpg has sha256 ...
failures:
  description: Details of the failed checks.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    AUDIT_ARGS,
    AUTHENTICATION_ARGS,
    AWS_CREDENTIAL_ARGS,
    S3_LOCATION_ARGS,
    exit_audited,
    fail_audited,
    missing_library,
    repository_from_params,
)
from ansible_collections.clinic.backup.plugins.module_utils.verify import verify_set


def argument_spec():
    spec = dict(AWS_CREDENTIAL_ARGS)
    spec.update(S3_LOCATION_ARGS)
    spec.update(AUDIT_ARGS)
    spec.update(AUTHENTICATION_ARGS)
    spec.update(
        repository=dict(type="path"),
        set_id=dict(type="str"),
        database=dict(type="str"),
        deep=dict(type="bool", default=True),
        max_age_hours=dict(type="float", default=25.0),
        size_tolerance_percent=dict(type="float", default=50.0),
        on_failure=dict(type="str", default="fail", choices=["fail", "warn"]),
        record=dict(type="bool", default=True),
        pg_bin_dir=dict(type="path"),
    )
    return spec


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
        required_one_of=[("repository", "bucket")],
        mutually_exclusive=[("repository", "bucket")],
    )
    params = module.params
    missing = missing_library(params)
    if missing:
        module.fail_json(msg=missing_required_lib(missing[0]), exception=str(missing[1]))
    try:
        outcome = verify_set(
            repository_from_params(params),
            set_id=params["set_id"],
            database=params["database"],
            passphrase_file=params["passphrase_file"],
            deep=params["deep"],
            max_age_hours=params["max_age_hours"],
            size_tolerance_percent=params["size_tolerance_percent"],
            pg_bin_dir=params["pg_bin_dir"],
            record=params["record"] and not module.check_mode,
            allow_unauthenticated=params["allow_unauthenticated"],
            old_passphrase_files=params["old_passphrase_files"],
        )
    except BackupError as exc:
        fail_audited(module, "verify", exc)
    for warning in outcome.pop("warnings", []):
        module.warn(warning)
    fail_task = False
    if not outcome["ok"]:
        outcome["msg"] = "backup set %s failed verification: %s" % (
            outcome["set_id"],
            "; ".join(outcome["failures"]),
        )
        fail_task = params["on_failure"] == "fail"
        if not fail_task:
            module.warn(outcome["msg"])
    exit_audited(module, "verify", dict(outcome, changed=False), outcome["ok"], fail_task)


if __name__ == "__main__":
    main()
