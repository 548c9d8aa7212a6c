"""clinic.backup.backup_retention through real ansible-playbook runs.

One real set is taken with the pg_dump module; older sets are copies of it under
older set ids (manifest id / started_at / finished_at rewritten), which is all the
planner looks at. Each case runs four times, check, run, check, run (the
ansible.posix filesize pattern): changed, changed, unchanged, unchanged, and only
the real run may change the repository.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from testbed.files import write_passphrase_file

from ansible_collections.clinic.backup.plugins.module_utils.locking import RunLock, lock_path_for
from ansible_collections.clinic.backup.plugins.module_utils.repository import (
    LocalRepository,
    latest_file,
)
from tests.integration import helpers

pytestmark = pytest.mark.integration

POLICY = {"keep_daily": 2, "keep_weekly": 1, "keep_monthly": 2, "keep_yearly": 0, "min_keep": 1}
# name -> (start time, verification): with POLICY the plan is
#   g: daily 2026-01-07, weekly 2026-W02, monthly 2026-01, min_keep, newest, latest pointer
#   f: daily 2026-01-06 (the newer of the two sets that day), newer than the newest verified
#   e: newest verified (ok)        c: monthly 2025-12 (newest of December)
#   d, b, a: deleted               h: corrupt manifest, left alone
SCENARIO = {
    "a": ("2025-11-15T01:00:00", None),
    "b": ("2025-12-20T01:00:00", None),
    "c": ("2025-12-29T01:00:00", None),
    "d": ("2026-01-05T01:00:00", None),
    "e": ("2026-01-06T01:00:00", "ok"),
    "f": ("2026-01-06T13:00:00", "failed"),
    "g": ("2026-01-07T01:00:00", None),
    "h": ("2025-10-01T01:00:00", "corrupt"),
}
KEPT, DELETED, CORRUPT = "gfec", "dba", "h"


# ------------------------------------------------------------------------- helpers


def craft_set(template_repo, template_id, repo, when, suffix, database="clinic_db", state=None):
    """Copy a real set under an older id; rewrite id, times (and database) in its manifest."""
    moment = datetime.datetime.fromisoformat(when)
    set_id = "%s-%s-%s" % (moment.strftime("%Y%m%dT%H%M%SZ"), database, suffix)
    target = Path(repo) / "sets" / set_id
    shutil.copytree(Path(template_repo) / "sets" / template_id, target)
    manifest_path = target / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(
        id=set_id,
        database=database,
        started_at=moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        finished_at=(moment + datetime.timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    )
    manifest_path.write_text(json.dumps(manifest, indent=2))
    if state == "corrupt":
        manifest_path.write_text('{"format_version": 1, "id": "%s", truncated' % set_id)
    elif state:
        (target / "verification.json").write_text(
            json.dumps({"state": state, "verified_at": manifest["finished_at"], "checks": []})
        )
    return set_id


def build_scenario(template, repo):
    """The SCENARIO sets in ``repo`` (a directory); returns {name: set_id}."""
    template_repo, template_id = template
    for sub in ("sets", "latest", ".staging"):
        (Path(repo) / sub).mkdir(parents=True, exist_ok=True)
    ids = {}
    for number, (name, (when, state)) in enumerate(sorted(SCENARIO.items())):
        ids[name] = craft_set(
            template_repo, template_id, repo, when, "%06x" % (0xA0 + number), state=state
        )
    (Path(repo) / "latest" / latest_file("clinic_db")).write_text(
        json.dumps({"database": "clinic_db", "set_id": ids["g"]})
    )
    return ids


def tree_digest(root, exclude=()):
    """sha256 over every path, file content and symlink target under ``root``."""
    digest = hashlib.sha256()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(dirnames + filenames):
            rel = rel_dir / name
            if str(rel) in exclude:
                continue
            path = Path(dirpath) / name
            digest.update(str(rel).encode() + b"\0")
            if path.is_symlink():
                digest.update(b"L" + os.readlink(path).encode())
            elif path.is_file():
                digest.update(b"F" + path.read_bytes())
    return digest.hexdigest()


def s3_state(client, bucket, prefix=""):
    """Every key under the prefix with its ETag."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted((o["Key"], o["ETag"]) for page in pages for o in page.get("Contents", []))


def upload_tree(client, bucket, prefix, local_root):
    for path in sorted(Path(local_root).rglob("*")):
        if path.is_file():
            key = "%s/%s" % (prefix, path.relative_to(local_root).as_posix())
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def retention_task(args, name="retention"):
    return {"name": name, "clinic.backup.backup_retention": args, "diff": True}


