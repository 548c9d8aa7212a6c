#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: files_backup
short_description: Take an encrypted, checksummed backup set of directories and files (uploads, configuration)
version_added: 0.1.0
description:
  - Archives the given O(paths) as one tar stream, built while walking them, and writes it through the same
    pipeline as the database backups (C(zstd)/C(gzip), C(gpg --symmetric --cipher-algo AES256), sha256) into
    every target at once. No temporary copy and no plaintext touches the disk.
  - The set has the layout, manifest (written last), lock, newest-set pointer, verification and retention
    of a database set. Its manifest has C(kind=files) and the set's O(name) in its C(database) field, so
    M(clinic.backup.backup_verify), M(clinic.backup.backup_info) and M(clinic.backup.backup_retention) work
    on it as on a database's sets.
  - Inside the archive the i-th path is stored as C(<i>-<basename>) (for example C(0-uploads)), so two
    paths with the same name never collide. Numeric owners, modes and modification times are kept.
  - Regular files, directories and symbolic links are stored; links are stored as links, never followed.
    A link pointing outside its path is left out with a warning (a restore would refuse it); an absolute
    link to a place inside its path is stored as the equivalent relative link. Sockets, FIFOs and devices
    are left out with a warning. A local O(repository) lying inside a path is left out.
  - A file that changes while it is read is stored as GNU tar does it, and reported in RV(changed_files).
    The archive holds exactly the size seen when the file was opened (a file that shrank is padded with
    zero bytes, one that grew is cut). A file that vanished before it was read is reported and left out.
  - A file or directory that cannot be read fails the task, naming it, after the set with everything else
    was stored.
  - If one target fails (for example S3 is down) the others still receive the complete set, and the task
    fails naming the target that did not.
  - With O(incremental=true) a set stores only the files that changed since the previous set (new and
    modified files; deleted ones are recorded), plus an encrypted index of the whole tree. Each set still
    restores on its own with M(clinic.backup.files_restore) to the exact tree of its moment, as long as the
    sets it builds on are there; M(clinic.backup.backup_retention) keeps them, M(clinic.backup.backup_verify)
    checks them. See the README for the by-hand restore of such a chain.
author:
  - Clinic Backup Team (@clinic-backup)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clinic.backup.repository
  - clinic.backup.audit
  - clinic.backup.s3
  - clinic.backup.s3.targets
  - clinic.backup.set_writing
