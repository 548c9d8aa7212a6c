"""Regression tests of the hostile pass (issue: security hardening), against the real
PostgreSQL cluster and moto S3: each case failed before its fix."""

from __future__ import annotations

import datetime
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from testbed.pg import quote_ident

from ansible_collections.clinic.backup.plugins.module_utils import catalog, pipeline
from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.backup import BackupOptions, run_backup
from ansible_collections.clinic.backup.plugins.module_utils.errors import (
    ConfigError,
    SourceError,
    StoreError,
)
from ansible_collections.clinic.backup.plugins.module_utils.file_backup import (
    FileBackupOptions,
    run_file_backup,
)
from ansible_collections.clinic.backup.plugins.module_utils.pgsource import PgConnection
from ansible_collections.clinic.backup.plugins.module_utils.repository import (
    LocalRepository,
    S3Repository,
)
from ansible_collections.clinic.backup.plugins.module_utils.restore import (
    RestoreOptions,
    run_restore,
)
from ansible_collections.clinic.backup.plugins.module_utils.retention import (
    RetentionPolicy,
    apply_retention,
)
from ansible_collections.clinic.backup.plugins.module_utils.verify import verify_set


def connection(pg, dbname, user=None):
    return PgConnection(
        host=pg.host,
        port=str(pg.port),
        user=user or pg.superuser,
        dbname=dbname,
    )


@pytest.fixture(scope="module")
def two_databases(pg):
    """clinic_db's little sibling billing_db, and a database whose name holds '='."""
    names = {"billing": "billing_db_sec", "equals": "clinic=db"}
    for name in names.values():
        pg.psql("DROP DATABASE IF EXISTS %s" % quote_ident(name))
        pg.create_database(name)
        pg.psql("CREATE TABLE invoices (id int); INSERT INTO invoices VALUES (1), (2)", dbname=name)
    yield names
    for name in names.values():
        pg.psql("DROP DATABASE IF EXISTS %s" % quote_ident(name))


def take(pg, repo, dbname, passphrase_file, **options):
    options.setdefault("passphrase_file", str(passphrase_file))
    return run_backup(connection(pg, dbname), [repo], BackupOptions(**options))


# ---------------------------------------------------------------------- defect 5
def test_a_set_of_another_database_or_a_file_set_is_refused_before_anything(
    pg, tmp_path, passphrase_file, two_databases
):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    billing = take(pg, repo, two_databases["billing"], passphrase_file)["set_id"]
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "scan.pdf").write_bytes(b"%PDF scan")
    file_set = run_file_backup(
        [repo], FileBackupOptions("uploads", [str(uploads)], passphrase_file=str(passphrase_file))
    )["set_id"]
    target = "sec_target_db"
    pg.psql("DROP DATABASE IF EXISTS %s" % target)
    pg.create_database(target)
    before = pg.psql("SELECT datname FROM pg_database ORDER BY 1")
    options = RestoreOptions(
        mode="replace",
        target_database=target,
        database=pg.clinic_db,
        set_id=billing,
        passphrase_file=str(passphrase_file),
    )
    with pytest.raises(ConfigError, match="is a backup of 'billing_db_sec', not of 'clinic_db'"):
        run_restore(repo, connection(pg, "postgres"), options)
    options = RestoreOptions(mode="rehearse", set_id=file_set, passphrase_file=str(passphrase_file))
    with pytest.raises(ConfigError, match="is a file set .* not a database backup") as caught:
        run_restore(repo, connection(pg, "postgres"), options)
    assert "files_restore" in caught.value.hint
    assert pg.psql("SELECT datname FROM pg_database ORDER BY 1") == before
    pg.psql("DROP DATABASE %s" % target)


# ---------------------------------------------------------------------- defect 10
def test_a_database_name_holding_an_equals_sign_is_backed_up_with_its_globals(
    pg, tmp_path, passphrase_file, two_databases
):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    result = take(pg, repo, two_databases["equals"], passphrase_file)
    names = [a["name"] for a in result["artifacts"]]
    assert names == ["database", "globals"]
    outcome = verify_set(repo, result["set_id"], passphrase_file=str(passphrase_file))
    assert outcome["ok"], outcome["failures"]


