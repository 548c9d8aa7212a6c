"""The file backup engine without Ansible: archive member naming, files that vanish or
change while being read, the restore's extractor (which must never write outside its
directory), manifest validation of file sets and a local round trip."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import socket
import stat
import tarfile
from pathlib import Path

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import file_backup, file_restore
from ansible_collections.clinic.backup.plugins.module_utils.catalog import validate_manifest
from ansible_collections.clinic.backup.plugins.module_utils.errors import (
    BackupError,
    ConfigError,
    IntegrityError,
)
from ansible_collections.clinic.backup.plugins.module_utils.repository import LocalRepository
from ansible_collections.clinic.backup.plugins.module_utils.tarsafety import unsafe_link
from ansible_collections.clinic.backup.plugins.module_utils.verify import (
    _check_files,
    verify_set,
)


# ---------------------------------------------------------------------- helpers
def archive_of(producer: file_backup.TarProducer) -> bytes:
    return b"".join(producer)


def members(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            body = tar.extractfile(info).read() if info.isreg() else None
            out[info.name] = (info, body)
    return out


def tree_digest(root: Path) -> dict[str, tuple]:
    """Every entry below root: (kind, mode, sha256 or link target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        info = path.lstat()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", stat.S_IMODE(info.st_mode))
        elif not stat.S_ISREG(info.st_mode):
            out[rel] = ("special",)
        else:
            out[rel] = (
                "file",
                stat.S_IMODE(info.st_mode),
                int(info.st_mtime),
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return out


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    root = tmp_path / "uploads"
    (root / "scans" / "2024").mkdir(parents=True)
    (root / "scans" / "2024" / "a.dcm").write_bytes(b"DICM" + bytes(range(256)) * 40)
    (root / "empty.pdf").write_bytes(b"")
    (root / "consent form.pdf").write_bytes(b"%PDF consent\n")
    os.utime(root / "consent form.pdf", (1_700_000_000, 1_700_000_000))
    (root / "setuid").write_bytes(b"x")
    os.chmod(root / "setuid", 0o4755)
    (root / "tmp").mkdir()
    (root / "tmp" / "upload.part").write_bytes(b"half")
    os.symlink("scans/2024", root / "latest")
    os.symlink(str(root / "scans"), root / "absolute-inside")
    os.symlink("/etc/passwd", root / "outside")
    os.symlink("../../escape", root / "scans" / "up")
    os.mkfifo(root / "pipe")
    return root


# ---------------------------------------------------------------------- naming and options
def test_each_path_gets_its_own_archive_prefix():
    assert file_backup.member_prefixes(["/srv/a/config", "/etc/b/config", "/home/app/.env"]) == [
        "0-config",
        "1-config",
        "2-.env",
    ]


def test_two_paths_with_one_basename_never_collide(tmp_path):
    for parent in ("a", "b"):
        (tmp_path / parent / "config").mkdir(parents=True)
        (tmp_path / parent / "config" / "app.ini").write_text(parent)
    producer = file_backup.TarProducer(
        [str(tmp_path / "a" / "config"), str(tmp_path / "b" / "config")]
    )
    found = members(archive_of(producer))
    assert found["0-config/app.ini"][1] == b"a"
    assert found["1-config/app.ini"][1] == b"b"
    assert producer.files == 2


def test_options_refuse_bad_paths_and_names(tmp_path):
    (tmp_path / "d" / "inner").mkdir(parents=True)
    good = str(tmp_path / "d")
    cases = [
        ({"name": "uploads", "paths": ["relative/dir"]}, "is relative"),
        ({"name": "uploads", "paths": [str(tmp_path / "missing")]}, "missing does not exist"),
        ({"name": "uploads", "paths": [good, good + "/"]}, "the same place"),
        ({"name": "uploads", "paths": [good, good + "/inner"]}, "lies inside"),
        ({"name": "uploads", "paths": ["/"]}, "whole file system"),
        ({"name": "up/loads", "paths": [good]}, "not a valid file set name"),
        ({"name": "uploads", "paths": []}, "non-empty list"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ConfigError, match=words):
            file_backup.FileBackupOptions(encrypt=False, **kwargs)
    with pytest.raises(ConfigError, match="no passphrase_file"):
        file_backup.FileBackupOptions("uploads", [good])


# ---------------------------------------------------------------------- the archive
def test_archive_keeps_files_modes_times_owners_and_links(sample):
    producer = file_backup.TarProducer([str(sample)], exclude=["*.part"])
    data = archive_of(producer)
    assert len(data) % tarfile.RECORDSIZE == 0
    found = members(data)
    info, body = found["0-uploads/consent form.pdf"]
    assert body == b"%PDF consent\n" and info.mtime == 1_700_000_000
    assert info.uid == os.getuid() and info.uname == ""
    assert found["0-uploads/setuid"][0].mode == 0o4755  # stored as is; restore strips it
    assert found["0-uploads/empty.pdf"][1] == b""
    assert found["0-uploads"][0].isdir()
    assert found["0-uploads/latest"][0].issym()
    assert found["0-uploads/latest"][0].linkname == "scans/2024"
    # An absolute link into the path becomes the same relative link.
    assert found["0-uploads/absolute-inside"][0].linkname == "scans"
    assert "0-uploads/outside" not in found and "0-uploads/scans/up" not in found
    assert "0-uploads/pipe" not in found and "0-uploads/tmp/upload.part" not in found
    reasons = sorted((s["path"].split("/")[-1], s["reason"]) for s in producer.skipped)
    assert reasons == [
        ("outside", file_backup.LINK_OUTSIDE),
        ("pipe", file_backup.SPECIAL),
        ("up", file_backup.LINK_OUTSIDE),
    ]
    summary = producer.summary()
    assert summary["count"] == 4 and summary["excluded"] == 1 and summary["symlinks"] == 2
    assert summary["skipped"] == [
        {"reason": file_backup.LINK_OUTSIDE, "count": 2},
        {"reason": file_backup.SPECIAL, "count": 1},
    ]
    assert "consent" not in json.dumps(summary)  # no file names in the manifest's record


def test_sockets_are_skipped_and_the_repository_is_left_out(tmp_path):
    root = tmp_path / "data"
    (root / "repo").mkdir(parents=True)
    (root / "repo" / "x.gpg").write_bytes(b"cipher")
    (root / "keep").write_text("k")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "app.sock"))
        producer = file_backup.TarProducer([str(root)], skip_dirs=[str(root / "repo")])
        found = members(archive_of(producer))
    finally:
        sock.close()
    assert sorted(found) == ["0-data", "0-data/keep"]
    assert {s["reason"] for s in producer.skipped} == {file_backup.SPECIAL, file_backup.REPOSITORY}


def test_a_file_vanishing_before_it_is_read_is_reported_not_stored(sample, monkeypatch):
    victim = sample / "consent form.pdf"
    real_open = file_backup._open_for_reading

    def vanish(path):
        if path == str(victim):
            os.unlink(path)
        return real_open(path)

    monkeypatch.setattr(file_backup, "_open_for_reading", vanish)
    producer = file_backup.TarProducer([str(sample)])
    found = members(archive_of(producer))
    assert "0-uploads/consent form.pdf" not in found
    assert {"path": str(victim), "reason": file_backup.VANISHED} in [
        {k: s[k] for k in ("path", "reason")} for s in producer.skipped
    ]
    assert producer.errors == []


def _big_file(tmp_path: Path, size: int = 50_000) -> Path:
    root = tmp_path / "big"
    root.mkdir()
    (root / "scan.dcm").write_bytes(bytes(range(256)) * (size // 256))
    (root / "after.txt").write_text("still readable")
    return root


def test_a_file_shrinking_while_read_is_padded_to_its_declared_size(tmp_path, monkeypatch):
    root = _big_file(tmp_path)
    original = (root / "scan.dcm").read_bytes()
    calls = []

    def shrink_then_read(fd, size):
        if not calls and os.fstat(fd).st_size == len(original):  # scan.dcm, once open
            os.truncate(root / "scan.dcm", 10_000)
            calls.append(size)
        return os.read(fd, size)

    monkeypatch.setattr(file_backup, "_read_chunk", shrink_then_read)
    producer = file_backup.TarProducer([str(root)], chunk_size=4096)
    found = members(archive_of(producer))  # the archive stays readable
    info, body = found["0-big/scan.dcm"]
    assert info.size == len(original) == len(body)
    assert body == original[:10_000] + bytes(len(original) - 10_000)
    assert found["0-big/after.txt"][1] == b"still readable"
    assert [c["path"] for c in producer.changed] == [str(root / "scan.dcm")]
    assert "padded with zero bytes" in producer.changed[0]["detail"]
    assert producer.summary()["changed"] == 1 and producer.bytes == len(original) + 14


def test_a_file_growing_while_read_is_cut_at_its_declared_size(tmp_path, monkeypatch):
    root = _big_file(tmp_path)
    original = (root / "scan.dcm").read_bytes()
    grown = []

    def grow_then_read(fd, size):
        if not grown and os.fstat(fd).st_size == len(original):
            with open(root / "scan.dcm", "ab") as handle:
                handle.write(b"appended" * 1000)
            grown.append(True)
        return os.read(fd, size)

    monkeypatch.setattr(file_backup, "_read_chunk", grow_then_read)
    producer = file_backup.TarProducer([str(root)], chunk_size=4096)
    found = members(archive_of(producer))
    assert found["0-big/scan.dcm"][1] == original
    assert "grew while being read" in producer.changed[0]["detail"]


def test_a_read_error_is_an_error_and_keeps_the_archive_consistent(tmp_path, monkeypatch):
    root = _big_file(tmp_path)

    def failing(fd, size):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(file_backup, "_read_chunk", failing)
    producer = file_backup.TarProducer([str(root)])
    found = members(archive_of(producer))
    assert found["0-big/scan.dcm"][1] == bytes(found["0-big/scan.dcm"][0].size)
    assert [e["path"] for e in producer.errors] == [
        str(root / "after.txt"),
        str(root / "scan.dcm"),
    ]


def test_check_mode_counts_without_opening_files(sample, monkeypatch):
    def refuse(path):
        raise AssertionError("opened %s" % path)

    monkeypatch.setattr(file_backup, "_open_for_reading", refuse)
    producer = file_backup.TarProducer([str(sample)], read=False)
    for _piece in producer:
        pass
    assert producer.files == 5


# ---------------------------------------------------------------------- the extractor
def tar_bytes(entries) -> bytes:
    """entries: (name, type, data-or-linkname, mode)."""
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload, mode in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = mode
            info.mtime = 1_700_000_000
            if kind == tarfile.SYMTYPE or kind == tarfile.LNKTYPE:
                info.linkname = payload
                tar.addfile(info)
            elif kind == tarfile.REGTYPE:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.addfile(info)
    return stream.getvalue()


def extract(root: Path, data: bytes, **kwargs) -> file_restore.FileTarExtractor:
    root.mkdir(mode=0o700)
    extractor = file_restore.FileTarExtractor(str(root), **kwargs)
    try:
        try:
            for start in range(0, len(data), 1000):
                extractor(data[start : start + 1000])
            extractor.finish()
        except BaseException:
            extractor.abort()
            raise
        extractor.apply_directories()
    finally:
        extractor.close()
    return extractor


GOOD = [
    ("0-uploads", tarfile.DIRTYPE, None, 0o2750),
    ("0-uploads/scans", tarfile.DIRTYPE, None, 0o755),
    ("0-uploads/scans/a.dcm", tarfile.REGTYPE, b"DICM", 0o6644),
    ("0-uploads/latest", tarfile.SYMTYPE, "scans/a.dcm", 0o777),
    ("0-uploads/scans/back", tarfile.SYMTYPE, "../latest", 0o777),
]


def test_extractor_restores_files_dirs_and_inside_links_without_setid_bits(tmp_path):
    root = tmp_path / "work"
    extractor = extract(root, tar_bytes(GOOD), strip="0-uploads", limit_files=1, limit_bytes=4)
    assert (extractor.files, extractor.bytes, extractor.symlinks) == (1, 4, 2)
    assert (root / "scans" / "a.dcm").read_bytes() == b"DICM"
    assert stat.S_IMODE((root / "scans" / "a.dcm").stat().st_mode) == 0o644
    assert stat.S_IMODE(root.stat().st_mode) == 0o750  # the root member: the directory itself
    assert os.readlink(root / "latest") == "scans/a.dcm"
    assert (root / "scans" / "a.dcm").stat().st_mtime == 1_700_000_000


@pytest.mark.parametrize(
    "extra, words",
    [
        ([("0-uploads/../evil", tarfile.REGTYPE, b"x", 0o644)], "'0-uploads/../evil' is unsafe"),
        ([("/tmp/abs-evil", tarfile.REGTYPE, b"x", 0o644)], "'/tmp/abs-evil' is unsafe"),
        ([("0-uploads/out", tarfile.SYMTYPE, "../../x", 0o777)], "'0-uploads/out' is a link"),
        ([("0-uploads/etc", tarfile.SYMTYPE, "/etc", 0o777)], "'0-uploads/etc' is a link"),
        ([("0-uploads/hard", tarfile.LNKTYPE, "0-uploads/x", 0o644)], "is a hard link"),
        ([("0-uploads/fifo", tarfile.FIFOTYPE, None, 0o644)], "is a FIFO"),
        ([("0-uploads/null", tarfile.CHRTYPE, None, 0o644)], "is a character device"),
        ([("1-other/x", tarfile.REGTYPE, b"x", 0o644)], "lies outside the set's root"),
        (
            [
                ("0-uploads/lnk", tarfile.SYMTYPE, "scans", 0o777),
                ("0-uploads/lnk/x", tarfile.REGTYPE, b"x", 0o644),
            ],
            "'0-uploads/lnk/x' would be written through 'lnk'",
        ),
        (
            [("0-uploads/scans/a.dcm", tarfile.REGTYPE, b"again", 0o644)],
            "appears twice",
        ),
        (
            # Each link alone stays inside; followed together they lead out.
            [
                ("0-uploads/q", tarfile.SYMTYPE, ".", 0o777),
                ("0-uploads/p", tarfile.SYMTYPE, "q/..", 0o777),
            ],
            "'0-uploads/p' is a link that leads outside",
        ),
    ],
)
def test_extractor_refuses_escapes_naming_the_member(tmp_path, extra, words):
    outside_before = sorted(os.listdir(tmp_path))
    with pytest.raises(IntegrityError, match=words.replace("(", r"\(").replace(".", r"\.")):
        extract(tmp_path / "work", tar_bytes(GOOD + extra), strip="0-uploads")
    assert sorted(p for p in os.listdir(tmp_path) if p != "work") == outside_before
    assert not (tmp_path / "evil").exists() and not Path("/tmp/abs-evil").exists()


def test_extractor_stops_when_the_archive_holds_more_than_the_manifest(tmp_path):
    with pytest.raises(IntegrityError, match="more than its manifest records"):
        extract(tmp_path / "work", tar_bytes(GOOD), strip="0-uploads", limit_bytes=3)


def test_extractor_reports_a_truncated_archive(tmp_path):
    data = tar_bytes(GOOD)
    with pytest.raises(IntegrityError, match="cannot be read|truncated"):
        extract(tmp_path / "work", data[:1700], strip="0-uploads")


# ---------------------------------------------------------------------- manifests and verify
def _manifest(kind=None, names=("files",)):
    data = {
        "format_version": 1,
        "id": "20261122T010000Z-uploads-1a2b3c",
        "database": "uploads",
        "format": "tar",
        "compression": {"algorithm": "zstd"},
        "encryption": {"method": "none"},
        "artifacts": [
            {
                "name": n,
                "file": "uploads-%d.tar.zst" % i,
                "content": "files-tar",
                "size": 1,
                "sha256": "0" * 64,
            }
            for i, n in enumerate(names)
        ],
        "started_at": "2026-11-22T01:00:00.000000Z",
        "finished_at": "2026-11-22T01:00:05.000000Z",
    }
    if kind:
        data["kind"] = kind
    return data


def test_validate_manifest_accepts_file_sets_and_keeps_database_rules():
    set_id = "20261122T010000Z-uploads-1a2b3c"
    assert validate_manifest(_manifest("files"), set_id)["kind"] == "files"
    assert validate_manifest(_manifest(None, ("database",)), set_id)
    for bad in (
        _manifest("files", ("database",)),
        _manifest("files", ("files", "files")),
        _manifest(None, ("files",)),
        _manifest("tapes", ("files",)),
    ):
        with pytest.raises(IntegrityError):
            validate_manifest(bad, set_id)


@pytest.mark.parametrize(
    "name, target, bad",
    [
        ("0-up/a/link", "../b", False),
        ("0-up/link", "../1-other/x", False),
        ("0-up/link", "../../etc", True),
        ("0-up/link", "/etc/passwd", True),
    ],
)
def test_unsafe_link(name, target, bad):
    assert (unsafe_link(name, target) is not None) == bad


def test_check_files_judges_a_listing():
    class Listing:
        names = ["0-up/", "0-up/a"]
        links = [("0-up/l", "a")]
        odd = []
        regular = 1

    assert _check_files(Listing, {"count": 1})[0] == "ok"
    assert "lists 1 files, the manifest records 2" in _check_files(Listing, {"count": 2})[1]
    Listing.odd = [("0-up/dev", "c")]
    assert "unsafe" in _check_files(Listing, {"count": 1})[1]


# ---------------------------------------------------------------------- a local round trip
def test_backup_verify_and_restore_round_trip(sample, tmp_path, passphrase_file):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    options = file_backup.FileBackupOptions(
        "uploads", [str(sample)], exclude=["tmp"], passphrase_file=str(passphrase_file)
    )
    checked = file_backup.run_file_backup([repo], options, check_mode=True)
    assert checked["files"]["count"] == 4 and not (tmp_path / "repo").exists()
    result = file_backup.run_file_backup([repo], options)
    assert result["manifest"]["kind"] == "files" and result["files"]["count"] == 4
    assert "row_counts" not in result["manifest"]
    outcome = verify_set(repo, passphrase_file=str(passphrase_file), size_tolerance_percent=0)
    assert outcome["ok"], outcome["failures"]
    target = tmp_path / "restored"
    restored = file_restore.restore_files(
        repo, file_restore.FileRestoreOptions(str(target), passphrase_file=str(passphrase_file))
    )
    assert restored["files"] == 4 and restored["layout"] == "content"
    expected = {
        k: v
        for k, v in tree_digest(sample).items()
        if not k.startswith("tmp") and k not in ("outside", "scans/up", "pipe")
    }
    expected["setuid"] = expected["setuid"][:1] + (0o755,) + expected["setuid"][2:]
    expected["absolute-inside"] = ("link", "scans")
    assert tree_digest(target) == expected
    with pytest.raises(ConfigError, match="already exists"):
        file_restore.restore_files(
            repo, file_restore.FileRestoreOptions(str(target), passphrase_file=str(passphrase_file))
        )
    assert [p.name for p in tmp_path.iterdir() if ".restoring-" in p.name] == []


def test_unreadable_files_fail_the_run_after_the_set_is_stored(sample, tmp_path, monkeypatch):
    real_open = file_backup._open_for_reading

    def denied(path):
        if path.endswith("a.dcm"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path)

    monkeypatch.setattr(file_backup, "_open_for_reading", denied)
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    options = file_backup.FileBackupOptions(
        "uploads", [str(sample)], encrypt=False, compression="none"
    )
    with pytest.raises(BackupError, match="could not be read.*a.dcm") as caught:
        file_backup.run_file_backup([repo], options)
    set_id = caught.value.result["set_id"]
    assert repo.set_ids() == [set_id]
    assert caught.value.result["files"]["unreadable"] == 1


def test_restore_falls_back_to_the_older_set_when_the_newest_is_damaged(sample, tmp_path):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    options = file_backup.FileBackupOptions("uploads", [str(sample)], encrypt=False)
    older = file_backup.run_file_backup([repo], options)["set_id"]
    newer = file_backup.run_file_backup([repo], options)
    artifact = Path(newer["artifacts"][0]["locations"][repo.url])
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    plain = {"allow_unauthenticated": True, "allow_unencrypted": True}
    result = file_restore.restore_files(
        repo, file_restore.FileRestoreOptions(str(tmp_path / "out"), mode="rehearse", **plain)
    )
    assert result["set_id"] == older
    assert [d["set_id"] for d in result["damaged"]] == [newer["set_id"]]
    assert not (tmp_path / "out").exists()
    with pytest.raises(IntegrityError, match="sha256"):
        file_restore.restore_files(
            repo,
            file_restore.FileRestoreOptions(str(tmp_path / "out"), set_id=newer["set_id"], **plain),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "uploads"]


def test_a_name_taken_by_database_backups_is_refused(sample, tmp_path):
    repo = LocalRepository(str(tmp_path / "repo"), must_exist=False)
    options = file_backup.FileBackupOptions("clinic_db", [str(sample)], encrypt=False)
    set_id = file_backup.run_file_backup([repo], options)["set_id"]
    with pytest.raises(ConfigError, match="not of 'uploads'"):
        file_restore.restore_files(
            repo,
            file_restore.FileRestoreOptions(str(tmp_path / "out"), set_id=set_id, name="uploads"),
        )
    # Turn the set into what a database set looks like: the next file backup must refuse.
    manifest_path = tmp_path / "repo" / "sets" / set_id / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["kind"]
    manifest["artifacts"][0]["name"] = "database"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="already holds database backups named 'clinic_db'"):
        file_backup.run_file_backup([repo], options)
    with pytest.raises(ConfigError, match="is a database backup"):
        file_restore.restore_files(
            repo, file_restore.FileRestoreOptions(str(tmp_path / "out"), set_id=set_id)
        )
    assert repo.set_ids() == [set_id] and not (tmp_path / "out").exists()
