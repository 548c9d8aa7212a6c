"""clinic.backup.backup_restore through real ansible-playbook runs.

Restores land on the shared test cluster under fresh names (and, for the complete
server failure case, on a second, empty cluster) and are compared table by table
(row count and an md5 of every row) with the source database.
"""

from __future__ import annotations

import contextlib
import secrets

import psycopg2
import pytest
from testbed.dataset import table_fingerprints
from testbed.files import write_passphrase_file, write_private
from testbed.pg import PostgresCluster

from tests.integration import helpers

pytestmark = pytest.mark.integration


def backup(ansible, connection_args, passphrase_file, **target):
    run = ansible.play(
        [
            {
                "name": "backup",
                "clinic.backup.pg_dump": dict(
                    connection_args, passphrase_file=passphrase_file, **target
                ),
            }
        ]
    ).assert_ok()
    return run.result("backup")["set_id"]


def restore_task(pg, passphrase_file, name="restore", **args):
    """As the cluster's superuser over loopback (trust in the test bed): no password."""
    base = {
        "login_host": pg.host,
        "login_port": pg.port,
        "login_user": pg.superuser,
        "passphrase_file": passphrase_file,
    }
    base.update(args)
    return {"name": name, "clinic.backup.backup_restore": base}


def databases(pg) -> list[str]:
    return pg.psql("SELECT datname FROM pg_database ORDER BY 1").split()


@contextlib.contextmanager
def held_session(pg, dbname):
    """An application session left connected to ``dbname``."""
    conn = psycopg2.connect(host=pg.host, port=pg.port, user=pg.superuser, dbname=dbname)
    try:
        yield conn
    finally:
        conn.close()


def fresh_name(stem: str) -> str:
    return "%s_%s" % (stem, secrets.token_hex(3))


def test_rehearsal_restores_checks_and_drops_reporting_rto_and_rpo(
    ansible, pg, connection_args, passphrase_file, repo_dir
):
    set_id = backup(ansible, connection_args, passphrase_file, repository=repo_dir)
    before = databases(pg)
    target = fresh_name("rehearsal")
    run = ansible.play(
        [
            restore_task(
                pg, passphrase_file, repository=repo_dir, mode="rehearse", target_database=target
            )
        ]
    ).assert_ok()
    result = run.result("restore")
    assert result["set_id"] == set_id
    assert result["changed"] is False
    assert result["dropped"].startswith(target + "__restoring_")
    assert result["duration_seconds"] > 0
    assert 0 <= result["rpo_seconds"] < 600
    counts = {row["table"]: row for row in result["row_counts"]}
    assert counts["public.patients"]["restored"] == counts["public.patients"]["expected"] > 0
    assert all(row["restored"] == row["expected"] for row in result["row_counts"])
    assert databases(pg) == before


@pytest.mark.parametrize(
    "dump_args",
    [{"format": "custom"}, {"format": "plain"}, {"format": "directory", "jobs": 2}],
    ids=["custom", "plain", "directory"],
)
def test_create_gives_identical_tables(
    ansible, pg, pg_fingerprints, connection_args, passphrase_file, tmp_path, dump_args
):
    repo = str(tmp_path / "repo")
    set_id = backup(ansible, connection_args, passphrase_file, repository=repo, **dump_args)
    target = fresh_name("restored")
    restore = restore_task(
        pg,
        passphrase_file,
        repository=repo,
        target_database=target,
        jobs=dump_args.get("jobs", 1),
        scratch_dir=str(tmp_path),
    )
    checked = ansible.play([restore], check=True).assert_ok().result("restore")
    assert checked["changed"] is True and checked["set_id"] == set_id
    assert target not in databases(pg), "check mode created the database"
    try:
        result = ansible.play([restore]).assert_ok().result("restore")
        assert result["changed"] is True and result["set_id"] == set_id
        assert table_fingerprints(pg, target) == pg_fingerprints
        owner = pg.psql(
            "SELECT tableowner FROM pg_tables WHERE tablename = 'patients'", dbname=target
        )
        assert owner == pg.clinic_user
        assert not any("__restoring_" in name for name in databases(pg))
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("clinic-restore-")] == []
        again = ansible.play([restore])
        failed = again.result("restore")
        assert failed["_status"] == "failed"
        assert "already exists" in failed["msg"] and "mode: replace" in failed["msg"]
    finally:
        pg.drop_database(target)


