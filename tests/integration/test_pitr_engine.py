"""pitr.recover() against a real cluster: recovery config, start, promotion, the point
reached, the checks, and the refusals that change nothing.

The base backup here is plain ``pg_basebackup -Fp`` and the WAL source a two-line
stand-in for ``wal-fetch`` (``cp`` from a directory): this file proves the recovery
half alone. The whole chain through the agent, S3 and ansible-playbook is
test_pitr_e2e.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from testbed.dataset import table_fingerprints
from testbed.netutil import free_port, wait_until
from testbed.pg import PostgresCluster

from ansible_collections.clinic.backup.plugins.module_utils import archiving, pitr
from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError
from ansible_collections.clinic.backup.plugins.module_utils.pgsource import PgConnection

pytestmark = pytest.mark.integration

FETCH_SCRIPT = """#!/bin/sh
# Stand-in for: clinic-backup wal-fetch --config CONFIG NAME DEST (CONFIG names the dir).
[ -f "$(cat "$3")/$4" ] || exit 1
exec cp "$(cat "$3")/$4" "$5"
"""


def _server_owned(path: Path, source: PostgresCluster) -> None:
    account = source._account  # the test bed's own server account (None: ourselves)
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)


class Archive:
    """A source cluster archiving with cp, one plain base backup, and what was committed."""

    def __init__(self, root: Path):
        self.source = PostgresCluster(base_dir=root)
        self.wal_dir = Path(self.source.base) / "archive"
        self.agent = Path(self.source.base) / "fake-agent"
        self.config = Path(self.source.base) / "fake-agent.json"
        self.base = root / "base"

    def start(self) -> None:
        src = self.source
        self.wal_dir.mkdir()
        _server_owned(self.wal_dir, src)
        self.agent.write_text(FETCH_SCRIPT)
        self.agent.chmod(0o755)
        self.config.write_text(str(self.wal_dir))
        self.config.chmod(0o644)
        src.settings.update(
            {
                "archive_mode": True,
                "archive_command": f"cp %p {self.wal_dir}/%f",
                "wal_level": "replica",
            }
        )
        src.start()
        with open(Path(src.data_dir, "pg_hba.conf"), "a") as hba:
            hba.write("local replication all trust\n")
        src.psql("SELECT pg_reload_conf();")
        src.psql(
            "CREATE TABLE visits (id serial PRIMARY KEY, note text);"
            "INSERT INTO visits (note) VALUES ('before the base backup');"
        )
        proc = subprocess.run(
            [
                str(src.bin_dir / "pg_basebackup"),
                "-h", src.socket_dir, "-p", str(src.port), "-U", "postgres",
                "-D", str(self.base), "-Fp", "-X", "none", "--checkpoint=fast",
            ],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr

    def commit(self, note: str) -> None:
        self.source.psql(f"INSERT INTO visits (note) VALUES ('{note}');")

    def switch_and_wait(self) -> None:
        name = self.source.psql("SELECT pg_walfile_name(pg_switch_wal());")
        wait_until((self.wal_dir / name).exists, timeout=60, what=f"{name} archived")

    def restore_base(self, data_dir: str):
        shutil.copytree(self.base, data_dir, dirs_exist_ok=True)

        class Base:
            set_id = "plain-basebackup"
            manifest = {}

        return Base()


@pytest.fixture(scope="module")
def archive():
    # Not below pytest's basetemp: any pytest run that starts meanwhile resets
    # /tmp/pytest-of-<user> to 0700, closing it to the server's user.
    root = Path(tempfile.mkdtemp(prefix="clinic-pitr-engine-"))
    root.chmod(0o711)
    arc = Archive(root)
    try:
        arc.start()
        arc.commit("A")
        time.sleep(1.1)  # commit timestamps a clear second apart from the target
        arc.target_time = arc.source.psql(
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"');"
        )
        arc.at_target = table_fingerprints(arc.source, "postgres")
        time.sleep(1.1)
        arc.commit("B")
        arc.switch_and_wait()
        yield arc
    finally:
        arc.source.destroy()
        shutil.rmtree(root, ignore_errors=True)


def recovery_options(arc: Archive, new: PostgresCluster, target, **extra):
    account = arc.source._account
    return pitr.PitrOptions(
        pitr.plan_recovery(target),
        new.data_dir,
        new.port,
        str(arc.agent),
        str(arc.config),
        os_user=account.pw_name if account else None,
        settings={"unix_socket_directories": new.socket_dir},
        timeout=120,
        **extra,
    )


def test_time_target_gives_a_not_b_and_the_point_reached(archive):
    new = PostgresCluster()
    try:
        result = pitr.recover(
            recovery_options(archive, new, {"time": archive.target_time}), archive.restore_base
        )
        notes = new.psql("SELECT string_agg(note, ',' ORDER BY id) FROM visits;")
        assert notes == "before the base backup,A"
        assert table_fingerprints(new, "postgres") == archive.at_target
        assert "recovery stopping before commit" in result["reached_message"]
        # B committed after the target: the stop time is B's commit, after the target.
        assert result["reached_time"] > archive.target_time
        assert result["new_timeline"] == 2
        assert result["row_counts"]["postgres"]["public.visits"] == 2
        assert result["rpo_seconds"] >= 0 and result["duration_seconds"] > 0
        assert new.psql("SHOW archive_mode;") == "off"  # never pushes into the source's archive
        assert new.psql("SELECT pg_is_in_recovery();") == "f"
    finally:
        new.destroy()


def test_latest_replays_everything_archived(archive):
    new = PostgresCluster()
    try:
        result = pitr.recover(recovery_options(archive, new, "latest"), archive.restore_base)
        assert new.psql("SELECT string_agg(note, ',' ORDER BY id) FROM visits;") == (
            "before the base backup,A,B"
        )
        assert result["last_transaction_time"] is not None
        assert result["reached_time"] == result["last_transaction_time"]
    finally:
        new.destroy()


def test_target_beyond_the_archive_fails_and_keeps_nothing_as_restored(archive):
    new = PostgresCluster()
    try:
        # A restore point that was never created: replay runs off the end of the WAL.
        options = recovery_options(archive, new, {"name": "never_created"})
        with pytest.raises(pitr.IntegrityError) as raised:
            pitr.recover(options, archive.restore_base)
        assert "never_created" in str(raised.value)
        assert not os.path.exists(new.data_dir)  # moved aside as .failed_<time>
        failed = raised.value.result["failed_data_dir"]
        assert Path(failed, "recovery.signal").exists()
        assert pitr.postmaster_status(failed) is None  # nothing left running
    finally:
        new.destroy()


def test_refusals_change_nothing(archive):
    new = PostgresCluster()
    called = []
    try:
        Path(new.data_dir).mkdir()
        (Path(new.data_dir) / "PG_VERSION").write_text("15\n")
        options = recovery_options(archive, new, "latest")
        with pytest.raises(ConfigError, match="not empty"):
            pitr.recover(options, called.append)
        options = recovery_options(
            archive, new, "latest", replace_running=True, confirm_replace="/x"
        )
        with pytest.raises(ConfigError, match="confirm_replace"):
            pitr.recover(options, called.append)
        shutil.rmtree(new.data_dir)
        busy = recovery_options(archive, new, "latest")
        busy.port = archive.source.port
        with pytest.raises(ConfigError, match="in use"):
            pitr.recover(busy, called.append)
        assert called == [] and not os.path.exists(new.data_dir)
    finally:
        new.destroy()


def _running_victim() -> PostgresCluster:
    """A cluster of its own data, running: what replace_running stops and keeps aside."""
    victim = PostgresCluster()
    victim.start()
    victim.psql("CREATE TABLE victim_marker AS SELECT 42 AS answer;")
    return victim


def test_replacing_a_running_cluster_keeps_it_aside(archive):
    victim = _running_victim()
    try:
        options = recovery_options(
            archive, victim, "latest", replace_running=True, confirm_replace=victim.data_dir
        )
        result = pitr.recover(options, archive.restore_base)
        aside = Path(result["replaced"])
        assert aside.name.startswith("data.pre_pitr_")
        assert pitr.postmaster_status(str(aside)) is None  # stopped, not deleted
        assert (aside / "PG_VERSION").exists()
        # The recovered cluster now lives in the same directory, on the same port.
        assert victim.psql("SELECT string_agg(note, ',' ORDER BY id) FROM visits;") == (
            "before the base backup,A,B"
        )
        assert victim.psql("SELECT to_regclass('victim_marker') IS NULL;") == "t"
    finally:
        victim.destroy()


def test_a_failed_replacement_puts_the_original_back_running(archive):
    victim = _running_victim()
    try:
        options = recovery_options(
            archive,
            victim,
            {"name": "never_created"},
            replace_running=True,
            confirm_replace=victim.data_dir,
        )
        with pytest.raises(pitr.IntegrityError) as raised:
            pitr.recover(options, archive.restore_base)
        result = raised.value.result
        assert result["rolled_back"] is True and result["original_restarted"] is True
        assert result["replaced"] is None
        assert "back in %s and running again" % victim.data_dir in str(raised.value)
        # The original, with its own data, answers on its own port again.
        assert victim.psql("SELECT answer FROM victim_marker;") == "42"
        failed = Path(result["failed_data_dir"])
        assert (failed / "recovery.signal").exists()
        assert pitr.postmaster_status(str(failed)) is None
        assert not list(Path(victim.data_dir).parent.glob("data.pre_pitr_*"))
    finally:
        victim.destroy()


@pytest.mark.parametrize(
    "target, message",
    [
        ({"time": "2026-01-01 10:00:00"}, "no time zone"),
        ({"time": "3026-01-01T10:00:00Z"}, "future"),
        ({"lsn": "0/XYZ"}, "not an LSN"),
        ({"name": "x" * 64}, "too long"),
        ({"time": "2026-01-01T10:00:00Z", "lsn": "0/1"}, "exactly one"),
        ({"xid": "5"}, "unknown recovery target"),
    ],
)
def test_bad_targets_are_refused(target, message):
    with pytest.raises(ConfigError, match=message):
        pitr.plan_recovery(target)


def test_recovery_settings_quote_what_the_server_and_shell_read():
    command = pitr.restore_command("/opt/clinic backup/bin", "/etc/clinic-backup/o'brien.json")
    quoted_config = "'/etc/clinic-backup/o'\"'\"'brien.json'"
    assert command == "'/opt/clinic backup/bin' wal-fetch --config %s %%f %%p" % quoted_config
    lines = dict(pitr.recovery_settings(pitr.plan_recovery({"name": "it's"}), command, free_port()))
    assert lines["recovery_target_name"] == "'it''s'"
    assert lines["recovery_target_action"] == "'promote'"
    with pytest.raises(ConfigError, match="%"):
        pitr.restore_command("/opt/50%/agent", "/etc/c.json")


def test_settings_only_where_they_differ_and_check_mode_writes_nothing(archive):
    """archiving.apply_settings, the wal_archiving module's engine, on the source cluster."""
    src = archive.source
    connection = PgConnection(
        host=src.socket_dir, port=src.port, user="postgres", dbname="postgres"
    )
    conn = archiving.connect(connection)
    try:
        wanted = {"archive_mode": True, "archive_timeout": "7min", "wal_level": "replica"}
        would = archiving.apply_settings(conn, wanted, check_mode=True)
        assert would["changed"] == ["archive_timeout"]  # the others are what the server runs
        assert src.psql("SHOW archive_timeout;") == "0"  # check mode wrote nothing
        done = archiving.apply_settings(conn, wanted)
        assert done["changed"] == ["archive_timeout"] and done["pending_restart"] == []
        assert src.psql("SHOW archive_timeout;") == "7min"
        again = archiving.apply_settings(conn, wanted)
        assert again["changed"] == [] and again["pending_restart"] == []
        # A postmaster-context setting waits for a restart, and says so until then.
        moved = archiving.apply_settings(conn, {"max_wal_senders": 7})
        assert moved["pending_restart"] == ["max_wal_senders"]
        assert archiving.apply_settings(conn, {"max_wal_senders": 7})["changed"] == []
        with pytest.raises(ConfigError, match="not a setting this module manages"):
            archiving.apply_settings(conn, {"shared_preload_libraries": "x"})
    finally:
        conn.close()
