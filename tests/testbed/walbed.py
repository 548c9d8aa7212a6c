"""A PostgreSQL cluster archiving its WAL through the clinic-backup agent (wal-push).

The server runs as an unprivileged account when the tests run as root, and so does its
archive_command: the agent's config, passphrase, repository and spool live in a
directory of the cluster's own (owned by that account), and the agent is started by a
wrapper script like the one the backup_agent role installs. WAL segments are 1 MiB
(initdb --wal-segsize=1) so that a test fills several in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from .ansible import make_collection_path
from .pg import PostgresCluster
from .s3 import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY

AGENT_MODULE = "ansible_collections.clinic.backup.plugins.module_utils.agent"
IMPORT_ROOT = make_collection_path(Path(__file__).resolve().parents[1] / "output" / "import")
SEGMENT_SIZE = 1024 * 1024


def server_python() -> tuple[str, str]:
    """(interpreter, PYTHONPATH) the server's account can run the agent with. The test
    venv's interpreter may live where only root can reach (pyenv under /root): then the
    system python3 of the same minor version runs it, with the venv's site-packages."""
    path = IMPORT_ROOT
    if os.geteuid() != 0 or _others_can_run(sys.executable):
        return sys.executable, path
    system = "/usr/bin/python%d.%d" % sys.version_info[:2]
    if not os.path.exists(system):
        raise RuntimeError(
            "the server account cannot run %s and there is no %s" % (sys.executable, system)
        )
    return system, path + ":" + sysconfig.get_paths()["purelib"]


def _others_can_run(program: str) -> bool:
    real = Path(os.path.realpath(program))
    return all(os.stat(p).st_mode & 0o001 for p in [real, *real.parents])


