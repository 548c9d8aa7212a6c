"""Shared steps of the fault-injection suite: running the host agent, freezing and
killing its processes at chosen points, and observing what a fault left behind.

Everything observed here feeds the fault summary (tests/faults/conftest.py), so the
helpers return plain facts (ids, counts, booleans) and leave judging to the tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.pg import quote_ident
from testbed.s3 import DEFAULT_REGION, DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY

from ansible_collections.clinic.backup.plugins.module_utils import catalog, metrics
from ansible_collections.clinic.backup.plugins.module_utils import s3 as s3util
from ansible_collections.clinic.backup.plugins.module_utils.repository import (
    LocalRepository,
    S3Repository,
    safe_name,
)
from ansible_collections.clinic.backup.plugins.module_utils.verify import verify_set
from tests.integration import helpers
from tests.integration.test_interrupted import AGENT, agent_config

__all__ = ["AGENT", "agent_config", "helpers"]

# Every agent this suite starts carries this marker in its environment; gpg-agent
# daemons it leaves behind inherit it, which is how teardown finds (only) ours.
RUN_MARK = "clinic-faults-%s" % uuid.uuid4().hex
MARK_VAR = "CLINIC_FAULTS_MARK"


def repeat_count() -> int:
    """FAULT_REPEAT (default 3; FAULT_SOAK=1 raises the default to 20)."""
    default = 20 if os.environ.get("FAULT_SOAK") == "1" else 3
    return max(1, int(os.environ.get("FAULT_REPEAT", default)))


def light_repeat() -> int:
    """Repetitions for injections that are deterministic by construction (a fixed request
    count, a fixed point): ceil(FAULT_REPEAT / 3). Randomised and race-prone faults use
    repeat_count()."""
    return max(1, -(-repeat_count() // 3))


# ---------------------------------------------------------------------- data
BLOB_MB = int(os.environ.get("FAULT_BLOB_MB", "6"))


def load_fault_data(cluster: Any, dbname: str, owner: str, blob_mb: int = BLOB_MB) -> None:
    """A small clinic dataset plus ``blob_mb`` MB of incompressible scans (multipart-sized
    artifacts in well under a second of pg_dump) and an empty ``fault_blocker`` table that
    tests lock to hold a run just before its manifest."""
    from testbed.dataset import load_clinic_dataset

    load_clinic_dataset(cluster, dbname, owner, scale=0.05)
    rows = blob_mb * 16  # 64 KiB per row
    cluster.psql(
        "SET ROLE %s; CREATE TABLE scans (scan_id int PRIMARY KEY, patient_id bigint, image bytea);"
        "ALTER TABLE scans ALTER COLUMN image SET STORAGE EXTERNAL;"
        "INSERT INTO scans SELECT g, g, (SELECT decode(string_agg("
        "md5(g::text || ':' || s::text || random()::text),"
        " ''), 'hex') FROM generate_series(1, 4096) AS s) FROM generate_series(1, %d) AS g;"
        "CREATE TABLE fault_blocker (id int);" % (quote_ident(owner), rows),
        dbname=dbname,
    )


# ---------------------------------------------------------------------- the agent
@dataclass
class AgentResult:
    rc: int
    stdout: str
    stderr: str
    doc: dict[str, Any] = field(default_factory=dict)

    @property
    def msg(self) -> str:
        return str(self.doc.get("msg", ""))

    @property
    def reported_ok(self) -> bool:
        """What the agent told cron: exit code 0."""
        return self.rc == 0

    def text(self) -> str:
        return "rc=%s\n--- stdout\n%s\n--- stderr\n%s" % (self.rc, self.stdout, self.stderr)


def start_agent(
    collections_path: str,
    config: str,
    env: dict[str, str] | None = None,
    command: str = "backup",
    metrics_dir: str | os.PathLike[str] | None = None,
    set_id: str | None = None,
) -> subprocess.Popen[bytes]:
    """The host agent as cron runs it (own session, so the whole pipeline can be killed).

    Same invocation as tests/integration/test_interrupted.agent(), plus --metrics-dir /
    --set-id and the suite's environment marker.
    """
    argv = [sys.executable, "-m", AGENT, command, "--config", str(config)]
    if metrics_dir is not None:
        argv += ["--metrics-dir", str(metrics_dir)]
    if set_id is not None:
        argv += ["--set-id", set_id]
    full_env = dict(os.environ, PYTHONPATH=collections_path, **(env or {}))
    full_env[MARK_VAR] = RUN_MARK
    return subprocess.Popen(
        argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )


def finish(proc: subprocess.Popen[bytes], timeout: float = 300) -> AgentResult:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        kill_session(proc)
        out, err = proc.communicate()
        raise AssertionError(
            "agent did not finish in %ss:\n%s\n%s" % (timeout, out.decode(), err.decode())
        ) from exc
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    try:
        doc = json.loads(stdout) if stdout.strip() else {}
    except ValueError:
        doc = {}
    return AgentResult(proc.returncode, stdout, stderr, doc)


def run_agent(collections_path: str, config: str, **kwargs: Any) -> AgentResult:
    timeout = kwargs.pop("timeout", 300)
    return finish(start_agent(collections_path, config, **kwargs), timeout)


def write_config(path: Path, config: dict[str, Any]) -> str:
    """A 0600 JSON agent config (for configs agent_config() cannot express)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(config, handle, default=str)
    return str(path)


