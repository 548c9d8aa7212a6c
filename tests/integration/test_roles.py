"""The backup_agent and backup_monitoring roles, converged on localhost by the real
``ansible-playbook playbooks/install_agent.yml`` with every path inside a temp dir.

One converge (-vvv) and a second run (must change nothing) are shared by the tests;
the installed ``clinic-backup`` wrapper then backs up and verifies the test cluster,
which proves the installed copy is the engine and the rendered config is complete.
"""

from __future__ import annotations

import filecmp
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from testbed.ansible import REPO_ROOT, PlaybookResult, ansible_env, run_playbook

from tests.integration import helpers

pytestmark = pytest.mark.integration

PLAYBOOK = REPO_ROOT / "playbooks" / "install_agent.yml"
ENGINE_DIR = REPO_ROOT / "plugins" / "module_utils"
PACKAGE = Path("lib/ansible_collections/clinic/backup/plugins/module_utils")
JOBS = ["backup", "verify", "restore-test", "retention"]
ALERTS = {
    "ClinicBackupFailed",
    "ClinicBackupMissing",
    "ClinicBackupVerifyFailed",
    "ClinicRestoreTestFailed",
    "ClinicRestoreTestOverdue",
    "ClinicRestoreTestRpoHigh",
}


@dataclass
class Host:
    """A converged 'host': its root dir, the role variables and both runs."""

    root: Path
    vars: dict[str, Any]
    env: dict[str, str]
    inventory: Path
    first: PlaybookResult | None = None
    second: PlaybookResult | None = None

    def path(self, var: str) -> Path:
        return Path(self.vars[var])

    def config(self, name: str = "clinic_db") -> Path:
        return self.path("backup_agent_config_dir") / f"{name}.json"

    def play(self, verbosity: int = 0, tags: str = "", **overrides: Any) -> PlaybookResult:
        extra = dict(self.vars)
        for key, value in overrides.items():
            if value is None:
                extra.pop(key, None)
            else:
                extra[key] = value
        env = dict(self.env, ANSIBLE_RUN_TAGS=tags) if tags else self.env
        return run_playbook(
            PLAYBOOK, env, extra_vars=extra, inventory=str(self.inventory), verbosity=verbosity
        )


def role_vars(root: Path, pg, passphrase: str) -> dict[str, Any]:
    return {
        "backup_agent_install_packages": False,
        "backup_agent_python": sys.executable,  # has psycopg2, like python3-psycopg2
        "backup_agent_install_dir": str(root / "opt/clinic-backup"),
        "backup_agent_bin_path": str(root / "usr/local/bin/clinic-backup"),
        "backup_agent_config_dir": str(root / "etc/clinic-backup"),
        "backup_agent_passphrase_file": str(root / "etc/clinic-backup/passphrase"),
        "backup_agent_passphrase": passphrase,
        "backup_agent_repository": str(root / "var/backups/clinic/db"),
        "backup_agent_metrics_dir": str(root / "var/lib/prometheus/node-exporter"),
        "backup_agent_log_dir": str(root / "var/log/clinic-backup"),
        "backup_agent_audit_log": str(root / "var/log/clinic-backup/audit.log"),
        "backup_agent_cron_file": str(root / "etc/cron.d/clinic-backup"),
        "backup_agent_logrotate_file": str(root / "etc/logrotate.d/clinic-backup"),
        "backup_agent_restore_test": {"login_user": pg.superuser, "login_password": None},
        "backup_agent_databases": [
            {
                "name": "clinic_db",
                "database": pg.clinic_db,
                "login_host": pg.host,
                "login_port": pg.port,
                "login_user": pg.clinic_user,
                "login_password": pg.clinic_password,
                "verify": {"max_age_hours": 48},
            }
        ],
        "backup_monitoring_textfile_dir": str(root / "var/lib/prometheus/node-exporter"),
        "backup_monitoring_rules_file": str(root / "etc/prometheus/rules/clinic_backup.rules.yml"),
    }


