"""Faults of base backup sets (issue #7 step 3): a base backup set missing its manifest.

Two real base backups of a cluster with archiving on (archive_command ``true``: the
WAL is not what this fault is about), then the newest set's manifest is deleted (a lost
file, or someone who can write to the repository). A set exists only through its manifest:
the catalog must not list it, restore_base_backup must restore the older one
(pg_verifybackup accepts it), verify asked for it by id must fail naming the missing
manifest, and retention must leave its directory alone for a human to look at.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from testbed.files import write_passphrase_file
from testbed.pg import PostgresCluster

from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.basebackup import (
    BaseBackupOptions,
    BaseRestoreOptions,
    restore_base_backup,
    run_base_backup,
)
from ansible_collections.clinic.backup.plugins.module_utils.catalog import list_catalog
from ansible_collections.clinic.backup.plugins.module_utils.pgsource import PgConnection
from ansible_collections.clinic.backup.plugins.module_utils.repository import LocalRepository
from ansible_collections.clinic.backup.plugins.module_utils.retention import (
    RetentionPolicy,
    apply_retention,
)
from ansible_collections.clinic.backup.plugins.module_utils.verify import verify_set

pytestmark = [pytest.mark.faults]


@pytest.fixture(scope="module")
def archiving_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    cluster.settings.update({"archive_mode": True, "archive_command": "true"})
    try:
        cluster.start()
        with open(os.path.join(cluster.data_dir, "pg_hba.conf"), "a") as handle:
            handle.write("local replication all trust\n")
        cluster.psql("SELECT pg_reload_conf();")
        yield cluster
    finally:
        cluster.destroy()


def test_base_backup_set_missing_its_manifest_is_ignored(archiving_cluster, tmp_path, summary_row):
    row = summary_row("base backup set missing its manifest (deleted after the set was stored)")
    passphrase = str(write_passphrase_file(tmp_path / "passphrase"))
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir(mode=0o700)
    repo = LocalRepository(str(repo_dir))
    key = RecordKey.from_file(passphrase)
    connection = PgConnection(
        host=archiving_cluster.socket_dir,
        port=archiving_cluster.port,
        user="postgres",
        dbname="postgres",
    )
    options = BaseBackupOptions("main", passphrase_file=passphrase)
    older = run_base_backup(connection, [repo], options)["set_id"]
    newest = run_base_backup(connection, [repo], options)["set_id"]
    (repo_dir / "sets" / newest / "manifest.json").unlink()
    row.run()

    # A set exists only through its manifest: not listed at all, never as complete.
    states = {e["id"]: e["state"] for e in list_catalog(repo, key=key)}
    row.add("incomplete_listed", newest in states)
    assert states == {older: "complete"}

    target = tmp_path / "restored"
    result = restore_base_backup(
        [repo], BaseRestoreOptions(str(target), cluster="main", passphrase_file=passphrase)
    )
    restored_ok = result.set_id == older and result.verified is True
    row.add("sets_lost", not restored_ok)
    assert restored_ok, result.as_dict()

    # Asked for by id, it is refused naming what is missing.
    outcome = verify_set(repo, newest, passphrase_file=passphrase, record=False)
    row.reported(outcome["ok"], False)
    clear = not outcome["ok"] and "has no manifest" in " ".join(outcome["failures"])
    row.bad_input(clear=clear)
    assert clear, outcome["failures"]

    policy = RetentionPolicy(daily=1, weekly=0, monthly=0, yearly=0, min_keep=1)
    pruned = apply_retention(repo, policy, key=key)
    assert pruned["kept"] == [older] and newest not in pruned["deleted"]
    assert (repo_dir / "sets" / newest).is_dir()  # left alone, for a human to look at
    row.add("recovered", restored_ok)