class WalBed:
    """A cluster with archive_mode on whose archive_command is the agent's wal-push into
    a local repository and (optionally) one S3 target."""

    def __init__(
        self,
        s3_endpoint: str | None = None,
        bucket: str | None = None,
        wal: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        s3_retries: int = 2,
        segment_mb: int = 1,
    ) -> None:
        self.cluster = PostgresCluster(initdb_args=("--wal-segsize=%d" % segment_mb,))
        base = Path(self.cluster.base)
        self.uid, self.gid = base.stat().st_uid, base.stat().st_gid
        self.home = base / "clinic"
        self.repo = self.home / "repo"
        self.spool = self.home / "spool"
        self.metrics = self.home / "metrics"
        self.passphrase = self.home / "passphrase"
        self.config_path = self.home / "agent.json"
        self.wrapper = self.home / "clinic-backup"
        for folder in (self.home, self.repo, self.metrics):
            folder.mkdir(mode=0o700)
            os.chown(folder, self.uid, self.gid)
        self.secret = secrets.token_urlsafe(32)
        self._private(self.passphrase, self.secret + "\n")
        self.config: dict[str, Any] = {
            "cluster": "main",
            "repository": str(self.repo),
            "passphrase_file": str(self.passphrase),
            "wal": {"spool_dir": str(self.spool), "workers": 2, **(wal or {})},
            # wal-status reads pg_stat_archiver over the unix socket.
            "login_host": self.cluster.socket_dir,
            "login_port": self.cluster.port,
            "login_user": self.cluster.superuser,
            "database": "postgres",
        }
        self.bucket = bucket
        if s3_endpoint and bucket:
            self.config.update(
                s3_targets=[{"bucket": bucket, "prefix": "clinic", "endpoint_url": s3_endpoint}],
                aws_access_key=DUMMY_ACCESS_KEY,
                aws_secret_key=DUMMY_SECRET_KEY,
                s3_retries=s3_retries,
            )
        self.write_config()
        python, pythonpath = server_python()
        self._private(
            self.wrapper,
            '#!/bin/sh\nPYTHONPATH=%s\nexport PYTHONPATH\nexec %s -m %s "$@"\n'
            % (shlex.quote(pythonpath), shlex.quote(python), AGENT_MODULE),
            mode=0o755,
        )
        self.cluster.settings.update(
            {
                "archive_mode": True,
                "archive_command": "%s wal-push --config %s %%p"
                % (shlex.quote(str(self.wrapper)), shlex.quote(str(self.config_path))),
                "wal_level": "replica",
                **(settings or {}),
            }
        )

    def _private(self, path: Path, text: str, mode: int = 0o600) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(path, mode)
        os.chown(path, self.uid, self.gid)

    def write_config(self, config: dict[str, Any] | None = None, path: Path | None = None) -> Path:
        path = path or self.config_path
        self._private(path, json.dumps(config or self.config))
        return path

    def record_key(self) -> Any:
        """The engine's RecordKey of the bed's passphrase, for checks made by the test
        (the passphrase file belongs to the server's account, which root's engine refuses)."""
        from ansible_collections.clinic.backup.plugins.module_utils.authentication import (
            RecordKey,
        )

        return RecordKey(self.secret.encode())

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> WalBed:
        self.cluster.start()
        # Base backups (pg_basebackup over the unix socket) need a replication entry.
        with Path(self.cluster.data_dir, "pg_hba.conf").open("a") as hba:
            hba.write("local   replication   all   trust\n")
        self.cluster.psql("SELECT pg_reload_conf();")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cluster.destroy()

    # ------------------------------------------------------------------ WAL
    def make_wal(self, megabytes: float = 3.0, table: str = "filler") -> str:
        """Write about ``megabytes`` of WAL, switch segments; returns the switched-out
        segment's name (the last one that must reach the archive)."""
        rows = int(megabytes * 9000)
        self.cluster.psql(
            "CREATE TABLE IF NOT EXISTS %s (id bigint, payload text);"
            " INSERT INTO %s SELECT g, md5(g::text) || repeat('x', 40)"
            " FROM generate_series(1, %d) g;" % (table, table, rows)
        )
        return self.switch()

    def switch(self) -> str:
        """pg_switch_wal(); the name of the segment it closed."""
        # pg_walfile_name() of a segment boundary names the segment that ends there.
        return self.cluster.psql("SELECT pg_walfile_name(pg_switch_wal());").strip()

    def archiver(self) -> dict[str, Any]:
        row = self.cluster.psql(
            "SELECT json_build_object('archived_count', archived_count, 'last_archived_wal',"
            " last_archived_wal, 'failed_count', failed_count, 'last_failed_wal',"
            " last_failed_wal) FROM pg_stat_archiver;"
        )
        return json.loads(row)

    def wait_archived(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until PostgreSQL reports ``name`` archived (its .done status file)."""
        done = Path(self.cluster.data_dir, "pg_wal", "archive_status", name + ".done")
        deadline = time.monotonic() + timeout
        while not done.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    "%s not archived after %ss: %s\n%s\n%s"
                    % (name, timeout, self.archiver(), self.worker_log(), self.cluster.log_tail())
                )
            time.sleep(0.05)
        return self.archiver()

    def done_names(self) -> list[str]:
        """Files PostgreSQL counts as archived (archive_status/*.done)."""
        folder = Path(self.cluster.data_dir, "pg_wal", "archive_status")
        return sorted(p.name[: -len(".done")] for p in folder.glob("*.done"))

    def ready_names(self) -> list[str]:
        folder = Path(self.cluster.data_dir, "pg_wal", "archive_status")
        return sorted(p.name[: -len(".ready")] for p in folder.glob("*.ready"))

    def wal_file(self, name: str) -> Path:
        return Path(self.cluster.data_dir, "pg_wal", name)

    def worker_log(self) -> str:
        try:
            return (self.spool / "worker.log").read_text(errors="replace")[-3000:]
        except OSError:
            return "(no worker log)"

    def agent(
        self, *args: str, config: Path | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the agent as the cluster's account (as PostgreSQL would)."""
        argv = [str(self.wrapper), args[0], "--config", str(config or self.config_path), *args[1:]]
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            kwargs.update(user=self.uid, group=self.gid, extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "AWS_"))}
        env["HOME"] = str(self.home)
        return subprocess.run(
            argv,
            cwd=self.cluster.data_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