@pytest.fixture(scope="module")
def host(tmp_path_factory, collections_path, pg) -> Host:
    root = tmp_path_factory.mktemp("host")
    # What a Debian host already has: /usr/local/bin, /etc/cron.d and /etc/logrotate.d from
    # the cron and logrotate packages.
    for directory in ("usr/local/bin", "etc/cron.d", "etc/logrotate.d"):
        (root / directory).mkdir(parents=True)
    # ansible.builtin.cron needs the crontab command even with cron_file (make bootstrap
    # installs the cron package); it never touches root's crontab here.
    assert shutil.which("crontab"), "crontab missing: run make bootstrap (it installs cron)"
    env = ansible_env(collections_path, {"ANSIBLE_PIPELINING": "True"})
    inventory = root / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump(
            {"clinic_db_servers": {"hosts": {"localhost": {"ansible_connection": "local"}}}}
        )
    )
    variables = role_vars(root, pg, "clinic " + secrets.token_urlsafe(24))
    base = Host(root, variables, env, inventory)
    base.first = base.play(verbosity=3)
    base.second = base.play()
    return base


def snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every path below root with its mode, uid, mtime and (for files) content."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(info.st_mode) else b""
        found[str(path.relative_to(root))] = (info.st_mode, info.st_uid, info.st_mtime_ns, data)
    return found


def clean_env() -> dict[str, str]:
    """The environment cron gives a job: nothing pointing at this checkout or the server."""
    return {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("PG", "ANSIBLE")) or k == "PYTHONPATH")
    }


def test_converges_and_second_run_changes_nothing(host):
    host.first.assert_ok()
    assert host.first.stats["localhost"]["changed"] > 0
    host.second.assert_ok()
    changed = [r["_task"] for r in host.second.results if r.get("changed")]
    assert changed == [], host.second.output()
    assert host.second.stats["localhost"]["changed"] == 0
    # The validation step really ran the installed agent with each config.
    check = host.second.result(
        "clinic.backup.backup_agent : Check every config with the installed agent"
    )
    assert check["_status"] == "ok" and check["results"][0]["rc"] == 0


def test_no_secret_in_vvv_output(host):
    run = host.first
    assert "EXEC" in run.stdout, "-vvv connection debug output missing"
    places = {
        "stdout": run.stdout,
        "stderr": run.stderr,
        "task results": json.dumps(run.results, default=str),
    }
    for secret in (
        host.vars["backup_agent_passphrase"],
        host.vars["backup_agent_databases"][0]["login_password"],
    ):
        leaks = [where for where, text in places.items() if secret in text]
        assert leaks == [], "secret in %s" % leaks


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_installed_files_and_modes(host):
    passphrase = host.path("backup_agent_passphrase_file")
    assert mode(passphrase) == 0o600
    assert passphrase.read_text() == host.vars["backup_agent_passphrase"] + "\n"
    assert mode(host.path("backup_agent_config_dir")) == 0o700
    assert mode(host.config()) == 0o600
    assert mode(host.path("backup_agent_repository")) == 0o700
    assert mode(host.path("backup_agent_bin_path")) == 0o755

    config = json.loads(host.config().read_text())
    db = host.vars["backup_agent_databases"][0]
    assert {k: config[k] for k in ("database", "login_host", "login_port", "login_user")} == {
        k: db[k] for k in ("database", "login_host", "login_port", "login_user")
    }
    assert config["passphrase_file"] == str(passphrase)
    assert config["repository"] == host.vars["backup_agent_repository"]
    # The entry's verify is merged over the shared one, key by key.
    assert config["verify"] == {"deep": True, "max_age_hours": 48, "size_tolerance_percent": 50}
    assert config["restore_test"] == host.vars["backup_agent_restore_test"]
    assert config["audit_log"] == host.vars["backup_agent_audit_log"]
    assert config["retention"] == {
        "keep_daily": 7,
        "keep_weekly": 4,
        "keep_monthly": 12,
        "keep_yearly": 7,
        "min_keep": 3,
    }
    assert "name" not in config

    install_dir = host.path("backup_agent_install_dir")
    package = install_dir / PACKAGE
    engine = sorted(p.name for p in ENGINE_DIR.glob("*.py"))
    assert sorted(p.name for p in package.glob("*.py")) == sorted(engine + ["__init__.py"])
    assert filecmp.cmpfiles(ENGINE_DIR, package, engine, shallow=False)[0] == engine
    for level in PACKAGE.parents:
        if level.name and level.name != "lib":
            assert (install_dir / level / "__init__.py").is_file(), level
    for path in [install_dir, *install_dir.rglob("*")]:
        info = path.lstat()
        assert info.st_uid == 0 and not info.st_mode & 0o022, "%s is writable by others" % path


