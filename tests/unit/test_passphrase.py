"""The passphrase file is the key to every backup: loose files are refused."""

from __future__ import annotations

import os

import pytest

from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError
from ansible_collections.clinic.backup.plugins.module_utils.passphrase import load_passphrase


def write(path, data: bytes, mode: int = 0o600):
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def test_reads_one_line_and_strips_newline(tmp_path):
    assert load_passphrase(write(tmp_path / "p", b"correct horse\n")) == b"correct horse"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666, 0o610])
def test_refuses_group_or_world_access(tmp_path, mode):
    path = write(tmp_path / "p", b"secret\n", mode)
    with pytest.raises(ConfigError, match="loose permissions") as info:
        load_passphrase(path)
    assert "chmod 0600" in str(info.value)


@pytest.mark.parametrize("data", [b"", b"\n", b"   \n"])
def test_refuses_empty(tmp_path, data):
    with pytest.raises(ConfigError, match="empty"):
        load_passphrase(write(tmp_path / "p", data))


def test_refuses_multiline(tmp_path):
    with pytest.raises(ConfigError, match="more than one line"):
        load_passphrase(write(tmp_path / "p", b"one\ntwo\n"))


def test_refuses_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot open passphrase file"):
        load_passphrase(str(tmp_path / "absent"))


def test_refuses_symlink(tmp_path):
    target = write(tmp_path / "real", b"secret\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="symlink"):
        load_passphrase(str(link))


def test_refuses_directory(tmp_path):
    folder = tmp_path / "dir"
    folder.mkdir(mode=0o700)
    with pytest.raises(ConfigError):
        load_passphrase(str(folder))


def test_refuses_no_path():
    with pytest.raises(ConfigError, match="no passphrase file"):
        load_passphrase(None)


def test_error_never_contains_the_passphrase(tmp_path):
    path = write(tmp_path / "p", b"TOPSECRET-VALUE\n", 0o644)
    with pytest.raises(ConfigError) as info:
        load_passphrase(path)
    assert "TOPSECRET" not in str(info.value)
