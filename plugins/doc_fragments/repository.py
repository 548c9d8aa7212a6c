# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # Modules that write into a local repository.
    DOCUMENTATION = r"""
options:
  create_repository:
    description:
      - A missing O(repository) is created (mode V(0700)) only when its parent directory exists, so that a
        typo in the path or an unmounted backup disk fails the task instead of filling the wrong disk.
      - V(true) creates the whole path, parents included.
      - An existing repository is never changed; one writable by every user is refused.
    type: bool
    default: false
"""
