#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: pg_dump
short_description: Take an encrypted, checksummed PostgreSQL backup set into local and S3 repositories
version_added: 0.1.0
description:
  - Runs C(pg_dump) (and C(pg_dumpall --globals-only) for roles and grants) as one streaming pipeline
    C(pg_dump) | C(zstd)/C(gzip) | C(gpg --symmetric --cipher-algo AES256) | sha256, writing every
    target at once; no plaintext copy touches the disk (except the scratch directory O(format=directory)
    needs, see notes).
  - The dump and the row counts recorded in the manifest come from the same exported snapshot.
  - A set is written under a staging name and becomes visible only when its manifest, written last, is
    in place. A killed run leaves nothing that the catalog, verify or restore would take for a backup.
  - If one target fails (for example S3 is down) the others still receive the complete set, and the
    task fails naming the target that did not.
author:
  - Clinic Backup Team (@clinic-backup)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clinic.backup.repository
  - clinic.backup.audit
  - clinic.backup.connection
  - clinic.backup.s3
  - clinic.backup.s3.targets
  - clinic.backup.set_writing
attributes:
  check_mode:
    support: full
    details: Connects, checks the passphrase file, the tables and every target, writes nothing.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  database:
    description:
      - Name of the database to back up.
      - Required unless O(database_url) names one; overrides the URL's database.
    type: str
    aliases: [db, login_db]
  format:
    description:
      - pg_dump output format. V(custom) is restorable selectively and in parallel by C(pg_restore).
      - V(directory) allows parallel dumping with O(jobs); it is tarred before compression and encryption.
    type: str
    choices: [custom, plain, directory]
    default: custom
  jobs:
    description: Parallel dump jobs (O(format=directory) only).
    type: int
    default: 1
  schema_only:
    description: Dump only the schema.
    type: bool
    default: false
  data_only:
    description: Dump only the data.
    type: bool
    default: false
  tables:
    description:
      - Dump only these tables. Each is an exact name, V(table) or V(schema.table); quotes, semicolons
        and wildcards are taken literally. An unknown table fails the task before anything is written.
    type: list
    elements: str
    default: []
  exclude_tables:
    description: Tables to leave out, named like O(tables).
    type: list
    elements: str
    default: []
  compression_threads:
    description: zstd worker threads; V(0) means one per core.
    type: int
    default: 0
  repository:
    description: Local repository directory (created with mode V(0700) if missing; see O(create_repository)).
    type: path
  include_globals:
    description:
      - Also capture roles, memberships and tablespaces with C(pg_dumpall --globals-only), needed to
        restore onto a replacement server. Without superuser rights role passwords are left out.
    type: bool
    default: true
  row_counts:
    description: Record the exact row count of every table, taken in the dump's snapshot, in the manifest.
    type: bool
    default: true
  label:
    description: Free text stored in the manifest (for example V(pre-migration)).
    type: str
requirements:
  - psycopg2
  - pg_dump, pg_dumpall, gpg, zstd or gzip on the host
notes:
  - O(format=directory) cannot stream; pg_dump writes its files into a 0700 scratch directory inside the
    repository's staging area, which is removed as soon as the archive is encrypted.
  - The module holds an exclusive lock on the repository; a second run at the same time fails with
    "already running".
seealso:
  - module: clinic.backup.backup_verify
  - module: clinic.backup.s3_transfer
"""

EXAMPLES = r"""
- name: Back up clinic_db to the local repository and to S3
  clinic.backup.pg_dump:
    database: clinic_db
    login_host: localhost
    login_user: clinic_user
    passfile: /root/.pgpass
    passphrase_file: /root/.backup-passphrase
    repository: /var/backups/clinic/db
    s3_targets:
      - bucket: clinic-backups
        prefix: db/clinic-main
        sse: AES256
      - bucket: clinic-backups-dr
        region: us-west-2
        prefix: db/clinic-main
        storage_class: STANDARD_IA

- name: Back up from a DATABASE_URL (the password never reaches argv)
  clinic.backup.pg_dump:
    database_url: "{{ lookup('ansible.builtin.env', 'DATABASE_URL') }}"
    passphrase_file: /root/.backup-passphrase
    repository: /var/backups/physician-dashboard

