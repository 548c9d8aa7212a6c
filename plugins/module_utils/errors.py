# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Errors raised by the clinic.backup engine.

Every error names what was wrong and how to fix it, so a module or the host
agent can show it to an operator as is.  The engine never imports Ansible.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class BackupError(Exception):
    """Base class: a failure the operator can act on."""

    def __init__(self, message, hint=None):
        super(BackupError, self).__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self):
        if self.hint:
            return "%s (%s)" % (self.message, self.hint)
        return self.message


class ConfigError(BackupError):
    """Bad input: detected before anything is created or changed."""


class SourceError(BackupError):
    """PostgreSQL could not be read (connection, permissions, pg_dump failure)."""


class StoreError(BackupError):
    """A repository (local directory or S3) could not be written or read."""


class UnreachableError(StoreError):
    """A target could not be reached (network, 5xx after every retry): an
    outage, not a misconfiguration; the other targets still get the set."""


class IntegrityError(BackupError):
    """A stored backup does not match its manifest."""


class LockedError(BackupError):
    """Another run holds the repository lock."""