def four_runs(ansible, args, snapshot):
    """check, run, check, run: the four results and ``snapshot()`` after each of them."""
    results, states = [], []
    for check in (True, False, True, False):
        run = ansible.play([retention_task(args)], check=check).assert_ok()
        results.append(run.result("retention"))
        states.append(snapshot())
    return results, states


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def template(ansible, pg, tmp_path_factory):
    """(repository, set_id) of one real backup set taken by the pg_dump module."""
    work = tmp_path_factory.mktemp("retention-template")
    passphrase = write_passphrase_file(work / "passphrase")
    repo = work / "repo"
    run = ansible.play(
        [
            {
                "name": "backup",
                "clinic.backup.pg_dump": {
                    "database": pg.clinic_db,
                    "login_host": pg.host,
                    "login_port": pg.port,
                    "login_user": pg.clinic_user,
                    "login_password": pg.clinic_password,
                    "passphrase_file": str(passphrase),
                    "repository": str(repo),
                    "include_globals": False,
                    "row_counts": False,
                },
            }
        ]
    ).assert_ok()
    return str(repo), run.result("backup")["set_id"]


# ------------------------------------------------------------------------- cases


def test_local_repository_check_run_check_run(ansible, template, repo_dir):
    ids = build_scenario(template, repo_dir)
    stale = repo_dir / ".staging" / "20260101T010000Z-clinic_db-0dead0"
    stale.mkdir()
    (stale / "half.dump").write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    kept_digests = {n: tree_digest(repo_dir / "sets" / ids[n]) for n in KEPT + CORRUPT}

    def snapshot():
        # The lock file holds the pid of its last holder: each real run rewrites it.
        return tree_digest(repo_dir, exclude={".lock"}), (repo_dir / ".lock").exists()

    before = snapshot()
    results, states = four_runs(ansible, dict(POLICY, repository=str(repo_dir)), snapshot)
    first, second, third, fourth = results

    assert [r["changed"] for r in results] == [True, True, False, False]
    # Check mode changed nothing at all, not even a lock file; only the first real run
    # changed the tree.
    assert states[0] == before and states[1] != before and states[3] == states[2] == states[1]
    expected_deleted = [ids[n] for n in DELETED]
    expected_kept = [ids[n] for n in KEPT]
    assert first["deleted"] == second["deleted"] == expected_deleted
    assert third["deleted"] == fourth["deleted"] == []
    assert all(r["kept"] == expected_kept for r in results)
    assert all(r["corrupt"] == [ids["h"]] and r["policy"] == POLICY for r in results)
    reasons = {d["id"]: d["reasons"] for d in first["decisions"]}
    assert reasons[ids["g"]] == [
        "daily 2026-01-07",
        "weekly 2026-W02",
        "monthly 2026-01",
        "min_keep",
        "newest",
        "newer than the newest verified",
        "latest pointer",
    ]
    assert reasons[ids["f"]] == ["daily 2026-01-06", "newer than the newest verified"]
    assert reasons[ids["e"]] == ["newest verified"]
    assert reasons[ids["c"]] == ["monthly 2025-12"]
    assert reasons[ids["h"]] == ["corrupt: left alone"]
    assert reasons[ids["d"]] == ["not kept by the policy"]
    assert first["decisions"][0]["repository"] == str(repo_dir)
    # --diff: the set list before and after.
    assert first["diff"][0]["before"].split() == sorted(ids.values(), reverse=True)
    assert first["diff"][0]["after"].split() == sorted(
        (ids[n] for n in KEPT + CORRUPT), reverse=True
    )
    assert third["diff"][0]["before"] == third["diff"][0]["after"]
    # The real run removed exactly the three sets and the stale leftover.
    assert second["incomplete_removed"] == [stale.name]
    assert first["incomplete_removed"] == [] and third["incomplete_removed"] == []
    assert sorted(os.listdir(repo_dir / "sets")) == sorted(ids[n] for n in KEPT + CORRUPT)
    assert helpers.staging_leftovers(repo_dir) == []
    assert {n: tree_digest(repo_dir / "sets" / ids[n]) for n in KEPT + CORRUPT} == kept_digests
    assert json.loads((repo_dir / "latest" / "clinic_db.json").read_text())["set_id"] == ids["g"]


