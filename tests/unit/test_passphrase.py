"""The passphrase file is the key to every backup: loose files are refused."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import pipeline
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


# ------------------------------------------- issue #10: the file as gpg reads it
def stock_gpg_decrypts(passphrase_file, encrypted: bytes, tmp_path) -> subprocess.CompletedProcess:
    """The README's emergency command: stock gpg, passphrase from the file as stored."""
    home = tmp_path / "gnupg-stock"
    home.mkdir(mode=0o700, exist_ok=True)
    blob = tmp_path / "set.gpg"
    blob.write_bytes(encrypted)
    try:
        return subprocess.run(
            ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback"]
            + ["--passphrase-file", str(passphrase_file), "--decrypt", str(blob)],
            capture_output=True,
            check=False,
            timeout=60,
        )
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)


def engine_encrypts(passphrase: bytes) -> bytes:
    stored = []
    with pipeline.GpgSession(passphrase) as session:
        pipeline.run_stream([session.encryption()], stored.append, source=[b"patient rows"])
    return b"".join(stored)


@pytest.mark.parametrize(
    "data",
    [
        b"correct horse\n",
        b"no trailing newline",
        b"  leading and trailing spaces  \n",
        b"\ttabs\tinside\t\n",
        b"a CR\rinside the line\n",
        b"not utf-8 \xff\xfe\n",
        b"\xef\xbb\xbfa byte order mark\n",
        b"x" * 4096,
    ],
    ids=["plain", "no-newline", "spaces", "tabs", "inner-cr", "non-utf8", "bom", "max-size"],
)
def test_every_accepted_file_is_read_exactly_as_stock_gpg_reads_it(tmp_path, data):
    """Sets the engine encrypts open with the README's emergency command and the same file."""
    path = write(tmp_path / "p", data)
    encrypted = engine_encrypts(load_passphrase(path))
    out = stock_gpg_decrypts(path, encrypted, tmp_path)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert out.stdout == b"patient rows"


@pytest.mark.parametrize(
    "data,words",
    [
        (b"secret passphrase\r\n", ["CR LF (a Windows line ending)"]),
        (b"secret passphrase\r", ["ends with a carriage return"]),
    ],
)
def test_a_line_ending_with_cr_is_refused_with_the_fix(tmp_path, data, words):
    """Stripping the CR made the engine's own verify pass while stock gpg
    --passphrase-file (which keeps it) fails with 'Bad session key'."""
    path = write(tmp_path / "p", data)
    # The defect itself: what the old engine used is not what gpg reads from the file.
    assert stock_gpg_decrypts(path, engine_encrypts(b"secret passphrase"), tmp_path).returncode
    with pytest.raises(ConfigError) as info:
        load_passphrase(path)
    message, hint = info.value.message, info.value.hint
    for word in words + ["stock gpg --passphrase-file", "Bad session key"]:
        assert word in message
    assert "sed -i 's/\\r$//' %s" % path in hint
    assert "WITHOUT the CR" in hint  # older sets: the stored passphrase has no CR
    assert b"secret" not in str(info.value).encode()


def test_after_the_suggested_fix_older_sets_decrypt_with_stock_gpg(tmp_path):
    """The hint's promise: sets written with the stripped passphrase open after the sed."""
    path = write(tmp_path / "p", b"secret passphrase\r\n")
    older_set = engine_encrypts(b"secret passphrase")
    subprocess.run(["sed", "-i", "s/\\r$//", path], check=True)
    assert load_passphrase(path) == b"secret passphrase"
    assert stock_gpg_decrypts(path, older_set, tmp_path).stdout == b"patient rows"


def test_refuses_a_nul_byte_gpg_would_stop_at(tmp_path):
    with pytest.raises(ConfigError, match="NUL byte"):
        load_passphrase(write(tmp_path / "p", b"first\0second\n"))


def test_refuses_a_fifo_without_blocking(tmp_path):
    """open() of a FIFO waited for a writer forever; now it is refused at once."""
    fifo = tmp_path / "p"
    os.mkfifo(str(fifo), 0o600)
    outcome = {}

    def load():
        try:
            outcome["result"] = load_passphrase(str(fifo))
        except ConfigError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(5)
    blocked = worker.is_alive()
    if blocked:  # release the stuck open(): a writer comes and goes
        os.close(os.open(str(fifo), os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
    assert not blocked, "load_passphrase blocked opening a FIFO"
    error = outcome["error"]
    assert "is not a regular file (it is a FIFO (named pipe))" in error.message
    assert "regular 0600 file" in error.hint


def test_names_what_a_non_regular_file_is(tmp_path):
    with pytest.raises(ConfigError, match="it is a character device"):
        load_passphrase("/dev/null")
