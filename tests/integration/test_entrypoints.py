"""The documented entry points work: make demo's script and ansible-doc for every module."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from testbed.ansible import ansible_env
from testbed.pg import PostgresCluster

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


MODULES = sorted(p.stem for p in (REPO_ROOT / "plugins" / "modules").glob("*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_ansible_doc_prints_full_docs(collections_path, module):
    env = ansible_env(collections_path)
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-doc"), "clinic.backup." + module],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for section in ("OPTIONS", "EXAMPLES", "RETURN VALUES", "clinic.backup." + module):
        assert section in out, (module, section)


def _demo(demo_dir):
    env = dict(os.environ, CLINIC_DEMO_DIR=str(demo_dir))
    env.pop("DATABASE_URL", None)
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_demo_teaches_backup_verify_rehearsal_status_and_leaves_its_cluster_up(tmp_path):
    demo = tmp_path / "demo"
    cluster = PostgresCluster(home=demo / "cluster")
    try:
        out = _demo(demo)
        assert "verification: ok" in out
        # The status table shows the set verified and restore-tested.
        assert "last restore test: ok" in out and "RTO " in out
        set_row = re.compile(r"\d{8}T\d{6}Z-clinic_db-\w+ ")
        rows = [line for line in out.splitlines() if set_row.search(line)]
        assert any("verified" in row for row in rows), out[-3000:]
        assert (demo / "compliance-report.html").exists()
        assert (demo / "backup-passphrase").stat().st_mode & 0o077 == 0
        # The cluster is left running, with the command to stop it, and vars.json still
        # points at it: a second run starts from the same data (a second set).
        assert cluster.is_running()
        assert "stop it with:" in out and "pg_ctl -D %s" % cluster.data_dir in out
        port = json.loads((demo / "vars.json").read_text())["clinic_backup_login_port"]
        assert "127.0.0.1:%d" % port in out
        cluster.stop()
        again = _demo(demo)
        assert "Starting the sample PostgreSQL again" in again
        assert len(list((demo / "repository" / "sets").glob("*/manifest.json"))) == 2
    finally:
        cluster.destroy()
