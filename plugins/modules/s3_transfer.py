#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: s3_transfer
short_description: Move backup sets between a local repository and S3, or list what S3 holds
version_added: 0.1.0
description:
  - V(upload) copies a set from the local O(repository) to S3; V(download) copies a set from S3 into the
    local O(repository) (for example onto a replacement server); V(list) returns the catalog of the S3
    prefix, newest first; V(newest) returns the newest complete set there.
  - Every artifact is streamed (multipart upload with O(s3_part_size_mb) parts and O(s3_concurrency)
    threads), its sha256 checked against the manifest on the way, and the manifest is written last.
  - A set already present at the destination with the same manifest and sizes is left alone.
author:
  - Clinic Backup Team (@clinic-backup)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - clinic.backup.repository
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
  bucket:
    description: S3 bucket holding the repository.
    type: str
    required: true
  mode:
    description: What to do.
    type: str
    choices: [upload, download, list, newest]
    required: true
  repository:
    description: Local repository directory (required for V(upload) and V(download)).
    type: path
  set_id:
    description: Set to transfer. By default the newest complete set (of O(database), if given) at the source.
    type: str
  database:
    description: Only consider sets of this database.
    type: str
seealso:
  - module: clinic.backup.pg_dump
"""

EXAMPLES = r"""
- name: Fetch the newest clinic_db set from S3 onto a replacement server
  clinic.backup.s3_transfer:
    mode: download
    bucket: clinic-backups
    prefix: db/clinic-main
    database: clinic_db
    repository: /var/backups/clinic/db

- name: Push a set that was taken while S3 was unreachable
  clinic.backup.s3_transfer:
    mode: upload
    repository: /var/backups/clinic/db
    set_id: 20261122T010000Z-clinic_db-1a2b3c
    bucket: clinic-backups
    prefix: db/clinic-main
    sse: AES256

- name: What does the offsite bucket hold?
  clinic.backup.s3_transfer:
    mode: list
    bucket: clinic-backups-dr
    region: us-west-2
    prefix: db/clinic-main
  register: offsite
"""

RETURN = r"""
set_id:
  description: The transferred (or newest) set.
  returned: when mode is upload, download or newest
  type: str
artifacts:
  description: Locations of the artifacts at the destination.
  returned: when mode is upload or download
  type: list
  elements: str
sets:
  description: Catalog entries of the S3 prefix, newest first (id, database, finished_at, size, verification).
  returned: when mode is list or newest
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.clinic.backup.plugins.module_utils.catalog import (
    list_catalog,
    newest_complete,
)
from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.module_support import (
    AWS_CREDENTIAL_ARGS,
    S3_LOCATION_ARGS,
    error_result,
    local_repository,
    missing_library,
    s3_repository,
)
from ansible_collections.clinic.backup.plugins.module_utils.transfer import copy_set, resolve_set_id


def argument_spec():
    spec = dict(AWS_CREDENTIAL_ARGS)
    spec.update(S3_LOCATION_ARGS)
    spec["bucket"] = dict(S3_LOCATION_ARGS["bucket"], required=True)
    spec.update(
        mode=dict(type="str", required=True, choices=["upload", "download", "list", "newest"]),
        repository=dict(type="path"),
        create_repository=dict(type="bool", default=False),
        set_id=dict(type="str"),
        database=dict(type="str"),
    )
    return spec


def summary(entry):
    return {k: v for k, v in entry.items() if k != "manifest"}


def do_upload(module, remote):
    local = local_repository(module.params["repository"])
    set_id = resolve_set_id(local, module.params["set_id"], module.params["database"])
    return copy_set(local, remote, set_id, check_mode=module.check_mode)


def do_download(module, remote):
    local = local_repository(
        module.params["repository"],
        must_exist=False,
        create_parents=module.params["create_repository"],
    )
    set_id = resolve_set_id(remote, module.params["set_id"], module.params["database"])
    return copy_set(remote, local, set_id, check_mode=module.check_mode)


def do_list(module, remote):
    return {
        "changed": False,
        "sets": [summary(e) for e in list_catalog(remote, module.params["database"])],
    }


def do_newest(module, remote):
    entry = newest_complete(remote, module.params["database"])
    if entry is None:
        module.fail_json(msg="no complete backup set in %s" % remote.url, sets=[])
    return {"changed": False, "set_id": entry["id"], "sets": [summary(entry)]}


ACTIONS = {"upload": do_upload, "download": do_download, "list": do_list, "newest": do_newest}


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
        required_if=[("mode", "upload", ("repository",)), ("mode", "download", ("repository",))],
    )
    missing = missing_library(module.params)
    if missing:
        module.fail_json(msg=missing_required_lib(missing[0]), exception=str(missing[1]))
    try:
        remote = s3_repository(module.params, module.params)
        if module.params["mode"] in ("upload", "download"):
            remote.check_writable()
        result = ACTIONS[module.params["mode"]](module, remote)
    except BackupError as exc:
        module.fail_json(**error_result(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