attributes:
  check_mode:
    support: full
    details: Checks the paths, the passphrase file and every target, and counts what would be stored; writes nothing.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  name:
    description:
      - Name of the file set, for example V(uploads) or V(config). Sets of one name form one series for
        restore, verification and retention, like the sets of one database.
      - Letters, digits, V(_), V(.) and V(-), at most 48 characters.
      - A name whose newest set in a repository is a database backup is refused.
    type: str
    required: true
  paths:
    description:
      - Absolute paths of the directories and files to back up. Each must exist. A path may not lie inside
        another one (use O(exclude) instead).
      - A path that is a symbolic link is followed once; what it points to is backed up.
    type: list
    elements: path
    required: true
  exclude:
    description:
      - Glob patterns of entries to leave out; an excluded directory is not descended into.
      - A pattern without V(/) matches the name of an entry at any depth (V(*.tmp), V(.cache)); a pattern
        with V(/) matches the path relative to its backed-up path (V(tmp/*)); a pattern starting with
        V(/) matches the absolute path.
    type: list
    elements: str
    default: []
  repository:
    description:
      - Local repository directory (created with mode V(0700) if missing; see O(create_repository)).
      - Prefer a repository of its own for file sets (for example C(/var/backups/clinic/files)); sets in one
        repository share its lock, so a long database backup would make a file backup wait.
    type: path
  label:
    description: Free text stored in the manifest (for example V(before-upgrade)).
    type: str
  incremental:
    description:
      - Store only what changed since the previous set of this O(name) (a file whose size, mtime, ctime and
        inode are unchanged is not read again), with an encrypted index of the whole tree naming the set that
        holds each file's bytes. Restoring a set then needs the sets of its chain (its full set and every set
        between).
      - A full set is taken instead, with a warning saying why, when there is no previous set, when the
        chain reached O(full_every), when O(paths), O(exclude) or O(encrypt) changed, or when a set of the
        chain is missing from any target.
      - Off by default, so that every set stays self-contained unless you choose chains (for example for an
        hourly uploads backup).
    type: bool
    default: false
  full_every:
    description:
      - With O(incremental=true), the longest chain - every O(full_every)-th set is a full set again.
        V(24) with hourly runs gives one full set a day. V(1) takes only full sets.
    type: int
    default: 24
requirements:
  - gpg, zstd or gzip on the host
  - boto3 (for S3 targets)
notes:
  - File names may be patient data. The manifest, which is stored unencrypted, records only the counts of
    skipped and changed entries; their paths are in the task result.
  - Hard links are stored as separate copies. Extended attributes and ACLs are not stored.
  - The module holds an exclusive lock on the repository; a second run at the same time fails with
    "already running".
seealso:
  - module: clinic.backup.files_restore
  - module: clinic.backup.backup_verify
  - module: clinic.backup.pg_dump
"""

EXAMPLES = r"""
- name: Back up the patients' uploads to the local repository and to S3 (hourly)
  clinic.backup.files_backup:
    name: uploads
    paths:
      - /var/www/clinic/uploads
    exclude:
      - "*.part"
      - tmp
    passphrase_file: /root/.backup-passphrase
    repository: /var/backups/clinic/files
    s3_targets:
      - bucket: clinic-backups
        prefix: files/clinic-main
        sse: AES256
    audit_log: /var/log/clinic-backup/audit.jsonl

- name: Hourly uploads, storing only what changed (a full set every 24 runs)
  clinic.backup.files_backup:
    name: uploads
    paths:
      - /var/www/clinic/uploads
    incremental: true
    full_every: 24
    passphrase_file: /root/.backup-passphrase
    repository: /var/backups/clinic/files

- name: Back up the application's configuration and TLS certificates
  clinic.backup.files_backup:
    name: config
    paths:
      - /home/clinic/clinic/.env
      - /etc/nginx/sites-available/clinic
      - /etc/systemd/system/clinic-web.service
      - /etc/letsencrypt
    passphrase_file: /root/.backup-passphrase
    repository: /var/backups/clinic/config
"""

RETURN = r"""
set_id:
  description: Id of the new backup set.
  returned: always
  type: str
  sample: 20261122T010000Z-uploads-1a2b3c
name:
  description: Name of the file set.
  returned: always
  type: str
  sample: uploads
files:
  description:
    - What the archive holds, as recorded in the manifest - regular files (C(count)) and their C(bytes),
      C(directories), C(symlinks), C(excluded) entries, C(roots) (each path with its archive name),
      C(skipped) (counts per reason; the paths are in RV(left_out)), C(changed) and C(unreadable) counts.
    - With O(incremental=true) also C(tree) (the counts of the whole tree), C(reused) and C(reused_bytes)
      (files left to earlier sets), C(deleted) and C(chain) (C(level) V(full) or V(incremental), and in
      C(sets) the sets it builds on, oldest first). C(count) and C(bytes) are then what this set stores.
  returned: always
  type: dict
  sample:
    count: 50
    bytes: 997477
    directories: 51
    symlinks: 0
    excluded: 0
    roots:
      - path: /var/www/clinic/uploads
        member: 0-uploads
        type: directory
    skipped: []
    changed: 0
    unreadable: 0
left_out:
  description: Entries left out, with the reason (special file, vanished, link outside the path, unreadable...). At most 200.
  returned: always
  type: list
  elements: dict
  sample:
    - path: /var/www/clinic/uploads/.socket
      reason: special file
      detail: socket, not backed up
changed_files:
  description: Files that changed while being read, with what was stored. At most 200.
  returned: success
  type: list
  elements: dict
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
  description: Stored bytes of the set (compressed and encrypted; with O(incremental=true) the archive and the index).
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
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.file_backup import (
    FileBackupOptions,
    run_file_backup,
)
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    AUDIT_ARGS,
    AWS_CREDENTIAL_ARGS,
    SET_WRITING_ARGS,
    exit_audited,
    fail_audited,
    missing_library,
    target_repositories,
)


def argument_spec():
    spec = dict(AWS_CREDENTIAL_ARGS)
    spec.update(AUDIT_ARGS)
    spec.update(
        name=dict(type="str", required=True),
        paths=dict(type="list", elements="path", required=True),
        exclude=dict(type="list", elements="str", default=[]),
        incremental=dict(type="bool", default=False),
        full_every=dict(type="int", default=24),
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
    missing = missing_library(params)
    if missing:
        module.fail_json(msg=missing_required_lib(missing[0]), exception=str(missing[1]))
    if not params["encrypt"]:
        module.warn("encrypt=false: this backup stores file contents unencrypted")
    try:
        options = FileBackupOptions(
            params["name"],
            params["paths"],
            exclude=params["exclude"],
            compression=params["compression"],
            compression_level=params["compression_level"],
            encrypt=params["encrypt"],
            passphrase_file=params["passphrase_file"],
            label=params["label"],
            stale_seconds=params["stale_seconds"],
            incremental=params["incremental"],
            full_every=params["full_every"],
        )
        result = run_file_backup(target_repositories(params), options, check_mode=module.check_mode)
    except BackupError as exc:
        fail_audited(module, "backup", exc)
    for warning in result.pop("warnings", []):
        module.warn(warning)
    exit_audited(module, "backup", result)


if __name__ == "__main__":
    main()
