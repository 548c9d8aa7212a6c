#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: pitr_restore
short_description: Point-in-time recovery of a PostgreSQL cluster into a new data directory
version_added: 0.1.0
description:
  - Restores a cluster to a moment - a time, an LSN, a named restore point or the end of the archived WAL
    (V(latest)) - from a base backup set and the WAL archived by the C(clinic-backup) agent
    (C(wal-push)), into a NEW data directory started on its own port. The running cluster is never
    touched, unless O(replace_running=true) and O(confirm_replace) repeats O(data_dir); then it is stopped
    and kept aside as C(<data_dir>.pre_pitr_<time>).
  - Takes the newest authenticated base backup that stopped before the target (for a restore point, before
    O(base_before) when given), extracts it safely, checks it with C(pg_verifybackup), writes
    C(recovery.signal) and the recovery settings (C(restore_command) through the agent's C(wal-fetch),
    which checks every segment's sha256; C(recovery_target_*); C(recovery_target_action=promote);
    C(recovery_target_timeline=latest); the port), starts the server as O(os_user) and waits until it has
    promoted.
  - Then connects to every database of the recovered cluster and counts every table (each must be
    readable), and reports the recovery point actually reached (from the server's own log, e.g.
    C(recovery stopping before commit of transaction 812, time 2026-12-03 14:31:02+00)), the measured RTO
    and the RPO.
  - A recovery that fails (the target lies beyond the archived WAL, a segment is missing or damaged) stops
    the server it started and moves the directory aside as C(<data_dir>.failed_<time>); it is never left
    looking like a restored cluster. When it was replacing a cluster (O(replace_running)), the original
    directory is moved back into O(data_dir) and, if it was running, started again with the options of its
    last start (C(postmaster.opts)).
  - The recovered cluster runs with C(archive_mode=off) unless O(archive=true), so that a rehearsal never
    writes its own timeline into the repository it was restored from.
author:
  - Clinic Backup Team (@clinic-backup)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clinic.backup.audit
  - clinic.backup.authentication
  - clinic.backup.authentication.unauthenticated
  - clinic.backup.authentication.restore
  - clinic.backup.s3
  - clinic.backup.s3.location
