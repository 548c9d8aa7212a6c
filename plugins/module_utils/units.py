# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Sizes, durations and rates as people read them (``28.5 MiB``, ``3 min 12 s``):
one place for the status table, the agent's progress lines, the modules' summaries
and the compliance report."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

_SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(size):
    """``28.5 MiB``: binary units, one decimal; bytes below 1 KiB; ``-`` when unknown."""
    if size is None:
        return "-"
    if size < 1024:
        return "%d B" % size
    value = float(size)
    for unit in _SIZE_UNITS:
        value /= 1024.0
        if value < 1024 or unit == _SIZE_UNITS[-1]:
            return "%.1f %s" % (value, unit)
    return "-"  # not reached: the loop returns at its last unit


def human_duration(seconds):
    """``3 min 12 s``, ``2 h 5 min``, ``4 d 3 h``, ``0.4 s``: the two largest units."""
    if seconds is None:
        return "-"
    if seconds < 10:
        # Short runs (a small restore test) deserve their tenth of a second.
        return "%.1f s" % max(seconds, 0.0)
    whole = int(round(seconds))
    units = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
    for index, (unit, length) in enumerate(units):
        if whole >= length or unit == "s":
            text = "%d %s" % (whole // length, unit)
            if index + 1 < len(units):
                next_unit, next_length = units[index + 1]
                rest = (whole % length) // next_length
                if rest:
                    text += " %d %s" % (rest, next_unit)
            return text
    return "-"  # not reached: "s" always matches


def human_rate(size, seconds):
    """``85.3 MiB/s``; ``-`` when nothing can be said."""
    if size is None or not seconds or seconds <= 0:
        return "-"
    return human_size(size / float(seconds)) + "/s"
