"""clinic.backup.pg_dump / backup_verify / s3_transfer through real ansible-playbook runs."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from testbed.dataset import table_fingerprints

from tests.integration import helpers

pytestmark = pytest.mark.integration


def backup_task(connection_args, passphrase_file, **extra):
    args = dict(connection_args, passphrase_file=passphrase_file)
    args.update(extra)
    return {"name": "backup", "clinic.backup.pg_dump": args}


def test_backup_to_local_and_s3_in_one_run_then_verify_both(
    ansible, s3, bucket, connection_args, passphrase_file, repo_dir
):
    target = {
        "bucket": bucket,
        "prefix": "db/main",
        "endpoint_url": s3.endpoint_url,
        "sse": "AES256",
    }
    s3_location = {k: target[k] for k in ("bucket", "prefix", "endpoint_url")}
    run = ansible.play(
        [
            backup_task(connection_args, passphrase_file, repository=repo_dir, s3_targets=[target]),
            {
                "name": "verify local",
                "clinic.backup.backup_verify": {
                    "repository": repo_dir,
                    "passphrase_file": passphrase_file,
                },
            },
            {
                "name": "verify s3",
                "clinic.backup.backup_verify": dict(s3_location, passphrase_file=passphrase_file),
            },
            {"name": "list s3", "clinic.backup.s3_transfer": dict(s3_location, mode="list")},
        ]
    ).assert_ok()
    backup = run.result("backup")
    set_id = backup["set_id"]
    assert backup["changed"] is True
    assert [t["ok"] for t in backup["targets"]] == [True, True]
    assert helpers.local_sets(repo_dir) == [set_id]
    keys = helpers.s3_keys(s3.client(), bucket, "db/main/sets/%s/" % set_id)
    files = {a["file"] for a in backup["artifacts"]}
    assert {k.rsplit("/", 1)[1] for k in keys} >= files | {"manifest.json"}
    # Same bytes in both places: one stream, one sha256.
    manifest = helpers.manifest(repo_dir, set_id)
    for artifact in manifest["artifacts"]:
        body = s3.client().get_object(
            Bucket=bucket, Key="db/main/sets/%s/%s" % (set_id, artifact["file"])
        )
        import hashlib

        assert hashlib.sha256(body["Body"].read()).hexdigest() == artifact["sha256"]
        assert body["ServerSideEncryption"] == "AES256"
    for name in ("verify local", "verify s3"):
        verify = run.result(name)
        assert verify["ok"] is True and verify["set_id"] == set_id, verify
        assert {c["name"] for c in verify["checks"]} >= {"manifest", "sha256", "readable", "age"}
    assert [s["id"] for s in run.result("list s3")["sets"]] == [set_id]
    encryption = dict(manifest["encryption"])
    # An identifier of the passphrase (never the passphrase), so rotation picks the key.
    assert re.fullmatch(r"[0-9a-f]{16}", encryption.pop("key_id")), manifest["encryption"]
    assert encryption == {"method": "gpg-symmetric", "cipher": "AES256"}
    assert manifest["row_counts"]["public.patients"] > 0


def test_flipped_byte_makes_verify_fail_naming_the_artifact(
    ansible, connection_args, passphrase_file, repo_dir
):
    run = ansible.play(
        [backup_task(connection_args, passphrase_file, repository=repo_dir)]
    ).assert_ok()
    set_id = run.result("backup")["set_id"]
    path = helpers.artifact_path(repo_dir, set_id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    run = ansible.play(
        [
            {
                "name": "verify",
                "clinic.backup.backup_verify": {
                    "repository": repo_dir,
                    "passphrase_file": passphrase_file,
                },
            }
        ]
    )
    verify = run.result("verify")
    assert verify["_status"] == "failed"
    assert path.name in verify["msg"] and "sha256" in verify["msg"]
    failed = {c["name"] for c in verify["checks"] if c["status"] == "fail"}
    assert failed == {"sha256", "readable"}  # the flip also breaks gpg's integrity check
    assert all(c.get("artifact") == path.name for c in verify["checks"] if c["status"] == "fail")


def test_emergency_path_with_stock_tools_and_restore_gives_identical_tables(
    ansible, pg, connection_args, passphrase_file, repo_dir, tmp_path
):
    run = ansible.play(
        [backup_task(connection_args, passphrase_file, repository=repo_dir)]
    ).assert_ok()
    set_id = run.result("backup")["set_id"]
    artifact = helpers.artifact_path(repo_dir, set_id)
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    bin_dir = str(pg.bin_dir)
    try:
        listing = helpers.pipe(
            helpers.stock_gpg(passphrase_file, home),
            ["zstd", "-d"],
            [os.path.join(bin_dir, "pg_restore"), "--list"],
            stdin_path=artifact,
        )
        assert b"TABLE DATA public patients" in listing
        # Restore into a fresh database and compare every table with the source.
        pg.create_database("restored_copy", owner=pg.clinic_user)
        try:
            plain = tmp_path / "dump"
            plain.write_bytes(
                helpers.pipe(
                    helpers.stock_gpg(passphrase_file, home), ["zstd", "-d"], stdin_path=artifact
                )
            )
            env = dict(os.environ, **pg.libpq_env(dbname="restored_copy"))
            subprocess.run(
                [
                    os.path.join(bin_dir, "pg_restore"),
                    "--no-owner",
                    "--exit-on-error",
                    "-d",
                    "restored_copy",
                    str(plain),
                ],
                env=env,
                check=True,
                capture_output=True,
            )
            source = table_fingerprints(pg, pg.clinic_db)
            assert table_fingerprints(pg, "restored_copy") == source
            counts = helpers.manifest(repo_dir, set_id)["row_counts"]
            assert {helpers.bare_public_name(name): rows for name, rows in counts.items()} == {
                name: fp["rows"] for name, fp in source.items()
            }
        finally:
            pg.drop_database("restored_copy")
    finally:
        helpers.kill_gpg_agent(home)


def test_check_mode_writes_nothing(ansible, s3, bucket, connection_args, passphrase_file, repo_dir):
    target = {"bucket": bucket, "endpoint_url": s3.endpoint_url}
    run = ansible.play(
        [backup_task(connection_args, passphrase_file, repository=repo_dir, s3_targets=[target])],
        check=True,
    ).assert_ok()
    assert run.result("backup")["changed"] is True
    assert helpers.local_sets(repo_dir) == [] and helpers.s3_keys(s3.client(), bucket) == []


def test_s3_transfer_upload_then_download_is_idempotent(
    ansible, s3, bucket, connection_args, passphrase_file, repo_dir, tmp_path
):
    location = {"bucket": bucket, "prefix": "offsite", "endpoint_url": s3.endpoint_url}
    replacement = str(tmp_path / "replacement-server")
    transfer_up = {
        "name": "up",
        "clinic.backup.s3_transfer": dict(location, mode="upload", repository=repo_dir),
    }
    transfer_down = {
        "name": "down",
        "clinic.backup.s3_transfer": dict(location, mode="download", repository=replacement),
    }
    first = ansible.play(
        [
            backup_task(connection_args, passphrase_file, repository=repo_dir),
            transfer_up,
            transfer_down,
        ]
    ).assert_ok()
    second = ansible.play([transfer_up, transfer_down]).assert_ok()
    set_id = first.result("backup")["set_id"]
    assert (first.result("up")["changed"], first.result("down")["changed"]) == (True, True)
    assert (second.result("up")["changed"], second.result("down")["changed"]) == (False, False)
    assert helpers.local_sets(replacement) == [set_id]
    for artifact in helpers.manifest(repo_dir, set_id)["artifacts"]:
        assert (
            helpers.artifact_path(replacement, set_id, artifact["name"]).read_bytes()
            == helpers.artifact_path(repo_dir, set_id, artifact["name"]).read_bytes()
        )


@pytest.mark.parametrize("fmt", ["plain", "directory"])
def test_other_formats_verify(ansible, connection_args, passphrase_file, repo_dir, fmt):
    extra = {"format": fmt, "compression": "gzip"}
    if fmt == "directory":
        extra["jobs"] = 2
    run = ansible.play(
        [
            backup_task(connection_args, passphrase_file, repository=repo_dir, **extra),
            {
                "name": "verify",
                "clinic.backup.backup_verify": {
                    "repository": repo_dir,
                    "passphrase_file": passphrase_file,
                },
            },
        ]
    ).assert_ok()
    assert run.result("verify")["ok"] is True
    assert helpers.staging_leftovers(repo_dir) == []


def test_unreachable_s3_still_gets_the_local_copy_and_fails_naming_s3(
    ansible, connection_args, passphrase_file, repo_dir
):
    """An S3 outage at 01:00 must not cost the clinic its local backup, nor pass as success."""
    from testbed.netutil import free_port

    down = {"bucket": "clinic-backups", "endpoint_url": "http://127.0.0.1:%d" % free_port()}
    run = ansible.play(
        [
            dict(
                backup_task(
                    connection_args, passphrase_file, repository=repo_dir, s3_targets=[down]
                ),
                ignore_errors=True,
            ),
            {
                "name": "verify local",
                "clinic.backup.backup_verify": {
                    "repository": repo_dir,
                    "passphrase_file": passphrase_file,
                },
            },
        ]
    )
    backup = run.result("backup")
    assert backup["_status"] in ("failed", "ignored")
    assert "cannot reach the endpoint" in backup["msg"] and down["endpoint_url"] in backup["msg"]
    assert [(t["kind"], t["ok"]) for t in backup["targets"]] == [("local", True), ("s3", False)]
    assert helpers.local_sets(repo_dir) == [backup["set_id"]]
    assert run.result("verify local")["ok"] is True
