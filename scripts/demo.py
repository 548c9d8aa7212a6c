#!/usr/bin/env python
"""`make demo`: what a clinic's first week with clinic.backup looks like, in two
minutes, on this machine: back up a PostgreSQL database with the local inventory,
verify every copy, rehearse a restore (measuring RTO and RPO), show the status table
and write the compliance report. Then say how to go on.

Without DATABASE_URL a sample cluster with synthetic clinic data runs in .demo/cluster
and is LEFT RUNNING (the stop command is printed); the next `make demo` starts it again
if it was stopped. With DATABASE_URL that database is backed up instead. Everything the
demo keeps is under .demo/ (repository, passphrase, audit log, vars): the passphrase
there decrypts the demo's backups.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.testbed.ansible import make_collection_path  # noqa: E402
from tests.testbed.dataset import load_clinic_dataset  # noqa: E402
from tests.testbed.files import write_private  # noqa: E402
from tests.testbed.pg import PostgresCluster  # noqa: E402

DEMO = Path(os.environ.get("CLINIC_DEMO_DIR") or REPO_ROOT / ".demo")


def passphrase() -> Path:
    path = DEMO / "backup-passphrase"
    if not path.exists():  # keep it: it is the only key to the demo's earlier backups
        write_private(path, secrets.token_urlsafe(32) + "\n")
    return path


def run_playbook(name: str, extra_vars: Path, env: dict[str, str]) -> None:
    argv = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        "-i",
        str(REPO_ROOT / "inventories/local"),
        str(REPO_ROOT / "playbooks" / name),
        "-e",
        "@" + str(extra_vars),
    ]
    print("\n$ " + " ".join(argv), flush=True)
    subprocess.run(argv, env=env, check=True, cwd=REPO_ROOT)


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (size, unit)
        size /= 1024.0
    return "%.1f GiB" % size


def show_repository(repository: Path) -> None:
    """Each set with its files and their sizes (not every path of the tree)."""
    print("\nStored in %s:" % repository)
    for set_dir in sorted(
        (repository / "sets").iterdir() if (repository / "sets").is_dir() else []
    ):
        files = sorted(p for p in set_dir.iterdir() if p.is_file())
        total = sum(p.stat().st_size for p in files)
        print("  set %s  (%s)" % (set_dir.name, human(total)))
        for path in files:
            print("      %-40s %10s" % (path.name, human(path.stat().st_size)))


def sample_cluster() -> tuple[PostgresCluster, dict[str, object]]:
    """The demo's cluster in .demo/cluster: made and loaded on first use, started again
    (same data, same password) on the next runs."""
    cluster = PostgresCluster(home=DEMO / "cluster")
    fresh = not Path(cluster.data_dir, "PG_VERSION").exists()
    cluster.start()
    cluster.detach()  # it stays up for the operator to explore
    secret = DEMO / "clinic_user.password"
    if fresh or not secret.exists():
        print("Starting a sample PostgreSQL with synthetic clinic data in %s" % cluster.base)
        password = secrets.token_urlsafe(16)
        cluster.create_role("clinic_user", password)
        cluster.create_database("clinic_db", owner="clinic_user")
        load_clinic_dataset(cluster, "clinic_db", owner="clinic_user", scale=0.2)
        write_private(secret, password + "\n")
    else:
        print("Starting the sample PostgreSQL again from %s (its data kept)" % cluster.base)
        password = secret.read_text().strip()
    passfile = write_private(
        DEMO / "pgpass", "127.0.0.1:%d:*:clinic_user:%s\n" % (cluster.port, password)
    )
    return cluster, {
        "clinic_backup_login_port": cluster.port,
        "clinic_backup_passfile": str(passfile),
    }


def main() -> int:
    DEMO.mkdir(mode=0o700, exist_ok=True)
    repository = DEMO / "repository"
    env = dict(os.environ)
    env["ANSIBLE_COLLECTIONS_PATH"] = make_collection_path(str(DEMO))
    env["ANSIBLE_COLLECTIONS_SCAN_SYS_PATH"] = "False"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    vars_file = DEMO / "vars.json"
    demo_vars: dict[str, object] = {
        "clinic_backup_repository": str(repository),
        "clinic_backup_passphrase_file": str(passphrase()),
        "clinic_backup_audit_log": str(DEMO / "audit.log"),
        "clinic_backup_restore_test_log": str(DEMO / "restore-test.log"),
        "clinic_backup_report_dest": str(DEMO / "compliance-report.html"),
        # The sample cluster has no cron schedule: the report says so instead of assuming.
        "clinic_backup_report_cron_file": str(DEMO / "no-cron-here"),
    }
    cluster = None
    url = os.environ.get("DATABASE_URL")
    if url:
        print("Backing up DATABASE_URL (its password stays out of every command line)")
        # Empty values blank out the inventory's login settings (the playbook omits them).
        demo_vars.update(
            clinic_backup_database_url=url,
            clinic_backup_login_host="",
            clinic_backup_login_port="",
            clinic_backup_login_user="",
            clinic_backup_passfile="",
        )
        # The database name comes from the URL.
        demo_vars["clinic_backup_database"] = url.rsplit("/", 1)[-1].split("?")[0]
    else:
        cluster, login = sample_cluster()
        demo_vars.update(login)
        # Restores: the cluster's superuser over its private socket (no password).
        demo_vars.update(
            clinic_backup_restore_login_user=cluster.superuser,
            clinic_backup_restore_login_host=cluster.socket_dir,
            clinic_backup_restore_login_port=cluster.port,
        )
    write_private(
        vars_file, json.dumps({k: v for k, v in demo_vars.items() if v is not None}, indent=2)
    )

    step("1/5 Back up: pg_dump -> zstd -> gpg AES256 -> sha256 -> the repository, manifest last")
    run_playbook("backup.yml", vars_file, env)
    step("2/5 Verify every copy: decrypt, decompress and list the archive, check every sha256")
    run_playbook("verify.yml", vars_file, env)
    if cluster is not None:
        step("3/5 Rehearse a restore into a scratch database, measuring RTO and RPO")
        run_playbook("restore_test.yml", vars_file, env)
    else:
        step("3/5 Restore rehearsal skipped: DATABASE_URL names a server this demo does not own")
    step("4/5 Status at a glance")
    run_playbook("status.yml", vars_file, env)
    step("5/5 Compliance report (the backup guide's HIPAA checklist, proven from data)")
    run_playbook("compliance_report.yml", vars_file, env)
    show_repository(repository)
    print(
        "\nEmergency restore by hand (stock tools only):\n"
        "  gpg --batch --pinentry-mode loopback --passphrase-file %s"
        " --decrypt SET/clinic_db.dump.zst.gpg | zstd -d | pg_restore --list"
        % (DEMO / "backup-passphrase")
    )
    print("\nWhat next:")
    print("  - open %s in a browser (offline, self-contained)" % (DEMO / "compliance-report.html"))
    print("  - run any playbook on the same data:")
    print(
        "      %s/ansible-playbook -i inventories/local playbooks/dr_database_corruption.yml -e @%s"
        % (Path(sys.executable).parent, vars_file)
    )
    if cluster is not None:
        print(
            "  - the sample cluster is still running on 127.0.0.1:%d; stop it with:" % cluster.port
        )
        print("      %s" % " ".join(shlex.quote(a) for a in cluster.pg_ctl_argv("stop")))
        print("    `make demo` starts it again (same data); `rm -rf .demo` starts over.")
    print("  - your first real server: README, 'Your first real server'")
    return 0


def step(text: str) -> None:
    print("\n==> %s" % text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
