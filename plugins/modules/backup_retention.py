#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: backup_retention
short_description: Delete old backup sets by a grandfather-father-son policy, safely
version_added: 0.1.0
description:
  - Applies a retention policy to a local repository, an S3 prefix, or both, and deletes the backup sets it
    does not keep. The default is the runbook's policy "7 days, 4 weeks, 12 months, 7 years".
  - Counts work like C(--keep-daily) and friends in borg and restic. O(keep_daily=7) keeps the newest set
    of each of the 7 most recent days B(that have sets), not of the last 7 calendar days, so a missed
    night never shortens the history kept. Weeks are ISO weeks, and days, weeks, months and years are
    taken in UTC from each set's start time. One set can count for several rules at once.
  - "These safety rules hold whatever the policy, for each database separately: the newest complete set
    is kept; the newest set verified V(ok) by M(clinic.backup.backup_verify) is kept, and so is every set
    newer than it; at least O(min_keep) sets are kept; the set named by the database's latest pointer is
    kept; a set dated in the future is kept; corrupt sets are reported and left alone; and a plan that
    would leave a database without any complete set is refused."
  - The module holds the repository lock for the whole run, so it never races a backup. A backup that is
    running makes it fail with "already running" and delete nothing.
  - A set is deleted so that an interruption can never leave it listed but incomplete (locally it is moved
    out of C(sets/) in one step first; in S3 the manifest is deleted first). A real run also removes
    leftovers of killed runs older than O(stale_seconds).
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
    details:
      - Plans and returns what would be deleted in RV(deleted); deletes nothing and takes no lock.
      - Leftovers of killed runs are only looked for in a real run.
  diff_mode:
    support: full
    details: The set ids of each repository before and after.
  platform:
    platforms: posix
options:
  repository:
    description:
      - Local repository directory. At least one of O(repository) and O(bucket) is required.
      - When both are given, both are pruned, each planned on its own catalog.
    type: path
  database:
    description: Only prune the sets of this database. By default every database in the repository is pruned.
    type: str
  keep_daily:
    description: Keep the newest set of each of this many most recent days that have sets. V(0) turns the rule off.
    type: int
    default: 7
  keep_weekly:
    description: Keep the newest set of each of this many most recent ISO weeks that have sets. V(0) turns the rule off.
    type: int
    default: 4
  keep_monthly:
    description: Keep the newest set of each of this many most recent months that have sets. V(0) turns the rule off.
    type: int
    default: 12
  keep_yearly:
    description: Keep the newest set of each of this many most recent years that have sets. V(0) turns the rule off.
    type: int
    default: 7
  min_keep:
    description:
      - Always keep at least this many complete sets of each database (the newest ones).
      - O(keep_daily), O(keep_weekly), O(keep_monthly) and O(keep_yearly) may not all be V(0).
    type: int
    default: 3
  stale_seconds:
    description: Leftovers of killed runs (staging directories, unfinished S3 uploads) older than this are removed.
    type: int
    default: 3600
notes:
  - Sets whose verification failed are treated like unverified sets. M(clinic.backup.backup_verify) also fails a
    set for its age or an unusual size, which says nothing about its content.
  - When no set of a database has been verified, sets are kept by date only and a warning says so.
seealso:
  - module: clinic.backup.pg_dump
  - module: clinic.backup.backup_verify
"""

EXAMPLES = r"""
- name: Apply the runbook's policy (7 days, 4 weeks, 12 months, 7 years) to the local repository
  clinic.backup.backup_retention:
    repository: /var/backups/clinic/db

- name: Same policy on the local repository and its S3 copy, after tonight's backup
  clinic.backup.backup_retention:
    repository: /var/backups/clinic/db
    bucket: clinic-backups
    prefix: db/clinic-main
    database: clinic_db

- name: What would a shorter offsite history delete? (nothing is deleted)
  clinic.backup.backup_retention:
    bucket: clinic-backups-dr
    region: us-west-2
    prefix: db/clinic-main
    keep_daily: 3
    keep_weekly: 2
    keep_monthly: 6
    keep_yearly: 2
  check_mode: true
  register: dr_plan
"""

RETURN = r"""
kept:
  description: Ids of the complete sets kept, newest first (over all repositories).
  returned: always
  type: list
  elements: str
  sample: [20261129T010000Z-clinic_db-1a2b3c]
deleted:
  description: Ids of the sets deleted, newest first; in check mode the sets a real run would delete.
  returned: always
  type: list
  elements: str
  sample: [20261020T010000Z-clinic_db-4d5e6f]
corrupt:
  description: Ids of sets whose manifest is unreadable; they are left alone and need an operator.
  returned: always
  type: list
  elements: str
locked:
  description:
    - Sets the policy would delete but that are still under S3 Object Lock (a retain-until date not reached,
      or a legal hold), so they were kept; a later run deletes them once they unlock. One entry per set
      and repository with C(repository), C(id), C(mode) (V(GOVERNANCE) or V(COMPLIANCE)), C(retain_until)
      (UTC) and C(legal_hold).
  returned: always
  type: list
  elements: dict
  sample:
    - repository: s3://clinic-backups/db/clinic-main
      id: 20261020T010000Z-clinic_db-4d5e6f
      mode: COMPLIANCE
      retain_until: "2026-12-20T01:00:05.000000Z"
      legal_hold: false
