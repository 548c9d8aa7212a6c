"""Smoke test of the test hosts: images, isolation, and Ansible over ssh.

Slow the first time on a machine (the images are built, a minute or two each), a few
seconds afterwards. Skipped, with the reason, where podman cannot run containers.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from testbed.ansible import run_playbook
from testbed.hosts import FORWARDING_SYSCTLS, podman

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Fixed programs handed to python3 as one argv element each (no shell involved).
CONNECT = """
import socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
started = time.monotonic()
try:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        print("connected", sock.recv(64).decode("ascii", "replace").strip())
except OSError as exc:
    print("failed", exc.errno, type(exc).__name__, exc)
print("%.3f" % (time.monotonic() - started))
"""

PROCESS_NAMES = """
import glob
for path in glob.glob("/proc/[0-9]*/comm"):
    try:
        print(open(path).read().strip())
    except OSError:
        pass
"""

RESOLVE = """
import socket, sys, time
started = time.monotonic()
try:
    print("resolved", socket.getaddrinfo(sys.argv[1], 443)[0][4][0])
except OSError as exc:
    print("failed", type(exc).__name__)
print("%.3f" % (time.monotonic() - started))
"""

# Public addresses a host would use if it had any route out: DNS and HTTPS.
PUBLIC = [("1.1.1.1", 443), ("8.8.8.8", 53), ("151.101.2.132", 80)]


def _connect(host, address: str, port: int, timeout: float = 5.0) -> tuple[str, float]:
    out = host.exec(["python3", "-c", CONNECT, address, str(port), str(timeout)]).stdout
    lines = out.strip().splitlines()
    return lines[0], float(lines[-1])


def _both(clinic_hosts):
    return [clinic_hosts.database, clinic_hosts.bare]


def test_python3_runs_in_both(clinic_hosts):
    for host in _both(clinic_hosts):
        out = host.exec(["python3", "-c", "import sys; print(sys.version_info[:2])"]).stdout
        assert out.strip() == "(3, 11)", (host.name, out)
        assert host.exec(["cat", "/etc/debian_version"]).stdout.startswith("12.")
        assert host.exec(["hostname"]).stdout.strip() == host.name


def test_postgresql_only_on_database_host(clinic_hosts):
    db, bare = clinic_hosts.database, clinic_hosts.bare
    for tool in ("pg_ctl", "postgres", "pg_dump", "pg_restore", "initdb"):
        db.exec(["test", "-x", f"/usr/lib/postgresql/15/bin/{tool}"])
    version = db.exec(["/usr/lib/postgresql/15/bin/postgres", "--version"]).stdout
    assert "PostgreSQL) 15." in version
    # What roles/backup_agent installs is already there (the hosts have no mirror).
    db.exec(["dpkg-query", "-W", "gnupg", "zstd", "gzip", "postgresql-client", "cron"])
    db.exec(["python3", "-c", "import psycopg2, boto3, apt"])

    assert bare.exec(["test", "-e", "/usr/lib/postgresql"], check=False).rc != 0
    for tool in ("psql", "pg_dump", "pg_ctlcluster"):
        assert bare.exec(["which", tool], check=False).rc != 0, tool
    assert bare.exec(["dpkg-query", "-W", "postgresql-15"], check=False).rc != 0
    bare.exec(["dpkg-query", "-W", "python3", "cron"])


def test_services_run(clinic_hosts):
    for host in _both(clinic_hosts):
        names = host.exec(["python3", "-c", PROCESS_NAMES]).stdout.split()
        assert "cron" in names and "sshd" in names, (host.name, names)


def test_hosts_reach_each_other(clinic_hosts):
    db, bare = clinic_hosts.database, clinic_hosts.bare
    for source, target in ((db, bare), (bare, db)):
        outcome, _seconds = _connect(source, target.ip, 22)
        assert outcome.startswith("connected SSH-2.0-OpenSSH"), (source.name, target.ip, outcome)


def test_no_route_out(clinic_hosts):
    network = json.loads(podman(["network", "inspect", clinic_hosts.network.name]).stdout)[0]
    assert network["internal"] is True
    assert network["dns_enabled"] is False
    for host in _both(clinic_hosts):
        routes = host.exec(["cat", "/proc/net/route"]).stdout.splitlines()[1:]
        assert routes, host.name
        assert all(line.split()[1] != "00000000" for line in routes), (host.name, routes)
        resolv = host.exec(["cat", "/etc/resolv.conf"]).stdout
        assert [line for line in resolv.splitlines() if line.startswith("nameserver")] == [
            "nameserver 127.0.0.1"
        ], (host.name, resolv)
        lookup = host.exec(["python3", "-c", RESOLVE, "deb.debian.org"]).stdout.split()
        assert lookup[0] == "failed" and float(lookup[-1]) < 2.0, (host.name, lookup)
        for address, port in PUBLIC:
            outcome, seconds = _connect(host, address, port)
            assert outcome.startswith(f"failed {errno.ENETUNREACH} "), (host.name, address, outcome)
            assert seconds < 1.0, (host.name, address, seconds)


def test_ip_forwarding_left_as_it_was(clinic_hosts):
    before = clinic_hosts.network.forwarding_before
    assert before, "no forwarding sysctl could be read"
    for path in FORWARDING_SYSCTLS:
        if path in before:
            assert path.read_text().strip() == before[path], path


def test_exec_refuses_a_shell_string(clinic_hosts):
    with pytest.raises(TypeError):
        clinic_hosts.bare.exec("echo hi")


def test_ansible_reaches_both_hosts(clinic_hosts, ansible_environ, tmp_path: Path):
    playbook = tmp_path / "smoke.yml"
    playbook.write_text(
        json.dumps(
            [
                {
                    "name": "Smoke test of the test hosts",
                    "hosts": "all",
                    "gather_facts": True,
                    "gather_subset": ["!all", "min"],
                    "tasks": [
                        {"name": "ping", "ansible.builtin.ping": {}},
                        {
                            "name": "hostname",
                            "ansible.builtin.command": {"argv": ["cat", "/etc/hostname"]},
                            "changed_when": False,
                        },
                        {
                            "name": "postgresql",
                            "ansible.builtin.stat": {"path": "/usr/lib/postgresql/15/bin/pg_ctl"},
                        },
                    ],
                }
            ]
        )
    )
    result = run_playbook(
        playbook, ansible_environ, inventory=str(clinic_hosts.inventory), timeout=300
    ).assert_ok()
    by_host = {r["_host"]: r for r in result.task_results("ping")}
    assert sorted(by_host) == ["app1", "db1"]
    assert all(r["ping"] == "pong" for r in by_host.values())
    for r in result.task_results("hostname"):
        assert r["stdout"] == r["_host"], r
    stats = {r["_host"]: r["stat"]["exists"] for r in result.task_results("postgresql")}
    assert stats == {"db1": True, "app1": False}
    assert result.stats["db1"]["unreachable"] == 0 and result.stats["app1"]["unreachable"] == 0
