# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which tar members may be extracted: one rule for verify, restore and file restore.

An archive read back from storage is data an attacker may have written. A member
is unsafe when its name is absolute or holds a ``..`` component, whether or not
normalising would bring it back inside (``a/../b`` is refused too: no extractor
here ever needs it, and verify must refuse exactly what restore refuses).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import posixpath


def unsafe_member(name):
    """Why a tar member name would escape an extraction directory, or None."""
    if name.startswith("/"):
        return "absolute path"
    if ".." in name.split("/") or ".." in posixpath.normpath(name).split("/"):
        return "parent directory reference"
    return None


def unsafe_link(name, target):
    """Why a link member ``name -> target`` would point outside its archive, or None."""
    if not target or target.startswith("/"):
        return "absolute link target %r" % target
    parts = posixpath.normpath(posixpath.join(posixpath.dirname(name), target)).split("/")
    if parts[0] == "..":
        return "link target %r leads outside the archive" % target
    return None
