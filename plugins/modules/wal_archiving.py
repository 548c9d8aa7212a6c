#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: wal_archiving
short_description: Set PostgreSQL's continuous-archiving settings idempotently and prove the archive works
version_added: 0.1.0
description:
  - Compares each of O(settings) with what the server has (C(pg_settings), and C(pg_file_settings) for a
    value already in C(postgresql.auto.conf) that waits for a restart) and writes only the ones that differ,
    with C(ALTER SYSTEM); then reloads the configuration.
  - Returns the settings that only a restart applies (C(pending_restart)); it never restarts the server
    itself. The C(clinic.backup.pg_wal_archiving) role restarts PostgreSQL only when this list is not empty.
  - With O(prove=true), closes the current WAL segment (C(pg_switch_wal())) and waits until that segment's
    record is stored in O(repository) and every one of O(s3_targets) - the proof that C(archive_command)
    reaches the repositories, not only that PostgreSQL called it.
  - Connects as a superuser (C(ALTER SYSTEM), C(pg_file_settings) and C(pg_switch_wal()) need one).
  - Runs no PostgreSQL program, so O(pg_bin_dir) is accepted (one set of connection variables serves every
    module) and ignored.
author:
  - Clinic Backup Team (@clinic-backup)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clinic.backup.audit
  - clinic.backup.connection
  - clinic.backup.s3
attributes:
  check_mode:
    support: full
    details: Reports which settings would be written and which of them would need a restart; proves nothing.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  database:
    description: Database to connect to.
    type: str
    default: postgres
    aliases: [db, login_db]
  settings:
    description:
      - Settings to have, by name. Only C(wal_level), C(archive_mode), C(archive_command),
        C(archive_library), C(restore_command), C(archive_timeout), C(max_wal_senders) and
        C(wal_compression) are accepted; booleans are written as V(on)/V(off).
    type: dict
    default: {}
  prove:
    description: Switch WAL and wait until the closed segment is stored in every repository.
    type: bool
    default: false
  prove_timeout:
    description: Seconds to wait for the segment before failing.
    type: int
    default: 120
  cluster:
    description: The cluster name the agent archives under (C(wal/<cluster>/) in the repositories). Required with O(prove=true).
    type: str
  repository:
    description: Local repository the segment must appear in.
    type: path
  s3_targets:
    description: S3 locations the segment must appear in, as in the agent's config.
    type: list
    elements: dict
    default: []
    suboptions:
      bucket:
        description: Bucket name.
        type: str
        required: true
      prefix:
        description: Key prefix.
        type: str
        default: ""
      region:
        description: AWS region.
        type: str
      endpoint_url:
        description: S3-compatible endpoint.
        type: str
      sse:
        description: Ignored here (only read).
        type: str
        default: none
        choices: [none, AES256, aws:kms]
      kms_key_id:
        description: Ignored here (only read).
        type: str
      storage_class:
        description: Ignored here (only read).
        type: str
      object_lock:
        description: Ignored here (only read).
        type: dict
        suboptions:
          mode:
            description: Ignored here (only read).
            type: str
            required: true
            choices: [GOVERNANCE, COMPLIANCE]
          days:
            description: Ignored here (only read).
            type: int
            required: true
requirements:
  - psycopg2 on the host (boto3 with O(s3_targets))
seealso:
  - module: clinic.backup.pitr_restore
"""

EXAMPLES = r"""
- name: Archive through the clinic.backup agent
  clinic.backup.wal_archiving:
    login_host: /var/run/postgresql
    login_user: postgres
    settings:
      wal_level: replica
      archive_mode: true
      archive_command: /usr/local/bin/clinic-backup wal-push --config /var/lib/postgresql/clinic-backup/main.json %p
      archive_timeout: 5min
  register: wal_settings

- name: Prove that a segment reaches the local repository and S3
  clinic.backup.wal_archiving:
    login_host: /var/run/postgresql
    login_user: postgres
    prove: true
    cluster: main
    repository: /var/backups/clinic/pitr
    s3_targets:
      - bucket: clinic-backups
        prefix: pitr
