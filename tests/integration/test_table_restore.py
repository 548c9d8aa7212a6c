"""Table restore (issue #9 item 1): backup_restore mode tables, backup_info list_tables and
playbooks/restore_table.yml, through real ansible-playbook runs.

Every case works on a copy of clinic_db (clinic_db itself is only read), damages it the
way the runbook's "partial restore" expects, restores, and asserts the live copy
afterwards with table_fingerprints (row count and md5 of every row, per table): the
restored tables as in the backup, every other table untouched.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest
from testbed.ansible import run_playbook
from testbed.dataset import table_fingerprints
from testbed.files import write_passphrase_file, write_private

from tests.integration import helpers

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = REPO_ROOT / "playbooks" / "restore_table.yml"
INVENTORY = REPO_ROOT / "inventories" / "local"
RESTORE_TASK = "Restore the tables from the newest good set"

# What depends on what in the test dataset (tests/testbed/dataset.py).
SCHEMA_QUERY = """
SELECT string_agg(x, E'\\n' ORDER BY x) FROM (
  SELECT 'constraint ' || conname || ' ' || pg_get_constraintdef(oid) AS x FROM pg_constraint
    WHERE conrelid = to_regclass(%(t)s) OR confrelid = to_regclass(%(t)s)
  UNION ALL SELECT 'index ' || indexdef FROM pg_indexes
    WHERE schemaname || '.' || tablename = %(t)s
  UNION ALL SELECT 'column ' || attname || ' ' || format_type(atttypid, atttypmod)
    || CASE WHEN attnotnull THEN ' not null' ELSE '' END FROM pg_attribute
    WHERE attrelid = to_regclass(%(t)s) AND attnum > 0 AND NOT attisdropped
  UNION ALL SELECT 'owner ' || tableowner FROM pg_tables
    WHERE schemaname || '.' || tablename = %(t)s
  UNION ALL SELECT 'comment ' || coalesce(obj_description(to_regclass(%(t)s), 'pg_class'), '')
) s
"""


class Setup:
    """One backup set of clinic_db and the settings every case shares."""

    def __init__(self, ansible, pg, work: Path, connection_args):
        self.ansible = ansible
        self.pg = pg
        self.work = work
        self.passphrase_file = str(write_passphrase_file(work / "passphrase"))
        self.repo = str(work / "repo")
        self.set_id = (
            ansible.play(
                [
                    {
                        "name": "backup",
                        "clinic.backup.pg_dump": dict(
                            connection_args,
                            passphrase_file=self.passphrase_file,
                            repository=self.repo,
                        ),
                    }
                ]
            )
            .assert_ok()
            .result("backup")["set_id"]
        )

    def copy(self) -> str:
        """A copy of clinic_db owned by clinic_user (clinic_db is idle between plays)."""
        name = "live_%s" % secrets.token_hex(3)
        for attempt in range(50):
            try:
                self.pg.psql(
                    'CREATE DATABASE "%s" TEMPLATE clinic_db OWNER %s' % (name, self.pg.clinic_user)
                )
                return name
            except Exception:
                if attempt == 49:
                    raise
                time.sleep(0.2)
        return name

    def restore(self, target, tables, check=False, name="restore", **args):
        task = {
            "login_host": self.pg.host,
            "login_port": self.pg.port,
            "login_user": self.pg.superuser,
            "passphrase_file": self.passphrase_file,
            "repository": args.pop("repository", self.repo),
            "database": self.pg.clinic_db,
            "target_database": target,
            "mode": "tables",
            "tables": tables,
        }
        task.update(args)
        run = self.ansible.play([{"name": name, "clinic.backup.backup_restore": task}], check=check)
        return run.result(name)

    def databases(self) -> list[str]:
        return self.pg.psql("SELECT datname FROM pg_database ORDER BY 1").split()

    def schema(self, dbname, table) -> str:
        return self.pg.psql(SCHEMA_QUERY.replace("%(t)s", "'%s'" % table), dbname=dbname)


@pytest.fixture(scope="module")
def setup(ansible, pg, tmp_path_factory) -> Setup:
    # The backup connects with the dashboard guide's DATABASE_URL (clinic_user).
    args = {"database_url": pg.url(pg.clinic_user, pg.clinic_password, pg.clinic_db)}
    return Setup(ansible, pg, tmp_path_factory.mktemp("tables"), args)


@pytest.fixture
def live(setup):
    name = setup.copy()
    try:
        yield name
    finally:
        setup.pg.drop_database(name)


def others(fingerprints, *tables):
    return {k: v for k, v in fingerprints.items() if k not in tables}


def no_work_databases(setup) -> bool:
    return not any("__restoring_" in name for name in setup.databases())


def test_list_tables_of_a_set(setup, pg_fingerprints):
    run = setup.ansible.play(
        [
            {
                "name": "explicit",
                "clinic.backup.backup_info": {
                    "repository": setup.repo,
                    "passphrase_file": setup.passphrase_file,
                    "list_tables": True,
                    "set_id": setup.set_id,
                },
            },
            {
                "name": "newest",
                "clinic.backup.backup_info": {
                    "repository": setup.repo,
                    "passphrase_file": setup.passphrase_file,
                    "list_tables": True,
                },
            },
            {
                "name": "unknown",
                "clinic.backup.backup_info": {
                    "repository": setup.repo,
                    "list_tables": True,
                    "set_id": "20200101T000000Z-clinic_db-000000",
                },
                "ignore_errors": True,
            },
        ]
    )
    listed = run.result("explicit")["tables"]
    assert listed["set_id"] == setup.set_id and listed["authentication"] == "ok"
    rows = {t["table"]: t["rows"] for t in listed["tables"]}
    assert rows == {"public." + name: value["rows"] for name, value in pg_fingerprints.items()}
    assert listed["rows"] == sum(rows.values())
    assert run.result("newest")["tables"] == listed
    unknown = run.result("unknown")
    assert unknown["_status"] == "ignored" and "no set 20200101T000000Z" in unknown["msg"]


def test_append_restores_deleted_rows_parents_first(setup, live, pg_fingerprints):
    # Deleting medical_records cascades to prescriptions: both must come back, the
    # parent before the child whatever order they are named in.
    setup.pg.psql("DELETE FROM medical_records", dbname=live)
    assert table_fingerprints(setup.pg, live)["prescriptions"]["rows"] == 0
    result = setup.restore(live, ["prescriptions", "public.medical_records"], table_mode="append")
    assert result["_status"] in ("ok", "changed"), result.get("msg")
    assert result["changed"] is True and result["set_id"] == setup.set_id
    assert table_fingerprints(setup.pg, live) == pg_fingerprints
    by_table = {t["table"]: t for t in result["tables"]}
    for table in ("public.prescriptions", "public.medical_records"):
        assert by_table[table]["rows_before"] == 0
        assert by_table[table]["rows_after"] == by_table[table]["restored"]
        assert by_table[table]["restored"] == by_table[table]["expected"] > 0
    # Their sequences never go back: the next id is past every restored one.
    next_id = by_table["public.medical_records"]["sequences"][0]["next_value"]
    assert next_id > pg_fingerprints["medical_records"]["rows"]
    assert result["work_database_dropped"].startswith(live + "__restoring_")
    assert no_work_databases(setup)


def test_append_unique_key_conflict_changes_nothing(setup, live):
    setup.pg.psql("DELETE FROM prescriptions WHERE prescription_id % 2 = 0", dbname=live)
    before = table_fingerprints(setup.pg, live)
    result = setup.restore(live, ["public.prescriptions"], table_mode="append")
    assert result["_status"] == "failed"
    assert "already exist in the live table" in result["msg"]
    assert "prescriptions_pkey" in result["msg"] and "nothing was changed" in result["msg"]
    assert "Key (" not in result["msg"]  # the row's values (PHI) are never shown
    assert result["error_type"] == "ConfigError"
    assert table_fingerprints(setup.pg, live) == before
    assert no_work_databases(setup)


@pytest.mark.parametrize("damage", ["dropped", "damaged"])
def test_replace_restores_the_table_with_its_schema(setup, live, pg, pg_fingerprints, damage):
    expected_schema = setup.schema(pg.clinic_db, "public.prescriptions")
    if damage == "dropped":
        setup.pg.psql("DROP TABLE prescriptions", dbname=live)
    else:
        setup.pg.psql(
            "UPDATE prescriptions SET dose_mg = 0 WHERE prescription_id < 50; "
            "ALTER TABLE prescriptions ADD COLUMN junk int; "
            "ALTER TABLE prescriptions DROP CONSTRAINT prescriptions_record_id_fkey; "
            "DROP INDEX prescriptions_patient_idx",
            dbname=live,
        )
    result = setup.restore(live, ["public.prescriptions"], table_mode="replace")
    assert result["_status"] in ("ok", "changed"), result.get("msg")
    entry = result["tables"][0]
    assert entry["existed"] is (damage == "damaged")
    assert entry["rows_after"] == entry["expected"] == pg_fingerprints["prescriptions"]["rows"]
    assert table_fingerprints(setup.pg, live) == pg_fingerprints
    assert setup.schema(live, "public.prescriptions") == expected_schema
    assert no_work_databases(setup)


def test_replace_refuses_a_table_others_depend_on_and_names_them(setup, live, pg_fingerprints):
    setup.pg.psql("UPDATE appointments SET reason = 'lost'", dbname=live)
    before = table_fingerprints(setup.pg, live)
    for recreate in (False, True):
        result = setup.restore(
            live, ["public.appointments"], table_mode="replace", recreate_foreign_keys=recreate
        )
        assert result["_status"] == "failed" and result["error_type"] == "ConfigError"
        assert "view public.patient_summary" in result["msg"]
        assert "nothing was changed" in result["msg"]
        if not recreate:
            assert (
                "foreign key medical_records_appointment_id_fkey of public.medical_records"
                in (result["msg"])
            )
        dependents = result["tables"][0]["dependents"]
        assert dependents["views"] == ["public.patient_summary"]
        assert [fk["table"] for fk in dependents["referenced_by"]] == ["public.medical_records"]
        assert table_fingerprints(setup.pg, live) == before
    # Check mode refuses the same way.
    checked = setup.restore(live, ["public.appointments"], check=True, table_mode="replace")
    assert checked["_status"] == "failed" and "public.patient_summary" in checked["msg"]
    assert no_work_databases(setup)


def test_replace_with_foreign_keys_recreated_and_checked(setup, live, pg, pg_fingerprints):
    setup.pg.psql("UPDATE medical_records SET clinical_notes = 'overwritten'", dbname=live)
    expected_schema = setup.schema(pg.clinic_db, "public.prescriptions")
    refused = setup.restore(live, ["public.medical_records"], table_mode="replace")
    assert refused["_status"] == "failed"
    assert "prescriptions_record_id_fkey of public.prescriptions" in refused["msg"]
    assert "recreate_foreign_keys: true" in refused["msg"]
    result = setup.restore(
        live, ["public.medical_records"], table_mode="replace", recreate_foreign_keys=True
    )
    assert result["_status"] in ("ok", "changed"), result.get("msg")
    assert result["foreign_keys_recreated"] == [
        "prescriptions_record_id_fkey on public.prescriptions"
    ]
    assert table_fingerprints(setup.pg, live) == pg_fingerprints
    # The foreign key is back, exactly as it was.
    assert setup.schema(live, "public.prescriptions") == expected_schema


def test_recreated_foreign_key_that_no_longer_holds_changes_nothing(setup, live):
    # A prescription written after the backup points at a record the backup lacks.
    setup.pg.psql(
        "INSERT INTO medical_records (record_id, patient_id, record_type, clinical_notes, "
        "author, recorded_at) VALUES (999999, 1, 'progress_note', 'new', 'x', now()); "
        "INSERT INTO prescriptions (record_id, patient_id, medication, dose_mg, frequency, "
        "prescribed_on) VALUES (999999, 1, 'aspirin', 100, 'daily', current_date)",
        dbname=live,
    )
    before = table_fingerprints(setup.pg, live)
    result = setup.restore(
        live, ["public.medical_records"], table_mode="replace", recreate_foreign_keys=True
    )
    assert result["_status"] == "failed" and "foreign key" in result["msg"]
    assert "prescriptions_record_id_fkey" in result["msg"]
    assert "nothing was changed" in result["msg"]
    assert table_fingerprints(setup.pg, live) == before


def test_unknown_table_and_misplaced_tables_are_clear_errors(setup, live):
    before = table_fingerprints(setup.pg, live)
    for check in (True, False):
        result = setup.restore(live, ["public.appointments", "public.nope"], check=check)
        assert result["_status"] == "failed" and result["error_type"] == "ConfigError"
        assert "has no table 'public.nope'" in result["msg"]
        assert "public.appointments" in result["msg"]  # the set's tables are listed
    misplaced = setup.ansible.play(
        [
            {
                "name": "misplaced",
                "clinic.backup.backup_restore": {
                    "repository": setup.repo,
                    "passphrase_file": setup.passphrase_file,
                    "login_host": setup.pg.host,
                    "login_port": setup.pg.port,
                    "login_user": setup.pg.superuser,
                    "target_database": live,
                    "mode": "replace",
                    "tables": ["public.appointments"],
                },
            }
        ]
    ).result("misplaced")
    assert misplaced["_status"] == "failed"
    assert "tables is only used with mode: tables" in misplaced["msg"]
    missing_db = setup.restore("no_such_db_here", ["public.appointments"])
    assert missing_db["_status"] == "failed" and "does not exist" in missing_db["msg"]
    setup.pg.psql("DROP TABLE prescriptions", dbname=live)
    result = setup.restore(live, ["public.prescriptions"], table_mode="append")
    assert result["_status"] == "failed" and "table_mode: replace" in result["msg"]
    assert table_fingerprints(setup.pg, live) == others(before, "prescriptions")
    assert no_work_databases(setup)


def test_check_mode_changes_nothing(setup, live):
    setup.pg.psql("DELETE FROM prescriptions", dbname=live)
    before_dbs = setup.databases()
    before = table_fingerprints(setup.pg, live)
    result = setup.restore(live, ["public.prescriptions"], check=True)
    assert result["_status"] in ("ok", "changed"), result.get("msg")
    assert result["changed"] is True and result["check_mode"] is True
    assert result["set_id"] == setup.set_id and result["table_mode"] == "append"
    entry = result["tables"][0]
    assert entry["rows_before"] == 0 and entry["expected"] > 0 and entry["exists"] is True
    assert table_fingerprints(setup.pg, live) == before
    assert setup.databases() == before_dbs


def test_plain_format_set_restores_tables_through_the_work_database(
    setup, live, connection_args, pg_fingerprints, tmp_path
):
    repo = str(tmp_path / "plain")
    setup.ansible.play(
        [
            {
                "name": "backup",
                "clinic.backup.pg_dump": dict(
                    connection_args,
                    passphrase_file=setup.passphrase_file,
                    repository=repo,
                    format="plain",
                ),
            }
        ]
    ).assert_ok()
    setup.pg.psql("DROP TABLE prescriptions", dbname=live)
    result = setup.restore(live, ["public.prescriptions"], table_mode="replace", repository=repo)
    assert result["_status"] in ("ok", "changed"), result.get("msg")
    assert table_fingerprints(setup.pg, live) == pg_fingerprints


# ---------------------------------------------------------------------- the playbook
def playbook(setup, live, ansible_env_vars, check=False, **overrides):
    pgpass = write_private(
        setup.work / "pgpass",
        "%s:%d:*:%s:%s\n"
        % (setup.pg.host, setup.pg.port, setup.pg.clinic_user, setup.pg.clinic_password),
    )
    extra = {
        "clinic_backup_database": setup.pg.clinic_db,
        "clinic_backup_restore_target": live,
        "clinic_backup_login_host": setup.pg.host,
        "clinic_backup_login_port": setup.pg.port,
        "clinic_backup_login_user": setup.pg.clinic_user,
        "clinic_backup_passfile": str(pgpass),
        "clinic_backup_passphrase_file": setup.passphrase_file,
        "clinic_backup_repository": setup.repo,
        "clinic_backup_restore_login_user": setup.pg.superuser,
        "clinic_backup_audit_log": str(Path(setup.repo).parent / "audit.log"),
    }
    extra.update(overrides)
    return run_playbook(
        PLAYBOOK, ansible_env_vars, extra_vars=extra, inventory=str(INVENTORY), check=check
    )


def test_playbook_end_to_end(setup, live, pg_fingerprints):
    env = setup.ansible.env
    setup.pg.psql("DELETE FROM prescriptions WHERE prescription_id > 100", dbname=live)
    damaged = table_fingerprints(setup.pg, live)

    refused = playbook(setup, live, env)
    assert refused.failed
    assert "clinic_backup_restore_tables must name the tables" in refused.output()
    assert table_fingerprints(setup.pg, live) == damaged

    checked = playbook(
        setup, live, env, check=True, clinic_backup_restore_tables=["public.medical_records"]
    )
    checked.assert_ok()
    report = checked.result("Report what would be restored (check mode)")["msg"]
    assert "CHECK MODE, nothing was changed" in report
    assert (
        "public.medical_records: %d rows in the backup" % pg_fingerprints["medical_records"]["rows"]
        in report
    )
    assert table_fingerprints(setup.pg, live) == damaged

    # Append into a table that still holds rows: the conflict changes nothing.
    conflict = playbook(setup, live, env, clinic_backup_restore_tables="public.prescriptions")
    assert conflict.failed and "already exist" in conflict.output()
    assert table_fingerprints(setup.pg, live) == damaged

    # Replace (a comma-separated -e value) puts the table back; a safety copy of the
    # damaged table is taken first.
    replaced = playbook(
        setup,
        live,
        env,
        clinic_backup_restore_tables="public.prescriptions",
        clinic_backup_restore_table_mode="replace",
    )
    replaced.assert_ok()
    result = replaced.result(RESTORE_TASK)
    assert result["tables"][0]["rows_before"] == 100
    assert table_fingerprints(setup.pg, live) == pg_fingerprints
    safety = replaced.result("Take a safety backup of the live tables (label pre-restore)")
    assert safety["manifest"]["row_counts"]["public.prescriptions"] == 100
    report = replaced.result("Report the table restore")["msg"]
    assert (
        "public.prescriptions: 100 rows before, %d after" % pg_fingerprints["prescriptions"]["rows"]
        in report
    )
    assert safety["set_id"] in report
    assert helpers.local_sets(setup.repo + "-pre-restore") == [safety["set_id"]]

    # Append rows deleted by mistake: the whole table back, nothing else touched.
    setup.pg.psql("DELETE FROM prescriptions", dbname=live)
    appended = playbook(setup, live, env, clinic_backup_restore_tables=["prescriptions"])
    appended.assert_ok()
    assert table_fingerprints(setup.pg, live) == pg_fingerprints
    assert no_work_databases(setup)