attributes:
  check_mode:
    support: full
    details: Checks the target, the data directory and the port, and names the base backup that would be used.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  target:
    description:
      - What to recover to. V(time) and V(lsn) and V(name) need O(target_value); V(latest) replays every
        archived segment.
    type: str
    required: true
    choices: [time, lsn, name, latest]
  target_value:
    description:
      - An ISO 8601 time with a zone (V(2026-12-03T14:31:00Z)), an LSN as C(pg_current_wal_lsn()) shows it
        (V(0/3000060)) or the name given to C(pg_create_restore_point()).
    type: str
  inclusive:
    description:
      - With a time or LSN, whether a transaction committed exactly at the target is kept (PostgreSQL's
        C(recovery_target_inclusive)).
    type: bool
    default: true
  base_before:
    description:
      - For O(target=name), only base backups that stopped before this ISO 8601 time (a restore point's
        time is not known before replaying to it). By default the newest base backup.
    type: str
  cluster:
    description: The cluster whose base backups and WAL are restored (the agent config's C(cluster)).
    type: str
    required: true
  repository:
    description: Local repository of the base backups. Exactly one of O(repository) and O(bucket).
    type: path
  data_dir:
    description: The new cluster's data directory; must not exist or be empty (its parent must exist).
    type: path
    required: true
  port:
    description: The port the recovered cluster listens on; must be free.
    type: int
    required: true
  agent_config:
    description:
      - The agent's config for the cluster (the one C(archive_command) uses, written by the
        C(clinic.backup.pg_wal_archiving) role); C(restore_command) runs C(wal-fetch) with it, as O(os_user).
    type: path
    required: true
  agent_bin:
    description: The installed agent.
    type: path
    default: /usr/local/bin/clinic-backup
  os_user:
    description: The OS user the recovered server runs as; owns the data directory. Required when running as root.
    type: str
    default: postgres
  check_user:
    description: Database role the checks connect as (over the server's Unix socket, as O(os_user)).
    type: str
    default: postgres
  settings:
    description:
      - Further settings for the recovered cluster, written to its C(postgresql.auto.conf) (e.g.
        C(unix_socket_directories), C(listen_addresses), C(shared_buffers) for a smaller host).
    type: dict
    default: {}
  archive:
    description: Keep archiving enabled on the recovered cluster (it then pushes a new timeline).
    type: bool
    default: false
  keep_running:
    description: Leave the recovered cluster running (V(false) stops it after the checks).
    type: bool
    default: true
  timeout:
    description: Seconds the replay may take before the restore fails.
    type: int
    default: 21600
  verify:
    description: Check the extracted base backup with C(pg_verifybackup) against the server's backup manifest.
    type: bool
    default: true
  replace_running:
    description:
      - Restore into O(data_dir) although a cluster lives there; it is stopped and moved aside (kept as the
        rollback). Only together with O(confirm_replace).
    type: bool
    default: false
  confirm_replace:
    description: Must repeat O(data_dir) exactly for O(replace_running) to act.
    type: str
  pg_bin_dir:
    description: The server's bin directory. By default C(/usr/lib/postgresql/<major>/bin) of the base backup's version.
    type: path
requirements:
  - PostgreSQL server of the base backup's major version, gpg, zstd/gzip, tar on the host; the agent installed
seealso:
  - module: clinic.backup.wal_archiving
  - module: clinic.backup.backup_restore
"""

EXAMPLES = r"""
- name: Undo the 14:32 migration - the cluster as it was at 14:31, on port 5433
  clinic.backup.pitr_restore:
    target: time
    target_value: "2026-12-03T14:31:00+01:00"
    cluster: main
    repository: /var/backups/clinic/pitr
    passphrase_file: /etc/clinic-backup/passphrase
    agent_config: /var/lib/postgresql/clinic-backup/main.json
    data_dir: /var/lib/postgresql/15/pitr
    port: 5433
  register: pitr

- name: Everything archived, from S3, onto a replacement server
  clinic.backup.pitr_restore:
    target: latest
    cluster: main
    bucket: clinic-backups
    prefix: pitr
    passphrase_file: /etc/clinic-backup/passphrase
    agent_config: /var/lib/postgresql/clinic-backup/main.json
    data_dir: /var/lib/postgresql/15/main
    port: 5432
"""

RETURN = r"""
set_id:
  description: The base backup set restored.
  returned: success
  type: str
target:
  description: The target as planned (kind, value, inclusive).
  returned: always
  type: dict
reached_time:
  description:
    - The recovery point actually reached (UTC) - the commit time at which replay stopped, or with V(latest) the
      last transaction replayed. Everything after it is not in the recovered cluster.
  returned: success
  type: str
reached_message:
  description: The server's own words about where it stopped.
  returned: success
  type: str
  sample: recovery stopping before commit of transaction 812, time 2026-12-03 14:31:02.120133+00
last_transaction_time:
  description: The last transaction replayed (from the server log), UTC.
  returned: success
  type: str
redo_done_lsn:
  description: The WAL position replay ended at.
  returned: success
  type: str
new_timeline:
  description: The timeline the recovered cluster continues on after its promotion.
  returned: success
  type: int
duration_seconds:
  description: Wall time from the start of the task until the recovered cluster was checked (the measured RTO).
  returned: success
  type: float
phases:
  description:
    - Seconds of each part of the measured RTO - C(base_restore) (choose, fetch, decrypt, extract and check the base
      backup), C(replay) (start the server until it has promoted) and C(checks) (count every table).
  returned: success
  type: dict
  sample: {"base_restore": 2.4, "replay": 11.8, "checks": 1.9}
rpo_seconds:
  description: From the point reached until the end of the restore - what a recovery now loses.
  returned: success
  type: float
row_counts:
  description: Per database, the rows of every table counted in the recovered cluster.
  returned: success
  type: dict
base_backup:
  description: The base backup's start and stop LSN and time, and timeline.
  returned: success
  type: dict
data_dir:
  description: The recovered cluster's data directory.
  returned: always
  type: str
port:
  description: Its port.
  returned: always
  type: int
log_file:
  description: The server log of the recovery.
  returned: success
  type: str
replaced:
  description: With O(replace_running), where the replaced cluster's directory was moved (the rollback).
  returned: always
  type: str
failed_data_dir:
  description: On failure after the extraction, where the half-recovered directory was moved.
  returned: failure
  type: str
rolled_back:
  description: On a failed replacement, true - the original cluster's directory is back in O(data_dir).
  returned: failure
  type: bool
original_restarted:
  description:
    - On a failed replacement, whether the original cluster was started again (null when it was not running
      before). False means it did not start and C(rollback_error) says why; start it by hand.
  returned: failure
  type: bool
passed_over:
  description: Base backups not taken, with the reason (after the target, damaged, unauthenticated).
  returned: success
  type: list
  elements: dict
"""

import os

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.basebackup import (
    BaseRestoreOptions,
    restore_base_backup,
)
from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    AUDIT_ARGS,
    AWS_CREDENTIAL_ARGS,
    RESTORE_AUTHENTICATION_ARGS,
    S3_LOCATION_ARGS,
    exit_audited,
    fail_audited,
    missing_library,
    repositories_from_params,
)
from ansible_collections.clinic.backup.plugins.module_utils.pitr import (
    DEFAULT_TIMEOUT,
    PitrOptions,
    plan_recovery,
    recover,
)
from ansible_collections.clinic.backup.plugins.module_utils.restore import parse_moment


def argument_spec():
    spec = dict(AWS_CREDENTIAL_ARGS)
    spec.update(S3_LOCATION_ARGS)
    spec.update(AUDIT_ARGS)
    spec.update(RESTORE_AUTHENTICATION_ARGS)
    spec.update(
        target=dict(type="str", required=True, choices=["time", "lsn", "name", "latest"]),
        target_value=dict(type="str"),
        inclusive=dict(type="bool", default=True),
        base_before=dict(type="str"),
        cluster=dict(type="str", required=True),
        repository=dict(type="path"),
        data_dir=dict(type="path", required=True),
        port=dict(type="int", required=True),
        agent_config=dict(type="path", required=True),
        agent_bin=dict(type="path", default="/usr/local/bin/clinic-backup"),
        os_user=dict(type="str", default="postgres"),
        check_user=dict(type="str", default="postgres"),
        settings=dict(type="dict", default={}),
        archive=dict(type="bool", default=False),
        keep_running=dict(type="bool", default=True),
        timeout=dict(type="int", default=DEFAULT_TIMEOUT),
        verify=dict(type="bool", default=True),
        replace_running=dict(type="bool", default=False),
        confirm_replace=dict(type="str"),
        pg_bin_dir=dict(type="path"),
    )
    return spec


def base_restorer(params, plan, repositories, check_mode):
    """restore_base_backup for recover(): the newest base backup before the target."""
    target_time = target_lsn = None
    if plan.kind == "time":
        target_time = plan.moment
    elif plan.kind == "lsn":
        target_lsn = plan.value
    elif plan.kind == "name" and params["base_before"]:
        target_time = parse_moment(params["base_before"], "base_before")
    root = os.geteuid() == 0

    def restore(data_dir):
        options = BaseRestoreOptions(
            data_dir,
            cluster=params["cluster"],
            target_time=target_time,
            target_lsn=target_lsn,
            owner=params["os_user"] if root else None,
            pg_bin_dir=params["pg_bin_dir"],
            verify=params["verify"],
            passphrase_file=params["passphrase_file"],
            old_passphrase_files=params["old_passphrase_files"],
            allow_unauthenticated=params["allow_unauthenticated"],
            allow_unencrypted=params["allow_unencrypted"],
        )
        return restore_base_backup(repositories, options, check_mode=check_mode)

    return restore


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
        required_one_of=[("repository", "bucket")],
        mutually_exclusive=[("repository", "bucket")],
        required_if=[
            ("target", "time", ("target_value",)),
            ("target", "lsn", ("target_value",)),
            ("target", "name", ("target_value",)),
            ("replace_running", True, ("confirm_replace",)),
        ],
    )
    params = module.params
    missing = missing_library(params)
    if missing:
        module.fail_json(msg=missing_required_lib(missing[0]), exception=str(missing[1]))
    try:
        plan = plan_recovery(
            "latest"
            if params["target"] == "latest"
            else {params["target"]: params["target_value"]},
            inclusive=params["inclusive"],
        )
        options = PitrOptions(
            plan,
            params["data_dir"],
            params["port"],
            params["agent_bin"],
            params["agent_config"],
            os_user=params["os_user"],
            pg_bin_dir=params["pg_bin_dir"],
            settings=params["settings"],
            archive=params["archive"],
            timeout=params["timeout"],
            check_user=params["check_user"],
            replace_running=params["replace_running"],
            confirm_replace=params["confirm_replace"],
            keep_running=params["keep_running"],
            check_mode=module.check_mode,
        )
        repositories = repositories_from_params(params)
        restore = base_restorer(params, plan, repositories, module.check_mode)
        result = recover(options, restore)
        if module.check_mode:
            # Which base backup would be used: chosen without extracting anything.
            chosen = restore(params["data_dir"])
            result["set_id"] = chosen.set_id
            result["passed_over"] = chosen.passed_over
    except BackupError as exc:
        fail_audited(module, "restore", exc)
    result["database"] = params["cluster"]
    result["msg"] = (
        "recovered %s to %s in %s (port %d): reached %s"
        % (
            params["cluster"],
            plan.describe(),
            params["data_dir"],
            params["port"],
            result.get("reached_time") or "?",
        )
        if not module.check_mode
        else "check mode: base backup %s would be recovered to %s"
        % (result.get("set_id"), plan.describe())
    )
    exit_audited(module, "restore", result)


if __name__ == "__main__":
    main()
