#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: files_place
short_description: Put a configuration file set back in place, validated before anything is reloaded
version_added: 0.1.0
description:
  - Restores one file set taken by M(clinic.backup.files_backup) (for example C(.env), the nginx site,
    systemd units, certificates) and puts each of its paths back where it belongs, with the owner,
    group, mode, validate command and reload command O(place) declares for it.
  - The set is restored by the same engine as M(clinic.backup.files_restore) (sha256, authentication,
    counts, safe extraction) into a private (0700) staging directory, removed whatever happens.
  - A destination already equal in content, mode and owner is left alone; when nothing differs the task
    reports no change and runs no command.
  - For each changed destination, the current version is copied into a new directory under O(keep_dir)
    and linked aside under a hidden name next to it; the new version is written atomically (hidden temporary
    file, owner and mode, fsync, rename; a directory is built beside it and swapped in).
  - Then every changed placement's validate command runs (for example C(nginx -t)). If one fails, every
    destination is put back as it was and NOTHING is reloaded; the task fails naming the file, the command
    and its output. Only when every validation passed do the reload commands run (each distinct command
    once, in the order declared), for example C(systemctl reload nginx) or C(systemctl daemon-reload).
  - Secret files (named C(.env) or C(.env.*), ending in C(.key), C(.pem), C(.crt), C(.p12), C(.pfx), or
    marked C(secret)) are written with mode 0600 at most (directories 0700); their contents never appear in
    the result or the diff, and the output of their validate command is withheld.
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
    details:
      - Restores the set into the private staging directory (removed afterwards) to compare it with the
        files in place; places nothing and runs no validate or reload command.
  diff_mode:
    support: full
    details: Names, types, modes and owners of each destination before and after; never contents.
  platform:
    platforms: posix
options:
  repository:
    description: Local repository directory. Exactly one of O(repository) and O(bucket) is required.
    type: path
  name:
    description: Name of the file set (as given to M(clinic.backup.files_backup)).
    type: str
    required: true
  set_id:
    description: The set to place. By default the newest complete set of O(name) that fits O(not_after) and O(require_verified).
    type: str
  not_after:
    description:
      - Only sets that finished at or before this ISO 8601 time (with a zone) are candidates, for example the
        last moment known to be clean after a breach.
    type: str
  require_verified:
    description: Only sets whose last M(clinic.backup.backup_verify) passed are candidates.
    type: bool
    default: false
  fallback:
    description: Without O(set_id), try the next older set when the chosen one is damaged.
    type: bool
    default: true
  place:
    description:
      - How each backed-up path goes back. Every path must be in the set (as it was given to
        M(clinic.backup.files_backup), or a path inside one of its directories); paths of the set that are not
        listed are not placed.
    type: list
    elements: dict
    required: true
    suboptions:
      path:
        description: The path as it was backed up.
        type: path
        required: true
      dest:
        description: Where it goes. By default O(place[].path) itself. Its directory must exist.
        type: path
      owner:
        description:
          - Owner (name or number). By default the current file's owner, or the running user for a new file.
          - Giving files to another user needs root.
        type: str
      group:
        description: Group (name or number). By default the current file's group, or the running user's.
        type: str
      mode:
        description:
          - Mode of the file (of every regular file, for a directory), an octal string such as V('0644').
          - By default the mode stored in the set. Secret files get 0600 at most.
        type: str
      directory_mode:
        description: For a directory, the mode of it and of every directory inside. By default as stored.
        type: str
      validate:
        description:
          - Command (an argv list, never a shell line) that must succeed with the new file in place, for example
            V([nginx, -t]) or V([systemd-analyze, verify, "{path}"]). C({path}) in an argument becomes the
            placed path.
        type: list
        elements: str
      reload:
        description:
          - Command (argv list) run once every validation passed, for example V([systemctl, reload, nginx]) or
            V([systemctl, daemon-reload]). C({path}) is replaced as in O(place[].validate).
        type: list
        elements: str
      secret:
        description:
          - Treat as secret (mode 0600 at most, contents and validation output never shown). By default
            C(.env) files, keys and certificates are secret.
        type: bool
  keep_dir:
    description:
      - Where the versions replaced are kept, one new 0700 directory per run,
        C(<keep_dir>/<UTC time>-<set id>/<the destination's path>). They may hold secrets (C(.env)).
    type: path
    default: /var/backups/clinic-backup/config-pre-restore
  work_dir:
    description:
      - Directory for the private staging directory (C(clinic-backup-place-*)), removed after the run. By
        default the system's temporary directory. The whole set is restored there.
    type: path
  command_timeout:
    description: Seconds a validate or reload command may take before it counts as failed.
    type: int
    default: 120
requirements:
  - gpg, zstd/gzip on the host
  - boto3 (for S3)
notes:
  - Validation runs with the new files in their final place (C(nginx -t) checks the configuration that
    includes them), so for the moment of the validation the service's configuration on disk is the new one;
    the running service is not reloaded until every validation passed.
  - A killed run can leave the previous version aside (C(.<name>.pre-restore-*)) next to a destination, a
    temporary file (C(.<name>.placing-*)) or a staging directory; the next run names them in a warning.
    Their copies are also under O(keep_dir).
  - A reload command that fails after every validation passed fails the task; the files stay in place (they
    are valid) and the previous versions are under O(keep_dir).
seealso:
  - module: clinic.backup.files_backup
  - module: clinic.backup.files_restore
"""

EXAMPLES = r"""
- name: Put the clinic's configuration back (runbook, configuration restore)
  clinic.backup.files_place:
    repository: /var/backups/clinic/config
    name: config
    passphrase_file: /root/.backup-passphrase
    audit_log: /var/log/clinic-backup/audit.jsonl
    place:
      - path: /home/clinic/clinic/.env
        owner: clinic
        group: clinic
        mode: "0600"
      - path: /etc/nginx/sites-available/clinic
        owner: root
        group: root
        mode: "0644"
        validate: [nginx, -t]
        reload: [systemctl, reload, nginx]
      - path: /etc/systemd/system/clinic-backend.service
        mode: "0644"
        validate: [systemd-analyze, verify, "{path}"]
        reload: [systemctl, daemon-reload]

- name: Certificates from before the breach, from the offsite bucket
  clinic.backup.files_place:
    bucket: clinic-backups-dr
    prefix: config/clinic-main
    name: certificates
    not_after: "2026-11-29T22:00:00Z"
    require_verified: true
    passphrase_file: /root/.backup-passphrase
    place:
      - path: /etc/ssl/clinic
        secret: true
        validate: [nginx, -t]
        reload: [systemctl, reload, nginx]
"""

RETURN = r"""
set_id:
  description: The set placed (or compared, in check mode).
  returned: always
  type: str
name:
  description: Name of the file set.
  returned: always
  type: str
placed:
  description:
    - One entry per placement, with the state V(created), V(replaced) or V(unchanged) (in check mode,
      what would happen), the type, mode, owner and group given, whether it is secret, and where the previous
      version was kept.
  returned: success
  type: list
  elements: dict
validated:
  description: Validate commands run, with their exit status.
  returned: always
  type: list
  elements: dict
reloaded:
  description: Reload commands run, with their exit status (none when a validation failed).
  returned: always
  type: list
  elements: dict
would_validate:
  description: In check mode, the validate commands a real run would run.
  returned: check mode
  type: list
  elements: list
would_reload:
  description: In check mode, the reload commands a real run would run.
  returned: check mode
  type: list
  elements: list
kept_dir:
  description: Directory under O(keep_dir) holding this run's previous versions, or null when none was replaced.
  returned: success
  type: str
rpo_seconds:
  description: Age of the placed data, from the start of the backup until now.
  returned: success
  type: float
damaged:
  description: Sets tried before the placed one and found damaged, with the reason.
  returned: success
  type: list
  elements: dict
passed_over:
  description: Newer sets not considered, with the reason.
  returned: success
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.file_placement import (
    DEFAULT_KEEP_DIR,
    DEFAULT_TIMEOUT,
    PlacementOptions,
    place_files,
)
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    AUDIT_ARGS,
    AWS_CREDENTIAL_ARGS,
    RESTORE_AUTHENTICATION_ARGS,
    S3_LOCATION_ARGS,
    exit_audited,
    fail_audited,
    missing_library,
    repository_from_params,
)