# ---------------------------------------------------------------------- defect 11
GERMAN = "de_DE.UTF-8"


def german_locale() -> bool:
    """Make de_DE.UTF-8 available to the C library (root, Debian's locales data)."""
    listed = subprocess.run(["locale", "-a"], stdout=subprocess.PIPE, text=True, check=False)
    if "de_DE.utf8" in listed.stdout:
        return True
    made = subprocess.run(
        ["localedef", "-i", "de_DE", "-f", "UTF-8", GERMAN],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return made.returncode == 0


def test_globals_errors_are_told_apart_by_sqlstate_on_a_german_server(
    pg, tmp_path, passphrase_file
):
    """Roles that exist are "already present" (SQLSTATE 42710) and nothing else is an
    error, although the server says FEHLER and "existiert bereits"."""
    if not german_locale():
        pytest.skip("no de_DE.UTF-8 locale can be made on this host (localedef, locales)")
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    set_id = take(pg, repo, pg.clinic_db, passphrase_file)["set_id"]
    target = "sec_globals_db"
    pg.psql("DROP DATABASE IF EXISTS %s" % target)
    pg.psql("ALTER SYSTEM SET lc_messages = '%s'" % GERMAN)
    pg.psql("SELECT pg_reload_conf()")
    options = RestoreOptions(
        mode="create",
        target_database=target,
        set_id=set_id,
        include_globals=True,
        passphrase_file=str(passphrase_file),
    )
    try:
        result = run_restore(repo, connection(pg, "postgres"), options)
    finally:
        pg.psql("ALTER SYSTEM RESET lc_messages")
        pg.psql("SELECT pg_reload_conf()")
        pg.psql("DROP DATABASE IF EXISTS %s" % target)
    report = result["globals"]
    assert report["applied"] and report["errors"] == []
    assert any(pg.clinic_user in line for line in report["already_present"]), report
    assert any("existiert bereits" in line for line in report["already_present"]), report


# ---------------------------------------------------------------------- defect 12
def test_an_existing_repository_is_never_chmodded(tmp_path, pg, passphrase_file):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    repo = LocalRepository(str(shared))
    result = take(pg, repo, pg.clinic_db, passphrase_file, row_counts=False)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert any("open to other users" in w for w in result["warnings"])
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by every user"):
        take(pg, LocalRepository(str(open_dir)), pg.clinic_db, passphrase_file)
    assert stat.S_IMODE(open_dir.stat().st_mode) == 0o777
    assert sorted(p.name for p in open_dir.iterdir()) == []
    fresh = tmp_path / "fresh" / "repo"
    repo = LocalRepository(str(fresh), must_exist=False, create_parents=True)
    take(pg, repo, pg.clinic_db, passphrase_file)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


# ---------------------------------------------------------------------- defect 13
def test_s3_cleanup_deletes_only_what_this_tool_wrote(s3, s3_bucket):
    client = s3.client()
    keep = [
        "db/sets/not-a-set-id/notes.txt",
        "db/sets/20261122T010000Z-clinic_db-1a2b3c/has space.txt",
        "db/sets/README",
        "db/other/20261122T010000Z-clinic_db-1a2b3c/x.gpg",
    ]
    ours = "db/sets/20261122T010000Z-clinic_db-aaaaaa/clinic_db.dump.zst.gpg"
    for key in keep + [ours]:
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    client.create_multipart_upload(Bucket=s3_bucket, Key="db/sets/someone-elses/upload.bin")
    repo = S3Repository(client, s3_bucket, "db")
    future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    removed = repo.cleanup_incomplete(older_than_seconds=-3600)
    assert ours in removed
    left = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])}
    assert left == set(keep)
    uploads = client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["db/sets/someone-elses/upload.bin"]
    assert future  # (cutoff in the future: everything is "stale", only ours goes)


