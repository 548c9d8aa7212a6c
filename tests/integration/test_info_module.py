"""clinic.backup.backup_info through real ansible-playbook runs: real sets made by pg_dump
in a local repository and an S3 prefix, a corrupt manifest in each, filters, and
newest_only + require_verified after a backup_verify run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CORRUPT_LOCAL = "20991231T000000Z-clinic_db-0000ff"  # newer than any real set
CORRUPT_S3 = "20200101T000000Z-clinic_db-0000ee"  # older than any real set


def tree_state(root):
    """Every path under root with its size and mtime: backup_info must change none."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            state[path] = (info.st_size, info.st_mtime_ns, info.st_mode)
    return state


def info_task(name, check_mode=False, **args):
    task = {"name": name, "clinic.backup.backup_info": args}
    if check_mode:
        task["check_mode"] = True
    return task


@pytest.fixture
def two_sets(ansible, s3, bucket, connection_args, passphrase_file, repo_dir):
    """Sets A (verified ok locally) and B (newer, unverified), in repo_dir and in S3."""
    target = {"bucket": bucket, "prefix": "db/main", "endpoint_url": s3.endpoint_url}
    backup = {
        "clinic.backup.pg_dump": dict(
            connection_args,
            passphrase_file=passphrase_file,
            repository=repo_dir,
            s3_targets=[target],
        )
    }
    run = ansible.play(
        [
            dict(backup, name="backup A"),
            {
                "name": "verify A",
                "clinic.backup.backup_verify": {
                    "repository": repo_dir,
                    "passphrase_file": passphrase_file,
                },
            },
            # Set ids have one-second resolution: B must start in a later second.
            {"name": "tick", "ansible.builtin.wait_for": {"timeout": 1}},
            dict(backup, name="backup B"),
        ]
    ).assert_ok()
    first, second = run.result("backup A")["set_id"], run.result("backup B")["set_id"]
    assert run.result("verify A")["set_id"] == first and first < second
    # A manifest that is not JSON in the local repository, one lacking fields in S3.
    corrupt = Path(repo_dir, "sets", CORRUPT_LOCAL)
    corrupt.mkdir(mode=0o700)
    (corrupt / "manifest.json").write_text("{not json")
    s3.client().put_object(
        Bucket=bucket, Key="db/main/sets/%s/manifest.json" % CORRUPT_S3, Body=b"{}"
    )
    location = {k: target[k] for k in ("bucket", "prefix", "endpoint_url")}
    return {"A": first, "B": second, "location": location, "s3_url": "s3://%s/db/main" % bucket}