def test_s3_prefix_check_run_check_run(ansible, s3, bucket, template, tmp_path):
    local = tmp_path / "crafted"
    ids = build_scenario(template, local)
    client = s3.client()
    prefix = "db/clinic-main"
    upload_tree(client, bucket, prefix, local)
    orphan = "%s/sets/20260101T010000Z-clinic_db-0dead0/half.dump" % prefix
    client.put_object(Bucket=bucket, Key=orphan, Body=b"partial upload of a killed run")
    elsewhere = "other/sets/%s/manifest.json" % ids["a"]  # another repository: untouchable
    client.put_object(Bucket=bucket, Key=elsewhere, Body=b"{}")
    before = s3_state(client, bucket)
    args = dict(POLICY, bucket=bucket, prefix=prefix, endpoint_url=s3.endpoint_url, stale_seconds=0)
    time.sleep(1.1)  # the orphan must be older than "now - stale_seconds"

    results, states = four_runs(ansible, args, lambda: s3_state(client, bucket))
    first, second, third, fourth = results

    assert [r["changed"] for r in results] == [True, True, False, False]
    assert first["deleted"] == second["deleted"] == [ids[n] for n in DELETED]
    assert third["deleted"] == fourth["deleted"] == []
    assert all(r["kept"] == [ids[n] for n in KEPT] for r in results)
    assert all(r["corrupt"] == [ids["h"]] for r in results)
    assert second["incomplete_removed"] == [orphan]
    # S3 changed only on the first real run, and exactly by the deleted sets and the orphan.
    assert states[0] == before and states[2] == states[1] == states[3]
    gone = {k for k, _etag in before} - {k for k, _etag in states[1]}
    assert gone == {
        k for k, _etag in before if any(ids[n] in k for n in DELETED) and k.startswith(prefix)
    } | {orphan}
    assert elsewhere in {k for k, _etag in states[3]}
    assert second["repositories"][0]["repository"] == "s3://%s/%s" % (bucket, prefix)


def test_local_and_s3_together_and_one_database_only(ansible, s3, bucket, template, repo_dir):
    template_repo, template_id = template
    ids = build_scenario(template, repo_dir)
    billing = [
        craft_set(template_repo, template_id, repo_dir, when, suffix, database="billing")
        for when, suffix in (
            ("2025-03-01T01:00:00", "b00003"),
            ("2025-04-01T01:00:00", "b00004"),
            ("2025-05-01T01:00:00", "b00005"),
        )
    ]
    prefix = "mirror"
    upload_tree(s3.client(), bucket, prefix, repo_dir)
    args = dict(POLICY, repository=str(repo_dir), bucket=bucket, prefix=prefix)
    args.update(endpoint_url=s3.endpoint_url, database="billing", keep_daily=1, keep_monthly=0)
    result = ansible.play([retention_task(args)]).assert_ok().result("retention")
    assert result["changed"] is True
    assert result["deleted"] == [billing[1], billing[0]]
    assert [r["deleted"] for r in result["repositories"]] == [[billing[1], billing[0]]] * 2
    assert [len(d) for d in result["diff"]] == [4, 4]
    remaining = helpers.local_sets(repo_dir)
    assert remaining == sorted(list(ids.values()) + [billing[2]])
    s3_sets = {k.split("/")[2] for k in helpers.s3_keys(s3.client(), bucket, prefix + "/sets/")}
    assert s3_sets == set(remaining)


# ------------------------------------------------------------------------- bad input


def test_bad_input_fails_clearly_and_changes_nothing(ansible, s3, template, repo_dir, tmp_path):
    build_scenario(template, repo_dir)
    base = dict(POLICY, repository=str(repo_dir))
    cases = [
        ("negative keep value", dict(base, keep_daily=-1), ["keep_daily", "negative"]),
        ("negative min_keep", dict(base, min_keep=-3), ["min_keep", "negative"]),
        (
            "all-zero policy",
            dict(base, keep_daily=0, keep_weekly=0, keep_monthly=0, keep_yearly=0),
            ["would delete every backup"],
        ),
        ("keep value not a number", dict(base, keep_weekly="four"), ["keep_weekly", "int"]),
        (
            "non-existent repository",
            dict(POLICY, repository=str(tmp_path / "no" / "such" / "repo")),
            ["does not exist", str(tmp_path / "no" / "such" / "repo")],
        ),
        (
            "non-existent bucket",
            dict(POLICY, bucket="no-such-bucket-r", endpoint_url=s3.endpoint_url),
            ["NoSuchBucket"],
        ),
        ("locked by a running backup", base, ["already running", str(repo_dir / ".lock")]),
        ("neither repository nor bucket", dict(POLICY), ["repository", "bucket"]),
    ]
    with RunLock(lock_path_for([LocalRepository(str(repo_dir))])):
        before = tree_digest(repo_dir)
        run = ansible.play(
            [dict(retention_task(args, name), ignore_errors=True) for name, args, _w in cases]
        )
        after = tree_digest(repo_dir)
    for name, _args, words in cases:
        result = run.result(name)
        assert result["_status"] in ("failed", "ignored"), (name, result)
        assert result.get("changed") is False, (name, result)
        for word in words:
            assert word in result["msg"], (name, word, result["msg"])
        assert "Traceback" not in result.get("module_stderr", ""), name
    assert run.result("locked by a running backup")["error_type"] == "LockedError"
    assert run.result("all-zero policy")["hint"]
    assert after == before
    assert not (tmp_path / "no").exists()
