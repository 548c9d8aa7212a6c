"""Fault 7: secrets must not leak while a backup runs or afterwards.

Two secrets: the DB password of clinic_user and the encryption passphrase. While a run is
in progress a sampler thread reads ``/proc/*/cmdline`` of every process every few ms (and
``/proc/*/environ`` for the passphrase, which must never travel in an environment; the DB
password does reach pg_dump's environment as PGPASSWORD, by design, so environments are
not searched for it). Afterwards the agent's stdout/stderr, the manifest and every other
file in the repository, the S3 objects and the Prometheus metrics are searched, and for
Ansible the full ``ansible-playbook -vvv`` output: stdout/stderr (connection debug, EXEC
lines) plus every task result the test bed's callback recorded (with -vvv these include
``invocation.module_args``, which the default callback would print).

* agent: the password only inside ``database_url`` (successful run + failing URLs)
* ansible-playbook -vvv: ``login_password`` and ``database_url`` from extra vars, a verify,
  and a failing task
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from testbed.ansible import run_playbook

from . import faultlib
from .faultlib import helpers


class ProcSampler(threading.Thread):
    """Reads every process's cmdline (and environ) in a loop; records where secrets show up."""

    def __init__(
        self,
        cmdline_secrets: dict[str, bytes],
        environ_secrets: dict[str, bytes],
        interval: float = 0.002,
    ) -> None:
        super().__init__(daemon=True)
        self.cmdline_secrets = cmdline_secrets
        self.environ_secrets = environ_secrets
        self.interval = interval
        self.hits: list[tuple[str, int, str, str]] = []
        self.seen: set[str] = set()
        self.sweeps = 0
        self._halt = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.is_set():
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) == me:
                    continue
                self._check(int(entry))
            self.sweeps += 1
            time.sleep(self.interval)

    def _check(self, pid: int) -> None:
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as fh:
                argv = fh.read()
        except OSError:
            return
        if not argv:
            return
        name = os.path.basename(argv.split(b"\0", 1)[0]).decode("utf-8", "replace")
        self.seen.add(name)
        for label, secret in self.cmdline_secrets.items():
            if secret in argv:
                self.hits.append(("cmdline", pid, name, label))
        try:
            with open("/proc/%d/environ" % pid, "rb") as fh:
                environ = fh.read()
        except OSError:
            return
        for label, secret in self.environ_secrets.items():
            if secret in environ:
                self.hits.append(("environ", pid, name, label))

    def stop(self) -> ProcSampler:
        self._halt.set()
        self.join(timeout=10)
        return self


def _secrets(pg: Any, passphrase_file: Path) -> dict[str, bytes]:
    return {
        "DB password": pg.clinic_password.encode(),
        "passphrase": passphrase_file.read_bytes().rstrip(b"\r\n"),
    }


def _search(places: dict[str, bytes], secrets: dict[str, bytes]) -> list[str]:
    return [
        "%s in %s" % (label, place)
        for place, data in places.items()
        for label, secret in secrets.items()
        if secret in data
    ]


