"""S3 Object Lock without a store: the option's checks, version choice, and what retention
does with a set a repository reports as locked (the radosgw tests cover the real thing)."""

from __future__ import annotations

import datetime

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import agent, retention
from ansible_collections.clinic.backup.plugins.module_utils import s3 as s3util
from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError, StoreError
from ansible_collections.clinic.backup.plugins.module_utils.module_support import s3_repository

NOW = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.UTC)


def test_the_oldest_version_of_each_key_is_the_one_read():
    versions = [  # ListObjectVersions order: newest first per key
        {"Key": "s/m.json", "VersionId": "v3", "DeleteMarker": True},
        {"Key": "s/m.json", "VersionId": "v2", "DeleteMarker": False},
        {"Key": "s/m.json", "VersionId": "v1", "DeleteMarker": False},
        {"Key": "s/a.gpg", "VersionId": "only", "DeleteMarker": False},
        {"Key": "s/gone", "VersionId": "dm", "DeleteMarker": True},
    ]
    assert s3util.first_versions(versions) == {"s/m.json": "v1", "s/a.gpg": "only"}


def test_an_expired_retention_is_no_lock():
    later = NOW + datetime.timedelta(days=2)
    info = {"ObjectLockMode": "GOVERNANCE", "ObjectLockRetainUntilDate": later}
    assert s3util.object_lock_state(info, NOW) == ("GOVERNANCE", later, None)
    past = dict(info, ObjectLockRetainUntilDate=NOW - datetime.timedelta(seconds=1))
    assert s3util.object_lock_state(past, NOW) == (None, None, None)
    held = dict(past, ObjectLockLegalHoldStatus="ON")
    assert s3util.object_lock_state(held, NOW) == (None, None, True)


def test_the_agent_config_takes_object_lock_and_checks_it():
    target = {"bucket": "b", "object_lock": {"mode": "COMPLIANCE", "days": 30}}
    agent.check_config({"database": "db", "s3_targets": [target]})
    with pytest.raises(ConfigError, match=r"s3_targets\[0\]\.object_lock must be an object"):
        agent.check_config({"database": "db", "s3_targets": [dict(target, object_lock="30")]})
    bad = dict(target, object_lock={"mode": "COMPLIANCE", "days": -1})
    with pytest.raises(ConfigError, match="object_lock.days"):
        s3_repository(bad, {"aws_access_key": "k", "aws_secret_key": "s"})
    repo = s3_repository(target, {"aws_access_key": "k", "aws_secret_key": "s"})
    assert repo.object_lock == ("COMPLIANCE", 30)


class LockedRepo:
    """What retention asks of a repository about locks, with one set locked."""

    url = "s3://b/p"

    def __init__(self, locked_id, fail_id=None):
        self.locked_id = locked_id
        self.fail_id = fail_id
        self.asked = []

    def object_lock_of(self, set_id, filenames):
        self.asked.append((set_id, tuple(filenames)))
        if set_id == self.fail_id:
            raise StoreError("S3 head failed: AccessDenied")
        if set_id == self.locked_id:
            return {"mode": "COMPLIANCE", "retain_until": "2026-12-31T00:00:00.000000Z"}
        return None


def entry(set_id):
    return {"id": set_id, "state": "complete", "manifest": {"artifacts": [{"file": "a.gpg"}]}}


def decision(set_id, action):
    return {"id": set_id, "action": action, "reasons": ["x"]}


def test_retention_keeps_a_locked_set_and_one_whose_lock_it_cannot_read():
    entries = [entry("new"), entry("locked"), entry("unknown"), entry("free")]
    decisions = [
        decision("new", retention.KEEP),
        decision("locked", retention.DELETE),
        decision("unknown", retention.DELETE),
        decision("free", retention.DELETE),
    ]
    repo = LockedRepo("locked", fail_id="unknown")
    warnings = []
    locked = retention.keep_locked(repo, entries, decisions, warnings)
    assert locked == [
        {"id": "locked", "mode": "COMPLIANCE", "retain_until": "2026-12-31T00:00:00.000000Z"}
    ]
    actions = {d["id"]: d["action"] for d in decisions}
    assert actions == {"new": "keep", "locked": "keep", "unknown": "keep", "free": "delete"}
    assert "until 2026-12-31T00:00:00.000000Z" in decisions[1]["reasons"][0]
    assert "unreadable" in decisions[2]["reasons"][0] and "unknown" in warnings[0]
    # Every object of the set is asked about, the manifest first; kept sets are not.
    assert ("locked", ("manifest.json", "a.gpg")) in repo.asked
    assert all(set_id != "new" for set_id, _files in repo.asked)