decisions:
  description:
    - One entry per set considered, newest first, with C(repository), C(id), C(database), C(state)
      (V(complete) or V(corrupt)), C(action) (V(keep) or V(delete)), C(reasons), C(started_at) and
      C(verification).
    - "Reasons are V(daily 2026-11-29), V(weekly 2026-W48), V(monthly 2026-11), V(yearly 2026), V(min_keep),
      V(newest), V(newest verified), V(newer than the newest verified), V(latest pointer),
      V(dated in the future: left alone), V(unreadable start time: left alone), V(corrupt: left alone),
      one starting with V(S3 Object Lock) and giving the mode and the date a locked set unlocks, or,
      for a deletion, V(not kept by the policy)."
  returned: always
  type: list
  elements: dict
  sample:
    - repository: /var/backups/clinic/db
      id: 20261129T010000Z-clinic_db-1a2b3c
      database: clinic_db
      state: complete
      action: keep
      reasons: [daily 2026-11-29, weekly 2026-W48, monthly 2026-11, yearly 2026, min_keep, newest]
      started_at: "2026-11-29T01:00:00.000000Z"
      verification: ok
incomplete_removed:
  description: Leftovers of killed runs that were removed (staging entries, S3 keys). Empty in check mode.
  returned: always
  type: list
  elements: str
policy:
  description: The policy applied.
  returned: always
  type: dict
  sample: {keep_daily: 7, keep_weekly: 4, keep_monthly: 12, keep_yearly: 7, min_keep: 3}
repositories:
  description: The result for each repository (C(repository), C(kept), C(deleted), C(corrupt), C(decisions), C(incomplete_removed)).
  returned: always
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    AUDIT_ARGS,
    AUTHENTICATION_ARGS,
    AWS_CREDENTIAL_ARGS,
    S3_LOCATION_ARGS,
    error_result,
    exit_audited,
    missing_library,
    repositories_from_params,
)
from ansible_collections.clinic.backup.plugins.module_utils.retention import (
    RetentionPolicy,
    apply_retention,
    lock_paths_for,
)

PER_REPOSITORY = ("repository", "kept", "deleted", "corrupt", "decisions", "incomplete_removed")


def argument_spec():
    spec = dict(AWS_CREDENTIAL_ARGS)
    spec.update(S3_LOCATION_ARGS)
    spec.update(AUDIT_ARGS)
    spec.update(AUTHENTICATION_ARGS)
    spec.update(
        repository=dict(type="path"),
        database=dict(type="str"),
        keep_daily=dict(type="int", default=7),
        keep_weekly=dict(type="int", default=4),
        keep_monthly=dict(type="int", default=12),
        keep_yearly=dict(type="int", default=7),
        min_keep=dict(type="int", default=3),
        stale_seconds=dict(type="int", default=3600),
    )
    return spec


def _unique(ids):
    seen = set()
    return [i for i in ids if not (i in seen or seen.add(i))]


def combine(results, policy, check_mode):
    """One module result from the per-repository results."""
    decisions = []
    for result in results:
        decisions.extend(dict(d, repository=result["repository"]) for d in result["decisions"])

    def ids(key):
        return sorted(_unique(i for r in results for i in r[key]), reverse=True)

    return {
        "changed": any(r["changed"] for r in results),
        "policy": policy.as_dict(),
        "kept": ids("kept"),
        "deleted": ids("deleted"),
        "corrupt": ids("corrupt"),
        "locked": [
            dict(entry, repository=r["repository"]) for r in results for entry in r["locked"]
        ],
        "decisions": decisions,
        "incomplete_removed": [i for r in results for i in r["incomplete_removed"]],
        "repositories": [{k: r[k] for k in PER_REPOSITORY} for r in results],
        "check_mode": check_mode,
    }


def diff(result):
    """before/after set lists of one repository (for --diff)."""
    before = sorted({d["id"] for d in result["decisions"]} | set(result["deleted"]), reverse=True)
    after = [i for i in before if i not in set(result["deleted"])]
    return {
        "before_header": "%s (sets)" % result["repository"],
        "after_header": "%s (sets)" % result["repository"],
        "before": "".join(i + "\n" for i in before),
        "after": "".join(i + "\n" for i in after),
    }


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
        required_one_of=[("repository", "bucket")],
    )
    params = module.params
    missing = missing_library(params)
    if missing:
        module.fail_json(msg=missing_required_lib(missing[0]), exception=str(missing[1]))
    results = []
    policy = None
    try:
        policy = RetentionPolicy(
            daily=params["keep_daily"],
            weekly=params["keep_weekly"],
            monthly=params["keep_monthly"],
            yearly=params["keep_yearly"],
            min_keep=params["min_keep"],
        )
        repositories = repositories_from_params(params)
        lock_paths = lock_paths_for(repositories)
        key = RecordKey.from_file(params["passphrase_file"], params["old_passphrase_files"])
        for repo in repositories:
            try:
                results.append(
                    apply_retention(
                        repo,
                        policy,
                        database=params["database"],
                        check_mode=module.check_mode,
                        stale_seconds=params["stale_seconds"],
                        lock_paths=lock_paths,
                        key=key,
                        allow_unauthenticated=params["allow_unauthenticated"],
                    )
                )
            except BackupError as exc:
                if getattr(exc, "result", None):
                    results.append(exc.result)
                raise
    except BackupError as exc:
        failure = error_result(exc)
        if results:
            # Say what was deleted before the failure.
            partial = combine(results, policy, module.check_mode)
            failure.update({k: v for k, v in partial.items() if k != "changed"})
            failure["changed"] = partial["changed"]
        exit_audited(module, "retention", failure, ok=False, fail_task=True)
    outcome = combine(results, policy, module.check_mode)
    for result in results:
        for warning in result["warnings"]:
            module.warn(warning)
    if module._diff:
        outcome["diff"] = [diff(r) for r in results]
    exit_audited(module, "retention", outcome)


if __name__ == "__main__":
    main()