def test_replace_swaps_in_the_backup_and_keeps_the_damaged_database_aside(
    ansible, pg, pg_fingerprints, connection_args, passphrase_file, repo_dir
):
    backup(ansible, connection_args, passphrase_file, repository=repo_dir)
    target = fresh_name("live")
    previous = None
    ansible.play(
        [restore_task(pg, passphrase_file, repository=repo_dir, target_database=target)]
    ).assert_ok()
    try:
        # "Corruption": a table emptied and a stray table, with a session still connected.
        pg.psql("DELETE FROM medical_records; CREATE TABLE damage (x int);", dbname=target)
        with held_session(pg, target):
            result = (
                ansible.play(
                    [
                        restore_task(
                            pg,
                            passphrase_file,
                            repository=repo_dir,
                            target_database=target,
                            mode="replace",
                        )
                    ]
                )
                .assert_ok()
                .result("restore")
            )
        previous = result["previous_database"]
        assert result["changed"] is True
        assert previous.startswith(target + "__pre_restore_")
        assert table_fingerprints(pg, target) == pg_fingerprints
        assert "damage" in table_fingerprints(pg, previous)
        assert table_fingerprints(pg, previous)["medical_records"]["rows"] == 0
    finally:
        pg.drop_database(target)
        if previous:
            pg.drop_database(previous)


