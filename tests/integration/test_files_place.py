"""clinic.backup.files_place through real ansible-playbook runs: configuration put back in
place, validated by a real ``nginx -t`` and reloaded into a real, serving nginx.

The live web server is a throwaway nginx (testbed/nginx.py) on a free loopback port with
its own prefix; its site file, an application ``.env`` and a systemd unit form the
configuration file group. Evidence comes from the server itself: the body it answers
an HTTP request with, and the reloads its error log records.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from testbed.dataset import FAKE_SECRETS, make_config_files
from testbed.nginx import Nginx, site

pytestmark = pytest.mark.integration

if not Nginx.available():
    pytest.skip(
        "nginx is not installed (scripts/bootstrap.sh installs nginx-light)",
        allow_module_level=True,
    )


def hidden_leftovers(*directories: Path) -> list[str]:
    """Asides and temporary files a placement leaves next to its destinations."""
    return sorted(
        name
        for directory in directories
        for name in os.listdir(directory)
        if ".pre-restore-" in name or ".placing-" in name
    )


@pytest.fixture
def web(tmp_path):
    server = Nginx(tmp_path / "nginx")
    server.write_config("backed-up site")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def config(tmp_path, web):
    """The live configuration: the nginx site, the app's .env and a unit, backed up."""
    files = make_config_files(tmp_path / "etc")
    files["nginx"] = web.site
    return files


def place_task(title, repo, passphrase_file, keep_dir, place, **extra):
    args = dict(
        repository=str(repo),
        name="config",
        passphrase_file=str(passphrase_file),
        keep_dir=str(keep_dir),
        place=place,
        **extra,
    )
    return {"name": title, "clinic.backup.files_place": args}


def backup_config(ansible, repo, passphrase_file, paths):
    run = ansible.play(
        [
            {
                "name": "config backup",
                "clinic.backup.files_backup": {
                    "name": "config",
                    "paths": [str(p) for p in paths],
                    "repository": str(repo),
                    "passphrase_file": str(passphrase_file),
                },
            }
        ]
    ).assert_ok()
    return run.result("config backup")["set_id"]


def placements(web, config):
    return [
        {
            "path": str(web.site),
            "mode": "0644",
            "validate": web.test_argv,
            "reload": web.reload_argv,
        },
        {"path": str(config["env"])},  # a .env: secret by its name
        {"path": str(config["systemd"]), "mode": "0644"},
    ]


def test_configuration_group_placed_validated_and_reloaded(
    ansible, web, config, passphrase_file, tmp_path
):
    repo, keep = tmp_path / "config-repo", tmp_path / "kept"
    set_id = backup_config(
        ansible, repo, passphrase_file, [web.site, config["env"], config["systemd"]]
    )
    backed_up = {k: Path(p).read_bytes() for k, p in config.items()}
    # Drift after the backup: the site serves something else, the .env was edited and
    # left readable by everyone, the unit was deleted.
    web.site.write_text(site(web.port, "drifted site"))
    os.chmod(web.site, 0o664)
    os.kill(web.proc.pid, 1)  # SIGHUP: the drift is live
    web.wait_for_body("drifted site")
    config["env"].write_text("DATABASE_PASSWORD=drifted\n")
    os.chmod(config["env"], 0o644)
    config["systemd"].unlink()
    reloads = web.reloads()

    task = place_task("place", repo, passphrase_file, keep, placements(web, config))
    check = ansible.play([task], check=True, extra_env={"ANSIBLE_DIFF_ALWAYS": "1"}).assert_ok()
    planned = check.result("place")
    assert planned["changed"] is True and planned["set_id"] == set_id
    assert {p["dest"]: p["state"] for p in planned["placed"]} == {
        str(web.site): "replaced",
        str(config["env"]): "replaced",
        str(config["systemd"]): "created",
    }
    assert planned["would_validate"] == [web.test_argv]
    assert planned["would_reload"] == [web.reload_argv]
    # Check mode changed nothing and reloaded nothing.
    assert web.site.read_text() == site(web.port, "drifted site")
    assert not config["systemd"].exists() and web.reloads() == reloads
    assert "secret: contents not shown" in planned["diff"]["after"]
    assert not keep.exists()

    run = ansible.play([task], extra_env={"ANSIBLE_DIFF_ALWAYS": "1"}).assert_ok()
    placed = run.result("place")
    assert placed["changed"] is True
    assert [v["rc"] for v in placed["validated"]] == [0]
    assert placed["reloaded"] == [{"argv": web.reload_argv, "rc": 0}]
    # The live server serves the restored site: it was reloaded, once.
    web.wait_for_body("backed-up site")
    assert web.reloads() == reloads + 1
    for key in ("nginx", "env", "systemd"):
        assert config[key].read_bytes() == backed_up[key], key
    assert stat.S_IMODE(config["env"].stat().st_mode) == 0o600
    assert stat.S_IMODE(web.site.stat().st_mode) == 0o644
    assert stat.S_IMODE(config["systemd"].stat().st_mode) == 0o644
    # The replaced versions are kept, privately; nothing is left beside the destinations.
    kept_env = Path(placed["kept_dir"]) / str(config["env"]).lstrip("/")
    assert kept_env.read_text() == "DATABASE_PASSWORD=drifted\n"
    assert stat.S_IMODE(Path(placed["kept_dir"]).stat().st_mode) == 0o700
    assert hidden_leftovers(web.site.parent, config["env"].parent, config["systemd"].parent) == []
    # The .env's contents are nowhere in what Ansible showed (diff included).
    shown = run.stdout + run.stderr + json.dumps(run.results) + json.dumps(check.results)
    for value in list(FAKE_SECRETS.values()) + ["drifted"]:
        assert value not in shown
    assert str(config["env"]) in placed["diff"]["after"]

    # Idempotent: a second run changes nothing, validates and reloads nothing.
    again = ansible.play([task]).assert_ok().result("place")
    assert again["changed"] is False
    assert again["validated"] == [] and again["reloaded"] == []
    assert {p["state"] for p in again["placed"]} == {"unchanged"}
    assert web.reloads() == reloads + 1


