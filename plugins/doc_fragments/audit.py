# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # The audit log option of every module that touches backup sets.
    DOCUMENTATION = r"""
options:
  audit_log:
    description:
      - Append one record of this run (who, when, on which host, what, which set, the outcome) to this
        append-only JSON-lines audit log (HIPAA audit controls). Each line carries the sha256 of the line
        before it, so an edited or deleted line is detectable.
      - The file is created V(0600) (its directory V(0700)); a file readable by others or a symlink is refused.
        Secrets are never written to it.
      - When the record cannot be written the task fails, even though the operation itself completed.
    type: path
"""
