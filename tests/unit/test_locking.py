"""Issue #10, defect 3: where the run lock lives and what it refuses (real flock, real files).

S3-only configs used to lock ``clinic-backup-<hash>.lock`` in the shared temp directory:
any local user could pre-create and hold it (every backup exits 75) or plant a symlink
that root then truncated. Locks now live in a directory of the running user, and no lock
file that is a link, a FIFO or not ours is ever followed, waited on or truncated.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from pathlib import Path

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import locking
from ansible_collections.clinic.backup.plugins.module_utils.errors import LockedError, StoreError
from ansible_collections.clinic.backup.plugins.module_utils.locking import RunLock, lock_path_for
from ansible_collections.clinic.backup.plugins.module_utils.module_support import s3_repository
from ansible_collections.clinic.backup.plugins.module_utils.repository import LocalRepository

OTHER_UID = 65534  # nobody
LOCK_DIR_ENV = "CLINIC_BACKUP_LOCK_DIR"


def s3_only():
    # A real S3Repository; nothing here talks to the endpoint.
    return [s3_repository({"bucket": "clinic-backups", "endpoint_url": "http://127.0.0.1:9"}, {})]


@pytest.fixture
def lock_dir(tmp_path, monkeypatch) -> Path:
    """The lock directory, pointed into tmp_path the way the tests' agents point it."""
    path = tmp_path / "locks"
    monkeypatch.setenv(LOCK_DIR_ENV, str(path))
    return path


def test_s3_only_lock_is_not_in_the_shared_temp_dir(monkeypatch):
    monkeypatch.delenv(LOCK_DIR_ENV, raising=False)
    path = lock_path_for(s3_only())
    assert not path.startswith(tempfile.gettempdir() + os.sep)
    assert os.path.dirname(path) == locking.lock_directory()
    if os.geteuid() == 0:
        assert os.path.dirname(path) in ("/run/clinic-backup", "/var/lib/clinic-backup/locks")


def test_lock_directory_is_created_private_and_the_lock_works(lock_dir):
    path = lock_path_for(s3_only())
    assert os.path.dirname(path) == str(lock_dir)
    with RunLock(path):
        assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o700
        assert Path(path).read_text() == str(os.getpid())
        with pytest.raises(LockedError, match="already running"):
            RunLock(path).acquire()
    with RunLock(path):
        pass


def test_missing_parents_of_the_lock_directory_are_private_too(tmp_path, monkeypatch):
    deep = tmp_path / "home" / ".cache" / "clinic-backup" / "locks"
    monkeypatch.setenv(LOCK_DIR_ENV, str(deep))
    with RunLock(lock_path_for(s3_only())):
        pass
    for level in (deep, deep.parent, deep.parent.parent):
        assert stat.S_IMODE(level.stat().st_mode) == 0o700, level


def test_a_symlinked_lock_directory_is_refused(lock_dir, tmp_path):
    victim = tmp_path / "elsewhere"
    victim.mkdir(mode=0o700)
    lock_dir.symlink_to(victim)
    with pytest.raises(StoreError, match="lock directory .* is a symlink") as caught:
        RunLock(lock_path_for(s3_only())).acquire()
    assert str(lock_dir) in str(caught.value) and "remove it" in str(caught.value)
    assert list(victim.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_lock_directory_owned_by_another_user_is_refused(lock_dir):
    lock_dir.mkdir(mode=0o700)
    os.chown(lock_dir, OTHER_UID, OTHER_UID)
    with pytest.raises(StoreError, match="owned by uid %d" % OTHER_UID):
        RunLock(lock_path_for(s3_only())).acquire()
    assert list(lock_dir.iterdir()) == []


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o702])
def test_a_lock_directory_others_can_write_is_refused(lock_dir, mode):
    lock_dir.mkdir()
    lock_dir.chmod(mode)
    with pytest.raises(StoreError, match="writable by group or others") as caught:
        RunLock(lock_path_for(s3_only())).acquire()
    assert "chmod 0700" in str(caught.value)
    assert list(lock_dir.iterdir()) == []


def _planted(kind, path: Path, victim: Path):
    if kind == "symlink":
        path.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, path)
    elif kind == "fifo":
        os.mkfifo(path, 0o600)


@pytest.mark.parametrize("where", ["lock-dir", "repository"])
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_a_planted_lock_file_is_refused_and_its_target_untouched(
    lock_dir, repo_dir, tmp_path, where, kind
):
    """root following a planted lock used to ftruncate the target (e.g. /etc/shadow)."""
    victim = tmp_path / "precious"
    victim.write_text("root:x:0:0\n")
    if where == "lock-dir":
        lock_dir.mkdir(mode=0o700)
        path = lock_path_for(s3_only())
    else:
        path = lock_path_for([LocalRepository(str(repo_dir))])
        assert path == str(repo_dir / ".lock")  # the local repository keeps its lock
    _planted(kind, Path(path), victim)
    outcome = {}

    def attempt():
        try:
            RunLock(path).acquire()
        except Exception as exc:  # the test reports whatever happened
            outcome["error"] = exc

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "RunLock blocked on a planted %s" % kind
    assert isinstance(outcome.get("error"), StoreError), outcome
    assert path in str(outcome["error"])
    assert victim.read_text() == "root:x:0:0\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_another_users_lock_file_is_locked_but_never_rewritten(repo_dir):
    path = repo_dir / ".lock"
    path.write_text("their content")
    os.chown(path, OTHER_UID, OTHER_UID)
    with RunLock(str(path)):
        with pytest.raises(LockedError):
            RunLock(str(path)).acquire()
    assert path.read_text() == "their content"


def test_module_setting_overrides_the_lock_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(LOCK_DIR_ENV, raising=False)
    monkeypatch.setattr(locking, "LOCK_DIR", str(tmp_path / "mod-locks"))
    assert os.path.dirname(lock_path_for(s3_only())) == str(tmp_path / "mod-locks")