"""

RETURN = r"""
changed_settings:
  description: Settings written with ALTER SYSTEM (in check mode, the ones that would be).
  returned: always
  type: list
  elements: str
pending_restart:
  description: Settings that take effect only after a restart of PostgreSQL.
  returned: always
  type: list
  elements: str
settings:
  description: The running value of each managed setting (before a pending restart applies it).
  returned: always
  type: dict
proof:
  description: With O(prove=true), the segment closed, the seconds until it was stored everywhere, and C(pg_stat_archiver).
  returned: when prove is true and not in check mode
  type: dict
  sample:
    segment: 000000010000000000000007
    seconds: 1.52
    archiver: {archived_count: 7, last_archived_wal: 000000010000000000000007, failed_count: 0}
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.archiving import (
    apply_settings,
    connect,
    missing_from,
    prove_archiving,
)
from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError, ConfigError
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    AUDIT_ARGS,
    AWS_CREDENTIAL_ARGS,
    CONNECTION_ARGS,
    connection_from_params,
    exit_audited,
    fail_audited,
    local_repository,
    missing_library,
    s3_repository,
    s3_target_options,
)


def argument_spec():
    spec = dict(CONNECTION_ARGS)
    spec["database"] = dict(type="str", default="postgres", aliases=["db", "login_db"])
    spec.update(AWS_CREDENTIAL_ARGS)
    spec.update(AUDIT_ARGS)
    spec.update(
        settings=dict(type="dict", default={}),
        prove=dict(type="bool", default=False),
        prove_timeout=dict(type="int", default=120),
        cluster=dict(type="str"),
        repository=dict(type="path"),
        s3_targets=dict(type="list", elements="dict", default=[], options=s3_target_options()),
    )
    return spec


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
        required_if=[
            ("prove", True, ("cluster",)),
            ("prove", True, ("repository", "s3_targets"), True),
        ],
    )
    params = module.params
    missing = missing_library(params, psycopg2=True)
    if missing:
        module.fail_json(msg=missing_required_lib(missing[0]), exception=str(missing[1]))
    try:
        conn = connect(connection_from_params(params))
        try:
            outcome = apply_settings(conn, params["settings"], module.check_mode)
            result = {
                "changed": bool(outcome["changed"]),
                "changed_settings": outcome["changed"],
                "pending_restart": outcome["pending_restart"],
                "settings": outcome["settings"],
            }
            if params["prove"] and not module.check_mode and outcome["pending_restart"]:
                raise ConfigError(
                    "PostgreSQL waits for a restart to apply %s: nothing can be proven before it"
                    % ", ".join(outcome["pending_restart"]),
                    "restart PostgreSQL (the pg_wal_archiving role does it through its handler: "
                    "check pg_wal_archiving_service / pg_wal_archiving_restart_command)",
                )
            if params["prove"] and not module.check_mode:
                repositories = []
                if params["repository"]:
                    repositories.append(local_repository(params["repository"]))
                for target in params["s3_targets"]:
                    repositories.append(s3_repository(target, params))
                result["proof"] = prove_archiving(
                    conn,
                    lambda name: missing_from(repositories, params["cluster"], name),
                    timeout=params["prove_timeout"],
                )
        finally:
            conn.close()
    except BackupError as exc:
        fail_audited(module, "archiving", exc)
    parts = []
    if result["changed_settings"]:
        parts.append("set %s" % ", ".join(result["changed_settings"]))
    if result["pending_restart"]:
        parts.append("restart needed for %s" % ", ".join(result["pending_restart"]))
    if "proof" in result:
        parts.append("segment %s stored everywhere" % result["proof"]["segment"])
    result["msg"] = "; ".join(parts) or "settings already in place"
    exit_audited(module, "archiving", result)


if __name__ == "__main__":
    main()
