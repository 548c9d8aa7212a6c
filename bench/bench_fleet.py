#!/usr/bin/env python
"""Benchmark: playbooks/backup.yml over a fleet of database hosts against one host.

Starts --hosts Debian 12 database hosts (tests/testbed/hosts.py: rootful podman, an
internal network, ssh; the images are built once and cached), loads the same clinic
database into each (molecule/shared/files/clinic.sql, --rows-scale times over), then
times `ansible-playbook playbooks/backup.yml` (an encrypted set with globals and row
counts, then its verification, per host) over:

  one        the first host alone (the baseline, measured in the same run)
  fleet-fN   every host with --forks N for each N of --forks (Ansible's default is 5;
             forks >= hosts runs them all at once)

Each run is preceded by an untimed warm-up on one host; --repeat rounds, median kept.
The goal on 2 cores: the whole fleet within 3x the one host (parallel, not serial).
Prints a table of wall times and ratios against `one`; --json writes them.

Usage: python bench/bench_fleet.py [--hosts 20] [--forks 5,20] [--repeat 2] [--json out.json]
Needs what tests/hosts needs (root, podman, mmdebstrap); `make bench-fleet`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from testbed.ansible import ansible_env, make_collection_path  # noqa: E402
from testbed.files import write_private  # noqa: E402
from testbed.hosts import DATABASE_IMAGE, Host, HostNetwork, podman, prepare_images  # noqa: E402

CLINIC_SQL = REPO / "molecule" / "shared" / "files" / "clinic.sql"
PASSPHRASE_FILE = "/etc/clinic-backup/passphrase"
GOAL_RATIO = 3.0


def log(message: str) -> None:
    print(f"bench_fleet: {message}", file=sys.stderr, flush=True)


def prepare_host(host: Host, password: str, passphrase: str, scale: int) -> None:
    """The clinic's database on one host: cluster started, clinic_db loaded, secrets 0600."""
    host.exec(["pg_ctlcluster", "15", "main", "start"])
    psql = ["runuser", "-u", "postgres", "--", "psql", "-v", "ON_ERROR_STOP=1", "-q"]
    host.exec(
        [*psql, "-d", "postgres", "-f", "-"],
        input_text=(
            f"CREATE ROLE clinic_user LOGIN PASSWORD '{password}';\n"
            "CREATE DATABASE clinic_db OWNER clinic_user;\n"
        ),
    )
    host.exec([*psql, "-d", "clinic_db", "-f", "-"], input_text=CLINIC_SQL.read_text())
    for _copy in range(scale - 1):
        # More rows of the same shape (the data is the same on every host).
        host.exec(
            [*psql, "-d", "clinic_db", "-f", "-"],
            input_text=(
                "INSERT INTO medical_records (patient_id, body) SELECT patient_id, body"
                " FROM medical_records ORDER BY id LIMIT 3000;\n"
                "INSERT INTO appointments (patient_id, starts_at, room) SELECT patient_id,"
                " starts_at, room FROM appointments ORDER BY id LIMIT 5000;\n"
            ),
        )
    # The backup disk (the repository's parent), as roles/backup_agent makes it.
    host.exec(["install", "-d", "-m", "0700", "/etc/clinic-backup", "/var/backups/clinic"])
    for path, content in (
        ("/root/.pgpass", f"127.0.0.1:5432:*:clinic_user:{password}\n"),
        (PASSPHRASE_FILE, passphrase + "\n"),
    ):
        host.exec(["sh", "-c", 'umask 077 && cat > "$1"', "sh", path], input_text=content)


