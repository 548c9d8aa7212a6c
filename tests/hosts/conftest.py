"""Fixtures of the test host suite: Debian 12 containers on an internal podman network.

``host_images`` builds (or finds cached) the images and skips the suite, with the
exact reason, on a machine that cannot run containers. ``host_network`` is one
internal network for the session; ``clinic_hosts`` is a database host and a bare host
started on it. Everything is removed in a ``finally``. See tests/testbed/hosts.py.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from testbed.hosts import (
    BARE_IMAGE,
    DATABASE_IMAGE,
    Host,
    HostNetwork,
    HostsUnavailable,
    Progress,
    prepare_images,
)


def _progress(config: pytest.Config) -> Progress:
    """Print through pytest's capture: image builds take minutes and say how far they are."""
    capman = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")

    def emit(message: str) -> None:
        line = f"testbed: {message}"
        if capman is None or reporter is None:
            print(line, file=sys.stderr, flush=True)
            return
        with capman.global_and_fixture_disabled():
            reporter.write_line(line)
            reporter.flush()

    return emit


@pytest.fixture(scope="session")
def host_progress(request: pytest.FixtureRequest) -> Progress:
    return _progress(request.config)


@pytest.fixture(scope="session")
def host_images(host_progress: Progress) -> dict[str, str]:
    """Image tags by name (``database``, ``bare``), built once and cached.

    Skips (never passes) where podman cannot run containers; CLINIC_TESTBED_REQUIRE=1
    turns that skip into a failure, for machines that must run the suite.
    """
    try:
        return prepare_images(progress=host_progress)
    except HostsUnavailable as exc:
        message = f"test hosts unavailable: {exc}"
        if os.environ.get("CLINIC_TESTBED_REQUIRE") == "1":
            pytest.fail(f"{message} (CLINIC_TESTBED_REQUIRE=1)", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def host_network(
    host_images: dict[str, str],
    host_progress: Progress,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HostNetwork]:
    """One internal podman network for the session; start hosts with ``.start()``."""
    network = HostNetwork(tmp_path_factory.mktemp("hosts"), progress=host_progress)
    try:
        network.create()
        yield network
    finally:
        network.close()


@dataclass
class ClinicHosts:
    """A database host and a bare host on one internal network, with an inventory."""

    database: Host
    bare: Host
    network: HostNetwork
    inventory: Path


@pytest.fixture(scope="session")
def clinic_hosts(host_network: HostNetwork) -> ClinicHosts:
    """``db1`` (database image) and ``app1`` (bare image), reachable by Ansible over ssh."""
    database = host_network.start("db1", DATABASE_IMAGE)
    bare = host_network.start("app1", BARE_IMAGE)
    return ClinicHosts(
        database=database,
        bare=bare,
        network=host_network,
        inventory=host_network.write_inventory(),
    )
