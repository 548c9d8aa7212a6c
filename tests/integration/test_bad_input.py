"""Bad input gets a clear error naming what was wrong, and changes nothing."""

from __future__ import annotations

import os

import pytest
from testbed.netutil import free_port

from tests.integration import helpers

pytestmark = pytest.mark.integration


@pytest.fixture
def loose_passphrase_file(tmp_path):
    path = tmp_path / "loose-passphrase"
    path.write_text("secret passphrase\n")
    os.chmod(path, 0o644)
    return str(path)


def cases(
    pg, s3, connection_args, passphrase_file, loose_passphrase_file, repo_dir, bucket, tmp_path
):
    """(name, pg_dump arguments, words the error must contain)."""
    base = dict(connection_args, passphrase_file=passphrase_file, repository=repo_dir)
    return [
        ("unknown database", dict(base, database="no_such_db"), ['"no_such_db" does not exist']),
        (
            "unreachable server",
            dict(base, login_port=free_port()),
            ["cannot connect", "server is running"],
        ),
        ("wrong password", dict(base, login_password="wrong"), ["password authentication failed"]),
        (
            "missing passphrase file",
            dict(base, passphrase_file=str(tmp_path / "absent")),
            ["cannot open passphrase file"],
        ),
        (
            "world-readable passphrase file",
            dict(base, passphrase_file=loose_passphrase_file),
            ["loose permissions", "chmod 0600"],
        ),
        (
            "unknown table with quote and semicolon",
            dict(base, tables=["nope'; DROP TABLE patients; --"]),
            ["not found", "nope'; DROP TABLE patients; --"],
        ),
        ("table name with newline", dict(base, tables=["patients\nDROP"]), ["control character"]),
        (
            "missing bucket",
            dict(
                base, s3_targets=[{"bucket": "no-such-bucket-x", "endpoint_url": s3.endpoint_url}]
            ),
            ["NoSuchBucket", "create the bucket"],
        ),
        (
            # The only target unreachable: nothing can be stored (with a local
            # repository too, the local copy is taken: test_backup_module).
            "unreachable endpoint, no other target",
            dict(
                {k: v for k, v in base.items() if k != "repository"},
                s3_targets=[
                    {"bucket": bucket, "endpoint_url": "http://127.0.0.1:%d" % free_port()}
                ],
                s3_retries=1,
            ),
            ["cannot reach the endpoint"],
        ),
        (
            "parallel jobs with custom format",
            dict(base, jobs=4),
            ["parallel jobs need format=directory"],
        ),
        ("relative repository", dict(base, repository="backups"), ["must be absolute"]),
        ("bad compression level", dict(base, compression_level=42), ["out of range"]),
        (
            # An unmounted backup disk or a typo: never fill the wrong disk.
            "repository whose parent is missing",
            dict(base, repository=str(tmp_path / "unmounted-nas" / "clinic" / "db")),
            ["neither does its parent", "create_repository: true"],
        ),
    ]


def test_each_bad_input_fails_clearly_and_changes_nothing(
    ansible,
    pg,
    s3,
    bucket,
    connection_args,
    passphrase_file,
    loose_passphrase_file,
    repo_dir,
    tmp_path,
):
    table = cases(
        pg, s3, connection_args, passphrase_file, loose_passphrase_file, repo_dir, bucket, tmp_path
    )
    before = pg.psql("SELECT count(*) FROM patients", dbname=pg.clinic_db)
    run = ansible.play(
        [
            {"name": name, "clinic.backup.pg_dump": args, "ignore_errors": True}
            for name, args, _words in table
        ]
    )
    for name, _args, words in table:
        result = run.result(name)
        assert result["_status"] in ("failed", "ignored"), (name, result)
        for word in words:
            assert word in result["msg"], (name, word, result["msg"])
        assert "Traceback" not in result.get("module_stderr", ""), name
    assert helpers.local_sets(repo_dir) == [] and helpers.staging_leftovers(repo_dir) == []
    assert not (tmp_path / "unmounted-nas").exists()
    assert (
        helpers.s3_keys(s3.client(), bucket) == []
        and helpers.open_multipart_uploads(s3.client(), bucket) == []
    )
    assert pg.psql("SELECT count(*) FROM patients", dbname=pg.clinic_db) == before


def test_awkward_table_names_are_dumped_literally(
    ansible, pg, connection_args, passphrase_file, repo_dir
):
    """A table named with a quote and a semicolon is backed up on its own; nothing else runs."""
    pg.psql(
        'CREATE TABLE IF NOT EXISTS "it\'s; DROP TABLE patients" (x int); '
        'INSERT INTO "it\'s; DROP TABLE patients" VALUES (1), (2);'
        'ALTER TABLE "it\'s; DROP TABLE patients" OWNER TO %s' % pg.clinic_user,
        dbname=pg.clinic_db,
    )
    try:
        run = ansible.play(
            [
                {
                    "name": "backup",
                    "clinic.backup.pg_dump": dict(
                        connection_args,
                        passphrase_file=passphrase_file,
                        repository=repo_dir,
                        tables=["it's; DROP TABLE patients"],
                    ),
                }
            ]
        ).assert_ok()
        manifest = helpers.manifest(repo_dir, run.result("backup")["set_id"])
        assert manifest["options"]["tables"] == ["it's; DROP TABLE patients"]
        assert int(pg.psql("SELECT count(*) FROM patients", dbname=pg.clinic_db)) > 0
    finally:
        pg.psql('DROP TABLE IF EXISTS "it\'s; DROP TABLE patients"', dbname=pg.clinic_db)
