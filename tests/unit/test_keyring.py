"""The passphrase file and its keyring: refused values, root-only files, rotation."""

from __future__ import annotations

import os
import stat

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import keyring
from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError
from ansible_collections.clinic.backup.plugins.module_utils.passphrase import load_passphrase

OLD = "k8Zq0vXh3TnB2mWf9sLr4Yd7"
NEW = "Qe5Wn1Rb8Tz6Vy3Ux0Lp2Ho9Jc"
UID, GID = os.getuid(), os.getgid()


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (None, "missing or empty"),
        ("   ", "missing or empty"),
        ("changeme", "placeholder"),
        ("CHANGE_ME", "placeholder"),
        ("Change-Me-Change-Me-Change-Me", "placeholder"),
        ("{{ vault_clinic_backup_passphrase }}", "placeholder"),
        ("correct horse battery staple", "placeholder"),
        ("short but random 7x", "fewer than 20"),
        ("two\nlines of a passphrase 1234", "not one line"),
        ("a carriage return\r 1234567890", "not one line"),
    ],
)
def test_a_missing_placeholder_or_short_passphrase_is_refused_without_quoting_it(value, problem):
    with pytest.raises(ConfigError, match=problem) as caught:
        keyring.check_new_passphrase(value)
    if value and value.strip():
        assert value not in str(caught.value) + (caught.value.hint or "")


def test_site_specific_placeholders_are_refused_too():
    with pytest.raises(ConfigError, match="placeholder"):
        keyring.check_new_passphrase(
            "Clinic-Backup-Staging-2026!", placeholders=["clinic backup staging 2026"]
        )
    assert keyring.check_new_passphrase(NEW + "\n") == NEW.encode()


def test_written_root_only_and_a_second_run_changes_nothing(tmp_path):
    path, ring = str(tmp_path / "passphrase"), str(tmp_path / "keyring")
    result = keyring.install_passphrase(path, NEW, ring, uid=UID, gid=GID)
    assert result["changed"] and not result["rotated"]
    assert result["key_id"] == RecordKey(NEW.encode()).passphrase_id()
    assert (mode(path), mode(ring)) == (0o600, 0o700)
    assert load_passphrase(path) == NEW.encode()
    again = keyring.install_passphrase(path, NEW, ring, uid=UID, gid=GID)
    assert not again["changed"] and again["old_passphrase_files"] == []
    # Loose permissions left by hand are put back.
    os.chmod(path, 0o644)
    assert keyring.install_passphrase(path, None, ring, uid=UID, gid=GID)["changed"]
    assert mode(path) == 0o600


def test_another_passphrase_is_refused_unless_rotating_and_rotation_keeps_the_old_one(tmp_path):
    path, ring = str(tmp_path / "passphrase"), str(tmp_path / "keyring")
    keyring.install_passphrase(path, OLD, ring, uid=UID, gid=GID)
    with pytest.raises(ConfigError, match="different passphrase") as caught:
        keyring.install_passphrase(path, NEW, ring, uid=UID, gid=GID)
    assert OLD not in str(caught.value) and NEW not in str(caught.value)
    assert load_passphrase(path) == OLD.encode()
    # Check mode says what a rotation would do, and does nothing.
    dry = keyring.install_passphrase(
        path, NEW, ring, rotate=True, uid=UID, gid=GID, check_mode=True
    )
    assert dry["changed"] and dry["rotated"] and os.listdir(ring) == []
    assert load_passphrase(path) == OLD.encode()
    rotated = keyring.install_passphrase(path, NEW, ring, rotate=True, uid=UID, gid=GID)
    old_id = RecordKey(OLD.encode()).passphrase_id()
    assert rotated["retired_key_id"] == old_id
    assert (
        rotated["old_passphrase_files"]
        == [os.path.join(ring, old_id)]
        == dry["old_passphrase_files"]
    )
    assert load_passphrase(path) == NEW.encode()
    assert load_passphrase(os.path.join(ring, old_id)) == OLD.encode()
    assert mode(os.path.join(ring, old_id)) == 0o400
    # Nothing but the two files: no temporary file left behind.
    assert sorted(os.listdir(tmp_path)) == ["keyring", "passphrase"]
    # Rotating again to the same passphrase is no change; the keyring is still listed.
    again = keyring.install_passphrase(path, NEW, ring, rotate=True, uid=UID, gid=GID)
    assert not again["changed"] and again["old_passphrase_files"] == rotated["old_passphrase_files"]


def test_a_missing_file_without_a_passphrase_is_refused_unless_optional(tmp_path):
    path = str(tmp_path / "passphrase")
    with pytest.raises(ConfigError, match="does not exist"):
        keyring.install_passphrase(path, None, uid=UID, gid=GID)
    assert not keyring.install_passphrase(path, None, uid=UID, gid=GID, required=False)["changed"]
    assert not os.path.exists(path)


def test_a_symlinked_passphrase_file_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text(OLD + "\n")
    os.symlink(target, tmp_path / "passphrase")
    with pytest.raises(ConfigError, match="symlink"):
        keyring.install_passphrase(str(tmp_path / "passphrase"), NEW, uid=UID, gid=GID)
    assert target.read_text() == OLD + "\n"
