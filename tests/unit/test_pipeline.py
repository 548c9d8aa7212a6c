"""The pipeline: any stage's failure surfaces, output is hashed, gpg output is stock-decryptable."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import pipeline
from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError, ConfigError


def collect(stages, source=None):
    out = []
    result = pipeline.run_stream(stages, out.append, source=source)
    return b"".join(out), result


def test_output_is_hashed_and_counted():
    data, result = collect([pipeline.Stage("printf", ["printf", "hello"])])
    assert data == b"hello" and result.size == 5
    assert result.sha256 == hashlib.sha256(b"hello").hexdigest()


def test_failing_producer_is_named_with_its_stderr():
    with pytest.raises(BackupError, match=r"producer failed with exit code 3: boom"):
        collect(
            [
                pipeline.Stage("producer", ["sh", "-c", "echo boom >&2; exit 3"]),
                pipeline.Stage("zstd", pipeline.compress_argv("zstd")),
            ]
        )


def test_failing_middle_stage_is_named():
    with pytest.raises(BackupError, match="broken filter failed"):
        collect(
            [
                pipeline.Stage("yes", ["head", "-c", "1000000", "/dev/zero"]),
                pipeline.Stage("broken filter", ["sh", "-c", "head -c 10 >/dev/null; exit 4"]),
            ]
        )


def test_consumer_exception_stops_the_pipeline():
    def consume(_chunk):
        raise RuntimeError("disk gone")

    stages = [pipeline.Stage("zero", ["head", "-c", "50000000", "/dev/zero"])]
    with pytest.raises(RuntimeError, match="disk gone"):
        pipeline.run_stream(stages, consume)
    assert stages[0].proc.poll() is not None


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_compression_round_trip(compression):
    payload = os.urandom(1000) * 500
    packed, _result = collect(
        [pipeline.Stage(compression, pipeline.compress_argv(compression))], source=iter([payload])
    )
    unpacked, _result = collect(
        [pipeline.Stage("d", pipeline.decompress_argv(compression))], source=iter([packed])
    )
    assert unpacked == payload and len(packed) < len(payload)


@pytest.mark.parametrize(
    "compression,level", [("zstd", 0), ("zstd", 20), ("gzip", 10), ("lz4", None)]
)
def test_bad_compression_settings_are_config_errors(compression, level):
    with pytest.raises(ConfigError):
        pipeline.compress_argv(compression, level)


def test_gpg_output_decrypts_with_stock_gpg(tmp_path):
    passphrase = b"a long and random passphrase"
    with pipeline.GpgSession(passphrase) as session:
        argv, fd = session.encrypt_stage()
        assert passphrase.decode() not in " ".join(argv)
        encrypted, _result = collect(
            [pipeline.Stage("gpg", argv, pass_fds=(fd,))], source=iter([b"patient data\n"])
        )
    assert b"patient data" not in encrypted
    assert not os.path.exists(session.home)
    pass_file = tmp_path / "pass"
    pass_file.write_bytes(passphrase + b"\n")
    blob = tmp_path / "x.gpg"
    blob.write_bytes(encrypted)
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    out = subprocess.run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase-file",
            str(pass_file),
            "--decrypt",
            str(blob),
        ],
        capture_output=True,
        check=True,
    )
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)
    assert out.stdout == b"patient data\n"


def test_wrong_passphrase_fails_decryption():
    with pipeline.GpgSession(b"right") as session:
        argv, fd = session.encrypt_stage()
        encrypted, _result = collect(
            [pipeline.Stage("gpg", argv, pass_fds=(fd,))], source=iter([b"x" * 100])
        )
    with pipeline.GpgSession(b"wrong") as session:
        argv, fd = session.decrypt_stage()
        with pytest.raises(BackupError, match="gpg decryption failed"):
            collect(
                [pipeline.Stage("gpg decryption", argv, pass_fds=(fd,))], source=iter([encrypted])
            )


def test_a_wrong_passphrase_is_recognised_whatever_the_hosts_language(tmp_path, monkeypatch):
    """gpg's messages are translated by LANG/LC_ALL; the engine tells a wrong passphrase
    from damage by "Bad session key", so its gpg stages always speak C."""
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    monkeypatch.setenv("LANGUAGE", "de")
    stored = []
    with pipeline.GpgSession(b"right passphrase") as session:
        pipeline.run_stream([session.encryption()], stored.append, source=[b"patient rows"])
    with pipeline.GpgSession(b"wrong passphrase") as session:
        with pytest.raises(BackupError, match="Bad session key"):
            pipeline.run_stream([session.decryption()], lambda chunk: None, source=stored)


def test_progress_lines_every_interval_and_at_the_end():
    lines, now = [], [100.0]
    log = pipeline.ProgressLog(lines.append, interval=10.0, clock=lambda: now[0])
    pipeline.report_progress_to(log)
    try:

        def chunks():
            for _mib in range(4):
                now[0] += 6.0  # 6 s per MiB: a line at 12 s and 24 s, then the end
                yield b"x" * (1024 * 1024)

        result = pipeline.run_stream([], lambda chunk: None, source=chunks(), what="db.dump")
        assert result.size == 4 * 1024 * 1024
        # An unnamed stream (a WAL segment, a manifest) says nothing.
        pipeline.run_stream([], lambda chunk: None, source=[b"y"])
    finally:
        pipeline.report_progress_to(None)
    assert lines == [
        "db.dump streaming: 2.0 MiB in 12 s (170.7 KiB/s)",
        "db.dump streaming: 4.0 MiB in 24 s (170.7 KiB/s)",
        "db.dump done: 4.0 MiB in 24 s (170.7 KiB/s)",
    ]


def test_progress_through_real_stages_and_a_closed_stderr(tmp_path):
    def broken(_line):
        raise OSError("stderr is gone")

    pipeline.report_progress_to(pipeline.ProgressLog(broken, interval=0.0))
    try:
        result = pipeline.run_stream(
            [pipeline.Stage("cat", ["cat"])],
            lambda chunk: None,
            source=[b"z" * 4096] * 8,
            what="artifact",
        )
    finally:
        pipeline.report_progress_to(None)
    assert result.size == 4096 * 8


def test_reaping_skips_a_home_removed_by_its_owner_meanwhile(tmp_path, monkeypatch):
    # Another process removes its own home between the listing and the look at it (a
    # WAL worker reaping while a foreground wal-fetch finishes): not an error.
    kept = tmp_path / "clinic-test-kept"
    kept.mkdir()
    listed = ["clinic-test-gone", "clinic-test-kept"]
    monkeypatch.setattr(pipeline.os, "listdir", lambda _base: listed)
    removed = []
    pipeline.reap_owned_dirs("clinic-test-", removed.append, base=str(tmp_path), min_age_seconds=0)
    assert removed == [str(kept)]  # the vanished one skipped, the stale one still reaped