def test_cron_file_has_every_job(host):
    lines = host.path("backup_agent_cron_file").read_text().splitlines()
    entries = {line[len("#Ansible: ") :] for line in lines if line.startswith("#Ansible: ")}
    assert entries == {"clinic-backup %s clinic_db" % job for job in JOBS}
    schedules = {
        "backup": "0 1 * * *",
        "verify": "0 3 * * 0",
        "restore-test": "0 4 1 * *",
        "retention": "0 5 * * *",
    }
    for job in JOBS:
        expected = "%s root %s %s --config %s --metrics-dir %s >> %s/%s.clinic_db.log 2>&1" % (
            schedules[job],
            host.vars["backup_agent_bin_path"],
            job,
            host.config(),
            host.vars["backup_agent_metrics_dir"],
            host.vars["backup_agent_log_dir"],
            job,
        )
        assert expected in lines, "\n".join(lines)


def test_installed_agent_runs_every_job(host, pg):
    """What cron runs, run now: backup, verify, restore test and retention all succeed."""
    host.first.assert_ok()
    wrapper = host.vars["backup_agent_bin_path"]
    metrics = host.path("backup_agent_metrics_dir")
    outcomes = {}
    for command in JOBS:
        proc = subprocess.run(
            [wrapper, command, "--config", str(host.config()), "--metrics-dir", str(metrics)],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outcomes[command] = json.loads(proc.stdout)
    set_id = outcomes["backup"]["set_id"]
    assert helpers.local_sets(host.vars["backup_agent_repository"]) == [set_id]
    assert outcomes["verify"]["ok"] and outcomes["verify"]["set_id"] == set_id
    assert outcomes["restore-test"]["set_id"] == set_id
    assert outcomes["retention"]["deleted"] == []  # the only set is the newest: kept
    for job in ("backup", "verify", "restore_test", "retention"):
        text = (metrics / f"clinic_backup_{job}.{pg.clinic_db}.prom").read_text()
        assert (
            f'clinic_backup_last_status{{database="{pg.clinic_db}",operation="{job}"}} 0.0' in text
        )
    audit_log = Path(host.vars["backup_agent_audit_log"])
    assert stat.S_IMODE(audit_log.stat().st_mode) == 0o600
    records = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert [(r["action"], r["outcome"]) for r in records] == [
        ("backup", "ok"),
        ("verify", "ok"),
        ("restore_test", "ok"),
        ("retention", "ok"),
    ]
    # The wrapper's interpreter cannot import clinic.backup on its own: what ran is the copy
    # the role installed (PYTHONPATH set by the wrapper), not this checkout.
    alone = subprocess.run(
        [host.vars["backup_agent_python"], "-c", "import ansible_collections.clinic.backup"],
        env=clean_env(),
        capture_output=True,
        check=False,
    )
    assert alone.returncode != 0


@pytest.mark.parametrize(
    ("passphrase", "message", "fresh"),
    [
        ("", "missing or empty", True),
        ("one\ntwo", "not one line", False),
    ],
    ids=["empty-on-a-new-host", "two-lines-on-an-installed-host"],
)
def test_bad_passphrase_is_refused_and_changes_nothing(
    host, pg, tmp_path, passphrase, message, fresh
):
    target = host
    if fresh:
        root = tmp_path / "new-host"
        for directory in ("usr/local/bin", "etc/cron.d", "etc/logrotate.d"):
            (root / directory).mkdir(parents=True)
        target = Host(
            root,
            role_vars(root, pg, "clinic " + secrets.token_urlsafe(24)),
            host.env,
            host.inventory,
        )
    before = snapshot(target.root)
    run = target.play(backup_agent_passphrase=passphrase)
    assert run.rc != 0
    failed = [r for r in run.results if r["_status"] == "failed"]
    assert len(failed) == 1 and message in failed[0]["msg"], run.output()
    if passphrase:
        assert passphrase not in run.stdout + run.stderr
    assert snapshot(target.root) == before


def test_passphrase_file_is_never_regenerated(host):
    before = host.path("backup_agent_passphrase_file").read_bytes()
    # Not given: the file on the host is kept as it is.
    kept = host.play(tags="backup_agent_configure", backup_agent_passphrase=None)
    kept.assert_ok()
    assert kept.stats["localhost"]["changed"] == 0, kept.output()
    # A different one: refused, since the sets taken so far need the old one.
    other = host.play(backup_agent_passphrase="another " + secrets.token_urlsafe(16))
    assert other.rc != 0
    assert "holds a different passphrase" in other.output()
    assert host.path("backup_agent_passphrase_file").read_bytes() == before


def test_alert_rules_parse_and_name_every_alert(host):
    rules_file = Path(host.vars["backup_monitoring_rules_file"])
    assert stat.S_IMODE(rules_file.stat().st_mode) == 0o644
    doc = yaml.safe_load(rules_file.read_text())
    rules = {r["alert"]: r for group in doc["groups"] for r in group["rules"]}
    assert ALERTS <= set(rules)
    assert (
        rules["ClinicBackupFailed"]["expr"] == 'clinic_backup_last_status{operation="backup"} == 1'
    )
    assert rules["ClinicBackupFailed"]["expr"].endswith("== 1")
    assert rules["ClinicBackupMissing"]["expr"].endswith("> 90000")  # 25 h
    assert rules["ClinicRestoreTestOverdue"]["expr"].endswith("> %d" % (35 * 86400))
    assert "clinic_backup_restore_test_rpo_seconds" in rules["ClinicRestoreTestRpoHigh"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert "summary" in rule["annotations"]
    assert Path(host.vars["backup_monitoring_textfile_dir"]).is_dir()
    promtool = shutil.which("promtool")
    if promtool:
        subprocess.run([promtool, "check", "rules", str(rules_file)], check=True)


# Issue #10, defect 2: databases sharing a repository queue for its lock, start at
# different minutes, and a run still skipped raises an alert.
def test_configs_wait_for_a_locked_repository(host):
    assert json.loads(host.config().read_text())["lock_wait"] == 1800


def cron_minutes(path: Path) -> dict[str, str]:
    """'<command> <name>' -> the minute field of its cron line."""
    lines = path.read_text().splitlines()
    found = {}
    for marker, line in zip(lines, lines[1:], strict=False):
        if marker.startswith("#Ansible: clinic-backup "):
            found[marker[len("#Ansible: clinic-backup ") :]] = line.split()[0]
    return found


def test_cron_minutes_are_staggered_per_database_and_stable(host, pg, tmp_path):
    root = tmp_path / "two-databases"
    for directory in ("usr/local/bin", "etc/cron.d", "etc/logrotate.d"):
        (root / directory).mkdir(parents=True)
    target = Host(
        root, role_vars(root, pg, "clinic " + secrets.token_urlsafe(24)), host.env, host.inventory
    )
    base = target.vars["backup_agent_databases"][0]
    databases = [base, dict(base, name="billing_db"), dict(base, name="imaging_db")]
    first = target.play(tags="backup_agent_cron", backup_agent_databases=databases)
    first.assert_ok()
    cron_file = target.path("backup_agent_cron_file")
    minutes = cron_minutes(cron_file)
    assert [minutes["backup %s" % d["name"]] for d in databases] == ["0", "5", "10"]
    assert [minutes["retention %s" % d["name"]] for d in databases] == ["0", "5", "10"]
    before = cron_file.read_bytes()
    second = target.play(tags="backup_agent_cron", backup_agent_databases=databases)
    second.assert_ok()
    assert second.stats["localhost"]["changed"] == 0, second.output()
    assert cron_file.read_bytes() == before


def test_alert_rules_flag_a_skipped_backup(host):
    rules_file = Path(host.vars["backup_monitoring_rules_file"])
    doc = yaml.safe_load(rules_file.read_text())
    rules = {r["alert"]: r for group in doc["groups"] for r in group["rules"]}
    skipped = rules["ClinicBackupSkipped"]
    assert "clinic_backup_last_skipped_timestamp_seconds" in skipped["expr"]
    assert 'operation="backup"' in skipped["expr"]
    assert skipped["labels"]["severity"] == "critical"
    assert "ClinicBackupJobSkipped" in rules


def test_engine_subpackages_are_installed_and_removed_with_the_collection(host):
    """The engine is copied recursively: a subpackage added to module_utils reaches the
    host on the next converge, and one the collection drops is removed there."""
    probe = ENGINE_DIR / "zz_role_probe"
    installed = host.path("backup_agent_install_dir") / PACKAGE / "zz_role_probe"
    probe.mkdir()
    try:
        (probe / "__init__.py").write_text("")
        (probe / "sample.py").write_text("VALUE = 42\n")
        # The install phase alone: the copy is what is under test.
        host.play(tags="backup_agent_install").assert_ok()
        assert (installed / "sample.py").read_text() == "VALUE = 42\n"
        assert (installed / "__init__.py").is_file()
    finally:
        shutil.rmtree(probe)
    host.play(tags="backup_agent_install").assert_ok()
    assert not (installed / "sample.py").exists()


def test_a_weekly_file_group_is_missing_only_after_its_week(host, tmp_path):
    """ClinicBackupMissing: 25 h for a daily backup, but the weekly configuration group
    (backup_monitoring_backup_max_age_hours_by_database) only after 193 h."""
    rules_file = Path(host.vars["backup_monitoring_rules_file"])
    doc = yaml.safe_load(rules_file.read_text())
    expr = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}["ClinicBackupMissing"]["expr"]
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed")
    metric = "clinic_backup_last_success_timestamp_seconds"
    series = [
        {"series": '%s{database="%s",operation="backup"}' % (metric, name), "values": "0x300"}
        for name in ("configuration", "clinic_db")
    ]

    def firing(hours, *names):
        return {
            "expr": expr,
            "eval_time": "%dh" % hours,
            "exp_samples": [
                {"labels": '{database="%s",operation="backup"}' % n, "value": hours * 3600}
                for n in names
            ],
        }

    test = {
        "rule_files": [],
        "evaluation_interval": "1h",
        "tests": [
            {
                "interval": "1h",
                "input_series": series,
                "promql_expr_test": [
                    firing(24),
                    firing(72, "clinic_db"),
                    firing(200, "configuration", "clinic_db"),
                ],
            }
        ],
    }
    test_file = tmp_path / "missing.test.yml"
    test_file.write_text(yaml.safe_dump(test))
    proc = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wal_alerts_fire_on_failing_and_stalled_archiving(host, tmp_path):
    """ClinicWalArchiveFailing / ClinicWalArchiveStalled, evaluated by promtool on series
    like the ones `clinic-backup wal-status` writes (issue #7)."""
    rules_file = Path(host.vars["backup_monitoring_rules_file"])
    doc = yaml.safe_load(rules_file.read_text())
    rules = {r["alert"]: r for group in doc["groups"] for r in group["rules"]}
    assert {"ClinicWalArchiveFailing", "ClinicWalArchiveStalled"} <= set(rules)
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed")
    labels = 'cluster="main",operation="wal",instance="db1"'
    series = [
        # Failing: the last failure (t=600) is newer than the last success (t=0).
        ("clinic_backup_wal_last_archived_timestamp_seconds{%s}" % labels, "0+0x30"),
        ("clinic_backup_wal_last_failed_timestamp_seconds{%s}" % labels, "600+0x30"),
        # Stalled: 3 files waiting, nothing archived for 1000 s (> 900).
        ("clinic_backup_wal_pending_segments{%s}" % labels, "3+0x30"),
        ("clinic_backup_wal_last_archived_age_seconds{%s}" % labels, "1000+0x30"),
        ("clinic_backup_wal_status_timestamp_seconds{%s}" % labels, "0+60x30"),
        # A healthy cluster next to it: never alerts.
        (
            'clinic_backup_wal_last_archived_timestamp_seconds{cluster="ok",operation="wal",instance="db2"}',
            "900+0x30",
        ),
        (
            'clinic_backup_wal_last_failed_timestamp_seconds{cluster="ok",operation="wal",instance="db2"}',
            "600+0x30",
        ),
        (
            'clinic_backup_wal_pending_segments{cluster="ok",operation="wal",instance="db2"}',
            "1+0x30",
        ),
        (
            'clinic_backup_wal_last_archived_age_seconds{cluster="ok",operation="wal",instance="db2"}',
            "30+0x30",
        ),
        (
            'clinic_backup_wal_status_timestamp_seconds{cluster="ok",operation="wal",instance="db2"}',
            "0+60x30",
        ),
    ]
    expected = {"cluster": "main", "operation": "wal", "instance": "db1", "severity": "critical"}
    test = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "alert_rule_test": [
                    {
                        "eval_time": "10m",
                        "alertname": name,
                        "exp_alerts": [
                            {
                                "exp_labels": expected,
                                "exp_annotations": dict(
                                    rules[name]["annotations"],
                                    **{
                                        k: v.replace("{{ $labels.cluster }}", "main").replace(
                                            "{{ $labels.instance }}", "db1"
                                        )
                                        for k, v in rules[name]["annotations"].items()
                                    },
                                ),
                            }
                        ],
                    }
                    for name in ("ClinicWalArchiveFailing", "ClinicWalArchiveStalled")
                ],
            }
        ],
    }
    test_file = tmp_path / "wal_alerts_test.yml"
    test_file.write_text(yaml.safe_dump(test))
    result = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def cron_entries(path: Path) -> set[str]:
    return {
        line[len("#Ansible: ") :]
        for line in path.read_text().splitlines()
        if line.startswith("#Ansible: ")
    }


