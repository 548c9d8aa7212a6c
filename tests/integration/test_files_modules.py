"""clinic.backup.files_backup and files_restore through real ansible-playbook runs.

A sample uploads tree (testbed make_uploads, plus links and a marker file) and the
sample configuration files are backed up to a local repository and to S3, verified,
and restored: into new directories (compared file by file: sha256, mode, mtime, link
targets), over an existing one (kept aside) and as a rehearsal (leaving nothing).
Crafted sets with escaping members must fail naming the member and write nothing
outside; bad input fails clearly and changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from testbed.dataset import make_config_files, make_uploads
from testbed.files import write_passphrase_file

from ansible_collections.clinic.backup.plugins.module_utils import authentication
from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.repository import (
    isoformat,
    new_set_id,
    utc_now,
)
from tests.integration import helpers

pytestmark = pytest.mark.integration


def tree(root: Path) -> dict[str, tuple]:
    """Every entry below ``root``: kind, mode, mtime and sha256 (files) or link target."""
    out = {}
    for current, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(current) / name
            rel = str(path.relative_to(root))
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                out[rel] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(info.st_mode), int(info.st_mtime), digest)
    return out


def _same_device(path: Path, device: int) -> bool:
    try:
        return os.lstat(path).st_dev == device
    except OSError:
        return False


def plaintext_copies(token: bytes, roots, skip: Path, since: float) -> list[str]:
    """Regular files below ``roots`` written since ``since`` that contain ``token``."""
    found = []
    for root in roots:
        # Stay on the root's own filesystem: a /proc mounted under /tmp (a chroot being
        # built) holds "regular" files such as kmsg whose read never ends.
        device = os.stat(root).st_dev
        for current, dirs, names in os.walk(root, onerror=lambda _exc: None):
            dirs[:] = [
                d
                for d in dirs
                if Path(current, d) != skip and _same_device(Path(current, d), device)
            ]
            for name in names:
                path = os.path.join(current, name)
                try:
                    info = os.lstat(path)
                    if (
                        not stat.S_ISREG(info.st_mode)
                        or info.st_mtime < since
                        or info.st_size > 64 * 1024 * 1024
                    ):
                        continue
                    with open(path, "rb") as handle:
                        if token in handle.read():
                            found.append(path)
                except OSError:
                    continue
    return found


def backup_task(title, /, **args):
    return {"name": title, "clinic.backup.files_backup": args}


def restore_task(title, /, **args):
    return {"name": title, "clinic.backup.files_restore": args}


def test_backup_verify_and_restore_uploads_and_config_through_local_and_s3(
    ansible, s3, bucket, passphrase_file, tmp_path
):
    source = tmp_path / "src"
    uploads = source / "uploads"
    make_uploads(uploads, count=40)
    config = make_config_files(source / "config")
    token = ("PHI-MARKER-" + secrets.token_hex(16)).encode()
    (uploads / "letters").mkdir()
    (uploads / "letters" / "referral.txt").write_bytes(b"Referral letter " + token + b"\n")
    os.symlink("../letters/referral.txt", uploads / "scans" / "referral-link")
    os.symlink("/etc/hostname", uploads / "outside-link")
    before = tree(uploads)
    repo = tmp_path / "files-repo"
    config_repo = tmp_path / "config-repo"
    s3_target = {"bucket": bucket, "prefix": "files", "endpoint_url": s3.endpoint_url}
    common = {"passphrase_file": str(passphrase_file)}
    started = time.time() - 1
    run = ansible.play(
        [
            dict(
                backup_task(
                    "check",
                    name="uploads",
                    paths=[str(uploads)],
                    repository=str(repo),
                    s3_targets=[s3_target],
                    **common,
                ),
                check_mode=True,
            ),
            backup_task(
                "uploads",
                name="uploads",
                paths=[str(uploads)],
                exclude=["*.part"],
                repository=str(repo),
                s3_targets=[s3_target],
                audit_log=str(tmp_path / "audit" / "audit.jsonl"),
                **common,
            ),
            backup_task(
                "config",
                name="config",
                paths=[
                    str(config["env"]),
                    str(source / "config" / "nginx"),
                    str(config["systemd"]),
                ],
                repository=str(config_repo),
                **common,
            ),
            {
                "name": "verify local",
                "clinic.backup.backup_verify": dict(repository=str(repo), **common),
            },
            {
                "name": "verify s3",
                "clinic.backup.backup_verify": dict(
                    bucket=bucket, prefix="files", endpoint_url=s3.endpoint_url, **common
                ),
            },
            {
                "name": "verify config",
                "clinic.backup.backup_verify": dict(repository=str(config_repo), **common),
            },
        ]
    ).assert_ok()
    # No plaintext copy anywhere: repositories, S3, the temp directories (sources excepted).
    assert plaintext_copies(token, [tmp_path, "/tmp", "/var/tmp"], source, started) == []
    checked = run.result("check")
    assert checked["changed"] is True and checked["files"]["count"] == 41
    backup = run.result("uploads")
    set_id = backup["set_id"]
    assert [t["ok"] for t in backup["targets"]] == [True, True]
    assert helpers.local_sets(repo) == [set_id]  # check mode wrote nothing
    assert backup["files"]["count"] == 41 and backup["files"]["symlinks"] == 1
    assert [s["path"] for s in backup["left_out"]] == [str(uploads / "outside-link")]
    assert any("outside-link" in w for w in run.result("uploads").get("warnings", []))
    manifest = helpers.manifest(repo, set_id)
    assert manifest["kind"] == "files" and manifest["database"] == "uploads"
    assert manifest["artifacts"][0]["content"] == "files-tar" and "row_counts" not in manifest
    assert "patient_" not in json.dumps(manifest)  # no upload names in the clear
    s3_body = (
        s3.client()
        .get_object(
            Bucket=bucket, Key="files/sets/%s/%s" % (set_id, manifest["artifacts"][0]["file"])
        )["Body"]
        .read()
    )
    assert hashlib.sha256(s3_body).hexdigest() == manifest["artifacts"][0]["sha256"]
    assert token not in s3_body
    audit = (tmp_path / "audit" / "audit.jsonl").read_text().splitlines()
    assert json.loads(audit[-1])["set_id"] == set_id
    for name in ("verify local", "verify s3", "verify config"):
        assert run.result(name)["ok"] is True, run.result(name)

    restored = tmp_path / "restored"
    from_s3 = tmp_path / "from-s3"
    config_out = tmp_path / "config-out"
    run = ansible.play(
        [
            restore_task("create", repository=str(repo), target_dir=str(restored), **common),
            restore_task(
                "create from s3",
                bucket=bucket,
                prefix="files",
                endpoint_url=s3.endpoint_url,
                name="uploads",
                target_dir=str(from_s3),
                **common,
            ),
            restore_task(
                "config", repository=str(config_repo), target_dir=str(config_out), **common
            ),
            {
                "name": "damage",
                "ansible.builtin.copy": {"dest": str(restored / "stray.txt"), "content": "x"},
            },
            dict(
                restore_task(
                    "replace check",
                    repository=str(repo),
                    target_dir=str(restored),
                    mode="replace",
                    **common,
                ),
                check_mode=True,
            ),
            restore_task(
                "replace",
                repository=str(repo),
                target_dir=str(restored),
                mode="replace",
                preserve_owner=True,
                **common,
            ),
            restore_task(
                "rehearse",
                repository=str(repo),
                target_dir=str(tmp_path / "rehearsal"),
                mode="rehearse",
                **common,
            ),
        ]
    ).assert_ok()
    expected = {k: v for k, v in before.items() if k != "outside-link"}
    assert tree(restored) == expected
    assert tree(from_s3) == expected
    assert run.result("create")["files"] == 41 and run.result("create")["layout"] == "content"
    previous = Path(run.result("replace")["previous_dir"])
    assert previous.name.startswith("restored.pre-restore-")
    assert (previous / "stray.txt").read_text() == "x"
    assert run.result("replace check")["changed"] is True
    rehearsal = run.result("rehearse")
    assert rehearsal["changed"] is False and rehearsal["files"] == 41
    assert rehearsal["duration_seconds"] > 0
    assert not (tmp_path / "rehearsal").exists()
    assert [p for p in tmp_path.iterdir() if ".restoring-" in p.name] == []
    assert sorted(os.listdir(config_out)) == ["0-.env", "1-nginx", "2-clinic-app.service"]
    assert (config_out / "0-.env").read_bytes() == config["env"].read_bytes()
    assert stat.S_IMODE((config_out / "0-.env").stat().st_mode) == 0o600

    # A flipped byte: verify fails naming the artifact, restore refuses the set.
    artifact = helpers.artifact_path(repo, set_id, name="files")
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    run = ansible.play(
        [
            {
                "name": "verify",
                "clinic.backup.backup_verify": dict(repository=str(repo), **common),
                "ignore_errors": True,
            },
            dict(
                restore_task(
                    "restore", repository=str(repo), target_dir=str(tmp_path / "again"), **common
                ),
                ignore_errors=True,
            ),
        ]
    )
    verify = run.result("verify")
    assert verify["ok"] is False and artifact.name in " ".join(verify["failures"])
    assert any(c["artifact"] == artifact.name for c in verify["checks"] if c["status"] == "fail")
    restore = run.result("restore")
    assert restore["_status"] in ("failed", "ignored") and "sha256" in restore["msg"]
    assert not (tmp_path / "again").exists()
    assert [p for p in tmp_path.iterdir() if ".restoring-" in p.name] == []


# ---------------------------------------------------------------------- crafted sets
def _info(name, kind=tarfile.REGTYPE, data=b"", linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
    info.mtime = 1_700_000_000
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def build_file_set(repo: Path, passphrase_file: Path, extra) -> str:
    """A file set of one directory whose tar (zstd + gpg with the right passphrase, correct
    sha256, size, count and bytes in the sealed manifest) holds two good files plus ``extra``."""
    entries = [
        _info("0-uploads", tarfile.DIRTYPE),
        _info("0-uploads/scan.dcm", data=b"DICM scan"),
        _info("0-uploads/letter.txt", data=b"letter"),
    ] + [_info(*e) for e in extra]
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    compressed = subprocess.run(
        ["zstd", "-q", "-c"], input=stream.getvalue(), capture_output=True, check=True
    ).stdout
    home = repo.parent / ("gnupg-" + secrets.token_hex(4))
    home.mkdir(mode=0o700)
    try:
        encrypted = subprocess.run(
            helpers.stock_gpg(
                passphrase_file, home, "--symmetric", "--cipher-algo", "AES256", "--output", "-"
            ),
            input=compressed,
            capture_output=True,
            check=True,
        ).stdout
    finally:
        helpers.kill_gpg_agent(home)
    started = utc_now()
    set_id = new_set_id("uploads", started)
    set_dir = repo / "sets" / set_id
    set_dir.mkdir(parents=True, mode=0o700)
    (set_dir / "uploads.tar.zst.gpg").write_bytes(encrypted)
    regular = [(i, d) for i, d in entries if i.isreg()]
    manifest = {
        "format_version": 1,
        "id": set_id,
        "kind": "files",
        "database": "uploads",
        "format": "tar",
        "compression": {"algorithm": "zstd", "level": 3},
        "encryption": {"method": "gpg-symmetric", "cipher": "AES256"},
        "artifacts": [
            {
                "name": "files",
                "file": "uploads.tar.zst.gpg",
                "content": "files-tar",
                "size": len(encrypted),
                "sha256": hashlib.sha256(encrypted).hexdigest(),
            }
        ],
        "files": {
            "count": len(regular),
            "bytes": sum(len(d) for _i, d in regular),
            "roots": [{"path": "/srv/uploads", "member": "0-uploads", "type": "directory"}],
        },
        "started_at": isoformat(started),
        "finished_at": isoformat(utc_now()),
        "options": {},
    }
    # Sealed with the passphrase: whoever crafted it knew it, so only the tar checks stand.
    manifest = authentication.seal(manifest, RecordKey.from_file(str(passphrase_file)), "manifest")
    (set_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return set_id


MALICIOUS = {
    # key: (extra members, what the error must say)
    "parent": (
        [("0-uploads/../evil", tarfile.REGTYPE, b"owned")],
        "tar member '0-uploads/../evil' is unsafe (parent directory reference)",
    ),
    "absolute": (
        [("/tmp/clinic-evil-abs", tarfile.REGTYPE, b"owned")],
        "tar member '/tmp/clinic-evil-abs' is unsafe (absolute path)",
    ),
    "link out": (
        [("0-uploads/passwd", tarfile.SYMTYPE, b"", "../../../../etc/passwd")],
        "tar member '0-uploads/passwd' is a link pointing outside the restored directory",
    ),
}


def test_crafted_sets_and_bad_input_fail_clearly_and_change_nothing(
    ansible, passphrase_file, tmp_path
):
    repo = tmp_path / "repo"
    good = build_file_set(repo, passphrase_file, [])
    crafted = {
        key: build_file_set(repo, passphrase_file, extra) for key, (extra, _m) in MALICIOUS.items()
    }
    existing = tmp_path / "live"
    existing.mkdir()
    (existing / "keep.txt").write_text("live data")
    wrong = write_passphrase_file(tmp_path / "wrong-passphrase")
    common = {"repository": str(repo), "passphrase_file": str(passphrase_file)}
    sources = tmp_path / "sources"
    sources.mkdir()
    tasks = [
        dict(
            restore_task(
                "crafted " + key, set_id=set_id, target_dir=str(tmp_path / "out"), **common
            ),
            ignore_errors=True,
        )
        for key, set_id in crafted.items()
    ]
    tasks.append(
        {
            "name": "verify crafted",
            "clinic.backup.backup_verify": dict(
                set_id=crafted["link out"], max_age_hours=0, size_tolerance_percent=0, **common
            ),
            "ignore_errors": True,
        }
    )
    bad = {
        "missing path": (
            backup_task(
                "missing path",
                name="uploads",
                paths=[str(sources / "absent")],
                repository=str(tmp_path / "new-repo"),
                encrypt=False,
            ),
            ["absent does not exist"],
        ),
        "relative path": (
            backup_task(
                "relative path",
                name="uploads",
                paths=["var/www/uploads"],
                repository=str(tmp_path / "new-repo"),
                encrypt=False,
            ),
            ["is relative"],
        ),
        "target exists": (
            restore_task("target exists", set_id=good, target_dir=str(existing), **common),
            ["already exists", "mode: replace"],
        ),
        "wrong passphrase": (
            restore_task(
                "wrong passphrase",
                repository=str(repo),
                set_id=good,
                target_dir=str(tmp_path / "out"),
                passphrase_file=str(wrong),
            ),
            ["does not open set", "sealed with another passphrase"],
        ),
    }
    tasks += [dict(task, ignore_errors=True) for task, _words in bad.values()]
    tasks.append(
        restore_task(
            "control", set_id=good, target_dir=str(tmp_path / "control"), mode="rehearse", **common
        )
    )
    before = sorted(os.listdir(tmp_path))
    repo_before = tree(repo)
    run = ansible.play(tasks)
    for key, (_extra, words) in MALICIOUS.items():
        result = run.result("crafted " + key)
        assert result["_status"] in ("failed", "ignored"), result
        assert words in result["msg"], result["msg"]
        assert result["error_type"] == "IntegrityError"
    verify = run.result("verify crafted")
    assert verify["ok"] is False and "0-uploads/passwd" in " ".join(verify["failures"])
    for name, (_task, words) in bad.items():
        result = run.result(name)
        assert result["_status"] in ("failed", "ignored"), (name, result)
        for word in words:
            assert word in result["msg"], (name, word, result["msg"])
        assert "Traceback" not in result.get("module_stderr", ""), name
    assert run.result("control")["files"] == 2  # the crafted sets are valid but for their members
    # Nothing written outside: no new entries next to the targets, nothing under /tmp or /etc.
    assert sorted(os.listdir(tmp_path)) == before
    assert not Path("/tmp/clinic-evil-abs").exists() and not (tmp_path / "evil").exists()
    assert (existing / "keep.txt").read_text() == "live data" and os.listdir(existing) == [
        "keep.txt"
    ]
    assert not (tmp_path / "new-repo").exists()
    after = tree(repo)
    assert {k: v for k, v in after.items() if not k.endswith("verification.json")} == repo_before