def test_catalog_of_local_and_s3_with_filters(ansible, repo_dir, two_sets):
    location = two_sets["location"]
    a, b = two_sets["A"], two_sets["B"]
    both = dict(location, repository=repo_dir)
    before = tree_state(repo_dir)
    run = ansible.play(
        [
            info_task("all", max_age_hours=25, **both),
            info_task("local limit", repository=repo_dir, database="clinic_db", limit=2),
            info_task("newest verified", newest_only=True, require_verified=True, **both),
            info_task("s3 newest", newest_only=True, include_manifest=True, **location),
            info_task("other database", repository=repo_dir, database="billing"),
            info_task("check mode", check_mode=True, **both),
            info_task("audited", audit_log=str(repo_dir) + "-audit/audit.log", **both),
            info_task(
                "audited check",
                check_mode=True,
                audit_log=str(repo_dir) + "-audit/audit.log",
                **both,
            ),
        ]
    ).assert_ok()
    assert tree_state(repo_dir) == before
    # Who read the catalog is on record, in check mode too (the read happened).
    reads = [
        json.loads(line)
        for line in Path(str(repo_dir) + "-audit/audit.log").read_text().splitlines()
    ]
    assert [(r["action"], r["outcome"], r.get("database")) for r in reads] == [
        ("read", "ok", None)
    ] * 2
    assert reads[0]["repositories"] == [str(repo_dir), two_sets["s3_url"]]

    everything = run.result("all")
    assert everything["changed"] is False
    assert everything["repositories"] == [str(repo_dir), two_sets["s3_url"]]
    local, remote = str(repo_dir), two_sets["s3_url"]
    assert [(s["id"], s["repository"], s["state"]) for s in everything["sets"]] == [
        (CORRUPT_LOCAL, local, "corrupt"),
        (b, local, "complete"),
        (b, remote, "complete"),
        (a, local, "complete"),
        (a, remote, "complete"),
        (CORRUPT_S3, remote, "corrupt"),
    ]
    bad_local, b_local, b_remote, a_local, a_remote, bad_remote = everything["sets"]
    assert "not valid JSON" in bad_local["error"]
    assert "lacks" in bad_remote["error"]
    assert sorted(w for w in everything["warnings"] if "corrupt" in w) == sorted(
        [
            "backup set %s in %s is corrupt: %s" % (CORRUPT_LOCAL, local, bad_local["error"]),
            "backup set %s in %s is corrupt: %s" % (CORRUPT_S3, remote, bad_remote["error"]),
        ]
    )
    assert (a_local["verification"], a_remote["verification"]) == ("ok", "unverified")
    assert a_local["verified_at"] and b_local["verification"] == "unverified"
    for item in (b_local, a_local):
        assert "manifest" not in item
        assert item["database"] == "clinic_db" and item["format"] == "custom"
        assert item["encrypted"] is True and item["size"] > 0
        assert item["row_counts"]["tables"] > 0 and item["row_counts"]["rows"] > 0
        assert item["started_at"] <= item["finished_at"]
        assert 0 <= item["age_hours"] < 1
    # The same set reads the same from both places.
    assert {k: v for k, v in b_local.items() if k != "repository"} == {
        k: v for k, v in b_remote.items() if k != "repository"
    }
    assert (b_local["stale"], b_remote["stale"]) == (False, False)
    assert "stale" not in a_local
    assert everything["newest"]["id"] == b and everything["newest"]["repository"] == local
    assert everything["databases"] == {
        "clinic_db": {
            "count": 2,
            "newest": b,
            "newest_verified": a,
            "age_hours": b_local["age_hours"],
            "stale": False,
        }
    }

    limited = run.result("local limit")
    assert [s["id"] for s in limited["sets"]] == [CORRUPT_LOCAL, b]
    assert limited["databases"]["clinic_db"]["count"] == 2

    verified = run.result("newest verified")
    assert [(s["id"], s["repository"]) for s in verified["sets"]] == [(a, local)]
    assert verified["newest"] == verified["sets"][0]

    s3_newest = run.result("s3 newest")
    (only,) = s3_newest["sets"]
    assert only["id"] == b and only["manifest"]["id"] == b
    assert only["manifest"]["row_counts"]["public.patients"] > 0
    assert s3_newest["databases"]["clinic_db"]["newest_verified"] is None

    other = run.result("other database")
    assert other["sets"] == [] and other["newest"] is None and other["databases"] == {}

    checked = run.result("check mode")
    assert checked["changed"] is False
    assert [s["id"] for s in checked["sets"]] == [s["id"] for s in everything["sets"]]


def test_bad_input_gets_clear_errors(ansible, s3, tmp_path):
    cases = [
        ("missing repository", {"repository": str(tmp_path / "absent")}, ["does not exist"]),
        ("relative repository", {"repository": "backups"}, ["must be absolute"]),
        (
            "missing bucket",
            {"bucket": "no-such-bucket-info", "endpoint_url": s3.endpoint_url, "s3_retries": 1},
            ["NoSuchBucket", "create the bucket"],
        ),
        ("no location", {}, ["one of the following is required", "repository", "bucket"]),
        ("zero limit", {"repository": str(tmp_path), "limit": 0}, ["limit must be at least 1"]),
        (
            "negative age",
            {"repository": str(tmp_path), "max_age_hours": -1},
            ["must not be negative"],
        ),
    ]
    run = ansible.play(
        [dict(info_task(name, **args), ignore_errors=True) for name, args, _words in cases]
    )
    for name, _args, words in cases:
        result = run.result(name)
        assert result["_status"] in ("failed", "ignored"), (name, result)
        for word in words:
            assert word in result["msg"], (name, word, result["msg"])
