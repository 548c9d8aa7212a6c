#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: backup_status
short_description: Status at a glance of one database or file group - sets, copies, restore test, overdue
version_added: 0.1.0
description:
  - Read-only. The table C(clinic-backup status) prints for one database or file group; every set (newest
    first) with its finish time and age, duration, size and compression ratio where known, and each copy (the
    local O(repository) and every entry of O(s3_targets)) with its verification state and authentication;
    the last restore test with its measured RTO and RPO; and what is overdue.
  - Overdue means no authenticated backup within O(backup_max_age_hours), a repository with no copy verified
    within O(verify_max_age_days), or no successful restore test within O(restore_test_max_age_days) (V(never)
    when there is no record at all). V(0) disables a check.
  - The restore test is read from what the agent and the playbooks leave behind, whichever exist - the
    agent's metrics file in O(metrics_dir), the O(audit_log) and O(restore_test_log). With none of them the
    last restore test is V(never).
  - With O(passphrase_file) every manifest and verification record is authenticated; a copy that is not says
    C(NOT AUTHENTICATED) or C(verification FORGED). Without it, every copy says C(NOT AUTHENTICATED).
  - A repository that cannot be read is named in RV(status.problems) and RV(status.errors); the task still
    succeeds with what could be read, so the table shows the rest. Use RV(overdue) to fail a play.
  - Never changes anything; reads the same in check mode. With O(audit_log), the read itself is recorded
    (action C(read), in check mode too; access to the backups' catalog is logged like any other access),
    and RV(status.audit) says whether the log is intact and what it holds.
  - O(s3_targets) takes the same list as M(clinic.backup.pg_dump); only its C(bucket), C(prefix), C(region)
    and C(endpoint_url) are used here (C(sse), C(kms_key_id), C(storage_class) and the upload tuning options
    do nothing in this module).
author:
  - Clinic Backup Team (@clinic-backup)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clinic.backup.authentication
  - clinic.backup.s3
  - clinic.backup.s3.targets
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  database:
    description:
      - The database (or file group, the C(name) of M(clinic.backup.files_backup)) whose sets are shown.
      - Sets of other databases in the same repository are left out.
    type: str
    required: true
  repository:
    description: Local repository directory (absolute path). At least one of O(repository) and O(s3_targets) is required.
    type: path
  audit_log:
    description: The audit log the agent and the modules append to; its restore test records are read.
    type: path
  metrics_dir:
    description:
      - node_exporter's textfile directory the agent writes its metrics to (its C(--metrics-dir)); the
        restore-test metrics file there holds the last restore test's RTO and RPO.
    type: path
  restore_test_log:
    description: The log C(playbooks/restore_test.yml) appends to (C(clinic_backup_restore_test_log)).
    type: path
  backup_max_age_hours:
    description: Overdue when the newest authenticated set finished longer ago than this; V(0) disables the check.
    type: float
    default: 25
  verify_max_age_days:
    description:
      - Overdue when a repository holds no copy whose verification passed within this many days; V(0)
        disables the check.
    type: float
    default: 8
  restore_test_max_age_days:
    description: Overdue when no restore test succeeded within this many days; V(0) disables the check.
    type: float
    default: 32
  limit:
    description: Show at most this many sets (the newest); RV(status.older_sets) counts the rest.
    type: int
    default: 10
seealso:
  - module: clinic.backup.backup_info
  - module: clinic.backup.backup_verify
  - module: clinic.backup.backup_restore
"""

EXAMPLES = r"""
- name: Status of clinic_db, local and off-site
  clinic.backup.backup_status:
    database: clinic_db
    repository: /var/backups/clinic/db
    s3_targets:
      - {bucket: clinic-backups, prefix: db/clinic-main}
    passphrase_file: /root/.backup-passphrase
    audit_log: /var/log/clinic-backup/audit.log
    metrics_dir: /var/lib/prometheus/node-exporter
  register: clinic_status

- name: Show the table
  ansible.builtin.debug:
    msg: "{{ clinic_status.table }}"

- name: Fail when anything is overdue
  ansible.builtin.assert:
    that: not clinic_status.overdue
    fail_msg: "{{ clinic_status.status.overdue | map(attribute='message') | join('; ') }}"
"""

RETURN = r"""
table:
  description: The status as text, one line per element (what C(clinic-backup status) prints for this group).
  returned: always
  type: list
  elements: str
overdue:
  description: Whether anything is overdue or a repository could not be read.
  returned: always
  type: bool
status:
  description: The status as data (what C(clinic-backup status --json) gives per group).
  returned: always
  type: dict
  contains:
    name:
      description: The database or file group.
      type: str
    kind:
      description: V(database) or V(files).
      type: str
    repositories:
      description: Every repository read, local first (a directory or an C(s3://) URL).
      type: list
      elements: str
    sets:
      description:
        - Sets, newest first, each with C(id), C(finished_at), C(finished) (local time and age), C(age_seconds),
          C(duration_seconds), C(size) (bytes), C(ratio) (source bytes over stored bytes, or null when the
          manifest does not record them), C(kind), C(encrypted) and C(copies).
        - Each copy has C(repository), C(where) (V(local) or V(s3)), C(present), C(state), C(verification),
          C(verified_at), C(authentication) and C(text) (as in the table).
      type: list
      elements: dict
    older_sets:
      description: Sets left out by O(limit).
      type: int
    restore_test:
      description:
        - The last restore test (C(at) UTC, C(ok), C(set_id), C(rto_seconds), C(rpo_seconds), C(sources)), or
          null (never). C(rpo_derived) is true when the RPO was computed from the set's start time because
          the record did not carry it.
      type: dict
    last_successful_restore_test:
      description: The last restore test that succeeded, as RV(status.restore_test), or null.
      type: dict
    restore_tests:
      description:
        - Every restore test found (newest first, at most 50), as RV(status.restore_test). A set's own sealed
          C(restore_test.json) counts, whichever path ran the test.
      type: list
      elements: dict
    audit:
      description:
        - With O(audit_log) only. C(present), C(intact) (the hash chain holds), C(first_bad_line), C(records),
          C(actions) (records per action), C(first_at) and C(last_at).
      returned: when O(audit_log) is given
      type: dict
    overdue:
      description: What is overdue, each with C(check) (V(backup), V(verify), V(restore_test)) and C(message).
      type: list
      elements: dict
    problems:
      description: Corrupt sets, forged verification records, unauthenticated sets, a failed last restore test.
      type: list
      elements: str
    errors:
      description: What could not be read (a repository, a log).
      type: list
      elements: str
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.audit import log_evidence
from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    AWS_CREDENTIAL_ARGS,
    PASSPHRASE_ARGS,
    error_result,
    missing_library,
    record_read,
    s3_target_options,
)
from ansible_collections.clinic.backup.plugins.module_utils.repository import utc_now
from ansible_collections.clinic.backup.plugins.module_utils.status import (
    Thresholds,
    render_group,
)
from ansible_collections.clinic.backup.plugins.module_utils.status_facts import (
    gather_group,
    locations_of,
)


def argument_spec():
    spec = dict(AWS_CREDENTIAL_ARGS)
    spec.update(PASSPHRASE_ARGS)
    spec.update(
        database=dict(type="str", required=True),
        repository=dict(type="path"),
        s3_targets=dict(type="list", elements="dict", default=[], options=s3_target_options()),
        audit_log=dict(type="path"),
        metrics_dir=dict(type="path"),
        restore_test_log=dict(type="path"),
        backup_max_age_hours=dict(type="float", default=25.0),
        verify_max_age_days=dict(type="float", default=8.0),
        restore_test_max_age_days=dict(type="float", default=32.0),
        limit=dict(type="int", default=10),
    )
    return spec


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
        required_one_of=[("repository", "s3_targets")],
    )
    params = module.params
    missing = missing_library(params)
    if missing:
        module.fail_json(msg=missing_required_lib(missing[0]), exception=str(missing[1]))
    try:
        thresholds = Thresholds(
            params["backup_max_age_hours"],
            params["verify_max_age_days"],
            params["restore_test_max_age_days"],
        )
        group = gather_group(
            params["database"],
            locations_of(params),
            RecordKey.from_file(params["passphrase_file"]),
            utc_now(),
            audit_log=params["audit_log"],
            metrics_dir=params["metrics_dir"],
            restore_test_log=params["restore_test_log"],
            thresholds=thresholds,
            limit=params["limit"],
        )
        if params["audit_log"]:
            record_read(module, params["database"])
            group["audit"] = log_evidence(params["audit_log"])
            if group["audit"]["present"] and not group["audit"]["intact"]:
                group["problems"].append(
                    "audit log %s is NOT intact from line %s on (edited, removed or "
                    "inserted lines): clinic-backup audit-verify names the line"
                    % (params["audit_log"], group["audit"]["first_bad_line"])
                )
    except BackupError as exc:
        module.fail_json(**error_result(exc))
    for error in group["errors"]:
        module.warn(error)
    module.exit_json(
        changed=False,
        status=group,
        table=render_group(group),
        overdue=bool(group["overdue"] or group["errors"]),
    )


if __name__ == "__main__":
    main()
