#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: backup_info
short_description: List the backup sets of a local repository and/or an S3 prefix
version_added: 0.1.0
description:
  - Read-only catalog of the backup sets in a local O(repository), an S3 location (O(bucket) and
    O(prefix)), or both at once, newest first.
  - Every set is listed with its database, format, times, size, encryption and the outcome of its last
    verification (see M(clinic.backup.backup_verify)). A set whose manifest cannot be read is listed with
    RV(sets[].state=corrupt) and the error, and a warning names it; it is never RV(newest).
  - A set held in both places is listed once per place (RV(sets[].repository) tells which).
  - With O(passphrase_file) every manifest and verification record is authenticated
    (RV(sets[].authentication)); one that fails is listed as corrupt or forged. Without it nothing is
    authenticated and a warning says so. RV(newest) is never a set whose manifest carries no MAC.
  - Never changes anything; reads the same in check mode. With O(audit_log) the read itself is recorded
    (action C(read), in check mode too), so access to the backups' catalog is logged.
  - O(sse), O(kms_key_id) and O(storage_class) only matter to modules that upload; they are accepted here so
    that one set of S3 variables serves every module.
author:
  - Clinic Backup Team (@clinic-backup)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clinic.backup.audit
  - clinic.backup.authentication
  - clinic.backup.s3
  - clinic.backup.s3.location
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  repository:
    description: Local repository directory (absolute path). At least one of O(repository) and O(bucket) is required.
    type: path
  database:
    description:
      - Only report sets of this database.
      - A set with a corrupt manifest is kept when its set id carries this database's name.
    type: str
  limit:
    description:
      - Return at most this many sets in RV(sets) (the newest ones).
      - RV(newest) and RV(databases) still consider every set.
    type: int
  newest_only:
    description: Return only the newest complete set in RV(sets) (an empty list when there is none).
    type: bool
    default: false
  require_verified:
    description:
      - RV(newest) (and with O(newest_only=true), RV(sets)) is the newest complete set whose last
        verification passed, not merely the newest complete set.
    type: bool
    default: false
  include_manifest:
    description: Include each set's full manifest (artifacts, checksums, options, per-table row counts).
    type: bool
    default: false
  list_tables:
    description:
      - Also return the tables of one set (O(set_id), by default RV(newest)) with their rows in the backup's
        snapshot, from its manifest, in RV(tables). These are the names M(clinic.backup.backup_restore) takes in
        O(clinic.backup.backup_restore#module:tables).
    type: bool
    default: false
  set_id:
    description: With O(list_tables=true), the set whose tables are listed.
    type: str
  max_age_hours:
    description:
      - Mark the newest complete set of each database with RV(sets[].stale), true when it finished longer ago
        than this many hours (RV(newest) and RV(databases) get it too).
      - Omitted or V(0), no staleness is reported.
    type: float
seealso:
  - module: clinic.backup.backup_verify
  - module: clinic.backup.s3_transfer
  - module: clinic.backup.pg_dump
"""

EXAMPLES = r"""
- name: Sets in the local repository
  clinic.backup.backup_info:
    repository: /var/backups/clinic/db
  register: catalog

- name: Newest verified clinic_db set, local and offsite, and whether it is older than a day
  clinic.backup.backup_info:
    repository: /var/backups/clinic/db
    bucket: clinic-backups
    prefix: db/clinic-main
    database: clinic_db
    newest_only: true
    require_verified: true
    max_age_hours: 25
  register: verified

- name: The tables of a set and their row counts (before a table restore)
  clinic.backup.backup_info:
    repository: /var/backups/clinic/db
    passphrase_file: /root/.backup-passphrase
    list_tables: true
    set_id: 20261122T010000Z-clinic_db-1a2b3c
  register: set_tables

- name: Alert when no fresh verified backup exists
  ansible.builtin.fail:
    msg: no verified clinic_db backup from the last 25 hours
  when: verified.newest is none or verified.newest.stale
"""

RETURN = r"""
sets:
  description:
    - Backup sets, newest first. A corrupt set has only RV(sets[].id), RV(sets[].state),
      RV(sets[].repository) and RV(sets[].error).
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: Set id (starts with the UTC start time).
      type: str
      sample: 20261122T010000Z-clinic_db-1a2b3c
    state:
      description: V(complete), or V(corrupt) when the manifest could not be read.
      type: str
    repository:
      description: Where this copy of the set is (a directory or an C(s3://) URL).
      type: str
    error:
      description: Why the set is corrupt.
      type: str
      returned: when state is corrupt
    database:
      description: The database backed up.
      type: str
    format:
      description: pg_dump format (V(custom), V(directory) or V(plain)).
      type: str
    started_at:
      description: UTC start time.
      type: str
    finished_at:
      description: UTC finish time.
      type: str
    age_hours:
      description: Hours since the set finished.
      type: float
    size:
      description: Total size of the artifacts in bytes.
      type: int
    encrypted:
      description: Whether the artifacts are encrypted.
      type: bool
    authentication:
      description:
        - V(ok) when the manifest's MAC holds under the key of O(passphrase_file), V(none) when it carries
          no MAC (written before records were sealed, or planted), V(not checked) without O(passphrase_file).
      type: str
    verification:
      description:
        - Outcome of the last verification (V(ok), V(failed), V(unverified) or V(unknown)).
        - With O(passphrase_file), V(forged) for a record whose MAC fails or that belongs to another set,
          and V(unverified) for an unsealed record beside a sealed manifest.
      type: str
    verification_detail:
      description: Why a verification record was not trusted, when it was not.
      type: str
    restore_tested_at:
      description:
        - UTC time of the last successful restore test (rehearsal) of this set, from the sealed record the
          rehearsal left next to it (playbook or cron), or null.
      type: str
    restore_test_rto_seconds:
      description: Measured duration of that restore test (the RTO it showed).
      type: float
    restore_test_rpo_seconds:
      description: Age of the data that restore test brought back (the RPO it showed).
      type: float
    verified_at:
      description: UTC time of the last verification, or null.
      type: str
    object_lock:
      description:
        - The S3 Object Lock holding the set's manifest as the store reports it, or null (not locked, lock
          expired, a local repository, or a store that does not report retention).
        - V(mode) (V(GOVERNANCE) or V(COMPLIANCE)), V(retain_until) (UTC; the set cannot be deleted before)
          and V(legal_hold).
      type: dict
      sample: {"mode": "COMPLIANCE", "retain_until": "2026-12-31T01:00:00.000000Z", "legal_hold": false}
    row_counts:
      description: Summary of the per-table row counts in the manifest (V(tables) counted, total V(rows)), or null.
      type: dict
      sample: {"tables": 12, "rows": 48210}
    kind:
      description: V(basebackup) for a base backup of a whole cluster (RV(sets[].database) is the cluster's name).
      type: str
      returned: for base backups
    recovery_window:
      description:
        - How far a base backup reaches with the WAL archived in the same repository. V(earliest) is
          the time its backup stopped (no earlier point can be recovered from it), V(latest) the
          archive time of the last segment of the unbroken run of WAL from its start (V(latest_wal)).
        - V(latest) is null, with V(problem), when the WAL the backup itself needs is not all archived.
      type: dict
      returned: for base backups
      sample: {"earliest": "2026-12-03T02:00:41.112000Z", "latest": "2026-12-03T14:05:00.020000Z",
               "latest_wal": "000000010000000A00000042"}
    stale:
      description: Whether the set finished longer than O(max_age_hours) ago.
      type: bool
      returned: with O(max_age_hours), on the newest complete set of each database
    manifest:
      description: The full manifest.
      type: dict
      returned: when O(include_manifest=true)
newest:
  description:
    - The newest complete set (verified ok with O(require_verified=true)), as in RV(sets), or null when
      there is none.
  returned: always
  type: dict
databases:
  description: Per database, the number of complete sets and the newest ones.
  returned: always
  type: dict
  sample:
    clinic_db:
      count: 14
      newest: 20261122T010000Z-clinic_db-1a2b3c
      newest_verified: 20261121T010000Z-clinic_db-9f8e7d
      age_hours: 5.2
      stale: false
tables:
  description:
    - With O(list_tables=true), the set whose tables are listed and its tables, sorted by name, with their rows
      in the backup's snapshot (manifest). Null when there is no set to list (no O(set_id) and no RV(newest)).
  returned: when O(list_tables=true)
  type: dict
  contains:
    set_id:
      description: The set.
      type: str
    repository:
      description: Where its manifest was read.
      type: str
    database:
      description: The database backed up.
      type: str
    authentication:
      description: As RV(sets[].authentication).
      type: str
    rows:
      description: Total rows.
      type: int
    tables:
      description: One entry per table.
      type: list
      elements: dict
      sample:
        - {table: public.appointments, schema: public, name: appointments, rows: 4000}
        - {table: public."Patient Notes", schema: public, name: Patient Notes, rows: 25}
repositories:
  description: The locations read (a directory and/or an C(s3://) URL).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.basebackup import (
    add_recovery_windows,
)
from ansible_collections.clinic.backup.plugins.module_utils.catalog import list_catalog
from ansible_collections.clinic.backup.plugins.module_utils.catalog_report import (
    build_report,
    check_options,
    merge_entries,
)
from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    AUDIT_ARGS,
    AWS_CREDENTIAL_ARGS,
    PASSPHRASE_ARGS,
    S3_LOCATION_ARGS,
    error_result,
    missing_library,
    record_read,
    repositories_from_params,
)
from ansible_collections.clinic.backup.plugins.module_utils.repository import utc_now
from ansible_collections.clinic.backup.plugins.module_utils.table_restore import set_tables


def argument_spec():
    spec = dict(AWS_CREDENTIAL_ARGS)
    spec.update(S3_LOCATION_ARGS)
    spec.update(PASSPHRASE_ARGS)
    spec.update(
        repository=dict(type="path"),
        database=dict(type="str"),
        limit=dict(type="int"),
        newest_only=dict(type="bool", default=False),
        require_verified=dict(type="bool", default=False),
        include_manifest=dict(type="bool", default=False),
        max_age_hours=dict(type="float"),
        list_tables=dict(type="bool", default=False),
        set_id=dict(type="str"),
    )
    spec.update(AUDIT_ARGS)
    return spec


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
    try:
        check_options(params["limit"], params["max_age_hours"])
        repos = repositories_from_params(params)
        key = RecordKey.from_file(params["passphrase_file"], params["old_passphrase_files"])
        entries = merge_entries(
            *(add_recovery_windows(repo, list_catalog(repo, key=key), key) for repo in repos)
        )
        report = build_report(
            entries,
            utc_now(),
            database=params["database"],
            limit=params["limit"],
            newest_only=params["newest_only"],
            require_verified=params["require_verified"],
            include_manifest=params["include_manifest"],
            max_age_hours=params["max_age_hours"],
        )
        if params["list_tables"]:
            wanted = params["set_id"] or (report["newest"] or {}).get("id")
            report["tables"] = set_tables(entries, wanted) if wanted else None
        # Who read the catalog is recorded (in check mode too: the read happened).
        record_read(module, params["database"])
    except BackupError as exc:
        module.fail_json(**error_result(exc))
    if key is None:
        report["warnings"].append(
            "sets were not authenticated (no passphrase_file): a set planted or altered by "
            "someone who can write to the repository would be listed like a real one"
        )
    for warning in report.pop("warnings"):
        module.warn(warning)
    module.exit_json(changed=False, repositories=[repo.url for repo in repos], **report)


if __name__ == "__main__":
    main()