def write_inventory(network: HostNetwork, path: Path) -> Path:
    doc = {
        "all": {
            "hosts": {name: {"ansible_host": h.ip} for name, h in network.hosts.items()},
            "children": {"clinic_db_servers": {"hosts": dict.fromkeys(network.hosts)}},
            "vars": {
                "ansible_connection": "ssh",
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(network.key_file),
                "ansible_ssh_common_args": (
                    "-F /dev/null -o UserKnownHostsFile=/dev/null "
                    "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=no "
                    "-o IdentitiesOnly=yes -o LogLevel=ERROR "
                    "-o ControlMaster=auto -o ControlPersist=120s"
                ),
                "ansible_ssh_pipelining": True,
                "ansible_python_interpreter": "/usr/bin/python3",
                "clinic_backup_database": "clinic_db",
                "clinic_backup_login_host": "127.0.0.1",
                "clinic_backup_login_user": "clinic_user",
                "clinic_backup_passfile": "/root/.pgpass",
                "clinic_backup_passphrase_file": PASSPHRASE_FILE,
                "clinic_backup_repository": "/var/backups/clinic/db",
                "clinic_backup_s3_targets": [],
                "clinic_backup_audit_log": "/var/log/clinic-backup/audit.log",
            },
        }
    }
    write_private(path, yaml.safe_dump(doc, sort_keys=False))
    return path


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """CPU time the whole machine spent busy so far (/proc/stat: every process, the
    controller's and the hosts' alike)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


def host_cgroup_paths(network: HostNetwork) -> list[Path]:
    """Each host's cpuacct.usage (cgroup v1) or cpu.stat (v2) file, where it is found."""
    paths = []
    for host in network.hosts.values():
        cgroup = podman(["inspect", "--format", "{{.State.CgroupPath}}", host.container])
        relative = cgroup.stdout.decode().strip().lstrip("/")
        for candidate in (
            Path("/sys/fs/cgroup/cpuacct", relative, "cpuacct.usage"),
            Path("/sys/fs/cgroup", relative, "cpu.stat"),
        ):
            if relative and candidate.exists():
                paths.append(candidate)
                break
    return paths


def hosts_cpu_seconds(paths: list[Path]) -> float:
    """CPU time spent inside the hosts (their containers' cgroups) so far."""
    total = 0.0
    for path in paths:
        text = path.read_text()
        if path.name == "cpuacct.usage":
            total += int(text) / 1e9
        else:
            usage = dict(line.split() for line in text.splitlines())
            total += int(usage["usage_usec"]) / 1e6
    return total


