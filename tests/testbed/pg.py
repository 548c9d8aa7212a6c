"""Throwaway PostgreSQL clusters on 127.0.0.1 for integration tests.

Each :class:`PostgresCluster` owns one temporary directory holding the data
directory, the unix socket and the server log. PostgreSQL refuses to run as
root, so when the tests run as root the server runs as an unprivileged
account (``postgres`` if it exists, else ``nobody``) while ``psql`` keeps
running as the caller over the unix socket with ``trust`` authentication.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from .netutil import LOOPBACK, child_pids, free_port, pid_alive, pid_exists, wait_until

SettingValue = str | int | float | bool

DEFAULT_SETTINGS: dict[str, SettingValue] = {
    # Skipping fsync survives a process crash (kill()) since the OS keeps the pages; the
    # cluster is thrown away after the run. synchronous_commit stays on: committed rows
    # must survive kill() for the fault tests.
    "fsync": False,
    "wal_level": "replica",
    "archive_mode": False,
    "max_wal_senders": 4,
    "max_connections": 40,
    "shared_buffers": "32MB",
    "timezone": "UTC",
    "log_timezone": "UTC",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "log_min_messages": "warning",
}

PG_HBA = """\
# Written by the clinic.backup test bed.
local   all   all                    trust
host    all   postgres  127.0.0.1/32 trust
host    all   all       127.0.0.1/32 scram-sha-256
"""

# Strong references on purpose: a running cluster must be stopped even if unreferenced.
_LIVE_CLUSTERS: set[PostgresCluster] = set()


class PostgresError(RuntimeError):
    """A PostgreSQL command of the test bed failed."""


def find_bin_dir() -> Path:
    """PostgreSQL binaries: ``$CLINIC_PG_BIN``, else the newest /usr/lib/postgresql/*/bin."""
    env_dir = os.environ.get("CLINIC_PG_BIN")
    if env_dir:
        path = Path(env_dir)
        if not (path / "pg_ctl").exists():
            raise PostgresError(f"CLINIC_PG_BIN={env_dir} has no pg_ctl")
        return path
    candidates = [
        Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "pg_ctl").exists()
    ]
    if not candidates:
        raise PostgresError(
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin; "
            "run scripts/bootstrap.sh or set CLINIC_PG_BIN"
        )
    return max(candidates, key=lambda p: _version_key(p.parent.name))


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)


def quote_ident(name: str) -> str:
    """Quote an SQL identifier (always quoted, so case and odd characters survive)."""
    if "\x00" in name:
        raise ValueError("identifier contains NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote an SQL string literal (standard_conforming_strings is on since 9.1)."""
    if "\x00" in value:
        raise ValueError("literal contains NUL")
    return "'" + value.replace("'", "''") + "'"


def _conf_value(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return quote_literal(str(value))


def _server_account() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresError("running as root but neither a 'postgres' nor a 'nobody' account exists")


def _clean_env() -> dict[str, str]:
    """os.environ without libpq variables that would redirect our clients."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class PostgresCluster:
    """A temporary PostgreSQL cluster listening on 127.0.0.1 and a private unix socket."""

    host: str = LOOPBACK
    superuser: str = "postgres"
    # Set by the ``pg`` fixture in tests/conftest.py; None on a bare cluster.
    clinic_user: str | None = None
    clinic_password: str | None = None
    clinic_db: str | None = None

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, SettingValue] | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
        initdb_args: tuple[str, ...] = (),
        home: str | os.PathLike[str] | None = None,
    ) -> None:
        """``home``: a fixed directory kept between runs (the demo's), used as it is (a
        cluster already in it is started again) instead of a new temporary one."""
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
        # Extra initdb options, e.g. ("--wal-segsize=1",) for 1 MiB WAL segments.
        self.initdb_args = tuple(initdb_args)
        self._account = _server_account()
        if home is not None:
            self.base = Path(home)
            self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        else:
            parent = Path(base_dir) if base_dir is not None else Path("/tmp")
            parent.mkdir(parents=True, exist_ok=True)
            self.base = Path(tempfile.mkdtemp(prefix="clinic-pg-", dir=parent))
        self._prepare_base()
        self.socket_dir = str(self.base)
        self.data_dir = str(self.base / "data")
        self.log_file = str(self.base / "postgres.log")
        self.port = free_port()
        self.settings: dict[str, SettingValue] = dict(DEFAULT_SETTINGS)
        self.settings.update(settings or {})
        _LIVE_CLUSTERS.add(self)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def start(self) -> None:
        """initdb on first use, then start the server and wait until it accepts connections."""
        if self.is_running():
            # A kept cluster (``home``) already up: talk to it on the port it listens on.
            try:
                self.port = int(Path(self.data_dir, "postmaster.pid").read_text().split("\n")[3])
            except (OSError, IndexError, ValueError):
                pass
            return
        if not Path(self.data_dir, "PG_VERSION").exists():
            self._initdb()
        for attempt in range(3):
            self._write_conf()
            proc = self._run_as_server(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    self.data_dir,
                    "-l",
                    self.log_file,
                    "-w",
                    "-t",
                    "60",
                    "-s",
                    "start",
                ],
            )
            if proc.returncode == 0:
                return
            tail = self.log_tail()
            # Another process may have taken our free port between probe and bind.
            if "could not bind" in tail and attempt < 2:
                self.port = free_port()
                continue
            raise PostgresError(
                f"pg_ctl start failed (rc={proc.returncode}): {proc.stderr.strip()}\n"
                f"--- {self.log_file} (tail) ---\n{tail}"
            )

    def stop(self) -> None:
        """Fast shutdown; a no-op when the server is not running."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        proc = self._run_as_server(
            [
                str(self.bin_dir / "pg_ctl"),
                "-D",
                self.data_dir,
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "-s",
                "stop",
            ],
        )
        if proc.returncode != 0 and pid_alive(pid):
            # A stuck fast shutdown must not leave a server behind after the tests.
            self.kill()
            return
        wait_until(lambda: not pid_alive(pid), timeout=30, what="postmaster exit")

    def kill(self, children: bool = True) -> None:
        """SIGKILL the postmaster (and, by default, its children) like a host crash.

        The next :meth:`start` runs crash recovery. With ``children=False`` the
        backends are left to notice the postmaster's death on their own.
        """
        pid = self.postmaster_pid()
        if pid is None:
            return
        kids = child_pids(pid)
        os.kill(pid, signal.SIGKILL)
        if children:
            for kid in kids:
                try:
                    os.kill(kid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        wait_until(
            lambda: not any(pid_alive(p) for p in [pid, *kids]),
            timeout=30,
            what="killed postgres processes to exit",
        )
        # The next postmaster trusts its lock files while kill(pid, 0) succeeds, which is
        # still true for a zombie that PID 1 has not reaped yet (seen: ~2 s in containers).
        try:
            wait_until(lambda: not pid_exists(pid), timeout=10, what="postmaster to be reaped")
        except TimeoutError:
            # Dead processes hold no locks; drop the lock files as a real reboot would.
            Path(self.data_dir, "postmaster.pid").unlink(missing_ok=True)
            Path(self.socket_dir, f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port and data directory."""
        self.stop()
        self.start()

    def detach(self) -> None:
        """Leave the server running when this process exits (the demo's cluster)."""
        _LIVE_CLUSTERS.discard(self)

    def pg_ctl_argv(self, action: str) -> list[str]:
        """The command an operator runs to ``stop``/``start`` this cluster by hand."""
        argv = [str(self.bin_dir / "pg_ctl"), "-D", self.data_dir, "-l", self.log_file, action]
        if self._account is not None:
            argv = ["runuser", "-u", self._account.pw_name, "--"] + argv
        return argv

    def destroy(self) -> None:
        """Stop the server and delete the cluster's directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            _LIVE_CLUSTERS.discard(self)

    def postmaster_pid(self) -> int | None:
        """PID of a live postmaster for this data directory, else None."""
        try:
            first = Path(self.data_dir, "postmaster.pid").read_text().splitlines()[0]
            pid = int(first)
        except (OSError, IndexError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def is_running(self) -> bool:
        """True while the postmaster is alive."""
        return self.postmaster_pid() is not None

    def configure(self, settings: Mapping[str, SettingValue]) -> None:
        """Merge postgresql.conf settings; they apply at the next (re)start or reload."""
        self.settings.update(settings)
        self._write_conf()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        try:
            text = Path(self.log_file).read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ SQL helpers
    def psql(
        self, sql: str, dbname: str = "postgres", user: str | None = None, timeout: float = 600
    ) -> str:
        """Run ``sql`` with psql over the unix socket; return unaligned tuples-only output.

        The SQL goes through stdin and the connection parameters through the
        environment, so neither a password nor an odd database name is parsed
        from argv.
        """
        env = _clean_env()
        env.update(
            PGHOST=self.socket_dir,
            PGPORT=str(self.port),
            PGUSER=user or self.superuser,
            PGDATABASE=dbname,
            PGCLIENTENCODING="UTF8",
            PGCONNECT_TIMEOUT="10",
        )
        argv = [
            str(self.bin_dir / "psql"),
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            "-",
        ]
        proc = subprocess.run(
            argv, input=sql, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise PostgresError(
                f"psql failed (rc={proc.returncode}, db={dbname!r}, user={env['PGUSER']!r}): "
                f"{proc.stderr.strip()}"
            )
        return proc.stdout.rstrip("\n")

    def create_role(
        self, name: str, password: str | None, superuser: bool = False, login: bool = True
    ) -> None:
        """CREATE ROLE with a SCRAM password (sent over stdin, never argv)."""
        parts = [
            f"CREATE ROLE {quote_ident(name)} WITH",
            "LOGIN" if login else "NOLOGIN",
            "SUPERUSER" if superuser else "NOSUPERUSER",
        ]
        if password is not None:
            parts.append(f"PASSWORD {quote_literal(password)}")
        self.psql(" ".join(parts) + ";")

    def create_database(self, name: str, owner: str | None = None) -> None:
        """CREATE DATABASE, optionally owned by ``owner``."""
        sql = f"CREATE DATABASE {quote_ident(name)}"
        if owner:
            sql += f" OWNER {quote_ident(owner)}"
        self.psql(sql + ";")

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS, disconnecting other sessions first."""
        self.psql(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE);")

    def libpq_env(
        self, user: str | None = None, dbname: str | None = None, password: str | None = None
    ) -> dict[str, str]:
        """libpq variables for a TCP connection to 127.0.0.1 (PGPASSWORD only if given)."""
        env = {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": user or self.superuser,
            "PGDATABASE": dbname or "postgres",
        }
        if password is not None:
            env["PGPASSWORD"] = password
        return env

    def url(self, user: str, password: str, dbname: str) -> str:
        """A percent-encoded ``postgresql://`` URL for TCP on 127.0.0.1."""
        return (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{quote(dbname, safe='')}"
        )

    @property
    def server_version_num(self) -> int:
        """``SHOW server_version_num`` of the running server, e.g. 150018."""
        return int(self.psql("SHOW server_version_num;"))

    # ------------------------------------------------------------------ internals
    def _prepare_base(self) -> None:
        if self._account is None:
            return
        # 0711: the server account may traverse and own it; others cannot list it.
        os.chown(self.base, self._account.pw_uid, self._account.pw_gid)
        os.chmod(self.base, 0o711)
        for parent in self.base.parents:
            mode = os.stat(parent).st_mode
            if not mode & stat.S_IXOTH:
                # e.g. pytest's 0700 basetemp: grant traverse (not read) to others.
                os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)

    def _run_as_server(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self._account is not None:
            kwargs.update(user=self._account.pw_uid, group=self._account.pw_gid, extra_groups=[])
        env = _clean_env()
        env.update(LC_ALL="C", LANG="C")
        if self._account is not None:
            env.update(
                HOME=str(self.base), USER=self._account.pw_name, LOGNAME=self._account.pw_name
            )
        return subprocess.run(
            argv,
            env=env,
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
            **kwargs,
        )

    def _initdb(self) -> None:
        proc = self._run_as_server(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                self.data_dir,
                "-U",
                self.superuser,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--data-checksums",
                "--no-sync",
                *self.initdb_args,
            ],
        )
        if proc.returncode != 0:
            raise PostgresError(f"initdb failed (rc={proc.returncode}):\n{proc.stderr}")
        hba = Path(self.data_dir, "pg_hba.conf")
        hba.write_text(PG_HBA)
        conf = Path(self.data_dir, "postgresql.conf")
        with conf.open("a") as fh:
            fh.write("\n# clinic.backup test bed settings (rewritten on every start)\n")
            fh.write("include_if_exists = 'testbed.conf'\n")
        if self._account is not None:
            os.chown(hba, self._account.pw_uid, self._account.pw_gid)

    def _write_conf(self) -> None:
        settings: dict[str, SettingValue] = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": self.socket_dir,
        }
        settings.update(self.settings)
        lines = [f"{name} = {_conf_value(value)}" for name, value in settings.items()]
        path = Path(self.data_dir, "testbed.conf")
        path.write_text("\n".join(lines) + "\n")
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def __repr__(self) -> str:
        return f"PostgresCluster(port={self.port}, data_dir={self.data_dir!r})"


@atexit.register
def _stop_leftover_clusters() -> None:
    # Safety net for clusters whose owner forgot destroy(): never leave a postmaster behind.
    for cluster in list(_LIVE_CLUSTERS):
        try:
            cluster.stop()
        except Exception:
            pass
