"""The documented entry points work: make demo's script and ansible-doc for every module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from testbed.ansible import ansible_env

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


def test_demo_backs_up_and_verifies_a_throwaway_cluster(tmp_path):
    env = dict(os.environ, CLINIC_DEMO_DIR=str(tmp_path / "demo"))
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
    assert "verification: ok" in run.stdout and ": ok" in run.stdout
    sets = list((tmp_path / "demo" / "repository" / "sets").glob("*/manifest.json"))
    assert len(sets) == 1
    assert (tmp_path / "demo" / "backup-passphrase").stat().st_mode & 0o077 == 0
