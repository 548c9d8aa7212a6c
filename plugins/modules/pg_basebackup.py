#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: pg_basebackup
short_description: Take an encrypted base backup of a whole PostgreSQL cluster, the start of point-in-time recovery
version_added: 0.1.0
description:
  - Runs C(pg_basebackup -D - -Ft -X none --checkpoint=fast --manifest-checksums=SHA256) and streams its tar
    archive through C(zstd)/C(gzip) | C(gpg --symmetric --cipher-algo AES256) | sha256 into every target at
    once; no plaintext copy of the data directory touches the disk.
  - The result is a backup set of kind C(basebackup) named after O(cluster), in the same repositories,
    catalog, verification and retention as the database backups. Its manifest, written last and sealed,
    records the system identifier, timeline, start and stop LSN, the first and last WAL segment the backup
    needs (C(start_wal), C(stop_wal)) and when it stopped.
  - The server's own C(backup_manifest) rides inside the archive, so that a restore checks the data
    directory with C(pg_verifybackup).
  - The WAL is not in the set (C(-X none)); it comes from the WAL archive (C(clinic-backup wal-push)).
    A server whose archiving is off, unset or failing is refused before anything is written, since its
    base backup could never be made consistent. A backup during which archiving stalls is stopped.
  - If one target fails (for example S3 is down) the others still receive the complete set, and the task
    fails naming the target that did not.
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
    details: Connects, checks the server (version, archiving, replication right, tablespaces), the passphrase
      file and every target, writes nothing.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  cluster:
    description:
      - Name of the PostgreSQL instance (for example V(main)); the set's name in the catalog and the WAL
        archive's (C(wal/<cluster>/)). Letters, digits, V(_), V(.) and V(-).
      - Refused when the repository already holds database or file sets of that name.
    type: str
    required: true
  database:
    description:
      - Database to connect to for the server checks; any one reaches the cluster. Default V(postgres),
        or the database of O(database_url).
      - C(pg_basebackup) itself uses a replication connection with the same host, port and credentials;
        O(login_user) needs the C(REPLICATION) attribute (or superuser) and a C(replication) line in
        C(pg_hba.conf).
    type: str
    aliases: [db, login_db]
  compression_threads:
    description: zstd worker threads; V(0) means one per core.
    type: int
    default: 0
  repository:
    description: Local repository directory (created with mode V(0700) if missing; see O(create_repository)).
    type: path
  label:
    description: Free text stored in the manifest and given to C(pg_basebackup --label).
    type: str
requirements:
  - psycopg2
  - PostgreSQL 13 or newer; pg_basebackup, gpg, zstd or gzip on the host
notes:
  - Restoring is the point-in-time playbook's work (C(playbooks/dr_point_in_time.yml)); by hand, see the
    README section "Base backups".
  - A streamed base backup holds one data directory; a cluster with tablespaces outside it is refused.
  - The module holds the repository lock, like every backup.
seealso:
  - module: clinic.backup.pg_dump
  - module: clinic.backup.backup_verify
  - module: clinic.backup.backup_retention
"""

EXAMPLES = r"""
- name: Base backup of the cluster main to the local repository and to S3
  clinic.backup.pg_basebackup:
    cluster: main
    login_host: /var/run/postgresql
    login_user: postgres
    passphrase_file: /etc/clinic-backup/passphrase
    repository: /var/backups/clinic/db
    s3_targets:
      - bucket: clinic-backups
        prefix: db/clinic-main
        sse: AES256

- name: Check the server could take one (archiving on, replication allowed), writing nothing
  clinic.backup.pg_basebackup:
    cluster: main
    login_user: backup_replication
    passfile: /root/.pgpass
    passphrase_file: /etc/clinic-backup/passphrase
    repository: /var/backups/clinic/db
  check_mode: true
"""

RETURN = r"""
set_id:
  description: Id of the new base backup set.
  returned: always
  type: str
  sample: 20261203T020000Z-main-1a2b3c
cluster:
  description: The cluster's name (also in RV(database), as the catalog lists it).
  returned: always
  type: str
database:
  description: The set's name in the catalog (the cluster's).
  returned: always
  type: str
start_wal:
  description: First WAL segment a restore of this backup needs.
  returned: success
  type: str
  sample: "000000010000000000000002"
stop_wal:
  description: Last WAL segment the backup needs to be consistent.
  returned: success
  type: str
start_lsn:
  description: Where the backup's WAL starts.
  returned: success
  type: str
  sample: 0/2000028
stop_lsn:
  description: Where it ends; recovery must replay at least to here.
  returned: success
  type: str
timeline:
  description: Timeline the backup was taken on.
  returned: success
  type: int
artifacts:
  description: The stored archive with its size, sha256 and location in every target.
  returned: success
  type: list
  elements: dict
targets:
  description: Each target with whether it received the set, and its error if not.
  returned: always
  type: list
  elements: dict
size:
  description: Stored bytes of the set.
  returned: success
  type: int
duration_seconds:
  description: Wall time of the backup.
  returned: success
  type: float
manifest:
  description: The manifest written with the set.
  returned: success
  type: dict
server:
  description: Version, host and port of the server (check mode).
  returned: check mode
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.basebackup import (
    BaseBackupOptions,
    run_base_backup,
)
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
        cluster=dict(type="str", required=True),
        compression_threads=dict(type="int", default=0),
    )
    spec.update(SET_WRITING_ARGS)
    return spec


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
        required_one_of=[("repository", "s3_targets")],
        required_if=[("encrypt", True, ("passphrase_file",))],
    )
    params = module.params
    missing = missing_library(params, psycopg2=True)
    if missing:
        module.fail_json(msg=missing_required_lib(missing[0]), exception=str(missing[1]))
    if not params["encrypt"]:
        module.warn("encrypt=false: this base backup stores the whole cluster unencrypted")
    try:
        options = BaseBackupOptions(
            params["cluster"],
            compression=params["compression"],
            compression_level=params["compression_level"],
            compression_threads=params["compression_threads"],
            encrypt=params["encrypt"],
            passphrase_file=params["passphrase_file"],
            pg_bin_dir=params["pg_bin_dir"],
            label=params["label"],
            stale_seconds=params["stale_seconds"],
        )
        # Any database reaches the cluster; the replication connection names none.
        dbname = None if params["database"] or params["database_url"] else "postgres"
        result = run_base_backup(
            connection_from_params(params, dbname=dbname),
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