def run_wrapper(host: Host, *args: str, config: Path | None = None) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [host.vars["backup_agent_bin_path"], *args, "--config", str(config or host.config())],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    return proc.returncode, json.loads(proc.stdout or "{}"), proc.stdout + proc.stderr


# Last in this file: it changes the shared host's databases, file groups and passphrase.
# One test, three converges (each costs seconds): file groups, dropped entries and a
# passphrase rotation share them.
def test_file_groups_dropped_entries_and_a_rotation_that_keeps_old_sets_restorable(host, tmp_path):
    """1. The runbook's file groups get their own schedules and retention. 2. Converging
    with one database and one file group fewer removes the others' configs and cron
    entries, and a further converge changes nothing. 3. The same converge rotates the
    passphrase (backup_agent_passphrase_replace, through backup_passphrase): new sets use
    the new one, the old one moves into the keyring every config lists, and database and
    file sets from before and after both verify and restore. Neither passphrase shows in
    the ansible output (-vvv), the audit log, the agent's output or any process's argv.
    4. The jobs' logs rotate, the audit log does not."""
    from tests.faults.test_secrets import ProcSampler

    uploads = tmp_path / "uploads"
    logs = tmp_path / "clinic-logs"
    for directory, name in ((uploads, "scan.pdf"), (logs, "app.log")):
        directory.mkdir()
        (directory / name).write_bytes(b"%s of patient 42\n" % name.encode())
    database = host.vars["backup_agent_databases"][0]
    groups = [
        {"name": "uploads", "paths": [str(uploads)]},
        {"name": "app_logs", "paths": [str(logs)], "exclude": ["*.tmp"]},
    ]
    files_repo = {"backup_agent_files_repository": str(host.root / "var/backups/clinic/files")}
    tags = "backup_agent_configure,backup_agent_cron"
    cron_file = host.path("backup_agent_cron_file")
    config_dir = host.path("backup_agent_config_dir")
    uploads_config = config_dir / "uploads.json"
    old = host.vars["backup_agent_passphrase"]
    new = "2027 " + secrets.token_urlsafe(32)
    secret_bytes = {"old passphrase": old.encode(), "new passphrase": new.encode()}
    sampler = ProcSampler(secret_bytes, secret_bytes)
    sampler.start()
    outputs: dict[str, str] = {}
    try:
        host.play(
            tags=tags,
            backup_agent_databases=[database, dict(database, name="billing_db")],
            backup_agent_file_groups=groups,
            **files_repo,
        ).assert_ok()
        entries = cron_entries(cron_file)
        lines = cron_file.read_text().splitlines()
        app_logs = json.loads((config_dir / "app_logs.json").read_text())
        billing_config = (config_dir / "billing_db.json").is_file()
        sets_before = {}
        for label, command, config in (
            ("db", "backup", None),
            ("files", "files-backup", uploads_config),
        ):
            rc, result, text = run_wrapper(host, command, config=config)
            assert rc == 0, text
            sets_before[label] = result["set_id"]
            outputs["%s before" % command] = text
        one = {"backup_agent_databases": [database], "backup_agent_file_groups": groups[:1]}
        rotation = host.play(
            verbosity=3,
            tags=tags,
            backup_agent_passphrase=new,
            backup_agent_passphrase_replace=True,
            **one,
            **files_repo,
        ).assert_ok()
        host.vars.update(backup_agent_passphrase=new, backup_agent_passphrase_replace=True)
        entries_after = cron_entries(cron_file)
        again = host.play(tags=tags, **one, **files_repo).assert_ok()
        sets_after = {}
        for label, command, config in (
            ("db", "backup", None),
            ("files", "files-backup", uploads_config),
        ):
            rc, result, text = run_wrapper(host, command, config=config)
            assert rc == 0, text
            sets_after[label] = result["set_id"]
            outputs["%s after" % command] = text
        for when, sets in (("before", sets_before), ("after", sets_after)):
            for command, label, config in (
                ("verify", "db", None),
                ("restore-test", "db", None),
                ("verify", "files", uploads_config),
                ("files-restore-test", "files", uploads_config),
            ):
                rc, result, text = run_wrapper(
                    host, command, "--set-id", sets[label], config=config
                )
                assert rc == 0 and result["set_id"] == sets[label], text
                outputs["%s %s %s" % (command, label, when)] = text
        rc, listed, text = run_wrapper(host, "list")
        outputs["list"] = text
    finally:
        sampler.stop()

    # 1. File groups: their own schedules, retention, options.
    for name in ("uploads", "app_logs"):
        assert {
            "clinic-backup %s %s" % (job, name)
            for job in ("files-backup", "verify", "files-restore-test", "retention")
        } <= entries
    assert "clinic-backup backup billing_db" in entries and billing_config
    backup_line = lines[lines.index("#Ansible: clinic-backup files-backup uploads") + 1]
    assert backup_line.startswith("30 * * * * root ")  # uploads: hourly
    logs_line = lines[lines.index("#Ansible: clinic-backup files-backup app_logs") + 1]
    assert logs_line.startswith("30 1 * * * root ")  # application logs: daily
    assert app_logs["retention"] == {
        "keep_daily": 14,
        "keep_weekly": 0,
        "keep_monthly": 0,
        "keep_yearly": 0,
        "min_keep": 3,
    }
    assert app_logs["paths"] == [str(logs)] and app_logs["exclude"] == ["*.tmp"]
    assert app_logs["name"] == "app_logs" and "schedule" not in app_logs

    # 2. Dropped: configs and cron entries gone; a further converge changes nothing.
    assert not [e for e in entries_after if e.endswith((" app_logs", " billing_db"))]
    assert "clinic-backup files-backup uploads" in entries_after
    assert "clinic-backup backup %s" % database["name"] in entries_after
    assert not (config_dir / "app_logs.json").exists()
    assert not (config_dir / "billing_db.json").exists()
    assert again.stats["localhost"]["changed"] == 0, again.output()

    # 3. Rotation: the keyring, the configs, each set naming its key.
    keyring = config_dir / "keyring"
    (kept,) = keyring.iterdir()
    assert kept.read_text() == old + "\n" and mode(kept) == 0o400 and mode(keyring) == 0o700
    assert host.path("backup_agent_passphrase_file").read_text() == new + "\n"
    for config in (host.config(), uploads_config):
        assert json.loads(config.read_text())["old_passphrase_files"] == [str(kept)]
    key_ids = {s["id"]: s["key_id"] for s in listed["sets"]}
    assert key_ids[sets_before["db"]] == kept.name != key_ids[sets_after["db"]]
    places = {
        "ansible stdout": rotation.stdout,
        "ansible stderr": rotation.stderr,
        "task results": json.dumps(rotation.results, default=str),
        "audit log": host.path("backup_agent_audit_log").read_text(),
        **outputs,
    }
    assert "EXEC" in rotation.stdout, "-vvv connection debug output missing"
    leaks = [
        "%s in %s" % (label, place)
        for place, text in places.items()
        for label, secret in (("old", old), ("new", new))
        if secret in text
    ]
    leaks += ["%s in %s of %s" % (label, where, name) for where, _pid, name, label in sampler.hits]
    assert leaks == []
    assert "gpg" in sampler.seen, sampler.seen

    # 4. The jobs' logs rotate (daily, 14 days); the audit log never does.
    logrotate_conf = host.path("backup_agent_logrotate_file")
    assert "rotate 14" in logrotate_conf.read_text()
    log_dir = host.path("backup_agent_log_dir")
    job_log = log_dir / "backup.clinic_db.log"
    with job_log.open("a") as handle:
        handle.write('{"ok": true}\n')
    audit = host.path("backup_agent_audit_log")
    audit_before = audit.read_bytes()
    subprocess.run(
        ["logrotate", "-f", "-s", str(tmp_path / "logrotate.state"), str(logrotate_conf)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert [p.name for p in log_dir.glob("backup.clinic_db.log-*")], sorted(log_dir.iterdir())
    assert job_log.read_bytes() == b""
    assert audit.read_bytes() == audit_before
    assert not list(log_dir.glob("audit.log-*"))
