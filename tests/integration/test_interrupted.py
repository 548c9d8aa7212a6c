"""A backup killed mid-stream leaves no set; the next run cleans up and succeeds.
Overlapping runs: the second exits "already running"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from testbed.files import write_private

from tests.integration import helpers

pytestmark = pytest.mark.integration

AGENT = "ansible_collections.clinic.backup.plugins.module_utils.agent"


@pytest.fixture(scope="module")
def big_db(pg):
    """A database large enough that a backup takes a few seconds (to be killed mid-stream)."""
    from testbed.dataset import load_clinic_dataset

    pg.create_database("kill_db", owner=pg.clinic_user)
    load_clinic_dataset(pg, "kill_db", owner=pg.clinic_user, scale=3.0)
    yield "kill_db"
    pg.drop_database("kill_db")


def agent_config(tmp_path, pg, database, passphrase_file, **extra):
    config = {
        "database": database,
        "login_host": pg.host,
        "login_port": pg.port,
        "login_user": pg.clinic_user,
        "login_password": pg.clinic_password,
        "passphrase_file": passphrase_file,
        "stale_seconds": 0,
    }
    config.update(extra)
    path = tmp_path / ("agent-%d.json" % len(list(tmp_path.glob("agent-*.json"))))
    write_private(path, json.dumps(config, default=str))
    return str(path)


def agent(collections_path, config, env=None, command="backup"):
    argv = [sys.executable, "-m", AGENT, command, "--config", config]
    full_env = dict(os.environ, PYTHONPATH=collections_path, **(env or {}))
    return subprocess.Popen(
        argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )


def staged_bytes(repository) -> int:
    staging = Path(repository) / ".staging"
    return (
        sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) if staging.exists() else 0
    )


def test_sigkill_mid_stream_leaves_no_set_and_next_run_cleans_up(
    pg, big_db, s3, bucket, collections_path, passphrase_file, repo_dir, tmp_path
):
    target = {"bucket": bucket, "prefix": "k", "endpoint_url": s3.endpoint_url}
    config = agent_config(
        tmp_path,
        pg,
        big_db,
        passphrase_file,
        repository=repo_dir,
        s3_targets=[target],
        s3_part_size_mb=5,
        compression_level=9,
    )
    proc = agent(collections_path, config, s3.env())
    deadline = time.time() + 60
    while (
        staged_bytes(repo_dir) < 6 * 1024 * 1024 and proc.poll() is None and time.time() < deadline
    ):
        time.sleep(0.01)
    assert proc.poll() is None, "backup finished before it could be killed: raise the dataset scale"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert staged_bytes(repo_dir) > 0  # really mid-stream
    # The killed run's private gpg home is left behind (nothing ran its cleanup).
    gpg_homes = set(Path(tempfile.gettempdir()).glob("clinic-backup-gnupg-*"))
    assert gpg_homes
    client = s3.client()
    assert helpers.local_sets(repo_dir) == []
    assert not any(k.endswith("manifest.json") for k in helpers.s3_keys(client, bucket))
    listing = agent(collections_path, config, s3.env(), command="list")
    out, _err = listing.communicate(timeout=60)
    assert json.loads(out)["sets"] == []
    # The next run removes the leftovers (staging dir, open multipart upload) and succeeds.
    rerun = agent(collections_path, config, s3.env())
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode() + out.decode()
    set_id = json.loads(out)["set_id"]
    assert helpers.local_sets(repo_dir) == [set_id] and helpers.staging_leftovers(repo_dir) == []
    assert helpers.open_multipart_uploads(client, bucket) == []
    assert {k.split("/")[2] for k in helpers.s3_keys(client, bucket, "k/sets/")} == {set_id}
    # ... and the next run removed it.
    assert [home for home in gpg_homes if home.exists()] == []


def test_overlapping_run_exits_already_running(
    pg, collections_path, passphrase_file, repo_dir, tmp_path
):
    from ansible_collections.clinic.backup.plugins.module_utils.locking import RunLock

    config = agent_config(tmp_path, pg, pg.clinic_db, passphrase_file, repository=repo_dir)
    with RunLock(os.path.join(repo_dir, ".lock")):
        proc = agent(collections_path, config)
        out, _err = proc.communicate(timeout=120)
    assert proc.returncode == 75
    assert "already running" in json.loads(out)["msg"]
    assert helpers.local_sets(repo_dir) == [] and helpers.staging_leftovers(repo_dir) == []