- name: Two tables only, before a risky migration
  clinic.backup.pg_dump:
    database: clinic_db
    tables: [patients, public.appointments]
    label: pre-migration
    passphrase_file: /root/.backup-passphrase
    repository: /var/backups/clinic/db
"""

RETURN = r"""
set_id:
  description: Id of the new backup set.
  returned: always
  type: str
  sample: 20261122T010000Z-clinic_db-1a2b3c
database:
  description: Database that was dumped.
  returned: always
  type: str
artifacts:
  description: Stored artifacts with their size, sha256 and location in every target.
  returned: success
  type: list
  elements: dict
  sample:
    - name: database
      file: clinic_db.dump.zst.gpg
      content: pg_dump-custom
      size: 1048576
      sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
      locations:
        /var/backups/clinic/db: /var/backups/clinic/db/sets/20261122T010000Z-clinic_db-1a2b3c/clinic_db.dump.zst.gpg
targets:
  description: Each target with whether it received the set, and its error if not.
  returned: always
  type: list
  elements: dict
size:
  description: Total stored bytes of the set.
  returned: success
  type: int
duration_seconds:
  description: Wall time of the backup.
  returned: success
  type: float
phases:
  description:
    - How long each phase took, in seconds - C(preflight_seconds) (connection, snapshot, checks),
      C(lock_seconds) (the repository lock and layout), C(stream_seconds) (per artifact file, the dump and the
      globals streaming at the same time) and C(commit_seconds) (manifest and pointer in every target).
  returned: success
  type: dict
summary:
  description: One line for people - the set, its size, how long it took, the rate, and the repositories it went into.
  returned: success
  type: str
manifest:
  description: The manifest written with the set.
  returned: success
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.backup import BackupOptions, run_backup
from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    AUDIT_ARGS,
    AWS_CREDENTIAL_ARGS,
    CONNECTION_ARGS,
    SET_WRITING_ARGS,
    connection_from_params,
    exit_audited,
    fail_audited,
    missing_library,
    target_repositories,
)


def argument_spec():
    spec = dict(CONNECTION_ARGS)
    spec.update(AWS_CREDENTIAL_ARGS)
    spec.update(AUDIT_ARGS)
    spec.update(
        format=dict(type="str", default="custom", choices=["custom", "plain", "directory"]),
        jobs=dict(type="int", default=1),
        schema_only=dict(type="bool", default=False),
        data_only=dict(type="bool", default=False),
        tables=dict(type="list", elements="str", default=[]),
        exclude_tables=dict(type="list", elements="str", default=[]),
        compression_threads=dict(type="int", default=0),
        include_globals=dict(type="bool", default=True),
        row_counts=dict(type="bool", default=True),
    )
    spec.update(SET_WRITING_ARGS)
    return spec


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
        required_one_of=[("repository", "s3_targets"), ("database", "database_url")],
        required_if=[("encrypt", True, ("passphrase_file",))],
        mutually_exclusive=[("schema_only", "data_only")],
    )
    params = module.params
    missing = missing_library(params, psycopg2=True)
    if missing:
        module.fail_json(msg=missing_required_lib(missing[0]), exception=str(missing[1]))
    if not params["encrypt"]:
        module.warn("encrypt=false: this backup stores database contents unencrypted")
    try:
        options = BackupOptions(
            format=params["format"],
            jobs=params["jobs"],
            schema_only=params["schema_only"],
            data_only=params["data_only"],
            tables=params["tables"],
            exclude_tables=params["exclude_tables"],
            compression=params["compression"],
            compression_level=params["compression_level"],
            compression_threads=params["compression_threads"],
            encrypt=params["encrypt"],
            passphrase_file=params["passphrase_file"],
            include_globals=params["include_globals"],
            row_counts=params["row_counts"],
            pg_bin_dir=params["pg_bin_dir"],
            label=params["label"],
            stale_seconds=params["stale_seconds"],
        )
        result = run_backup(
            connection_from_params(params),
            target_repositories(params),
            options,
            check_mode=module.check_mode,
        )
    except BackupError as exc:
        fail_audited(module, "backup", exc)
    for warning in result.pop("warnings", []):
        module.warn(warning)
    exit_audited(module, "backup", result)


if __name__ == "__main__":
    main()
