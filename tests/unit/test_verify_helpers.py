"""The one tar-safety rule shared by verify, restore and file restore."""

from __future__ import annotations

import pytest

from ansible_collections.clinic.backup.plugins.module_utils.tarsafety import unsafe_member


@pytest.mark.parametrize(
    "name,why",
    [
        ("toc.dat", None),
        ("./3456.dat", None),
        ("/etc/passwd", "absolute path"),
        ("../outside", "parent directory reference"),
        ("a/../../outside", "parent directory reference"),
        # Inside after normalising, but restore never accepted it: verify must not either.
        ("a/../b", "parent directory reference"),
    ],
)
def test_unsafe_member(name, why):
    assert unsafe_member(name) == why
