# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The engine's version, recorded in every manifest (keep in step with galaxy.yml)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

TOOL_NAME = "clinic.backup"
TOOL_VERSION = "0.1.0"
