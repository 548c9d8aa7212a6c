"""Tests of the test bed itself: real PostgreSQL, moto, ansible-playbook; no mocks."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from testbed.ansible import REPO_ROOT, ansible_env, run_module, run_playbook
from testbed.dataset import (
    AWKWARD_TABLES,
    BASE_ROWS,
    FAKE_SECRETS,
    load_clinic_dataset,
    make_config_files,
    make_uploads,
    table_fingerprints,
)
from testbed.netutil import free_port, pid_alive, pid_exists
from testbed.pg import PostgresCluster, PostgresError, quote_literal
from testbed.s3 import MotoS3Server

pytestmark = pytest.mark.integration


def _psql_tcp(
    pg: PostgresCluster, env_extra: dict[str, str], sql: str
) -> subprocess.CompletedProcess[str]:
    """psql over TCP with libpq variables only (how the modules will connect)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(env_extra)
    return subprocess.run(
        [str(pg.bin_dir / "psql"), "-X", "-A", "-t", "-w", "-c", sql],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


# ---------------------------------------------------------------------------- netutil
def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# ---------------------------------------------------------------------------- pg
def test_pg_fixture_is_ready(pg: PostgresCluster) -> None:
    assert pg.host == "127.0.0.1"
    assert 150000 <= pg.server_version_num < 1000000
    assert Path(pg.socket_dir, f".s.PGSQL.{pg.port}").exists()
    assert pg.psql("SHOW listen_addresses;") == "127.0.0.1"
    assert pg.psql("SHOW wal_level;") == "replica"
    assert pg.psql("SHOW archive_mode;") == "off"
    owner = pg.psql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'clinic_db';")
    assert owner == "clinic_user"
    pid = pg.postmaster_pid()
    assert pid is not None
    if os.geteuid() == 0:
        assert _proc_uid(pid) != 0, "postgres must not run as root"


def test_pg_tcp_auth(pg: PostgresCluster) -> None:
    assert pg.clinic_password
    ok = _psql_tcp(
        pg, pg.libpq_env(pg.clinic_user, pg.clinic_db, pg.clinic_password), "SELECT current_user"
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "clinic_user"
    # scram-sha-256 is enforced for non-superusers over TCP ...
    bad = _psql_tcp(pg, pg.libpq_env(pg.clinic_user, pg.clinic_db, "wrong"), "SELECT 1")
    assert bad.returncode != 0
    assert "password authentication failed" in bad.stderr
    # ... while the superuser gets trust on 127.0.0.1.
    su = _psql_tcp(pg, pg.libpq_env(), "SELECT current_user")
    assert su.stdout.strip() == "postgres"


def test_pg_url_with_awkward_password(pg: PostgresCluster, scratch_db: str) -> None:
    import psycopg2

    password = "p@ss:w/rd?#%' \"x"
    pg.create_role("url_user", password)
    try:
        url = pg.url("url_user", password, scratch_db)
        assert password not in url
        conn = psycopg2.connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT current_user, current_database()")
                assert cur.fetchone() == ("url_user", scratch_db)
        finally:
            conn.close()
    finally:
        pg.psql("DROP ROLE url_user;")


def test_pg_psql_raises_with_stderr(pg: PostgresCluster) -> None:
    with pytest.raises(PostgresError, match="no_such_table"):
        pg.psql("SELECT * FROM no_such_table;")
    # ON_ERROR_STOP: nothing after the failing statement runs.
    with pytest.raises(PostgresError):
        pg.psql("SELECT 1/0; CREATE TABLE must_not_exist (a int);", dbname="clinic_db")
    assert pg.psql("SELECT to_regclass('must_not_exist') IS NULL;", dbname="clinic_db") == "t"


def test_pg_database_with_odd_name(pg: PostgresCluster) -> None:
    name = "odd name=x 'q'"
    pg.create_database(name, owner="clinic_user")
    try:
        assert pg.psql("SELECT current_database();", dbname=name) == name
    finally:
        pg.drop_database(name)
    pg.drop_database(name)  # IF EXISTS: idempotent
    assert (
        pg.psql(f"SELECT count(*) FROM pg_database WHERE datname = {quote_literal(name)};") == "0"
    )


@pytest.mark.faults
def test_cluster_lifecycle_kill_and_restart(tmp_path: Path) -> None:
    with PostgresCluster(base_dir=tmp_path, settings={"work_mem": "7MB"}) as cluster:
        assert Path(cluster.data_dir).is_relative_to(tmp_path)
        assert cluster.psql("SHOW work_mem;") == "7MB"
        cluster.psql("CREATE TABLE t (a int); INSERT INTO t VALUES (1), (2);")
        first = cluster.postmaster_pid()
        cluster.kill()
        assert not cluster.is_running()
        assert first is not None and not pid_exists(first)
        cluster.start()  # crash recovery; committed rows survive
        assert cluster.psql("SELECT sum(a) FROM t;") == "3"
        assert "not properly shut down" in Path(cluster.log_file).read_text()
        cluster.restart()
        assert cluster.psql("SELECT count(*) FROM t;") == "2"
        cluster.configure({"work_mem": "9MB"})
        cluster.restart()
        assert cluster.psql("SHOW work_mem;") == "9MB"
        last = cluster.postmaster_pid()
        cluster.stop()
        cluster.stop()  # idempotent
        assert last is not None and not pid_alive(last)
        assert not cluster.is_running()
        base = cluster.base
    assert not base.exists()


def test_cluster_start_failure_reports_log() -> None:
    cluster = PostgresCluster(settings={"shared_buffers": "not-a-size"})
    try:
        with pytest.raises(PostgresError) as info:
            cluster.start()
        assert "shared_buffers" in str(info.value)
        assert not cluster.is_running()
    finally:
        cluster.destroy()


# ---------------------------------------------------------------------------- dataset
def test_dataset_in_fixture(
    pg: PostgresCluster, pg_fingerprints: dict[str, dict[str, object]]
) -> None:
    expected = {t: round(n * 0.2) for t, n in BASE_ROWS.items()}
    assert {t: fp["rows"] for t, fp in pg_fingerprints.items()} == expected
    owners = pg.psql(
        "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class "
        "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'v', 'S');",
        dbname="clinic_db",
    )
    assert owners == "clinic_user"
    kinds = pg.psql(
        "SELECT relkind::text || ':' || relname FROM pg_class WHERE relnamespace = "
        "'public'::regnamespace AND relkind IN ('v', 'S') ORDER BY 1;",
        dbname="clinic_db",
    ).splitlines()
    assert "v:patient_summary" in kinds
    assert "S:invoice_number_seq" in kinds
    orphans = pg.psql(
        "SELECT count(*) FROM medical_records m LEFT JOIN patients p USING (patient_id) "
        "WHERE p.patient_id IS NULL;",
        dbname="clinic_db",
    )
    assert orphans == "0"
    notes = pg.psql(
        "SELECT clinical_notes FROM medical_records WHERE record_id = 1;", dbname="clinic_db"
    )
    assert len(notes.split()) > 10


def _dump(pg: PostgresCluster, dbname: str) -> bytes:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(pg.libpq_env(dbname=dbname))
    return subprocess.run(
        [str(pg.bin_dir / "pg_dump"), "--format=plain"],
        env=env,
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI missing (scripts/bootstrap.sh)")
def test_dataset_deterministic_compressible_and_awkward(pg: PostgresCluster) -> None:
    dbs = ["ds_seed1_a", "ds_seed1_b", "ds_seed2"]
    try:
        for name, seed in zip(dbs, (1, 1, 2), strict=True):
            pg.create_database(name, owner="clinic_user")
            load_clinic_dataset(pg, name, "clinic_user", scale=0.03, seed=seed, awkward_names=True)
        a, b, c = (table_fingerprints(pg, name) for name in dbs)
        assert a == b
        assert a["medical_records"]["md5"] != c["medical_records"]["md5"]
        assert a["medical_records"]["rows"] == c["medical_records"]["rows"] == 900
        for table in AWKWARD_TABLES:
            assert a[table]["rows"] in (25, 7)
        # A change to one row changes the digest but not the count.
        pg.psql(
            "UPDATE patients SET phone = '+1-555-000-0000' WHERE patient_id = 7;", dbname=dbs[1]
        )
        changed = table_fingerprints(pg, dbs[1])["patients"]
        assert changed["rows"] == a["patients"]["rows"]
        assert changed["md5"] != a["patients"]["md5"]

        dump = _dump(pg, dbs[0])
        packed = subprocess.run(
            ["zstd", "-3", "-q", "-c"], input=dump, capture_output=True, check=True
        ).stdout
        ratio = len(dump) / len(packed)
        assert 3.0 <= ratio <= 8.0, f"zstd ratio {ratio:.1f}"
    finally:
        for name in dbs:
            pg.drop_database(name)


def test_make_uploads_deterministic(tmp_path: Path) -> None:
    first = make_uploads(tmp_path / "a", count=12, seed=3)
    second = make_uploads(tmp_path / "b", count=12, seed=3)
    other = make_uploads(tmp_path / "c", count=12, seed=4)
    assert len(first) == 12
    assert all(p.is_file() for p in first)
    assert any(len(p.relative_to(tmp_path / "a").parts) >= 3 for p in first)
    assert any(" " in p.name for p in first)
    assert first[-1].stat().st_size == 0
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]
    assert first[0].stat().st_mtime == second[0].stat().st_mtime


def test_make_config_files(tmp_path: Path) -> None:
    files = make_config_files(tmp_path)
    assert set(files) == {"env", "nginx", "systemd"}
    env_text = files["env"].read_text()
    assert all(secret in env_text for secret in FAKE_SECRETS.values())
    assert stat.S_IMODE(files["env"].stat().st_mode) == 0o600
    assert "proxy_pass" in files["nginx"].read_text()
    assert "[Service]" in files["systemd"].read_text()


# ---------------------------------------------------------------------------- s3
def test_s3_buckets_objects_and_reset(s3: MotoS3Server, s3_bucket: str) -> None:
    env = s3.env()
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert "AWS_PROFILE" not in env
    assert s3.endpoint_url.startswith("http://127.0.0.1:")
    client = s3.client()
    client.put_object(Bucket=s3_bucket, Key="dumps/a.zst", Body=b"payload")
    assert client.get_object(Bucket=s3_bucket, Key="dumps/a.zst")["Body"].read() == b"payload"
    s3.create_bucket("clinic-eu-bucket", region="eu-central-1")
    location = s3.client("eu-central-1").get_bucket_location(Bucket="clinic-eu-bucket")
    assert location["LocationConstraint"] == "eu-central-1"
    s3.reset()
    assert s3.client().list_buckets()["Buckets"] == []


@pytest.mark.faults
def test_s3_restart_same_port_and_stop() -> None:
    with MotoS3Server() as server:
        port, pid = server.port, server.pid
        server.create_bucket("before-restart")
        server.restart()
        assert server.port == port and server.pid != pid
        # moto keeps state in memory: a restart is an outage that loses everything.
        assert server.client().list_buckets()["Buckets"] == []
        new_pid = server.pid
        server.stop()
        server.stop()  # idempotent
        assert new_pid is not None and not pid_exists(new_pid)


# ---------------------------------------------------------------------------- ansible
PLAYBOOK = """\
- name: testbed smoke
  hosts: all
  gather_facts: false
  tasks:
    - name: greet
      ansible.builtin.debug:
        msg: "hello {{ who }}"
    - name: interpreter
      ansible.builtin.setup:
        gather_subset: ["!all", "!min", "python"]
    - name: expected failure
      ansible.builtin.fail:
        msg: boom
      ignore_errors: true
    - name: skipped
      ansible.builtin.debug:
        msg: never
      when: false
    - name: write file
      ansible.builtin.copy:
        content: "x"
        dest: "{{ dest }}"
        mode: "0600"
"""


def test_collection_path_links_checkout(collections_path: str) -> None:
    link = Path(collections_path, "ansible_collections", "clinic", "backup")
    assert link.is_symlink()
    assert link.resolve() == REPO_ROOT
    assert (link / "galaxy.yml").is_file()


def test_ansible_env_is_isolated(collections_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "ANSIBLE_CONFIG": "/etc/ansible/prod.cfg",
        "PGPASSWORD": "prod-secret",
        "PGHOST": "db.prod.example",
        "AWS_PROFILE": "prod",
        "AWS_ENDPOINT_URL": "https://s3.amazonaws.com",
    }.items():
        monkeypatch.setenv(name, value)
    env = ansible_env(collections_path, {"EXTRA_ONE": "1"})
    leaked = {"ANSIBLE_CONFIG", "PGPASSWORD", "PGHOST", "AWS_PROFILE", "AWS_ENDPOINT_URL"}
    assert not leaked & set(env)
    assert env["EXTRA_ONE"] == "1"
    assert env["ANSIBLE_COLLECTIONS_PATH"] == collections_path
    assert env["ANSIBLE_PYTHON_INTERPRETER"] == sys.executable
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert Path(env["ANSIBLE_LOCAL_TEMP"]).is_relative_to(collections_path)


def test_run_playbook_results(ansible_environ: dict[str, str], tmp_path: Path) -> None:
    playbook = tmp_path / "smoke.yml"
    playbook.write_text(PLAYBOOK)
    dest = tmp_path / "out.txt"
    result = run_playbook(
        playbook, ansible_environ, extra_vars={"who": "xv-7f3a9", "dest": str(dest)}
    )
    result.assert_ok()
    assert [r["_task"] for r in result.task_results()] == [
        "greet",
        "interpreter",
        "expected failure",
        "skipped",
        "write file",
    ]
    assert result.result("greet")["msg"] == "hello xv-7f3a9"
    # Modules run with the tests' venv, which has boto3 and psycopg2.
    python = result.result("interpreter")["ansible_facts"]["ansible_python"]["executable"]
    assert python == sys.executable
    subprocess.run([python, "-c", "import boto3, psycopg2"], check=True, timeout=60)
    assert result.result("expected failure")["_status"] == "ignored"
    assert result.result("skipped")["_status"] == "skipped"
    assert result.result("write file")["changed"] is True
    assert dest.read_text() == "x"
    assert result.stats["localhost"]["ignored"] == 1
    # Extra vars went through a file that is gone now, never through argv.
    assert "xv-7f3a9" not in " ".join(result.argv)
    assert not Path(result.argv[result.argv.index("-e") + 1][1:]).exists()


def test_run_playbook_failure_is_reported(ansible_environ: dict[str, str], tmp_path: Path) -> None:
    playbook = tmp_path / "fail.yml"
    playbook.write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - name: explode\n      ansible.builtin.fail:\n        msg: kaboom\n"
        "    - name: after\n      ansible.builtin.debug:\n        msg: unreachable\n"
    )
    result = run_playbook(playbook, ansible_environ)
    assert result.failed and result.rc != 0
    assert result.result("explode")["msg"] == "kaboom"
    assert result.result("explode")["failed"] is True
    assert result.task_results("after") == []


def test_run_module_passes_args_verbatim(ansible_environ: dict[str, str]) -> None:
    tricky = ["false", "yes", "007", "{{ lookup('env', 'HOME') }}", "it's; rm -rf /"]
    result = run_module("ansible.builtin.command", {"argv": ["echo", *tricky]}, ansible_environ)
    assert result["failed"] is False
    assert result["stdout"] == " ".join(tricky)


def test_run_module_check_mode(ansible_environ: dict[str, str], tmp_path: Path) -> None:
    dest = tmp_path / "never-written"
    result = run_module(
        "ansible.builtin.copy",
        {"content": "x", "dest": str(dest), "mode": "0600"},
        ansible_environ,
        check=True,
    )
    assert result["changed"] is True and result["failed"] is False
    assert not dest.exists(), "--check must not write"


def test_clinic_backup_collection_is_resolved(collections_path: str) -> None:
    env = ansible_env(collections_path)
    galaxy = Path(sys.executable).parent / "ansible-galaxy"
    proc = subprocess.run(
        [str(galaxy), "collection", "list", "clinic.backup", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"clinic.backup"' in proc.stdout


# ---------------------------------------------------------------------------- fixtures
def test_file_fixtures(passphrase_file: Path, repo_dir: Path) -> None:
    assert stat.S_IMODE(passphrase_file.stat().st_mode) == 0o600
    assert len(passphrase_file.read_text().strip()) >= 32
    assert stat.S_IMODE(repo_dir.stat().st_mode) == 0o700
    assert list(repo_dir.iterdir()) == []
