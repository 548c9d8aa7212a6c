"""Ceph's radosgw, single-node, on 127.0.0.1: an S3 endpoint that enforces Object Lock.

moto accepts Object Lock requests but does not read retention back nor refuse deletes the
way S3 does; radosgw (Debian's ``radosgw``, ``ceph-mon``, ``ceph-osd``) does both. One
monitor, one OSD on memstore (RAM, nothing on disk but logs and the monitor's store), no
manager, ``auth none`` between the daemons, the beast frontend on a free loopback port.
Everything lives in one temporary directory; every daemon runs in the foreground in its
own process group and :meth:`RadosGateway.stop` takes them all down.

Start-up takes about 3 s on 2 cores (12 s with the monitor's default Paxos interval,
which spaces the creation of radosgw's pools 1 s apart); its first bucket about 1 s
more. One instance per test session (the ``radosgw`` fixture in tests/conftest.py).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .netutil import LOOPBACK, free_port, http_ok, stop_process_group, wait_until

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
PACKAGES = "radosgw ceph-mon ceph-osd ceph-common"
ACCESS_KEY = "CLINICBACKUPTESTBED0"
SECRET_KEY = "testbed-radosgw-secret-not-a-real-one"
REGION = "us-east-1"

_LIVE: set[RadosGateway] = set()


class RadosGatewayError(RuntimeError):
    """radosgw (or the cluster under it) did not start."""


def missing_binaries() -> list[str]:
    """The Ceph programs this machine lacks (empty: the fixture can run)."""
    return [name for name in BINARIES if shutil.which(name, path=_path()) is None]


def _path() -> str:
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin"


CONF = """\
[global]
fsid = {fsid}
mon host = v1:{host}:{mon_port}
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
keyring = /dev/null
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd pool default pg autoscale mode = off
osd pool default pg num = 1
osd pool default pgp num = 1
mon max pg per osd = 1000
osd crush chooseleaf type = 0
ms bind msgr2 = false
ms bind ipv6 = false
run dir = {root}/run
admin socket = {root}/run/$name.asok
log file = {root}/log/$name.log
log to stderr = false
err to stderr = true
[mon]
mon data = {root}/mon
# Every map change (each pool radosgw creates) waits for the next Paxos proposal, by
# default up to 1 s apart: a single monitor can propose at once.
paxos propose interval = 0.01
paxos min wait = 0.001
mon cluster log file = {root}/log/cluster.log
[osd]
osd data = {root}/osd$id
osd objectstore = memstore
memstore device bytes = 1073741824
[client.rgw]
rgw frontends = beast endpoint={host}:{rgw_port}
rgw data = {root}/rgw
rgw enable usage log = false
"""


class RadosGateway:
    """A throwaway Ceph cluster with radosgw; :meth:`client` gives a boto3 S3 client."""

    host: str = LOOPBACK

    def __init__(self, startup_timeout: float = 90.0) -> None:
        self.startup_timeout = startup_timeout
        self.root = Path(tempfile.mkdtemp(prefix="clinic-rgw-"))
        self.mon_port = free_port()
        self.port = free_port()
        self.conf = self.root / "ceph.conf"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._restarts = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> RadosGateway:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """mkfs and start the monitor, the OSD and radosgw; create the test user."""
        _LIVE.add(self)
        try:
            self._start()
        except BaseException as exc:
            tail = self.log_tail()
            self.stop()
            raise RadosGatewayError(f"radosgw did not start: {exc}\n{tail}") from None

    def _start(self) -> None:
        for sub in ("run", "log", "mon", "osd0", "rgw"):
            (self.root / sub).mkdir()
        self.conf.write_text(
            CONF.format(
                fsid=uuid.uuid4(),
                host=self.host,
                mon_port=self.mon_port,
                rgw_port=self.port,
                root=self.root,
            )
        )
        monmap = self.root / "monmap"
        fsid = self._conf_value("fsid")
        self._run(
            "monmaptool",
            "--create",
            "--fsid",
            fsid,
            "--addv",
            "a",
            f"[v1:{self.host}:{self.mon_port}]",
            str(monmap),
        )
        self._run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap))
        self._daemon("ceph-mon", "-c", str(self.conf), "-f", "-i", "a")
        # The OSD's own uuid, given to the monitor and to mkfs alike (as Ceph's vstart.sh).
        osd_uuid = str(uuid.uuid4())
        self._run("ceph", "-c", str(self.conf), "--connect-timeout", "30", "osd", "new", osd_uuid)
        self._run("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self._daemon("ceph-osd", "-c", str(self.conf), "-f", "-i", "0")
        self._daemon("radosgw", "-c", str(self.conf), "-f", "-n", "client.rgw")
        wait_until(self._ready, timeout=self.startup_timeout, what="radosgw", interval=0.2)
        self._run(
            "radosgw-admin",
            "-c",
            str(self.conf),
            "user",
            "create",
            "--uid",
            "clinic-backup",
            "--display-name",
            "clinic backup (test bed)",
            "--access-key",
            ACCESS_KEY,
            "--secret",
            SECRET_KEY,
        )

    def _conf_value(self, name: str) -> str:
        for line in self.conf.read_text().splitlines():
            key, _sep, value = line.partition("=")
            if key.strip() == name:
                return value.strip()
        raise KeyError(name)

    def _env(self) -> dict[str, str]:
        return dict(os.environ, PATH=_path())

    def _run(self, *argv: str) -> None:
        # Ceph 16 clients sometimes send their first command before they know the
        # cluster's fsid and the monitor refuses it ("wrong fsid", "problem getting
        # command descriptions"): a fresh attempt succeeds.
        for attempt in range(4):
            try:
                return self._run_once(*argv)
            except RadosGatewayError:
                if argv[0] != "ceph" or attempt == 3:
                    raise
                time.sleep(0.5)

    def _run_once(self, *argv: str) -> None:
        done = subprocess.run(
            list(argv),
            cwd=self.root,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=self.startup_timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RadosGatewayError(
                "%s failed (%d): %s"
                % (
                    " ".join(argv[:3]),
                    done.returncode,
                    done.stderr.decode(errors="replace")[-2000:],
                )
            )

    def _daemon(self, *argv: str) -> None:
        log = open(self.root / "log" / (argv[0] + ".out"), "wb")
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=self.root,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: stop() signals whatever the daemon started.
                start_new_session=True,
            )
        finally:
            log.close()
        self._procs.append(proc)

    def _ready(self) -> bool:
        for index, proc in enumerate(self._procs):
            if proc.poll() is None:
                continue
            # The same race, at an OSD's boot (it places itself in the CRUSH map): it
            # exits 1; started again it joins.
            if proc.args[0] != "ceph-osd" or self._restarts >= 3:
                raise RadosGatewayError(f"{proc.args[0]} exited with {proc.returncode}")
            self._restarts += 1
            self._procs.pop(index)
            self._daemon(*proc.args)
            return False
        return http_ok(self.endpoint_url + "/")

    def stop(self) -> None:
        """Stop every daemon (radosgw first) and remove the directory; idempotent."""
        while self._procs:
            stop_process_group(self._procs.pop(), timeout=15)
        shutil.rmtree(self.root, ignore_errors=True)
        _LIVE.discard(self)

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) if (self.root / "log").is_dir() else []:
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"== {path.name}\n" + "\n".join(text))
        return "\n".join(parts) or "(no log)"

    # ------------------------------------------------------------------ helpers
    def env(self) -> dict[str, str]:
        """The backup's credentials for boto3 (AWS config files masked)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self) -> Any:
        """A boto3 S3 client with the backup's own credentials (path-style)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def create_bucket(self, name: str, object_lock: bool = True) -> str:
        """Create ``name`` (with Object Lock enabled unless told otherwise)."""
        kwargs: dict[str, Any] = {"Bucket": name}
        if object_lock:
            kwargs["ObjectLockEnabledForBucket"] = True
        self.client().create_bucket(**kwargs)
        return name

    def __repr__(self) -> str:
        return f"RadosGateway(endpoint_url={self.endpoint_url!r})"


@atexit.register
def _stop_leftovers() -> None:
    # Safety net: never leave Ceph daemons behind when a caller forgot stop().
    for gateway in list(_LIVE):
        try:
            gateway.stop()
        except Exception:
            pass
