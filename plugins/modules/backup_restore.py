#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: backup_restore
short_description: Restore a backup set into PostgreSQL, or rehearse the restore and measure RTO/RPO
version_added: 0.1.0
description:
  - Restores one backup set from a local repository or an S3 prefix into a PostgreSQL server.
  - The set is streamed (stored bytes, sha256, gpg, decompression, C(pg_restore) or C(psql)) into a new work
    database; its sha256 is checked against the manifest and the row count of every table against the
    counts taken in the backup's snapshot. Only then does the work database take the target's name.
    Whatever fails, the work database is dropped and the target is untouched.
  - O(mode=create) restores into a database that must not exist yet. O(mode=replace) keeps the current
    database aside, renamed C(<target>__pre_restore_<time>), as the rollback (see O(keep_previous)).
    O(mode=rehearse) restores into a scratch database, checks it and drops it (the monthly restore test),
    returning the measured duration (RTO) and the age of the data (RPO).
  - Without O(set_id) the newest complete set is taken; a set that turns out damaged (missing artifact,
    sha256 mismatch, rows missing) is passed over for the next older one and reported in RV(damaged).
  - A wrong passphrase, a server error or bad input stops at once, never falls back to older data.
  - O(mode=tables) restores chosen tables (O(tables)) into the existing O(target_database). The whole set is
    restored into a work database and checked as above, then, in one transaction on the live database, the
    tables' rows are appended (O(table_mode=append)) or the tables are dropped and re-created with their
    schema, indexes, constraints and triggers as in the backup (O(table_mode=replace)). Every format works
    (custom, directory and plain, through the work database).
  - Only sets whose manifest MAC holds under the passphrase's key are taken, and only encrypted ones
    (see O(allow_unauthenticated), O(allow_unencrypted)). Plain SQL scripts run in C(psql) restricted mode
    (C(\restrict)), so a meta-command in a script is refused and the set reported as tampered with.
author:
  - Clinic Backup Team (@clinic-backup)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clinic.backup.audit
  - clinic.backup.authentication
  - clinic.backup.authentication.unauthenticated
  - clinic.backup.authentication.restore
  - clinic.backup.connection
  - clinic.backup.s3
  - clinic.backup.s3.location