def _files(root: Path, label: str) -> dict[str, bytes]:
    return {
        "%s:%s" % (label, p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _s3_objects(client: Any, bucket: str) -> dict[str, bytes]:
    found = {}
    for key in helpers.s3_keys(client, bucket):
        obj = client.get_object(Bucket=bucket, Key=key)
        found["s3:" + key] = obj["Body"].read() + json.dumps(obj.get("Metadata", {})).encode()
    return found


def test_agent_with_database_url_leaks_no_secret(
    pg,
    faults_db,
    s3,
    fresh_bucket,
    direct_s3,
    collections_path,
    passphrase_file,
    repo_dir,
    tmp_path,
    summary_row,
):
    row = summary_row("secrets: agent, password in database_url")
    secrets = _secrets(pg, passphrase_file)
    metrics_dir = tmp_path / "metrics"
    base = {
        "passphrase_file": str(passphrase_file),
        "repository": str(repo_dir),
        "stale_seconds": 0,
        "s3_targets": [{"bucket": fresh_bucket, "prefix": "sec", "endpoint_url": s3.endpoint_url}],
    }
    good_url = pg.url(pg.clinic_user, pg.clinic_password, faults_db)
    runs = {
        "backup": good_url,
        "missing database": pg.url(pg.clinic_user, pg.clinic_password, "no_such_db"),
        "wrong user": pg.url("nobody_here", pg.clinic_password, faults_db),
        "invalid port": good_url.replace(":%d/" % pg.port, ":99999/"),
    }
    leaks: list[str] = []
    outputs: dict[str, bytes] = {}
    sampler = ProcSampler(secrets, {"passphrase": secrets["passphrase"]})
    sampler.start()
    try:
        results = {}
        for label, url in runs.items():
            config = faultlib.write_config(
                tmp_path / ("%s.json" % label.replace(" ", "-")), dict(base, database_url=url)
            )
            results[label] = faultlib.run_agent(
                collections_path, config, env=s3.env(), metrics_dir=metrics_dir
            )
            outputs["agent stdout (%s)" % label] = results[label].stdout.encode()
            outputs["agent stderr (%s)" % label] = results[label].stderr.encode()
            row.run()
    finally:
        sampler.stop()
    leaks += [
        "%s in %s of %s (pid %d)" % (label, where, name, pid)
        for where, pid, name, label in sampler.hits
    ]
    outputs.update(_files(repo_dir, "repository"))
    outputs.update(_files(metrics_dir, "metrics"))
    outputs.update(_s3_objects(direct_s3, fresh_bucket))
    leaks += _search(outputs, secrets)
    row.add("secrets_leaked", len(leaks))
    row.note(
        "%d /proc sweeps; processes seen include %s"
        % (
            sampler.sweeps,
            sorted(sampler.seen & {"pg_dump", "pg_dumpall", "gpg", "zstd", "gpg-agent"}),
        )
    )

    backup = results["backup"]
    assert backup.rc == 0, backup.text()
    set_ok = faultlib.verify_ok(
        faultlib.local_repository(repo_dir), backup.doc["set_id"], passphrase_file
    )[0]
    row.reported(backup.reported_ok, set_ok)
    assert set_ok
    for label in ("missing database", "wrong user", "invalid port"):
        assert results[label].rc in (1, 2), results[label].text()
    assert {"pg_dump", "gpg", "zstd"} <= sampler.seen, (
        "the sampler never saw the pipeline: %s" % sampler.seen
    )
    assert any(h for h in helpers.local_sets(repo_dir)), "nothing was backed up"
    assert not leaks, leaks


def test_ansible_vvv_leaks_no_secret(
    pg,
    faults_db,
    collections_path,
    ansible_environ,
    passphrase_file,
    repo_dir,
    tmp_path,
    summary_row,
):
    row = summary_row("secrets: ansible-playbook -vvv")
    secrets = _secrets(pg, passphrase_file)
    connection = {"login_host": pg.host, "login_port": pg.port, "login_user": pg.clinic_user}
    tasks = [
        {
            "name": "backup with login_password",
            "clinic.backup.pg_dump": dict(
                connection,
                database=faults_db,
                login_password="{{ db_password }}",
                passphrase_file=str(passphrase_file),
                repository=str(repo_dir),
            ),
        },
        {
            "name": "backup with database_url",
            "clinic.backup.pg_dump": {
                "database_url": "{{ db_url }}",
                "passphrase_file": str(passphrase_file),
                "repository": str(repo_dir),
            },
        },
        {
            "name": "verify",
            "clinic.backup.backup_verify": {
                "repository": str(repo_dir),
                "passphrase_file": str(passphrase_file),
            },
        },
        {
            "name": "failing backup",
            "ignore_errors": True,
            "clinic.backup.pg_dump": dict(
                connection,
                database="no_such_db",
                login_password="{{ db_password }}",
                passphrase_file=str(passphrase_file),
                repository=str(repo_dir),
            ),
        },
    ]
    playbook = tmp_path / "secrets.yml"
    playbook.write_text(
        json.dumps([{"name": "secrets", "hosts": "all", "gather_facts": False, "tasks": tasks}])
    )
    sampler = ProcSampler(secrets, {"passphrase": secrets["passphrase"]})
    sampler.start()
    try:
        run = run_playbook(
            playbook,
            ansible_environ,
            verbosity=3,
            extra_vars={
                "db_password": pg.clinic_password,
                "db_url": pg.url(pg.clinic_user, pg.clinic_password, faults_db),
            },
        )
    finally:
        sampler.stop()
    row.run()
    leaks = [
        "%s in %s of %s (pid %d)" % (label, where, name, pid)
        for where, pid, name, label in sampler.hits
    ]
    places = {
        "ansible stdout": run.stdout.encode(),
        "ansible stderr": run.stderr.encode(),
        "task results": json.dumps(run.results).encode(),
    }
    places.update(_files(repo_dir, "repository"))
    leaks += _search(places, secrets)
    row.add("secrets_leaked", len(leaks))
    row.note(
        "-vvv output: %d bytes; %d /proc sweeps"
        % (len(run.stdout) + len(run.stderr), sampler.sweeps)
    )

    for name in ("backup with login_password", "backup with database_url", "verify"):
        assert run.result(name)["_status"] in ("ok", "changed"), run.output()
    set_id = run.result("backup with database_url")["set_id"]
    set_ok = run.result("verify")["ok"] and run.result("verify")["set_id"] == set_id
    row.reported(True, set_ok)
    assert run.result("failing backup")["_status"] in ("failed", "ignored")
    # The test bed's stdout callback keeps each task result (with -vvv: including
    # invocation.module_args, what the default callback prints) in run.results.
    assert "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER" in places["task results"].decode(), (
        "no module_args recorded?"
    )
    assert "EXEC" in run.stdout, "-vvv connection debug output missing"
    assert {"pg_dump", "gpg"} <= sampler.seen, sampler.seen
    assert not leaks, leaks