def read_metrics(
    metrics_dir: str | os.PathLike[str], database: str, job: str = "backup"
) -> dict[str, float]:
    path = Path(metrics_dir, "clinic_backup_%s.%s.prom" % (job, safe_name(database)))
    return metrics.read_previous(str(path)) if path.exists() else {}


# ---------------------------------------------------------------------- processes
def _stat(pid: int) -> list[str] | None:
    try:
        with open("/proc/%d/stat" % pid, encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    return [comm] + text.rpartition(")")[2].split()


def session_processes(sid: int) -> list[tuple[int, str, str]]:
    """(pid, comm, state) of every live process in session ``sid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        # fields: comm, state, ppid, pgrp, session, ...
        if fields and len(fields) > 4 and int(fields[4]) == sid and fields[1] != "Z":
            found.append((int(entry), fields[0], fields[1]))
    return found


def cmdline(pid: int) -> list[str]:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            return [part.decode("utf-8", "replace") for part in fh.read().split(b"\0") if part]
    except OSError:
        return []


def wait_for_child(
    proc: subprocess.Popen[bytes],
    comm: str,
    timeout: float = 60.0,
    argv_contains: str | None = None,
) -> int:
    """PID of the first process named ``comm`` in the agent's session (polled every ~2 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("agent exited (rc=%s) before %s started" % (proc.returncode, comm))
        for pid, name, _state in session_processes(proc.pid):
            if name == comm and (
                argv_contains is None or any(argv_contains in a for a in cmdline(pid))
            ):
                return pid
        time.sleep(0.002)
    raise TimeoutError("no %s process appeared within %ss" % (comm, timeout))


def written_bytes(pid: int) -> int | None:
    """Bytes the process handed to write() so far (/proc/PID/io wchar), None once gone."""
    try:
        with open("/proc/%d/io" % pid) as fh:
            for line in fh:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def freeze_mid_stream(
    pid: int, min_written: int, step: float = 0.003, timeout: float = 60.0
) -> int:
    """SIGSTOP ``pid`` at once, then let it run in few-ms slices until it wrote ``min_written``.

    Leaves the process stopped, mid-stream, and returns the bytes it wrote: a
    deterministic "in the middle of pg_dump" point without depending on timing.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        done = written_bytes(pid)
        if done is None or _stat(pid) is None or _stat(pid)[1] == "Z":
            raise AssertionError("process %d finished before it was frozen mid-stream" % pid)
        if done >= min_written:
            return done
        if time.monotonic() > deadline:
            raise TimeoutError("process %d wrote only %d bytes in %ss" % (pid, done, timeout))
        os.kill(pid, signal.SIGCONT)
        time.sleep(step)
        os.kill(pid, signal.SIGSTOP)


def kill_session(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal the agent's whole process group (agent, pg_dump, zstd, gpg) and reap it."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    if sig == signal.SIGKILL:
        proc.wait(timeout=30)


def marked_gpg_agents() -> dict[int, str]:
    """gpg-agent daemons left by this suite's agents: pid -> homedir."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        fields = _stat(pid)
        if not fields or fields[0] != "gpg-agent" or fields[1] == "Z":
            continue
        try:
            with open("/proc/%d/environ" % pid, "rb") as fh:
                environ = fh.read()
        except OSError:
            continue
        if ("%s=%s" % (MARK_VAR, RUN_MARK)).encode() in environ.split(b"\0"):
            argv = cmdline(pid)
            home = argv[argv.index("--homedir") + 1] if "--homedir" in argv else ""
            found[pid] = home
    return found


def reap_marked_gpg_agents() -> int:
    """Stop the gpg-agents this suite's killed runs left behind (by pid) and remove their homes."""
    import shutil

    agents = marked_gpg_agents()
    for pid, home in agents.items():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if home.startswith("/tmp/clinic-backup-gnupg-"):
            shutil.rmtree(home, ignore_errors=True)
    return len(agents)


# ---------------------------------------------------------------------- repositories
def s3_client(endpoint_url: str, retries: int = 3) -> Any:
    """The engine's own client factory, straight to moto (not through the fault proxy)."""
    return s3util.make_client(
        region=DEFAULT_REGION,
        endpoint_url=endpoint_url,
        access_key=DUMMY_ACCESS_KEY,
        secret_key=DUMMY_SECRET_KEY,
        retries=retries,
    )


def s3_repository(endpoint_url: str, bucket: str, prefix: str) -> S3Repository:
    return S3Repository(s3_client(endpoint_url), bucket, prefix)


def local_repository(path: str | os.PathLike[str]) -> LocalRepository:
    return LocalRepository(str(path))


def newest_first(ids_in_creation_order: list[str]) -> list[str]:
    """The catalog's order for sets taken one after the other. Not sorted(ids): two sets
    started in the same second are ordered by start time, not by their random suffix."""
    return list(reversed(ids_in_creation_order))


def catalog_state(repo: Any) -> dict[str, list[str]]:
    """Ids the catalog lists, split by state (complete / corrupt)."""
    state: dict[str, list[str]] = {"complete": [], "other": []}
    for entry in catalog.list_catalog(repo):
        state["complete" if entry["state"] == "complete" else "other"].append(entry["id"])
    return state


def verify_ok(
    repo: Any, set_id: str, passphrase_file: Any, deep: bool = True
) -> tuple[bool, dict[str, Any]]:
    """Run verify_set without recording; (ok, outcome). Never raises for a broken set."""
    try:
        outcome = verify_set(
            repo,
            set_id=set_id,
            passphrase_file=str(passphrase_file),
            deep=deep,
            max_age_hours=0,
            size_tolerance_percent=0,
            record=False,
        )
    except Exception as exc:  # a set that cannot even be read is not ok
        return False, {"failures": [str(exc)]}
    return bool(outcome["ok"]), outcome


def s3_sets_without_manifest(client: Any, bucket: str, prefix: str) -> list[str]:
    """Set ids with objects under <prefix>/sets/<id>/ but no manifest (upload leftovers)."""
    keys = helpers.s3_keys(client, bucket, prefix.strip("/") + "/sets/")
    by_set: dict[str, set[str]] = {}
    for key in keys:
        parts = key.split("/")
        by_set.setdefault(parts[-2], set()).add(parts[-1])
    return sorted(s for s, names in by_set.items() if "manifest.json" not in names)


def leftovers(
    repo_dir: Any = None, client: Any = None, bucket: str | None = None, prefix: str = ""
) -> list[str]:
    """What a finished run must not leave: staging entries, open multipart uploads and
    manifest-less S3 sets."""
    found = []
    if repo_dir is not None:
        found += ["staging:%s" % n for n in helpers.staging_leftovers(repo_dir)]
    if client is not None and bucket:
        found += ["multipart:%s" % k for k in helpers.open_multipart_uploads(client, bucket)]
        found += ["s3-orphan-set:%s" % s for s in s3_sets_without_manifest(client, bucket, prefix)]
    return found


def tree_digest(
    root: str | os.PathLike[str], ignore: tuple[str, ...] = (".lock",)
) -> dict[str, str]:
    """relative path -> sha256 (or 'dir') of everything under ``root``."""
    import hashlib

    digest = {}
    base = Path(root)
    if not base.exists():
        return digest
    for path in sorted(base.rglob("*")):
        rel = str(path.relative_to(base))
        if path.name in ignore:
            continue
        if path.is_dir() and not path.is_symlink():
            digest[rel] = "dir"
        elif path.is_symlink():
            digest[rel] = "link:" + os.readlink(path)
        else:
            digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def stable_digest(
    root: str | os.PathLike[str], quiet: float = 0.1, timeout: float = 10.0
) -> dict[str, str]:
    """tree_digest() once it stopped changing for ``quiet`` seconds (buffers drained)."""
    deadline = time.monotonic() + timeout
    last = tree_digest(root)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = tree_digest(root)
        if now == last:
            return now
        last = now
    raise TimeoutError("%s kept changing for %ss" % (root, timeout))


def wait_globals_done(
    proc: subprocess.Popen[bytes], repo_dir: str | os.PathLike[str], timeout: float = 60.0
) -> None:
    """Wait until the run's globals artifact (streamed alongside the dump) is fully staged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        staged = list(Path(repo_dir, ".staging").glob("*/globals.sql*"))
        running = [n for _p, n, _s in session_processes(proc.pid) if n == "pg_dumpall"]
        if staged and staged[0].stat().st_size > 0 and not running:
            return
        time.sleep(0.01)
    raise TimeoutError("the globals artifact was not staged within %ss" % timeout)