attributes:
  check_mode:
    support: full
    details:
      - Chooses the set and checks the target and the privileges; creates, renames and drops nothing.
      - With O(mode=tables), also resolves the table names in the set, counts the live tables' rows and reports
        (and, for O(table_mode=replace), refuses) the objects that depend on them.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  repository:
    description: Local repository directory. Exactly one of O(repository) and O(bucket) is required.
    type: path
  set_id:
    description: The set to restore. By default the newest suitable set (see O(database), O(require_verified), O(not_after)).
    type: str
  database:
    description: Only consider sets of this database when choosing one.
    type: str
  target_database:
    description:
      - Database to create (O(mode=create)) or replace (O(mode=replace)).
      - For O(mode=rehearse), the scratch database; by default C(<database>_restore_test).
      - For O(mode=tables), the existing (live) database the tables are restored into.
    type: str
  mode:
    description:
      - V(create) restores into a new database and fails if O(target_database) exists.
      - V(replace) swaps the restored database in for the current one, which is kept as the rollback.
      - V(rehearse) restores into a scratch database, checks it, drops it and reports RTO/RPO.
      - V(tables) restores only O(tables) into the existing O(target_database) (see O(table_mode)).
    type: str
    choices: [create, replace, rehearse, tables]
    default: create
  tables:
    description:
      - With O(mode=tables) (required there, refused otherwise), the tables to restore, as the set's manifest
        names them (M(clinic.backup.backup_info) with O(clinic.backup.backup_info#module:list_tables=true) lists
        them), for example V(public.appointments), or a bare V(appointments) when only one schema has that table. Quoted parts
        are unquoted (V(public."Patient Notes")), unquoted parts are taken literally (no case folding).
      - A name the set does not hold fails before anything is built, listing the set's tables.
    type: list
    elements: str
  table_mode:
    description:
      - With O(mode=tables), V(append) copies the backup's rows into the existing live tables (the rows deleted
        by mistake); a row whose key is already there, or that breaks a foreign key, fails the whole restore and
        nothing is changed. The live table's triggers fire.
      - V(replace) drops each live table (never with CASCADE) and re-creates it from the backup's definition
        with its rows, indexes, constraints, triggers, comments and grants (a dropped or damaged table). A table
        that does not exist any more is simply created. Views, other tables' foreign keys and other objects that
        depend on a table make the restore refuse, naming them (see O(recreate_foreign_keys)).
      - Either way, the sequences a table owns are set to the later of the backup's and the live value, so no
        id is handed out twice, and each table's row count is checked before the transaction commits.
    type: str
    choices: [append, replace]
    default: append
  recreate_foreign_keys:
    description:
      - With O(table_mode=replace), foreign keys of other tables that point at a replaced table are dropped
        and re-created in the same transaction, which checks them against the restored rows (a row pointing at
        a row the backup does not have fails the whole restore). Listed in RV(foreign_keys_recreated).
      - Views and other dependent objects are never dropped; they always make O(table_mode=replace) refuse.
    type: bool
    default: false
  maintenance_db:
    description: Database to connect to for creating, renaming and dropping databases.
    type: str
    default: postgres
  require_verified:
    description: Only restore sets whose last M(clinic.backup.backup_verify) run passed (the ransomware case).
    type: bool
    default: false
  not_after:
    description:
      - Only restore sets that finished at or before this ISO 8601 time with a zone, for example
        V(2026-11-30T06:00:00Z) (the last moment known to be clean).
    type: str
  fallback:
    description: Without O(set_id), try the next older set when the chosen one is damaged.
    type: bool
    default: true
  jobs:
    description: Parallel C(pg_restore) jobs (directory-format sets only).
    type: int
    default: 1
  include_globals:
    description:
      - Replay the set's roles and tablespaces (C(pg_dumpall --globals-only)) before the database, as on a
        replacement server. A role that already exists keeps its password; its attributes (LOGIN, CREATEDB...)
        are set as in the backup.
      - Role passwords are not part of the backup unless it was taken as a superuser; set them afterwards.
      - Ignored with O(mode=rehearse), which never changes server-wide objects.
    type: bool
    default: false
  owner:
    description: Owner of the created database. By default the connecting role.
    type: str
  no_owner:
    description:
      - Do not restore object ownership (C(pg_restore --no-owner)); every object belongs to the connecting role.
      - With O(mode=tables) and O(table_mode=replace), the re-created tables belong to the connecting role too.
    type: bool
    default: false
  keep_previous:
    description: With O(mode=replace), keep the replaced database (renamed) instead of dropping it.
    type: bool
    default: true
  check_row_counts:
    description: Compare the row count of every table with the counts recorded in the manifest; a difference fails the restore.
    type: bool
    default: true
  scratch_dir:
    description:
      - Directory for unpacking directory-format sets before C(pg_restore) reads them (a private
        temporary directory inside it is removed afterwards). By default the system temporary directory.
    type: path
requirements:
  - psycopg2
  - gpg, zstd/gzip, pg_restore and psql on the host
notes:
  - The connecting role needs CREATEDB; O(mode=replace) also needs to own the target database (or be a superuser).
  - Sessions connected to the target are terminated when it is replaced; stop the application first.
  - O(mode=tables) needs CREATEDB (for the work database) and, for O(table_mode=replace), the ownership of the
    tables (or a superuser). It waits at most 60 seconds for a table the application holds, then fails
    changing nothing. The live tables are locked until the transaction commits, against readers too with
    O(table_mode=replace), against writers only with O(table_mode=append).
seealso:
  - module: clinic.backup.backup_verify
  - module: clinic.backup.pg_dump
"""

EXAMPLES = r"""
- name: Monthly restore test of the newest backup (measures RTO and RPO, drops the scratch database)
  clinic.backup.backup_restore:
    repository: /var/backups/clinic/db
    database: clinic_db
    mode: rehearse
    passphrase_file: /root/.backup-passphrase
    login_user: postgres
  register: restore_test

- name: Database corruption - put the newest good backup in place, keep the damaged one aside
  clinic.backup.backup_restore:
    repository: /var/backups/clinic/db
    database: clinic_db
    target_database: clinic_db
    mode: replace
    passphrase_file: /root/.backup-passphrase
    login_user: postgres

- name: Ransomware - newest verified set from before the intrusion, from the offsite bucket
  clinic.backup.backup_restore:
    bucket: clinic-backups-offsite
    prefix: db/clinic-main
    database: clinic_db
    target_database: clinic_db
    require_verified: true
    not_after: "2026-11-29T22:00:00Z"
    include_globals: true
    passphrase_file: /root/.backup-passphrase
    login_user: postgres