# ---------------------------------------------------------------------- defect 15
def test_a_fifo_in_the_repository_never_hangs_catalog_or_retention(tmp_path, pg, passphrase_file):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    set_id = take(pg, repo, pg.clinic_db, passphrase_file, row_counts=False)["set_id"]
    fifo = tmp_path / "repo" / "sets" / set_id / "verification.json"
    os.mkfifo(fifo)
    key = RecordKey.from_file(str(passphrase_file))
    outcome = {}

    def work():
        outcome["entries"] = catalog.list_catalog(repo, key=key)
        outcome["retention"] = apply_retention(
            repo, RetentionPolicy(daily=1, weekly=0, monthly=0, yearly=0, min_keep=1), key=key
        )

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive():
        # Unblock the reader so the test process can end, then fail.
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO verification record hung")
    (entry,) = outcome["entries"]
    assert entry["state"] == "complete" and entry["verification"] == "unknown"
    assert outcome["retention"]["kept"] == [set_id]


# ---------------------------------------------------------------------- defect 9
def test_plaintext_scratch_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    base = tmp_path / "tmp"
    base.mkdir()
    script = (
        "import os, sys\n"
        "from ansible_collections.clinic.backup.plugins.module_utils import pipeline\n"
        "d = pipeline.scratch_dir(base=sys.argv[1])\n"
        "os.makedirs(os.path.join(d.path, 'dump'))\n"
        "open(os.path.join(d.path, 'dump', '3456.dat'), 'w').write('patient rows')\n"
        "print(d.path, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(base)], env=env, stdout=subprocess.PIPE, check=False
    )
    assert proc.returncode == -signal.SIGKILL
    leftover = Path(proc.stdout.decode().strip())
    assert (leftover / "dump" / "3456.dat").exists()
    os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    live = pipeline.scratch_dir(base=str(base))
    try:
        assert not leftover.exists()
        assert Path(live.path).exists()
        assert stat.S_IMODE(Path(live.path).stat().st_mode) == 0o700
        # A live run's scratch is never taken for a leftover.
        pipeline.reap_owned_dirs(pipeline.SCRATCH_PREFIX, base=str(base), min_age_seconds=0)
        assert Path(live.path).exists()
    finally:
        live.close()
    assert not Path(live.path).exists()


# ---------------------------------------------------------------------- copies keep their seal
def test_a_copied_set_stays_authenticated_and_its_pointer_sealed(tmp_path, pg, passphrase_file):
    from ansible_collections.clinic.backup.plugins.module_utils.transfer import copy_set

    source = LocalRepository(str(tmp_path / "source"), must_exist=False)
    dest = LocalRepository(str(tmp_path / "dest"), must_exist=False)
    set_id = take(pg, source, pg.clinic_db, passphrase_file, row_counts=False)["set_id"]
    copy_set(source, dest, set_id)
    key = RecordKey.from_file(str(passphrase_file))
    (entry,) = catalog.list_catalog(dest, key=key)
    assert entry["authentication"] == "ok"
    assert dest.read_latest(pg.clinic_db, key) == set_id
    assert verify_set(dest, set_id, passphrase_file=str(passphrase_file))["ok"]


# ---------------------------------------------------------------------- operator's view
def test_a_table_the_backup_role_cannot_read_is_named_before_anything(
    pg, tmp_path, passphrase_file
):
    """Not "could not import the requested snapshot": the schema and the fix."""
    dbname, schema = "sec_readable_db", '"Billing Dept"'
    pg.psql("DROP DATABASE IF EXISTS %s" % dbname)
    pg.create_database(dbname)
    pg.psql(
        "CREATE SCHEMA %s; CREATE TABLE %s.invoices (id int); "
        "INSERT INTO %s.invoices VALUES (1)" % (schema, schema, schema),
        dbname=dbname,
    )
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    conn = PgConnection(
        host=pg.host,
        port=str(pg.port),
        user=pg.clinic_user,
        password=pg.clinic_password,
        dbname=dbname,
    )
    try:
        with pytest.raises(SourceError) as caught:
            run_backup(conn, [repo], BackupOptions(passphrase_file=str(passphrase_file)))
        assert 'schema "Billing Dept" (no USAGE)' in str(caught.value)
        assert "grant" in caught.value.hint
        assert not (tmp_path / "repo").exists() or repo.set_ids() == []
        pg.psql(
            "GRANT USAGE ON SCHEMA %s TO %s; GRANT SELECT ON %s.invoices TO %s"
            % (schema, pg.clinic_user, schema, pg.clinic_user),
            dbname=dbname,
        )
        result = run_backup(conn, [repo], BackupOptions(passphrase_file=str(passphrase_file)))
        assert any("no role passwords" in w for w in result["warnings"])
    finally:
        pg.psql("DROP DATABASE IF EXISTS %s" % dbname)


