"""Fixtures of the integration tests: an ansible environment that sees this
checkout as clinic.backup and talks to the test S3 endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from testbed.ansible import ansible_env, run_playbook


class Ansible:
    """Runs generated playbooks (JSON is YAML) against localhost."""

    def __init__(self, env, work: Path):
        self.env = env
        self.work = work
        self.count = 0

    def play(self, tasks, check=False, verbosity=0, extra_env=None):
        self.count += 1
        path = self.work / ("play-%d.yml" % self.count)
        path.write_text(
            json.dumps(
                [{"name": "test", "hosts": "all", "gather_facts": False, "tasks": tasks}],
                default=str,
            )
        )
        env = dict(self.env, **(extra_env or {}))
        return run_playbook(path, env, check=check, verbosity=verbosity)


@pytest.fixture(scope="session")
def ansible(collections_path, s3, tmp_path_factory):
    return Ansible(ansible_env(collections_path, s3.env()), tmp_path_factory.mktemp("plays"))


@pytest.fixture
def bucket(s3, request):
    """A fresh bucket per test."""
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + "-b"
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-")
    s3.create_bucket(name)
    return name


@pytest.fixture
def connection_args(pg):
    """Module arguments for the test cluster as clinic_user (password only via the environment)."""
    return {
        "database": pg.clinic_db,
        "login_host": pg.host,
        "login_port": pg.port,
        "login_user": pg.clinic_user,
        "login_password": pg.clinic_password,
    }
