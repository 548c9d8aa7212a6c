"""Shared pytest fixtures: a real PostgreSQL cluster, a moto S3 server, Ansible wiring.

Session fixtures start each server once per run; every one of them is stopped in a
``finally`` so a failing test or a failing setup leaves no process behind.
Tests must treat ``clinic_db`` as read-only (restore into ``scratch_db`` instead).
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Make ``import testbed`` work whatever --import-mode or rootdir pytest runs with.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from testbed.ansible import ansible_env, make_collection_path
from testbed.dataset import load_clinic_dataset, table_fingerprints
from testbed.files import write_passphrase_file
from testbed.pg import PostgresCluster
from testbed.radosgw import PACKAGES as RADOSGW_PACKAGES
from testbed.radosgw import RadosGateway, RadosGatewayError, missing_binaries
from testbed.s3 import MotoS3Server

# The engine is imported as ansible_collections.clinic.backup.plugins.module_utils,
# exactly as modules and the host agent import it: link this checkout there once.
_IMPORT_ROOT = make_collection_path(Path(__file__).resolve().parent / "output" / "import")
sys.path.insert(0, _IMPORT_ROOT)

# ansible-test and galaxy-importer leave copies of the collection (with this very
# conftest.py) under tests/output/; collecting them would register it twice.
collect_ignore = ["output"]

CLINIC_USER = "clinic_user"
CLINIC_DB = "clinic_db"
CLINIC_SCALE = 0.2


def pytest_configure(config: pytest.Config) -> None:
    """Register the project's markers (there is no pytest.ini)."""
    for line in (
        "integration: runs real PostgreSQL / moto / ansible-playbook processes",
        "slow: takes more than a few seconds",
        "faults: injects failures (killed servers, full disks, bad credentials)",
    ):
        config.addinivalue_line("markers", line)


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    """A running cluster with role clinic_user (pg.clinic_password) owning clinic_db.

    clinic_db holds the synthetic clinic dataset at scale 0.2; treat it as read-only.
    """
    cluster = PostgresCluster()
    try:
        cluster.start()
        password = secrets.token_urlsafe(24)
        cluster.create_role(CLINIC_USER, password)
        cluster.create_database(CLINIC_DB, owner=CLINIC_USER)
        load_clinic_dataset(cluster, CLINIC_DB, CLINIC_USER, scale=CLINIC_SCALE)
        cluster.clinic_user = CLINIC_USER
        cluster.clinic_password = password
        cluster.clinic_db = CLINIC_DB
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg_fingerprints(pg: PostgresCluster) -> dict[str, dict[str, object]]:
    """table_fingerprints() of clinic_db, computed once: compare restores against it."""
    return table_fingerprints(pg, CLINIC_DB)


@pytest.fixture
def scratch_db(pg: PostgresCluster) -> Iterator[str]:
    """Name of an empty database owned by clinic_user, dropped after the test."""
    name = f"scratch_{secrets.token_hex(4)}"
    pg.create_database(name, owner=CLINIC_USER)
    try:
        yield name
    finally:
        pg.drop_database(name)


@pytest.fixture(scope="session")
def s3() -> Iterator[MotoS3Server]:
    """A running moto S3 server on 127.0.0.1 (shared; see ``s3_bucket`` for a clean one)."""
    server = MotoS3Server()
    try:
        server.start()
        yield server
    finally:
        server.stop()
        server.cleanup()


@pytest.fixture(scope="session")
def radosgw() -> Iterator[RadosGateway]:
    """Ceph's radosgw on 127.0.0.1 (one per session; ~3 s to start), an S3
    endpoint that enforces Object Lock; skips when the Ceph packages are missing."""
    missing = missing_binaries()
    if missing:
        pytest.skip(
            "radosgw test bed unavailable: %s not installed (apt-get install %s; "
            "scripts/bootstrap.sh tries it)" % (", ".join(missing), RADOSGW_PACKAGES)
        )
    gateway = RadosGateway()
    try:
        try:
            gateway.start()
        except RadosGatewayError:
            # A Ceph daemon that lost a start-up race: once more, from scratch.
            gateway = RadosGateway()
            gateway.start()
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture
def s3_bucket(s3: MotoS3Server) -> str:
    """An empty bucket in a freshly reset moto (all other buckets are gone)."""
    s3.reset()
    name = "clinic-backups-test"
    s3.create_bucket(name)
    return name


@pytest.fixture(scope="session")
def collections_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """ANSIBLE_COLLECTIONS_PATH in which clinic.backup is this checkout (a symlink)."""
    return make_collection_path(tmp_path_factory.mktemp("collections"))


@pytest.fixture(scope="session")
def ansible_environ(collections_path: str) -> dict[str, str]:
    """ansible_env(collections_path): pass to run_playbook / run_module (copy to modify)."""
    return ansible_env(collections_path)


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    """A 0600 file holding a random passphrase followed by a newline."""
    return write_passphrase_file(tmp_path / "passphrase")


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    """An empty 0700 directory to hold a backup repository."""
    path = tmp_path / "repo"
    path.mkdir()
    path.chmod(0o700)  # mkdir's mode is subject to the umask
    return path