- name: Appointments deleted by mistake - append the newest backup's rows to the live table
  clinic.backup.backup_restore:
    repository: /var/backups/clinic/db
    database: clinic_db
    target_database: clinic_db
    mode: tables
    tables: [public.appointments]
    table_mode: append
    passphrase_file: /root/.backup-passphrase
    login_user: postgres

- name: A dropped or damaged table - put it back with its schema, re-checking the foreign keys pointing at it
  clinic.backup.backup_restore:
    repository: /var/backups/clinic/db
    database: clinic_db
    target_database: clinic_db
    mode: tables
    tables: [public.prescriptions]
    table_mode: replace
    recreate_foreign_keys: true
    passphrase_file: /root/.backup-passphrase
    login_user: postgres
"""

RETURN = r"""
set_id:
  description: The set that was restored (or would be, in check mode).
  returned: always
  type: str
target_database:
  description: The database restored into.
  returned: always
  type: str
mode:
  description: The mode used.
  returned: always
  type: str
duration_seconds:
  description: Wall time from the start of the task until the restored database was checked and in place (the measured RTO).
  returned: success
  type: float
summary:
  description: One line for people - the set, the database it went into, the measured RTO, and how old the data is (RPO).
  returned: success
  type: str
rpo_seconds:
  description: Age of the restored data, from the backup's snapshot until now (the data an incident now would lose).
  returned: success
  type: float
row_counts:
  description: Per table, the rows recorded in the manifest and the rows found after the restore.
  returned: success
  type: list
  elements: dict
  sample:
    - table: public.patients
      expected: 250
      restored: 250
damaged:
  description: Sets tried before the restored one and found damaged, with the reason (newest first).
  returned: success
  type: list
  elements: dict
passed_over:
  description: Newer sets not considered, with the reason (corrupt, unverified, too recent).
  returned: success
  type: list
  elements: dict
previous_database:
  description: With O(mode=replace), the name the replaced database was given (the rollback), or null.
  returned: when mode is replace
  type: str
globals:
  description: With O(include_globals), whether roles were replayed and which statements failed.
  returned: when include_globals is true
  type: dict
database_properties:
  description:
    - The database's own privileges, settings, comment and owner (C(GRANT/REVOKE ... ON DATABASE),
      C(ALTER DATABASE ... SET), C(COMMENT ON DATABASE)) applied to the restored database from the set.
    - C(applied), C(statements) (how many), C(errors) (statements the server refused, also in C(warnings),
      e.g. a granted role missing on this server), C(problems). Plain-format sets hold none.
  returned: success, except with O(mode=tables)
  type: dict
  sample: {applied: true, statements: 4, errors: [], problems: []}
table_mode:
  description: With O(mode=tables), the table mode used.
  returned: when mode is tables
  type: str
tables:
  description:
    - With O(mode=tables), per table what was done (in check mode, what would be done, and the failure
      result of a refused O(table_mode=replace) carries it too).
  returned: when mode is tables
  type: list
  elements: dict
  contains:
    table:
      description: The table, as the manifest names it.
      type: str
      sample: public.appointments
    expected:
      description: Its rows in the backup's snapshot (manifest).
      type: int
    restored:
      description: Rows copied into the live table.
      type: int
    rows_before:
      description: Rows in the live table before, or null when it did not exist.
      type: int
    rows_after:
      description: Rows in the live table after (checked before the commit).
      type: int
    exists:
      description: In check mode, whether the live table exists.
      type: bool
    existed:
      description: Whether the live table existed before.
      type: bool
    sequences:
      description: The sequences the table owns and the next value each will hand out.
      type: list
      elements: dict
    dependents:
      description:
        - What depends on the live table, or null when it did not exist. V(referenced_by) (other tables' foreign
          keys, with their definition), V(views), V(other) (functions, columns or defaults using its row type or
          sequences) block O(table_mode=replace); V(references) (its own foreign keys) and V(triggers) (which fire
          on append, and come back with the table on replace) are for information.
      type: dict
      sample:
        referenced_by:
          - constraint: prescriptions_record_id_fkey
            table: public.prescriptions
            definition: FOREIGN KEY (record_id) REFERENCES public.medical_records(record_id) ON DELETE CASCADE
        views: [public.patient_summary]
        other: []
        references: [{constraint: medical_records_patient_id_fkey, table: public.patients}]
        triggers: []