def test_damaged_newest_set_is_skipped_for_the_previous_good_one(
    ansible, pg, connection_args, passphrase_file, repo_dir
):
    good = backup(ansible, connection_args, passphrase_file, repository=repo_dir)
    newest = backup(ansible, connection_args, passphrase_file, repository=repo_dir)
    path = helpers.artifact_path(repo_dir, newest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    before = databases(pg)
    target = fresh_name("fallback")
    run = ansible.play(
        [
            restore_task(
                pg, passphrase_file, repository=repo_dir, mode="rehearse", target_database=target
            ),
            restore_task(
                pg,
                passphrase_file,
                name="explicit",
                repository=repo_dir,
                mode="rehearse",
                target_database=target,
                set_id=newest,
            ),
        ]
    )
    chosen = run.result("restore")
    assert chosen["_status"] == "ok", chosen
    assert chosen["set_id"] == good
    assert [s["set_id"] for s in chosen["damaged"]] == [newest]
    assert path.name in chosen["damaged"][0]["reason"]
    explicit = run.result("explicit")
    assert explicit["_status"] == "failed"
    assert path.name in explicit["msg"] and "sha256" in explicit["msg"]
    assert databases(pg) == before


def test_wrong_passphrase_stops_without_falling_back(
    ansible, pg, connection_args, passphrase_file, repo_dir, tmp_path
):
    backup(ansible, connection_args, passphrase_file, repository=repo_dir)
    backup(ansible, connection_args, passphrase_file, repository=repo_dir)
    wrong = write_private(tmp_path / "wrong", secrets.token_urlsafe(24).encode() + b"\n")
    before = databases(pg)
    result = ansible.play(
        [
            restore_task(
                pg,
                wrong,
                repository=repo_dir,
                mode="rehearse",
                target_database=fresh_name("wrongpass"),
            )
        ]
    ).result("restore")
    assert result["_status"] == "failed"
    assert "sealed with another passphrase" in result["msg"]
    assert "damaged before" not in result["msg"]
    assert databases(pg) == before


def test_require_verified_and_not_after_choose_the_clean_set(
    ansible, pg, connection_args, passphrase_file, repo_dir
):
    clean = backup(ansible, connection_args, passphrase_file, repository=repo_dir)
    ansible.play(
        [
            {
                "name": "verify",
                "clinic.backup.backup_verify": {
                    "repository": repo_dir,
                    "set_id": clean,
                    "passphrase_file": passphrase_file,
                },
            }
        ]
    ).assert_ok()
    infected = backup(ansible, connection_args, passphrase_file, repository=repo_dir)
    finished = helpers.manifest(repo_dir, clean)["finished_at"]
    run = ansible.play(
        [
            restore_task(
                pg,
                passphrase_file,
                name="verified",
                repository=repo_dir,
                mode="rehearse",
                target_database=fresh_name("verified"),
                require_verified=True,
            ),
            restore_task(
                pg,
                passphrase_file,
                name="before",
                repository=repo_dir,
                mode="rehearse",
                target_database=fresh_name("before"),
                not_after=finished,
            ),
            restore_task(
                pg,
                passphrase_file,
                name="nothing",
                repository=repo_dir,
                mode="rehearse",
                target_database=fresh_name("nothing"),
                not_after="2000-01-01T00:00:00Z",
            ),
        ]
    )
    for name in ("verified", "before"):
        result = run.result(name)
        assert result["_status"] == "ok", result
        assert result["set_id"] == clean
        assert infected in [p["set_id"] for p in result["passed_over"]]
    nothing = run.result("nothing")
    assert nothing["_status"] == "failed"
    assert "no complete backup set" in nothing["msg"] and "2000-01-01" in nothing["msg"]


def test_rehearsal_from_s3(ansible, pg, s3, bucket, connection_args, passphrase_file):
    location = {"bucket": bucket, "prefix": "db/main", "endpoint_url": s3.endpoint_url}
    set_id = backup(ansible, connection_args, passphrase_file, s3_targets=[location])
    result = (
        ansible.play(
            [
                restore_task(
                    pg,
                    passphrase_file,
                    mode="rehearse",
                    target_database=fresh_name("s3"),
                    **location,
                )
            ]
        )
        .assert_ok()
        .result("restore")
    )
    assert result["set_id"] == set_id
    assert all(row["restored"] == row["expected"] for row in result["row_counts"])


def test_replacement_server_gets_roles_and_data(
    ansible, pg, pg_fingerprints, connection_args, passphrase_file, repo_dir
):
    """Complete server failure: an empty new cluster, roles from the set's globals."""
    backup(ansible, connection_args, passphrase_file, repository=repo_dir)
    replacement = PostgresCluster()
    try:
        replacement.start()
        assert "clinic_user" not in replacement.psql("SELECT rolname FROM pg_roles")
        result = (
            ansible.play(
                [
                    restore_task(
                        replacement,
                        passphrase_file,
                        repository=repo_dir,
                        target_database=pg.clinic_db,
                        include_globals=True,
                    )
                ]
            )
            .assert_ok()
            .result("restore")
        )
        assert result["globals"]["applied"] is True
        assert result["globals"]["errors"] == []
        assert result["globals"]["role_passwords"] is False
        assert "clinic_user" in replacement.psql("SELECT rolname FROM pg_roles")
        assert table_fingerprints(replacement, pg.clinic_db) == pg_fingerprints
        owner = replacement.psql(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()",
            dbname=pg.clinic_db,
        )
        # The database's own owner and privileges come from the set (no owner given).
        assert owner == pg.psql(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()",
            dbname=pg.clinic_db,
        )
        assert result["database_properties"]["errors"] == []
    finally:
        replacement.destroy()


BAD_INPUT = {
    "target exists (create)": (
        {"target_database": "postgres"},
        ["database 'postgres' already exists", "mode: replace"],
    ),
    "newline in target": ({"target_database": "x\ny"}, ["control character"]),
    "target too long": ({"target_database": "x" * 64}, ["longer than 63 bytes"]),
    "not_after without zone": (
        {"target_database": "nz", "not_after": "2026-11-30 08:00"},
        ["not_after", "no time zone"],
    ),
    "not_after garbage": (
        {"target_database": "ng", "not_after": "yesterday"},
        ["not an ISO 8601 time"],
    ),
    "traversal set id": (
        {"target_database": "tr", "set_id": "../../etc"},
        ["set id"],
    ),
    "unknown set id": (
        {"target_database": "un", "set_id": "20200101T000000Z-clinic_db-abcdef"},
        ["has no manifest"],
    ),
    "negative jobs": ({"target_database": "nj", "jobs": -1}, ["jobs must be at least 1"]),
    "relative scratch dir": (
        {"target_database": "rs", "scratch_dir": "tmp"},
        ["scratch_dir", "absolute"],
    ),
    "no createdb privilege": (
        {"target_database": "np", "_as_clinic_user": True},
        ["may not create databases", "CREATEDB"],
    ),
    "missing repository": (
        {"target_database": "mr", "repository": "/nonexistent/clinic/repo"},
        ["does not exist"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_clear_error_and_changes_nothing(case, ansible, pg, good_restore_repo):
    repo, passphrase_file = good_restore_repo
    args, words = BAD_INPUT[case]
    args = dict(args)
    task_args = {"repository": repo}
    if args.pop("_as_clinic_user", False):
        task_args.update(login_user=pg.clinic_user, login_password=pg.clinic_password)
    task_args.update(args)
    before = databases(pg)
    result = ansible.play([restore_task(pg, passphrase_file, **task_args)]).result("restore")
    assert result["_status"] == "failed", result
    assert all(word in result["msg"] for word in words), result["msg"]
    assert databases(pg) == before


@pytest.fixture(scope="module")
def good_restore_repo(ansible, pg, tmp_path_factory):
    """One good set for every bad-input case: (repository, passphrase file)."""
    work = tmp_path_factory.mktemp("restore-bad-input")
    repo = work / "repo"
    passphrase = write_passphrase_file(work / "passphrase")
    args = {
        "database": pg.clinic_db,
        "login_host": pg.host,
        "login_port": pg.port,
        "login_user": pg.clinic_user,
        "login_password": pg.clinic_password,
    }
    backup(ansible, args, passphrase, repository=str(repo))
    return str(repo), passphrase