# ---------------------------------------------------------------------- cold storage
def test_glacier_sets_stay_listed_and_restores_say_what_to_do(pg, s3, s3_bucket, passphrase_file):
    client = s3.client()
    repo = S3Repository(client, s3_bucket, "db", extra_args={"StorageClass": "GLACIER"})
    set_id = take(pg, repo, pg.clinic_db, passphrase_file, row_counts=False)["set_id"]
    classes = {
        o["Key"].rsplit("/", 1)[-1]: o.get("StorageClass", "STANDARD")
        for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    }
    assert classes["manifest.json"] == "STANDARD" and classes["clinic_db.json"] == "STANDARD"
    assert classes["clinic_db.dump.zst.gpg"] == "GLACIER"
    key = RecordKey.from_file(str(passphrase_file))
    (entry,) = catalog.list_catalog(repo, key=key)
    assert entry["state"] == "complete" and entry["authentication"] == "ok"
    with pytest.raises(StoreError, match="archive storage") as caught:
        verify_set(repo, set_id, passphrase_file=str(passphrase_file))
    assert "restore-object" in caught.value.hint
    assert catalog.list_catalog(repo, key=key)[0]["verification"] == "unverified"
    options = RestoreOptions(
        mode="rehearse", database=pg.clinic_db, passphrase_file=str(passphrase_file)
    )
    with pytest.raises(StoreError, match="archive storage"):
        run_restore(repo, connection(pg, "postgres"), options)
    # Once S3 restored the objects, the set verifies as any other.
    for name in ("clinic_db.dump.zst.gpg", "globals.sql.zst.gpg"):
        client.restore_object(
            Bucket=s3_bucket,
            Key="db/sets/%s/%s" % (set_id, name),
            RestoreRequest={"Days": 1},
        )
    assert verify_set(repo, set_id, passphrase_file=str(passphrase_file))["ok"]


# ---------------------------------------------------------------------- passphrase rotation
def test_after_a_rotation_old_and_new_sets_verify_and_restore(pg, tmp_path, passphrase_file):
    """New sets use the new passphrase; the old one, kept as an old_passphrase_file,
    still opens the sets it wrote: each set names (by fingerprint) the key that sealed it."""
    from testbed.files import write_passphrase_file

    new_passphrase = write_passphrase_file(tmp_path / "passphrase-2027")
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    old_set = take(pg, repo, pg.clinic_db, passphrase_file, row_counts=False)["set_id"]
    new_set = take(pg, repo, pg.clinic_db, new_passphrase)["set_id"]
    keyring = {
        "passphrase_file": str(new_passphrase),
        "old_passphrase_files": [str(passphrase_file)],
    }
    key = RecordKey.from_file(keyring["passphrase_file"], keyring["old_passphrase_files"])
    assert [e["authentication"] for e in catalog.list_catalog(repo, key=key)] == ["ok", "ok"]
    for set_id in (old_set, new_set):
        assert verify_set(repo, set_id, **keyring)["ok"], set_id
        result = run_restore(
            repo,
            connection(pg, "postgres"),
            RestoreOptions(mode="rehearse", set_id=set_id, **keyring),
        )
        assert result["set_id"] == set_id
    # Without the old passphrase the old set is the operator's problem, named as such.
    with pytest.raises(ConfigError, match="sealed with another passphrase"):
        verify_set(repo, old_set, passphrase_file=str(new_passphrase))
    # The catalog still verifies both afterwards (the records verify_set wrote are sealed).
    assert [e["verification"] for e in catalog.list_catalog(repo, key=key)] == ["ok", "ok"]
    # Each manifest names the key that encrypted it: an identifier, never the key.
    ids = {
        e["id"]: e["manifest"]["encryption"]["key_id"] for e in catalog.list_catalog(repo, key=key)
    }
    assert ids == {
        old_set: RecordKey.from_file(str(passphrase_file)).passphrase_id(),
        new_set: RecordKey.from_file(str(new_passphrase)).passphrase_id(),
    }
    # A set that names no key (written before sets did, unsealed: allowed explicitly) is
    # opened by trying each passphrase of the keyring: verify and restore both find it.
    manifest_path = Path(repo.path) / "sets" / old_set / "manifest.json"
    unnamed = json.loads(manifest_path.read_text())
    del unnamed["authentication"], unnamed["encryption"]["key_id"]
    manifest_path.write_text(json.dumps(unnamed))
    assert key.candidates_for(unnamed)[0] != passphrase_file.read_bytes().rstrip(b"\n")
    verified = verify_set(repo, old_set, allow_unauthenticated=True, **keyring)
    assert verified["ok"], verified
    result = run_restore(
        repo,
        connection(pg, "postgres"),
        RestoreOptions(mode="rehearse", set_id=old_set, allow_unauthenticated=True, **keyring),
    )
    assert result["set_id"] == old_set


