"""Immutable backups: S3 Object Lock against Ceph's radosgw, which enforces it.

A set is written with ``object_lock: {mode: COMPLIANCE, days: 1}``; then someone holding
the backup's own credentials attacks it through boto3 (deletes by version, puts over it,
hides it behind delete markers). The locked versions survive, the catalog shows the lock,
retention keeps the locked set and says until when, and playbooks/dr_ransomware.yml
restores from it. Tests skip (saying why) when the Ceph packages are not installed;
what moto supports (the preflight, the option's validation) runs against moto.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from testbed.ansible import ansible_env, run_playbook
from testbed.dataset import table_fingerprints
from testbed.files import write_passphrase_file, write_private

from ansible_collections.clinic.backup.plugins.module_utils import s3 as s3util
from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError
from ansible_collections.clinic.backup.plugins.module_utils.repository import (
    S3Repository,
    dump_json,
    new_set_id,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFIX = "db/clinic-main"
LOCK = {"mode": "COMPLIANCE", "days": 1}
CLEAN_RESTORE = "Restore the newest verified set from before the intrusion into a new database"


@dataclass
class Locked:
    """Two locked, verified sets of clinic_db in radosgw, the newer one attacked."""

    env: dict[str, str]
    work: Path
    endpoint: str
    bucket: str
    connection: dict[str, object]
    older: str
    newer: str
    artifact: str  # key of the newer set's database dump
    manifest: str  # key of the newer set's manifest
    original: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # key: (version, body)
    attempts: dict[str, str] = field(default_factory=dict)  # what the attacker tried: outcome

    def play(self, tasks, **kwargs):
        path = self.work / ("play-%s.json" % secrets.token_hex(3))
        path.write_text(
            json.dumps([{"hosts": "all", "gather_facts": False, "tasks": tasks}], default=str)
        )
        return run_playbook(path, self.env, **kwargs)


def s3_args(gateway, bucket, **extra):
    return dict({"bucket": bucket, "prefix": PREFIX, "endpoint_url": gateway.endpoint_url}, **extra)


def attempt(outcomes, what, call):
    """Run one attack step; record 'refused: <code>' or 'done'."""
    try:
        call()
    except ClientError as exc:
        outcomes[what] = "refused: %s" % exc.response["Error"]["Code"]
    else:
        outcomes[what] = "done"


@pytest.fixture(scope="module")
def locked(radosgw, pg, collections_path, tmp_path_factory) -> Locked:
    work = tmp_path_factory.mktemp("objectlock")
    bucket = radosgw.create_bucket("clinic-locked-" + secrets.token_hex(3))
    passphrase = write_passphrase_file(work / "passphrase")
    connection = {
        "database": pg.clinic_db,
        "login_host": pg.host,
        "login_port": pg.port,
        "login_user": pg.clinic_user,
        "login_password": pg.clinic_password,
        "passphrase_file": str(passphrase),
    }
    target = s3_args(radosgw, bucket, object_lock=LOCK)
    location = s3_args(radosgw, bucket)
    verify = {"passphrase_file": str(passphrase), **location}
    tasks = [
        {"name": "older", "clinic.backup.pg_dump": dict(connection, s3_targets=[target])},
        {"name": "verify older", "clinic.backup.backup_verify": verify},
        {"name": "newer", "clinic.backup.pg_dump": dict(connection, s3_targets=[target])},
        {"name": "verify newer", "clinic.backup.backup_verify": verify},
    ]
    state = Locked(
        env=ansible_env(collections_path, radosgw.env()),
        work=work,
        endpoint=radosgw.endpoint_url,
        bucket=bucket,
        connection=connection,
        older="",
        newer="",
        artifact="",
        manifest="",
    )
    run = state.play(tasks).assert_ok()
    state.older = run.result("older")["set_id"]
    state.newer = run.result("newer")["set_id"]
    assert run.result("verify newer")["set_id"] == state.newer

    client = radosgw.client()  # the backup's own credentials
    sets = "%s/sets/%s/" % (PREFIX, state.newer)
    state.manifest = sets + "manifest.json"
    manifest = json.loads(client.get_object(Bucket=bucket, Key=state.manifest)["Body"].read())
    state.artifact = sets + next(
        a["file"] for a in manifest["artifacts"] if a["name"] == "database"
    )
    for key in (state.manifest, state.artifact):
        obj = client.get_object(Bucket=bucket, Key=key)
        state.original[key] = (obj["VersionId"], obj["Body"].read())

    # The attack, with the credentials that wrote the backups.
    outcomes = state.attempts
    for key in (state.manifest, state.artifact):
        version = state.original[key][0]
        attempt(
            outcomes,
            "delete version " + key,
            lambda key=key, version=version: client.delete_object(
                Bucket=bucket, Key=key, VersionId=version
            ),
        )
        attempt(
            outcomes,
            "bypass governance " + key,
            lambda key=key, version=version: client.delete_object(
                Bucket=bucket, Key=key, VersionId=version, BypassGovernanceRetention=True
            ),
        )
        attempt(
            outcomes,
            "shorten retention " + key,
            lambda key=key, version=version: client.put_object_retention(
                Bucket=bucket,
                Key=key,
                VersionId=version,
                Retention={
                    "Mode": "GOVERNANCE",
                    "RetainUntilDate": datetime.datetime.now(datetime.UTC)
                    + datetime.timedelta(seconds=5),
                },
            ),
        )
    ransom = b"your backups are encrypted, pay 10 BTC"
    attempt(
        outcomes,
        "put over artifact",
        lambda: client.put_object(
            Bucket=bucket, Key=state.artifact, Body=ransom, ContentMD5=s3util._md5_b64(ransom)
        ),
    )
    attempt(
        outcomes,
        "put over manifest",
        lambda: client.put_object(
            Bucket=bucket, Key=state.manifest, Body=ransom, ContentMD5=s3util._md5_b64(ransom)
        ),
    )
    # ... then hide the set: a delete marker on top of the forged manifest.
    attempt(
        outcomes,
        "delete marker on manifest",
        lambda: client.delete_object(Bucket=bucket, Key=state.manifest),
    )
    return state


def test_a_locked_set_cannot_be_deleted_or_overwritten_with_the_backup_credentials(locked, radosgw):
    client = radosgw.client()
    for key in (locked.manifest, locked.artifact):
        assert locked.attempts["delete version " + key] == "refused: AccessDenied"
        assert locked.attempts["bypass governance " + key] == "refused: AccessDenied"
        assert locked.attempts["shorten retention " + key].startswith("refused")
        version, body = locked.original[key]
        stored = client.get_object(Bucket=locked.bucket, Key=key, VersionId=version)
        assert hashlib.sha256(stored["Body"].read()).digest() == hashlib.sha256(body).digest()
        assert stored["ObjectLockMode"] == "COMPLIANCE"
        until = stored["ObjectLockRetainUntilDate"]
        now = datetime.datetime.now(datetime.UTC)
        assert now + datetime.timedelta(hours=23) < until <= now + datetime.timedelta(days=1)
    # Putting over and hiding "work" (S3 keeps every version): what a reader must see through.
    assert locked.attempts["put over artifact"] == "done"
    assert locked.attempts["delete marker on manifest"] == "done"
    with pytest.raises(ClientError):
        client.get_object(Bucket=locked.bucket, Key=locked.manifest)


def test_the_catalog_lists_the_attacked_set_as_written_with_its_lock(locked):
    run = locked.play(
        [
            {
                "name": "catalog",
                "clinic.backup.backup_info": {
                    "passphrase_file": locked.connection["passphrase_file"],
                    **s3_args_from(locked),
                },
            }
        ]
    ).assert_ok()
    sets = {s["id"]: s for s in run.result("catalog")["sets"]}
    newer = sets[locked.newer]
    assert newer["state"] == "complete" and newer["authentication"] == "ok"
    assert newer["verification"] == "ok"
    assert newer["object_lock"]["mode"] == "COMPLIANCE"
    assert newer["object_lock"]["retain_until"] > datetime.datetime.now(datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S"
    )
    assert sets[locked.older]["object_lock"]["mode"] == "COMPLIANCE"


def s3_args_from(locked):
    return {"bucket": locked.bucket, "prefix": PREFIX, "endpoint_url": locked.endpoint}


def test_retention_keeps_the_locked_set_and_says_until_when(locked):
    run = locked.play(
        [
            {
                "name": "prune",
                "clinic.backup.backup_retention": {
                    "passphrase_file": locked.connection["passphrase_file"],
                    "keep_daily": 1,
                    "keep_weekly": 0,
                    "keep_monthly": 0,
                    "keep_yearly": 0,
                    "min_keep": 1,
                    **s3_args_from(locked),
                },
            }
        ]
    ).assert_ok()
    result = run.result("prune")
    assert result["deleted"] == [] and result["changed"] is False
    assert locked.older in result["kept"] and locked.newer in result["kept"]
    (entry,) = result["locked"]
    assert entry["id"] == locked.older and entry["mode"] == "COMPLIANCE"
    decision = next(d for d in result["decisions"] if d["id"] == locked.older)
    assert decision["action"] == "keep"
    assert "until %s" % entry["retain_until"] in decision["reasons"][0]


def test_dr_ransomware_restores_the_attacked_locked_set(locked, pg, pg_fingerprints):
    pgpass = write_private(
        locked.work / "pgpass",
        "%s:%d:*:%s:%s\n" % (pg.host, pg.port, pg.clinic_user, pg.clinic_password),
    )
    target = "clinic_db_locked_%s" % secrets.token_hex(3)
    extra_vars = {
        "clinic_backup_database": pg.clinic_db,
        "clinic_backup_login_host": pg.host,
        "clinic_backup_login_port": pg.port,
        "clinic_backup_login_user": pg.clinic_user,
        "clinic_backup_passfile": str(pgpass),
        "clinic_backup_passphrase_file": locked.connection["passphrase_file"],
        "clinic_backup_s3_targets": [dict(s3_args_from(locked), object_lock=LOCK)],
        "clinic_backup_restore_login_user": pg.superuser,
        "clinic_backup_clean_before": datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
        "clinic_backup_restore_target": target,
    }
    try:
        run = run_playbook(
            REPO_ROOT / "playbooks" / "dr_ransomware.yml",
            locked.env,
            extra_vars=extra_vars,
            inventory=str(REPO_ROOT / "inventories" / "local"),
        ).assert_ok()
        restore = run.result(CLEAN_RESTORE)
        assert restore["set_id"] == locked.newer
        assert table_fingerprints(pg, target) == pg_fingerprints
    finally:
        if target in pg.psql("SELECT datname FROM pg_database").split():
            pg.drop_database(target)


def test_an_expired_or_absent_lock_lets_retention_delete_every_version(radosgw):
    """A set with no lock in an Object Lock bucket: deleting it removes every version (a
    delete marker alone would leave the data stored, and the set listed from versions)."""
    bucket = radosgw.create_bucket("clinic-unlocked-" + secrets.token_hex(3))
    client = radosgw.client()
    repo = S3Repository(client, bucket, "p")
    set_id = new_set_id("db")
    for name, body in (("db.dump", b"dump"), ("manifest.json", dump_json({"id": set_id}))):
        client.put_object(
            Bucket=bucket, Key=repo.key(set_id, name), Body=body, ContentMD5=s3util._md5_b64(body)
        )
    client.put_object(
        Bucket=bucket,
        Key=repo.key(set_id, "db.dump"),
        Body=b"over",
        ContentMD5=s3util._md5_b64(b"over"),
    )
    assert repo.versioned_reads() and repo.set_ids() == [set_id]
    assert repo.open_artifact(set_id, "db.dump").read() == b"dump"  # as first written
    assert repo.object_lock_of(set_id, ["db.dump", "manifest.json"]) is None
    repo.delete_set(set_id)
    assert client.list_object_versions(Bucket=bucket, Prefix="p/").get("Versions") is None
    assert repo.set_ids() == []


def test_a_target_asking_for_object_lock_on_a_bucket_without_it_is_refused(s3, bucket):
    """Preflight (moto answers GetObjectLockConfiguration like S3): nothing is written."""
    env = s3.env()
    client = s3util.make_client(
        endpoint_url=s3.endpoint_url,
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        retries=2,
    )
    repo = S3Repository(client, bucket, "p", object_lock=LOCK)
    with pytest.raises(ConfigError, match="does not have S3 Object Lock enabled") as info:
        repo.check_writable()
    assert "object-lock-enabled-for-bucket" in info.value.hint
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


@pytest.mark.parametrize(
    "lock, words",
    [
        ({"mode": "governance", "days": 3}, "GOVERNANCE or COMPLIANCE"),
        ({"mode": "COMPLIANCE", "days": 0}, "from 1 to"),
        ({"mode": "COMPLIANCE", "days": "30"}, "whole number"),
        ({"mode": "COMPLIANCE", "days": 3, "years": 1}, "unknown key"),
    ],
)
def test_a_malformed_object_lock_is_refused_naming_it(lock, words):
    with pytest.raises(ConfigError, match=words):
        s3util.check_object_lock(lock)
