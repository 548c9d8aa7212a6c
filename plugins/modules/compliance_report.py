#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: compliance_report
short_description: A self-contained HTML compliance report (and JSON) from the status of every host
version_added: 0.1.0
description:
  - Writes one HTML page for a HIPAA review, and the same report as JSON beside it. The page holds the backup
    guide's compliance checklist (daily automated backups, encrypted at rest, off-site copy, restore procedures
    documented, monthly restore testing, backup access logged and audited, disaster recovery plan), each line
    with its state (V(pass), V(warn), V(fail)) and the evidence it was decided on; then, per host and database
    or file group, charts of backup size, backup duration, the verification of each copy and the restore
    tests' measured RTO and RPO over time against the objectives.
  - The page is self-contained (inline SVG, no script) and its Content-Security-Policy forbids loading
    anything, so it opens without a network and can be archived or mailed as it is.
  - The evidence comes from M(clinic.backup.backup_status) results (with O(hosts[].audit) from its
    RV(clinic.backup.backup_status#module:status.audit)), the hosts' cron files and the runbook documents given
    in O(documents). C(playbooks/compliance_report.yml) gathers all of it.
  - Written files are V(0600) (set ids and host names are not for everyone), replaced atomically.
author:
  - Clinic Backup Team (@clinic-backup)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Evaluates the evidence and returns the report; writes nothing.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  dest:
    description: The HTML file to write (absolute path). Its directory must exist.
    type: path
    required: true
  json_dest:
    description: The JSON file to write; by default O(dest) with its extension replaced by C(.json).
    type: path
  title:
    description: The page's title.
    type: str
    default: Backup compliance report
  hosts:
    description: One entry per host.
    type: list
    elements: dict
    required: true
    suboptions:
      host:
        description: The host's name as the report shows it.
        type: str
        required: true
      groups:
        description: The RV(clinic.backup.backup_status#module:status) of each database and file group of the host.
        type: list
        elements: dict
        default: []
      schedule:
        description: The text of the host's cron file of the agent (C(/etc/cron.d/clinic-backup)); null when absent.
        type: str
      audit:
        description: What the audit log proves (RV(clinic.backup.backup_status#module:status.audit)); null when none.
        type: dict
  documents:
    description:
      - Runbook documents that prove procedures are documented; each is read on the controller and recorded
        with its size and sha256. A missing or empty file counts as not documented.
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: The document (absolute path).
        type: path
        required: true
      title:
        description: What it is, as the report shows it.
        type: str
        required: true
      kind:
        description: Which checklist line it proves.
        type: str
        required: true
        choices: [procedures, dr_plan]
  objectives:
    description: What the clinic promises; defaults are the runbook's (database corruption RTO 1 hour, RPO 24 hours).
    type: dict
    default: {}
    suboptions:
      rto_hours:
        description: Recovery time objective.
        type: float
        default: 1.0
      rpo_hours:
        description: Recovery point objective.
        type: float
        default: 24.0
      backup_max_age_hours:
        description: The newest backup may be this old.
        type: float
        default: 25.0
      verify_max_age_days:
        description: The off-site copy must have been verified this recently.
        type: float
        default: 8.0
      restore_test_max_age_days:
        description: The last successful restore test may be this old (monthly testing).
        type: float
        default: 32.0
      window_days:
        description: Days of daily backups checked.
        type: int
        default: 30
"""

EXAMPLES = r"""
- name: Write the compliance report on the controller
  clinic.backup.compliance_report:
    dest: /srv/reports/clinic-backup-compliance.html
    hosts:
      - host: db1
        groups: ["{{ db_status.status }}"]
        schedule: "{{ cron_text }}"
        audit: "{{ db_status.status.audit }}"
    documents:
      - path: /usr/share/ansible/collections/ansible_collections/clinic/backup/playbooks/README.md
        title: DR runbook
        kind: procedures
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
overall:
  description: The worst state of the checklist (V(pass), V(warn) or V(fail)).
  returned: always
  type: str
checklist:
  description: Each requirement with C(key), C(requirement), C(state) and C(evidence) (C(state), C(text)).
  returned: always
  type: list
  elements: dict
html_file:
  description: The HTML file (O(dest)).
  returned: always
  type: str
json_file:
  description: The JSON file.
  returned: always
  type: str
"""

import hashlib
import json
import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.clinic.backup.plugins.module_utils.compliance import (
    Objectives,
    evaluate,
    render_html,
)
from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError, ConfigError
from ansible_collections.clinic.backup.plugins.module_utils.module_support import error_result
from ansible_collections.clinic.backup.plugins.module_utils.repository import (
    atomic_write,
    utc_now,
)


def argument_spec():
    return dict(
        dest=dict(type="path", required=True),
        json_dest=dict(type="path"),
        title=dict(type="str", default="Backup compliance report"),
        hosts=dict(
            type="list",
            elements="dict",
            required=True,
            options=dict(
                host=dict(type="str", required=True),
                groups=dict(type="list", elements="dict", default=[]),
                schedule=dict(type="str"),
                audit=dict(type="dict"),
            ),
        ),
        documents=dict(
            type="list",
            elements="dict",
            default=[],
            options=dict(
                path=dict(type="path", required=True),
                title=dict(type="str", required=True),
                kind=dict(type="str", required=True, choices=["procedures", "dr_plan"]),
            ),
        ),
        objectives=dict(
            type="dict",
            default={},
            options=dict(
                rto_hours=dict(type="float", default=1.0),
                rpo_hours=dict(type="float", default=24.0),
                backup_max_age_hours=dict(type="float", default=25.0),
                verify_max_age_days=dict(type="float", default=8.0),
                restore_test_max_age_days=dict(type="float", default=32.0),
                window_days=dict(type="int", default=30),
            ),
        ),
    )


def describe_document(document):
    """The document's size and sha256 (0 bytes when it cannot be read)."""
    digest, size = hashlib.sha256(), 0
    try:
        with open(document["path"], "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 16), b""):
                digest.update(chunk)
                size += len(chunk)
    except OSError:
        return dict(document, bytes=0, sha256="")
    return dict(document, bytes=size, sha256=digest.hexdigest())


def output_paths(params):
    dest = params["dest"]
    if not os.path.isabs(dest) or not os.path.isdir(os.path.dirname(dest)):
        raise ConfigError(
            "dest %s must be an absolute path in an existing directory" % dest,
            "create the directory first, e.g. with ansible.builtin.file",
        )
    json_dest = params["json_dest"] or os.path.splitext(dest)[0] + ".json"
    if json_dest == dest:
        raise ConfigError("json_dest must differ from dest (%s)" % dest)
    return dest, json_dest


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    params = module.params
    try:
        dest, json_dest = output_paths(params)
        objectives = Objectives(**(params["objectives"] or {}))
        report = evaluate(
            params["hosts"],
            [describe_document(d) for d in params["documents"]],
            objectives,
            utc_now(),
        )
        if not module.check_mode:
            atomic_write(dest, render_html(report, params["title"]).encode("utf-8"))
            atomic_write(json_dest, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    except BackupError as exc:
        module.fail_json(**error_result(exc))
    module.exit_json(
        changed=not module.check_mode,
        overall=report["state"],
        checklist=report["checklist"],
        html_file=dest,
        json_file=json_dest,
    )


if __name__ == "__main__":
    main()