def test_the_agent_takes_old_passphrase_files_from_its_config(
    pg, tmp_path, passphrase_file, collections_path
):
    import subprocess
    import sys

    from testbed.files import write_passphrase_file

    from tests.integration.test_interrupted import AGENT, agent_config

    new_passphrase = write_passphrase_file(tmp_path / "passphrase-2027")
    repo = tmp_path / "repo"
    env = dict(os.environ, PYTHONPATH=collections_path)

    def agent(command, config, *extra):
        proc = subprocess.run(
            [sys.executable, "-m", AGENT, command, "--config", config, *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        return proc.returncode, json.loads(proc.stdout or "{}")

    before = agent_config(tmp_path, pg, pg.clinic_db, str(passphrase_file), repository=repo)
    rc, old = agent("backup", before)
    assert rc == 0, old
    after = agent_config(
        tmp_path,
        pg,
        pg.clinic_db,
        str(new_passphrase),
        repository=repo,
        old_passphrase_files=[str(passphrase_file)],
    )
    rc, new = agent("backup", after)
    assert rc == 0, new
    rc, verified = agent("verify", after, "--set-id", old["set_id"])
    assert rc == 0 and verified["ok"], verified
    rc, listed = agent("list", after)
    assert [s["authentication"] for s in listed["sets"]] == ["ok", "ok"]


# ---------------------------------------------------------------------- restore-tested sets
def test_a_rehearsal_marks_its_set_restore_tested_and_a_copied_record_counts_for_nothing(
    pg, tmp_path, passphrase_file
):
    import shutil

    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    older = take(pg, repo, pg.clinic_db, passphrase_file, row_counts=False)["set_id"]
    newer = take(pg, repo, pg.clinic_db, passphrase_file, row_counts=False)["set_id"]
    key = RecordKey.from_file(str(passphrase_file))
    assert catalog.list_catalog(repo, key=key)[0]["restore_tested_at"] is None
    result = run_restore(
        repo,
        connection(pg, "postgres"),
        RestoreOptions(mode="rehearse", set_id=newer, passphrase_file=str(passphrase_file)),
    )
    entries = {e["id"]: e for e in catalog.list_catalog(repo, key=key)}
    assert entries[newer]["restore_tested_at"] == result["restored_at"]
    assert entries[newer]["restore_test_rto_seconds"] == result["duration_seconds"]
    assert entries[newer]["restore_test_rpo_seconds"] == result["rpo_seconds"]
    # A writer copies the record next to the older set: it names another set, so it is no
    # evidence that the older set restores.
    sets = tmp_path / "repo" / "sets"
    shutil.copy(sets / newer / "restore_test.json", sets / older / "restore_test.json")
    assert catalog.catalog_entry(repo, older, key)["restore_tested_at"] is None