OPTION_KEYS = (
    "name",
    "set_id",
    "not_after",
    "require_verified",
    "fallback",
    "keep_dir",
    "work_dir",
    "command_timeout",
    "passphrase_file",
    "old_passphrase_files",
    "allow_unauthenticated",
    "allow_unencrypted",
)

PLACE_OPTIONS = dict(
    path=dict(type="path", required=True),
    dest=dict(type="path"),
    owner=dict(type="str"),
    group=dict(type="str"),
    mode=dict(type="str"),
    directory_mode=dict(type="str"),
    validate=dict(type="list", elements="str"),
    reload=dict(type="list", elements="str"),
    secret=dict(type="bool"),
)


def argument_spec():
    spec = dict(AWS_CREDENTIAL_ARGS)
    spec.update(S3_LOCATION_ARGS)
    spec.update(AUDIT_ARGS)
    spec.update(RESTORE_AUTHENTICATION_ARGS)
    spec.update(
        repository=dict(type="path"),
        name=dict(type="str", required=True),
        set_id=dict(type="str"),
        not_after=dict(type="str"),
        require_verified=dict(type="bool", default=False),
        fallback=dict(type="bool", default=True),
        place=dict(type="list", elements="dict", required=True, options=PLACE_OPTIONS),
        keep_dir=dict(type="path", default=DEFAULT_KEEP_DIR),
        work_dir=dict(type="path"),
        command_timeout=dict(type="int", default=DEFAULT_TIMEOUT),
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
        options = PlacementOptions(
            place=[{k: v for k, v in entry.items() if v is not None} for entry in params["place"]],
            **{key: params[key] for key in OPTION_KEYS},
        )
        result = place_files(repository_from_params(params), options, check_mode=module.check_mode)
    except BackupError as exc:
        fail_audited(module, "restore", exc)
    diff = result.pop("diff")
    if module._diff:
        result["diff"] = diff
    for warning in result.pop("warnings", []):
        module.warn(warning)
    exit_audited(module, "restore", result)


if __name__ == "__main__":
    main()
