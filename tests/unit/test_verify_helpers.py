"""Pure helpers of verify."""

from __future__ import annotations

import pytest

from ansible_collections.clinic.backup.plugins.module_utils.verify import unsafe_tar_member


@pytest.mark.parametrize(
    "name,why",
    [
        ("toc.dat", None),
        ("./3456.dat", None),
        ("/etc/passwd", "absolute path"),
        ("../outside", "parent directory reference"),
        ("a/../../outside", "parent directory reference"),
    ],
)
def test_unsafe_tar_member(name, why):
    assert unsafe_tar_member(name) == why
