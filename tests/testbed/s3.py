"""moto's standalone S3 server on 127.0.0.1, run as a real subprocess.

A subprocess (not moto's in-process decorators) keeps the code under test honest:
boto3 inside Ansible modules talks HTTP to a real endpoint, exactly as in production.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from .netutil import LOOPBACK, free_port, http_ok, http_post, stop_process_group, wait_until

DUMMY_ACCESS_KEY = "AKIATESTBEDCLINIC000"
DUMMY_SECRET_KEY = "testbed-secret-key-not-a-real-credential"
DEFAULT_REGION = "us-east-1"

# Variables that would point boto3 somewhere other than the moto endpoint, or lend it
# a developer's real credentials.
AWS_LEAKS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)

_LIVE_SERVERS: set[MotoS3Server] = set()


class MotoServerError(RuntimeError):
    """The moto server did not start."""


class MotoS3Server:
    """A moto server subprocess with helpers for boto3 clients and buckets."""

    host: str = LOOPBACK

    def __init__(self, port: int | None = None, startup_timeout: float = 30.0) -> None:
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="clinic-moto-", suffix=".log", delete=False)
        self.log_file = self._log.name

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> MotoS3Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.cleanup()

    def start(self) -> None:
        """Start the server and wait until it answers HTTP."""
        if self.is_running():
            return
        env = {k: v for k, v in os.environ.items() if k not in AWS_LEAKS}
        env.update(self.env())
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            # Own process group, so stop() can take down anything moto forks.
            start_new_session=True,
        )
        _LIVE_SERVERS.add(self)
        try:
            wait_until(self._ready, timeout=self.startup_timeout, what="moto server")
        except TimeoutError as exc:
            self.stop()
            raise MotoServerError(
                f"moto did not start on {self.endpoint_url}:\n{self.log_tail()}"
            ) from exc

    def _ready(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            raise MotoServerError(f"moto server exited early:\n{self.log_tail()}")
        return http_ok(f"{self.endpoint_url}/moto-api/")

    def stop(self) -> None:
        """Terminate the server's process group; a no-op when not running."""
        if self._proc is not None:
            stop_process_group(self._proc)
            self._proc = None
        _LIVE_SERVERS.discard(self)

    def restart(self) -> None:
        """Stop and start again on the same port (moto's state is lost, like a real outage)."""
        self.stop()
        self.start()

    def is_running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the server process (also its process group id), or None."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def cleanup(self) -> None:
        """Remove the log file (call after stop())."""
        self._log.close()
        Path(self.log_file).unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's output."""
        try:
            text = Path(self.log_file).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ helpers
    def env(self) -> dict[str, str]:
        """Dummy credentials and region for boto3 (no AWS_PROFILE; IMDS lookups disabled).

        ~/.aws/config and ~/.aws/credentials are masked with /dev/null so a developer's
        profile cannot add a region, endpoint or credentials. Callers that copy
        os.environ should drop AWS_PROFILE themselves: see :func:`aws_env`
        (``testbed.ansible.ansible_env`` already does).
        """
        return {
            "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_KEY,
            "AWS_DEFAULT_REGION": DEFAULT_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self, region: str = DEFAULT_REGION) -> Any:
        """A boto3 S3 client for this endpoint with path-style addressing."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=region,
            aws_access_key_id=DUMMY_ACCESS_KEY,
            aws_secret_access_key=DUMMY_SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def create_bucket(self, name: str, region: str = DEFAULT_REGION) -> None:
        """Create ``name`` (with a LocationConstraint outside us-east-1)."""
        kwargs: dict[str, Any] = {"Bucket": name}
        if region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        self.client(region).create_bucket(**kwargs)

    def reset(self) -> None:
        """Drop every bucket and object (POST /moto-api/reset)."""
        status = http_post(f"{self.endpoint_url}/moto-api/reset")
        if status >= 300:
            raise MotoServerError(f"moto reset answered HTTP {status}")

    def __repr__(self) -> str:
        return f"MotoS3Server(endpoint_url={self.endpoint_url!r})"


def aws_env(server: MotoS3Server, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) without AWS profile/endpoint leaks, plus server.env()."""
    env = {
        k: v for k, v in (base if base is not None else os.environ).items() if k not in AWS_LEAKS
    }
    env.update(server.env())
    return env


@atexit.register
def _stop_leftover_servers() -> None:
    # Safety net: never leave a moto server behind when a caller forgot stop().
    for server in list(_LIVE_SERVERS):
        try:
            server.stop()
        except Exception:
            pass
