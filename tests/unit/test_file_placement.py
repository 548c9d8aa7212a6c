"""Placement options: what files_place refuses before it reads a set or touches a file."""

from __future__ import annotations

import pytest

from ansible_collections.clinic.backup.plugins.module_utils.errors import ConfigError
from ansible_collections.clinic.backup.plugins.module_utils.file_placement import (
    Placement,
    PlacementOptions,
    looks_secret,
)


@pytest.mark.parametrize(
    ("path", "secret"),
    [
        ("/home/clinic/clinic/.env", True),
        ("/srv/app/.env.production", True),
        ("/etc/ssl/private/clinic.key", True),
        ("/etc/letsencrypt/live/clinic/fullchain.pem", True),
        ("/etc/nginx/sites-available/clinic", False),
        ("/etc/systemd/system/clinic-backend.service", False),
        ("/srv/app/environment", False),
    ],
)
def test_secret_by_name(path, secret):
    assert looks_secret(path) is secret


def test_modes_owners_and_commands_are_parsed():
    placement = Placement(
        "/etc/nginx/sites-available/clinic/",
        mode="0644",
        owner="0",
        group="root",
        validate=["nginx", "-t", "-c", "{path}"],
        reload=["systemctl", "reload", "nginx"],
    )
    assert placement.path == placement.dest == "/etc/nginx/sites-available/clinic"
    assert (placement.mode, placement.uid, placement.gid) == (0o644, 0, 0)
    assert placement.file_mode(0o600) == 0o644 and placement.secret is False
    # Secrets never get group or other bits, whatever the set stored.
    env = Placement("/srv/app/.env")
    assert env.secret and env.file_mode(0o664) == 0o600 and env.dir_mode(0o755) == 0o700


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"path": "etc/nginx.conf"}, "must be an absolute path"),
        ({"path": "/srv/app/.env", "mode": "0640"}, "lets other users read a secret file"),
        ({"path": "/etc/x", "mode": "u+rw"}, "is not an octal mode"),
        ({"path": "/etc/x", "mode": "4755"}, "setuid"),
        (
            {"path": "/etc/x", "validate": "nginx -t && systemctl reload nginx"},
            "never a shell line",
        ),
        ({"path": "/etc/x", "reload": ["systemctl", ""]}, "non-empty strings"),
        ({"path": "/etc/x", "owner": "no-such-user-here"}, "does not exist on this host"),
        ({"path": "/etc/x", "validate_cmd": ["true"]}, "unknown key(s) validate_cmd"),
        ({"dest": "/etc/x"}, "has no path"),
    ],
)
def test_bad_placements_are_refused_naming_the_problem(entry, words):
    with pytest.raises(ConfigError) as caught:
        PlacementOptions("config", [entry])
    assert words in str(caught.value)


def test_overlapping_destinations_and_empty_groups_are_refused():
    with pytest.raises(ConfigError, match="overlap"):
        PlacementOptions(
            "config", [{"path": "/etc/nginx"}, {"path": "/etc/nginx/sites-available/x"}]
        )
    with pytest.raises(ConfigError, match="at least one path"):
        PlacementOptions("config", [])
    with pytest.raises(ConfigError, match="not a valid file set name"):
        PlacementOptions("../config", [{"path": "/etc/x"}])
    with pytest.raises(ConfigError, match="ISO 8601"):
        PlacementOptions("config", [{"path": "/etc/x"}], not_after="yesterday")
