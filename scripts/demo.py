#!/usr/bin/env python
"""`make demo`: back up a PostgreSQL database on this machine with the
local inventory, verify it, and show what was stored where.

Without DATABASE_URL a throwaway cluster with the sample clinic data is
started (and stopped at the end); with DATABASE_URL that database is backed
up instead. Everything the demo keeps is under .demo/ (repository,
passphrase, vars): the passphrase there decrypts the demo's backups.
"""

from __future__ import annotations

import json
import os
import secrets
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


def show_repository(repository: Path) -> None:
    print("\nStored in %s:" % repository)
    for path in sorted(repository.rglob("*")):
        if path.is_file() and ".staging" not in path.parts and path.name != ".lock":
            print("  %10d  %s" % (path.stat().st_size, path.relative_to(repository)))


def main() -> int:
    DEMO.mkdir(mode=0o700, exist_ok=True)
    repository = DEMO / "repository"
    env = dict(os.environ)
    env["ANSIBLE_COLLECTIONS_PATH"] = make_collection_path(str(DEMO))
    env["ANSIBLE_COLLECTIONS_SCAN_SYS_PATH"] = "False"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    vars_file = DEMO / "vars.json"
    cluster = None
    try:
        demo_vars = {
            "clinic_backup_repository": str(repository),
            "clinic_backup_passphrase_file": str(passphrase()),
            "clinic_backup_audit_log": str(DEMO / "audit.log"),
        }
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
            print("No DATABASE_URL: starting a throwaway PostgreSQL with sample clinic data")
            cluster = PostgresCluster()
            cluster.start()
            password = secrets.token_urlsafe(16)
            cluster.create_role("clinic_user", password)
            cluster.create_database("clinic_db", owner="clinic_user")
            load_clinic_dataset(cluster, "clinic_db", owner="clinic_user", scale=0.2)
            passfile = write_private(
                DEMO / "pgpass", "127.0.0.1:%d:*:clinic_user:%s\n" % (cluster.port, password)
            )
            demo_vars.update(
                clinic_backup_login_port=cluster.port, clinic_backup_passfile=str(passfile)
            )
        write_private(
            vars_file, json.dumps({k: v for k, v in demo_vars.items() if v is not None}, indent=2)
        )
        run_playbook("backup.yml", vars_file, env)
        run_playbook("verify.yml", vars_file, env)
        show_repository(repository)
        print(
            "\nEmergency restore by hand (stock tools only):\n"
            "  gpg --batch --pinentry-mode loopback --passphrase-file %s"
            " --decrypt SET/clinic_db.dump.zst.gpg | zstd -d | pg_restore --list"
            % (DEMO / "backup-passphrase")
        )
    finally:
        if cluster is not None:
            cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