def test_broken_nginx_site_refused_old_config_left_serving(
    ansible, web, config, passphrase_file, tmp_path
):
    repo, keep = tmp_path / "config-repo", tmp_path / "kept"
    # The set holds a broken site (a truncated file) and an older .env.
    live_site = web.site.read_bytes()
    live_env = config["env"].read_bytes()
    web.site.write_text("server {\n    listen 127.0.0.1:%d\n" % web.port)
    config["env"].write_text("DATABASE_PASSWORD=from-the-backup\n")
    backup_config(ansible, repo, passphrase_file, [web.site, config["env"]])
    web.site.write_bytes(live_site)
    config["env"].write_bytes(live_env)
    os.chmod(config["env"], 0o600)
    env_inode = config["env"].stat().st_ino
    reloads = web.reloads()

    run = ansible.play(
        [place_task("place", repo, passphrase_file, keep, placements(web, config)[:2])]
    )
    assert run.rc != 0
    failed = run.result("place")
    assert failed["_status"] == "failed" and failed["error_type"] == "ValidationError"
    assert "validation of %s failed" % web.site in failed["msg"]
    assert "nothing was reloaded" in failed["msg"]
    assert 'expecting ";" or "}"' in failed["msg"]  # nginx's own words
    assert failed["reloaded"] == [] and failed["validated"][0]["rc"] != 0
    assert sorted(failed["rolled_back"]) == sorted([str(web.site), str(config["env"])])
    # Every file is back as it was (the .env the very same inode), nothing was reloaded,
    # and the server still answers with the old site.
    assert web.site.read_bytes() == live_site
    assert config["env"].read_bytes() == live_env
    assert config["env"].stat().st_ino == env_inode
    assert web.reloads() == reloads
    assert web.get() == "backed-up site"
    assert hidden_leftovers(web.site.parent, config["env"].parent) == []
    assert not keep.exists() or list(keep.iterdir()) == []  # no copy of what is back anyway
    assert "from-the-backup" not in run.stdout + run.stderr + json.dumps(run.results)


def test_placement_bad_inputs_change_nothing(ansible, web, config, passphrase_file, tmp_path):
    repo, keep = tmp_path / "config-repo", tmp_path / "kept"
    backup_config(ansible, repo, passphrase_file, [web.site, config["env"]])
    before = {p: p.read_bytes() for p in (web.site, config["env"])}
    cases = {
        "not in the set": (
            [{"path": str(config["systemd"])}],
            "does not hold %s" % config["systemd"],
        ),
        "loose mode on a secret": (
            [{"path": str(config["env"]), "mode": "0644"}],
            "lets other users read a secret file",
        ),
        "validate not on PATH": (
            [{"path": str(web.site), "validate": ["no-such-nginx", "-t"]}],
            "is not on PATH",
        ),
        "shell line as validate": (
            [{"path": str(web.site), "validate": ["nginx -t && reboot", ""]}],
            "list of non-empty strings",
        ),
    }
    run = ansible.play(
        [
            dict(place_task(name, repo, passphrase_file, keep, place), ignore_errors=True)
            for name, (place, _expected) in cases.items()
        ]
    )
    for name, (_place, expected) in cases.items():
        result = run.result(name)
        assert result["_status"] in ("failed", "ignored"), name
        assert expected in result["msg"], (name, result["msg"])
    assert {p: p.read_bytes() for p in before} == before
    assert not keep.exists() and web.reloads() == 0
