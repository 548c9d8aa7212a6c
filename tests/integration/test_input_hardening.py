"""Regression tests of issue #10 (hostile input pass) through the real pg_dump module under
ansible-playbook: each bad input is refused with a clear message before anything is written,
and no piece of a password reaches the task result or the audit log."""

from __future__ import annotations

import json
import os

import pytest
from testbed.ansible import run_playbook
from testbed.files import write_private

from tests.integration import helpers

pytestmark = pytest.mark.integration

PASSWORD = "2024/Winter!Clinic"
# Checked in the message and hint; the whole result and the audit log also hold
# paths, ports and hashes, where four digits may turn up by chance.
FRAGMENTS = [PASSWORD, "2024", "Winter!Clinic", "Winter", "Clinic"]
WORDS = [PASSWORD, "Winter!Clinic", "Winter"]


def test_bad_inputs_are_refused_before_anything_is_written(
    ansible_environ, pg, passphrase_file, repo_dir, tmp_path
):
    audit = tmp_path / "audit.log"
    crlf = write_private(tmp_path / "crlf-passphrase", b"secret passphrase\r\n")
    fifo = tmp_path / "fifo-passphrase"
    os.mkfifo(str(fifo), 0o600)
    base = {
        "database": pg.clinic_db,
        "login_host": pg.host,
        "login_port": pg.port,
        "login_user": pg.clinic_user,
        "login_password": pg.clinic_password,
        "passphrase_file": str(passphrase_file),
        "repository": str(repo_dir),
        "audit_log": str(audit),
    }
    url = "postgresql://%s:%s@%s:%d/%s" % (pg.clinic_user, PASSWORD, pg.host, pg.port, pg.clinic_db)
    no_login = {k: v for k, v in base.items() if not k.startswith("login_") and k != "database"}
    table = [
        ("CRLF passphrase file", dict(base, passphrase_file=str(crlf)), ["CR LF", "sed -i"]),
        ("FIFO passphrase file", dict(base, passphrase_file=str(fifo)), ["FIFO"]),
        (
            "password with an unencoded slash",
            dict(no_login, database_url=url),
            ["ambiguous", "percent-encoded"],
        ),
        ("10 kB database name", dict(base, database="d" * 10000), ["NAMEDATALEN-1"]),
        ("64-byte login user", dict(base, login_user="u" * 64), ["NAMEDATALEN-1", "login_user"]),
    ]
    play = tmp_path / "play.yml"
    play.write_text(
        json.dumps(
            [
                {
                    "hosts": "all",
                    "gather_facts": False,
                    "tasks": [
                        {"name": name, "clinic.backup.pg_dump": args, "ignore_errors": True}
                        for name, args, _words in table
                    ],
                }
            ]
        )
    )
    # A FIFO used to block open() forever: a bounded run proves it no longer does.
    run = run_playbook(play, ansible_environ, timeout=300)
    for name, _args, words in table:
        result = run.result(name)
        assert result["_status"] in ("failed", "ignored"), (name, result)
        assert result.get("error_type") == "ConfigError", (name, result)
        for word in words:
            assert word in result["msg"], (name, word, result["msg"])
        assert "terminated abnormally" not in result["msg"]
    url_result = run.result("password with an unencoded slash")
    for fragment in FRAGMENTS:
        assert fragment not in url_result["msg"] + url_result.get("hint", ""), fragment
    logged = audit.read_text()
    for word in WORDS:
        assert word not in json.dumps(url_result), word
        assert word not in logged and word not in run.stdout + run.stderr, word
    assert "secret passphrase" not in logged
    assert [json.loads(line)["outcome"] for line in logged.splitlines()] == ["refused"] * len(table)
    assert helpers.local_sets(repo_dir) == [] and helpers.staging_leftovers(repo_dir) == []