foreign_keys_recreated:
  description: With O(recreate_foreign_keys), the foreign keys that were dropped and re-created (checked).
  returned: when mode is tables
  type: list
  elements: str
work_database_dropped:
  description: With O(mode=tables), the work database the set was restored into, dropped afterwards.
  returned: when mode is tables
  type: str
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    AUDIT_ARGS,
    AWS_CREDENTIAL_ARGS,
    CONNECTION_ARGS,
    RESTORE_AUTHENTICATION_ARGS,
    S3_LOCATION_ARGS,
    connection_from_params,
    exit_audited,
    fail_audited,
    missing_library,
    repository_from_params,
)
from ansible_collections.clinic.backup.plugins.module_utils.restore import (
    RestoreOptions,
    run_restore,
)
from ansible_collections.clinic.backup.plugins.module_utils.table_restore import (
    TableRestoreOptions,
    run_table_restore,
)

OPTION_KEYS = (
    "target_database",
    "mode",
    "set_id",
    "database",
    "require_verified",
    "not_after",
    "fallback",
    "passphrase_file",
    "allow_unauthenticated",
    "allow_unencrypted",
    "old_passphrase_files",
    "jobs",
    "include_globals",
    "no_owner",
    "owner",
    "keep_previous",
    "check_row_counts",
    "pg_bin_dir",
    "scratch_dir",
)
# mode: tables takes the options of a restore that choose the set and build the work
# database, and its own.
TABLE_OPTION_KEYS = tuple(
    key
    for key in OPTION_KEYS
    if key not in ("mode", "include_globals", "owner", "keep_previous", "check_row_counts")
) + ("tables", "table_mode", "recreate_foreign_keys")


def argument_spec():
    spec = dict(CONNECTION_ARGS)
    spec.update(AWS_CREDENTIAL_ARGS)
    spec.update(S3_LOCATION_ARGS)
    spec.update(AUDIT_ARGS)
    spec.update(RESTORE_AUTHENTICATION_ARGS)
    spec.update(
        repository=dict(type="path"),
        set_id=dict(type="str"),
        database=dict(type="str"),
        target_database=dict(type="str"),
        mode=dict(
            type="str", default="create", choices=["create", "replace", "rehearse", "tables"]
        ),
        tables=dict(type="list", elements="str"),
        table_mode=dict(type="str", default="append", choices=["append", "replace"]),
        recreate_foreign_keys=dict(type="bool", default=False),
        maintenance_db=dict(type="str", default="postgres"),
        require_verified=dict(type="bool", default=False),
        not_after=dict(type="str"),
        fallback=dict(type="bool", default=True),
        jobs=dict(type="int", default=1),
        include_globals=dict(type="bool", default=False),
        owner=dict(type="str"),
        no_owner=dict(type="bool", default=False),
        keep_previous=dict(type="bool", default=True),
        check_row_counts=dict(type="bool", default=True),
        scratch_dir=dict(type="path"),
    )
    return spec


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
        required_one_of=[("repository", "bucket")],
        mutually_exclusive=[("repository", "bucket")],
        required_if=[
            ("mode", "create", ("target_database",)),
            ("mode", "replace", ("target_database",)),
            ("mode", "tables", ("target_database", "tables")),
        ],
    )
    params = module.params
    missing = missing_library(params, psycopg2=True)
    if missing:
        module.fail_json(msg=missing_required_lib(missing[0]), exception=str(missing[1]))
    if params["tables"] and params["mode"] != "tables":
        module.fail_json(
            msg="tables is only used with mode: tables (got mode: %s); nothing was changed"
            % params["mode"],
            error_type="ConfigError",
        )
    try:
        if params["mode"] == "tables":
            options = TableRestoreOptions(**{key: params[key] for key in TABLE_OPTION_KEYS})
            run = run_table_restore
        else:
            options = RestoreOptions(**{key: params[key] for key in OPTION_KEYS})
            run = run_restore
        result = run(
            repository_from_params(params),
            connection_from_params(params, dbname=params["maintenance_db"]),
            options,
            check_mode=module.check_mode,
        )
    except BackupError as exc:
        fail_audited(module, "restore", exc)
    for warning in result.pop("warnings", []):
        module.warn(warning)
    exit_audited(module, "restore" if result["mode"] != "rehearse" else "restore_test", result)


if __name__ == "__main__":
    main()
