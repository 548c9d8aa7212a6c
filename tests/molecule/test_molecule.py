"""molecule's scenarios (molecule/default, molecule/replacement) on the podman test hosts.

Each test runs ``molecule test -s <scenario>`` from the repository root: create,
prepare, converge, idempotence, verify, destroy (see molecule/*/molecule.yml). The
images and the local apt repository are built (or found in the cache) first, so a fresh
machine says what it is building. Where this machine cannot run the test hosts the
tests are skipped with the reason, never passed; CLINIC_TESTBED_REQUIRE=1 makes that a
failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest
from testbed.ansible import REPO_ROOT, ansible_env, make_collection_path
from testbed.hosts import HostsUnavailable, ensure_apt_repository, prepare_images

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCENARIO_TIMEOUT = 1500


@pytest.fixture(scope="module")
def molecule_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    try:
        prepare_images()
        ensure_apt_repository()
    except HostsUnavailable as exc:
        message = f"molecule scenarios need the test hosts: {exc}"
        if os.environ.get("CLINIC_TESTBED_REQUIRE") == "1":
            pytest.fail(f"{message} (CLINIC_TESTBED_REQUIRE=1)", pytrace=False)
        pytest.skip(message)
    collections = make_collection_path(tmp_path_factory.mktemp("molecule"))
    env = ansible_env(collections)
    # The hosts keep Ansible's remote temp in root's home, as on a real host.
    env.pop("ANSIBLE_REMOTE_TEMP", None)
    env.pop("ANSIBLE_PYTHON_INTERPRETER", None)
    env["CLINIC_MOLECULE_COLLECTIONS"] = collections
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["NO_COLOR"] = "1"
    return env


@pytest.mark.parametrize("scenario", ["default", "replacement"])
def test_molecule_scenario(scenario: str, molecule_env: dict[str, str]) -> None:
    # Kept after the run (pytest prunes its own temp dirs): tests/output is not collected.
    log = REPO_ROOT / "tests" / "output" / f"molecule-{scenario}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "wb") as out:
        try:
            proc = subprocess.run(
                ["molecule", "test", "--scenario-name", scenario],
                cwd=REPO_ROOT,
                env=molecule_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=SCENARIO_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            subprocess.run(
                ["molecule", "destroy", "--scenario-name", scenario],
                cwd=REPO_ROOT,
                env=molecule_env,
                capture_output=True,
                check=False,
                timeout=300,
            )
            pytest.fail(f"molecule test -s {scenario} ran over {SCENARIO_TIMEOUT}s (log {log})")
    output = log.read_text(errors="replace")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"molecule test -s {scenario} failed:\n{output[-12000:]}"
    # Every stage of the sequence ran and passed (none was skipped or missing).
    # ("[default > verify] Executed: Successful", or "default ➜ verify: ..." on a terminal)
    for stage in ("create", "prepare", "converge", "idempotence", "verify", "destroy"):
        done = re.search(rf"{scenario}\W+{stage}\]?:? Executed: Successful", output)
        assert done, (stage, output[-6000:])
    # What the scenarios say they could not check, or found missing (printed with -s/-rA).
    for line in output.splitlines():
        if "NOT CHECKED" in line or "KNOWN GAP" in line:
            print(f"molecule {scenario}: {line.strip()}")
    print(f"molecule test -s {scenario}: {elapsed:.0f}s")