def run_backup(env: dict[str, str], inventory: Path, limit: str, forks: int) -> float:
    argv = [
        "ansible-playbook",
        "-i",
        str(inventory),
        "--limit",
        limit,
        "--forks",
        str(forks),
        str(REPO / "playbooks" / "backup.yml"),
    ]
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--forks", default="5,20", help="comma-separated fork counts (5 = default)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rows-scale", type=int, default=1, help="the dataset this many times")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    forks = [int(f) for f in args.forks.split(",") if f]

    prepare_images([DATABASE_IMAGE])
    work = Path(tempfile.mkdtemp(prefix="clinic-bench-fleet-"))
    password = secrets.token_urlsafe(18)
    passphrase = secrets.token_urlsafe(36)
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[tuple[float, float]]] = {}
    with HostNetwork(work, progress=log) as network:
        started = time.monotonic()
        names = [f"db{i:02d}" for i in range(1, args.hosts + 1)]
        for name in names:
            prepare_host(network.start(name, DATABASE_IMAGE), password, passphrase, args.rows_scale)
        log(f"{args.hosts} hosts started and loaded in {time.monotonic() - started:.0f}s")
        inventory = write_inventory(network, work / "inventory.yml")
        env = ansible_env(make_collection_path(work / "collections"))
        env.pop("ANSIBLE_REMOTE_TEMP", None)
        env.pop("ANSIBLE_PYTHON_INTERPRETER", None)
        env["ANSIBLE_FORKS"] = "5"
        modes = [("one", names[0], 5)] + [(f"fleet-f{f}", "all", f) for f in forks]
        cgroups = host_cgroup_paths(network)
        if len(cgroups) != len(network.hosts):
            log("the hosts' cgroups are not all readable: CPU inside the hosts is not split out")
            cgroups = []
        log("warm-up (untimed): one host")
        run_backup(env, inventory, names[0], 5)
        for round_no in range(args.repeat):
            order = modes[round_no % len(modes) :] + modes[: round_no % len(modes)]
            for mode, limit, fork_count in order:
                machine, inside = machine_cpu_seconds(), hosts_cpu_seconds(cgroups)
                seconds = run_backup(env, inventory, limit, fork_count)
                cpu.setdefault(mode, []).append(
                    (machine_cpu_seconds() - machine, hosts_cpu_seconds(cgroups) - inside)
                )
                results.setdefault(mode, []).append(seconds)
                log(f"round {round_no + 1}: {mode} {seconds:.1f}s, {cpu[mode][-1][0]:.1f} CPU-s")
    baseline = statistics.median(results["one"])
    cores = os.cpu_count() or 1
    rows = []
    print(
        f"\nplaybooks/backup.yml, {args.hosts} hosts, {cores} cores, median of {args.repeat}, "
        f"loadavg {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'mode':<12} {'hosts':>5} {'forks':>5} {'sec':>8} {'x one':>7} {'CPU-s':>7} "
        f"{'in hosts':>8} {'floor s':>8} {'sec/floor':>9}"
    )
    for mode, _limit, fork_count in modes:
        seconds = statistics.median(results[mode])
        machine = statistics.median(c[0] for c in cpu[mode])
        inside = statistics.median(c[1] for c in cpu[mode]) if cgroups else None
        hosts = 1 if mode == "one" else args.hosts
        ratio = seconds / baseline
        # The least wall time this CPU work can take on this machine's cores: a run
        # close to it is as parallel as the machine allows.
        floor = machine / cores
        rows.append(
            {
                "mode": mode, "hosts": hosts, "forks": fork_count, "seconds": seconds,
                "ratio": ratio, "cpu_seconds": machine, "cpu_seconds_in_hosts": inside,
                "cpu_floor_seconds": floor,
            }
        )  # fmt: skip
        print(
            f"{mode:<12} {hosts:>5} {fork_count:>5} {seconds:>8.1f} {ratio:>7.2f} {machine:>7.1f} "
            f"{inside if inside is not None else float('nan'):>8.1f} {floor:>8.1f} "
            f"{seconds / floor:>9.2f}"
        )
    best = min((r for r in rows if r["mode"] != "one"), key=lambda r: r["ratio"])
    verdict = "met" if best["ratio"] <= GOAL_RATIO else "NOT met"
    print(
        f"goal: {args.hosts} hosts <= {GOAL_RATIO:.0f}x one host: {verdict} "
        f"(best {best['ratio']:.2f}x)"
    )
    one = rows[0]
    print(
        f"CPU bound: one host's run costs {one['cpu_seconds']:.1f} CPU-s, so {args.hosts} hosts "
        f"on {cores} cores need at least {args.hosts * one['cpu_seconds'] / cores:.1f} s "
        f"({args.hosts * one['cpu_seconds'] / cores / baseline:.2f}x one host) however "
        f"parallel the run"
    )
    if cgroups:
        controller = best["cpu_seconds"] - best["cpu_seconds_in_hosts"]
        # An estimate, not a measurement: with every host on cores of its own, only the
        # controller's CPU is shared; the run takes at least one host's time.
        alone = max(baseline, controller / cores)
        print(
            f"{best['mode']}: {best['cpu_seconds_in_hosts']:.1f} CPU-s inside the hosts, "
            f"{controller:.1f} on the controller ({controller / args.hosts:.2f} per host). "
            f"Estimate with each host on cores of its own (only the controller shared): "
            f"{alone:.1f} s, {alone / baseline:.2f}x one host"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "runs": results, "cpu": cpu}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
