"""Fault: a validation fails while a configuration group is being put back in place.

The group holds what the runbook restores: an nginx site, the application's .env (a
secret), a directory of TLS files (secret) and a systemd unit that does not exist on the
host yet. Every placement is written before the validations run, so when one of them
fails (first, middle or last; the failing one prints the secret file it checks) the
engine must put EVERY destination back (same bytes, mode and inode; the new unit gone),
run no reload command, leave nothing beside the destinations nor a staging directory,
and never show the secret's contents. Real commands, real engine (files_place's).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from testbed.dataset import FAKE_SECRETS, make_config_files

from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.file_backup import (
    FileBackupOptions,
    run_file_backup,
)
from ansible_collections.clinic.backup.plugins.module_utils.file_placement import (
    PlacementOptions,
    ValidationError,
    place_files,
    run_command,
)

from . import faultlib


def snapshot(paths: list[Path]) -> dict[str, tuple]:
    """Every entry below ``paths``: bytes, mode, owner and inode (None: absent)."""
    out: dict[str, tuple] = {}
    for root in paths:
        if not root.exists():
            out[str(root)] = ()
            continue
        entries = [root] + (sorted(root.rglob("*")) if root.is_dir() else [])
        for path in entries:
            info = path.lstat()
            data = path.read_bytes() if stat.S_ISREG(info.st_mode) else b""
            out[str(path)] = (data, stat.S_IMODE(info.st_mode), info.st_uid, info.st_ino)
    return out


def beside(paths: list[Path]) -> list[str]:
    return sorted(
        name
        for directory in {p.parent for p in paths}
        for name in os.listdir(directory)
        if ".pre-restore-" in name or ".placing-" in name
    )


@pytest.mark.parametrize("failing", [0, 1, 2], ids=["first", "middle", "last"])
def test_failed_validation_puts_every_file_back_and_reloads_nothing(
    passphrase_file, repo_dir, tmp_path, summary_row, failing
):
    row = summary_row("failed validation during configuration restore")
    files = make_config_files(tmp_path / "host")
    tls = tmp_path / "host" / "tls"
    tls.mkdir()
    (tls / "clinic.key").write_text("-----BEGIN PRIVATE KEY-----\nbacked-up-key\n")
    (tls / "clinic.pem").write_text("-----BEGIN CERTIFICATE-----\nbacked-up-cert\n")
    repo = faultlib.local_repository(repo_dir)
    run_file_backup(
        [repo],
        FileBackupOptions(
            "config",
            [str(files["nginx"]), str(files["env"]), str(tls), str(files["systemd"])],
            passphrase_file=str(passphrase_file),
        ),
    )
    # The host now: every file edited since the backup, the unit not installed yet.
    files["nginx"].write_text("server { listen 127.0.0.1:8080; }\n")
    files["env"].write_text("SECRET_KEY=live-secret-not-from-the-backup\n")
    (tls / "clinic.key").write_text("live-key\n")
    (tls / "clinic.key").chmod(0o600)
    files["systemd"].unlink()
    destinations = [files["nginx"], files["env"], tls, files["systemd"]]
    before = snapshot(destinations)
    marker = tmp_path / "reloaded"
    passing = ["test", "-s", "{path}"]
    # The failing check prints what it reads: for the .env and the key, secrets.
    failing_argv = ["sh", "-c", 'cat "$1" "$1"/* 2>/dev/null; exit 3', "validate", "{path}"]
    validators = [passing, passing, passing]
    validators[failing] = failing_argv
    place = [
        {"path": str(files["nginx"]), "validate": validators[0], "reload": ["touch", str(marker)]},
        {"path": str(files["env"]), "validate": validators[1]},
        {
            "path": str(tls),
            "secret": True,
            "validate": validators[2],
            "reload": ["touch", str(marker)],
        },
        {"path": str(files["systemd"]), "reload": ["touch", str(marker)]},
    ]
    work = tmp_path / "work"
    options = PlacementOptions(
        "config",
        place,
        keep_dir=str(tmp_path / "kept"),
        work_dir=str(work),
        passphrase_file=str(passphrase_file),
    )
    row.run()
    try:
        place_files(repo, options)
    except BackupError as exc:
        error = exc
    else:
        error = None
    row.reported(error is None, False)
    after = snapshot(destinations)
    left = beside(destinations) + (os.listdir(work) if work.exists() else [])
    message = str(error)
    leaked = [s for s in list(FAKE_SECRETS.values()) + ["backed-up-key"] if s in message]
    recovered = after == before and not marker.exists() and not left
    row.add("leftovers", len(left))
    row.add("secrets_leaked", len(leaked))
    row.add("recovered", recovered)
    if failing == 1:
        row.note(message)

    assert isinstance(error, ValidationError), message
    assert "nothing was reloaded" in message and "exited 3" in message
    assert str(destinations[failing]) in message
    assert after == before  # every file back: bytes, mode, owner, the very same inode
    assert not files["systemd"].exists()
    assert not marker.exists()
    assert left == []
    assert leaked == []
    if failing == 0:
        assert "server {" in message  # not a secret: the validator's words are shown
    else:
        assert "output withheld (secret file)" in message


def test_interrupted_validation_puts_every_file_back(
    passphrase_file, repo_dir, tmp_path, summary_row
):
    """Ctrl-C (or any exception) while a validation runs: nothing new stays in place."""
    row = summary_row("failed validation during configuration restore")
    files = make_config_files(tmp_path / "host")
    repo = faultlib.local_repository(repo_dir)
    run_file_backup(
        [repo],
        FileBackupOptions(
            "config", [str(files["nginx"]), str(files["env"])], passphrase_file=str(passphrase_file)
        ),
    )
    files["nginx"].write_text("server { listen 127.0.0.1:8080; }\n")
    files["env"].write_text("SECRET_KEY=live\n")
    destinations = [files["nginx"], files["env"]]
    before = snapshot(destinations)
    calls = []

    def interrupted(argv, timeout):
        calls.append(argv)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_command(argv, timeout)

    options = PlacementOptions(
        "config",
        [
            {"path": str(files["nginx"]), "validate": ["test", "-s", "{path}"]},
            {"path": str(files["env"]), "validate": ["test", "-f", "{path}"]},
        ],
        keep_dir=str(tmp_path / "kept"),
        work_dir=str(tmp_path / "work"),
        passphrase_file=str(passphrase_file),
    )
    row.run()
    with pytest.raises(KeyboardInterrupt):
        place_files(repo, options, runner=interrupted)
    left = beside(destinations) + os.listdir(tmp_path / "work")
    recovered = snapshot(destinations) == before and not left
    row.add("leftovers", len(left))
    row.add("recovered", recovered)
    assert len(calls) == 2
    assert snapshot(destinations) == before
    assert left == []
