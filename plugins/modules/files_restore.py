#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: files_restore
short_description: Restore a file backup set into a directory, or rehearse the restore
version_added: 0.1.0
description:
  - Restores one file set taken by M(clinic.backup.files_backup) from a local repository or an S3 prefix.
  - The set is streamed (stored bytes, sha256, gpg, decompression) into a safe extractor writing into a new
    directory next to the target, C(<target_dir>.restoring-<hex>). The sha256 is checked against the
    manifest and so are the number of files and their bytes. Only then does the new directory take the
    target's place. Whatever fails, the new directory is removed and the target is untouched.
  - The extractor accepts only regular files, directories and symbolic links whose target stays inside the
    restored directory. An absolute member name, a C(..) component, a link pointing outside, a hard link or
    a device fails the restore naming the member; nothing is ever written outside the new directory, and
    links inside the archive are never followed while extracting.
  - A set of one directory is restored as that directory's content, so O(target_dir) becomes the
    directory. A set of several paths (or of one file) is restored as its archive layout, one entry per
    path named C(<i>-<basename>) (for example C(0-.env), C(1-nginx)).
  - O(mode=create) restores into a directory that must not exist yet. O(mode=replace) renames the current
    directory aside to C(<target_dir>.pre-restore-<UTC time>), keeps it, and puts the restored one in its
    place (the original is put back if that fails). O(mode=rehearse) restores, checks, removes the new
    directory and reports the counts and the duration (the restore test).
  - Modes and modification times are restored, without setuid and setgid bits. Owners are restored only
    with O(preserve_owner) when running as root; otherwise everything belongs to the user running the task.
  - Without O(set_id) the newest complete set of O(name) is taken; a set that turns out damaged (missing
    artifact, sha256 mismatch, unsafe member, wrong count) is passed over for the next older one and
    reported in RV(damaged). A wrong passphrase or bad input stops at once.
  - A set of an incremental chain (C(files_backup) with C(incremental=true)) is restored from its encrypted
    index, which lists every path of the tree and the set of the chain holding each file's bytes; those
    sets' archives are read oldest first and each file is checked against the sha256 the index records. If a
    set of the chain is missing or is not the set it was taken against, the restore refuses naming it (a set
    taken before the missing one still restores). RV(chain) lists the sets read.
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
    details: Chooses the set and checks the target; creates, renames and removes nothing.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  repository:
    description: Local repository directory. Exactly one of O(repository) and O(bucket) is required.
    type: path
  name:
    description:
      - Name of the file set (as given to M(clinic.backup.files_backup)).
      - Required when the repository holds file sets of several names and O(set_id) is not given.
    type: str
  set_id:
    description: The set to restore. By default the newest complete set of O(name).
    type: str
  target_dir:
    description:
      - Directory to create (O(mode=create)) or replace (O(mode=replace)); its parent must exist.
      - With O(mode=rehearse), the restore is built next to it and removed; it may or may not exist.
    type: path
    required: true
  mode:
    description:
      - V(create) restores into a new directory and fails if O(target_dir) exists.
      - V(replace) swaps the restored directory in for the current one, which is kept, renamed.
      - V(rehearse) restores next to O(target_dir), checks, removes it and reports the duration.
    type: str
    choices: [create, replace, rehearse]
    default: create
  preserve_owner:
    description:
      - Restore the numeric owner and group of every entry. Needs root; without root a warning is given
        and the files belong to the running user.
      - Use it when putting a directory back in place for an application (for example uploads written by
        the web server's user).
    type: bool
    default: false
  fallback:
    description: Without O(set_id), try the next older set when the chosen one is damaged.
    type: bool
    default: true
requirements:
  - gpg, zstd/gzip on the host
  - boto3 (for S3)
notes:
  - The restore needs free space for a full copy next to O(target_dir) (O(mode=replace) keeps the old one).
  - O(mode=replace) refuses a O(target_dir) that is a mount point or a symbolic link. Stop the application
    writing into it first; files written after the backup remain in the kept directory.
  - Work directories left by a killed restore (C(<target_dir>.restoring-*)) are reported, not removed.
seealso:
  - module: clinic.backup.files_backup
  - module: clinic.backup.backup_verify
"""

EXAMPLES = r"""
- name: Monthly restore test of the newest uploads set
  clinic.backup.files_restore:
    repository: /var/backups/clinic/files
    name: uploads
    target_dir: /var/tmp/uploads-restore-test
    mode: rehearse
    passphrase_file: /root/.backup-passphrase

- name: Put the newest uploads back in place, keeping the current directory aside
  clinic.backup.files_restore:
    repository: /var/backups/clinic/files
    name: uploads
    target_dir: /var/www/clinic/uploads
    mode: replace
    preserve_owner: true
    passphrase_file: /root/.backup-passphrase
    audit_log: /var/log/clinic-backup/audit.jsonl

- name: Unpack one configuration set from the offsite bucket for inspection
  clinic.backup.files_restore:
    bucket: clinic-backups-dr
    prefix: config/clinic-main
    name: config
    set_id: 20261122T010000Z-config-1a2b3c
    target_dir: /root/config-restore
    passphrase_file: /root/.backup-passphrase
"""

RETURN = r"""
set_id:
  description: The set that was restored (or would be, in check mode).
  returned: always
  type: str
name:
  description: Name of the restored file set.
  returned: always
  type: str
target_dir:
  description: The directory restored into.
  returned: always
  type: str
mode:
  description: The mode used.
  returned: always
  type: str
files:
  description: Regular files restored.
  returned: success
  type: int
bytes:
  description: Bytes of the restored files.
  returned: success
  type: int
directories:
  description: Directories restored.
  returned: success
  type: int
symlinks:
  description: Symbolic links restored.
  returned: success
  type: int
layout:
  description: V(content) when O(target_dir) became the one backed-up directory, V(roots) when it holds one entry per backed-up path.
  returned: success
  type: str
roots:
  description: The backed-up paths with their names in the archive.
  returned: success
  type: list
  elements: dict
chain:
  description: For a set of an incremental chain, the sets it was rebuilt from, oldest first (the restored set last).
  returned: when the set belongs to an incremental chain
  type: list
  elements: str
previous_dir:
  description: With O(mode=replace), where the replaced directory was kept, or null if there was none.
  returned: when mode is create or replace
  type: str
removed:
  description: With O(mode=rehearse), the work directory that was restored into and removed.
  returned: when mode is rehearse
  type: str
duration_seconds:
  description: Wall time until the restored directory was checked and in place (the measured RTO).
  returned: success
  type: float
rpo_seconds:
  description: Age of the restored data, from the start of the backup until now.
  returned: success
  type: float
damaged:
  description: Sets tried before the restored one and found damaged, with the reason (newest first).
  returned: success
  type: list
  elements: dict
passed_over:
  description: Newer sets not considered, with the reason (corrupt manifest).
  returned: success
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.file_restore import (
    FileRestoreOptions,
    restore_files,
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
    "target_dir",
    "mode",
    "set_id",
    "name",
    "passphrase_file",
    "preserve_owner",
    "fallback",
    "allow_unauthenticated",
    "allow_unencrypted",
    "old_passphrase_files",
)


def argument_spec():
    spec = dict(AWS_CREDENTIAL_ARGS)
    spec.update(S3_LOCATION_ARGS)
    spec.update(AUDIT_ARGS)
    spec.update(RESTORE_AUTHENTICATION_ARGS)
    spec.update(
        repository=dict(type="path"),
        name=dict(type="str"),
        set_id=dict(type="str"),
        target_dir=dict(type="path", required=True),
        mode=dict(type="str", default="create", choices=["create", "replace", "rehearse"]),
        preserve_owner=dict(type="bool", default=False),
        fallback=dict(type="bool", default=True),
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
    action = "restore" if params["mode"] != "rehearse" else "restore_test"
    missing = missing_library(params)
    if missing:
        module.fail_json(msg=missing_required_lib(missing[0]), exception=str(missing[1]))
    try:
        options = FileRestoreOptions(**{key: params[key] for key in OPTION_KEYS})
        result = restore_files(
            repository_from_params(params), options, check_mode=module.check_mode
        )
    except BackupError as exc:
        fail_audited(module, action, exc)
    for warning in result.pop("warnings", []):
        module.warn(warning)
    exit_audited(module, action, result)


if __name__ == "__main__":
    main()
