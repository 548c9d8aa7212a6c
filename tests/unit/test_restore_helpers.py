"""Pure parts of the restore engine: names, times, row-count comparison and the
streaming tar extractor that must never write outside its directory."""

from __future__ import annotations

import datetime
import io
import os
import tarfile

import pytest

from ansible_collections.clinic.backup.plugins.module_utils.errors import (
    ConfigError,
    IntegrityError,
)
from ansible_collections.clinic.backup.plugins.module_utils.restore import (
    NAME_LIMIT,
    RestoreOptions,
    SafeTarExtractor,
    compare_row_counts,
    parse_moment,
    previous_database_name,
    work_database_name,
)


def test_work_and_previous_names_fit_postgres_limit_without_splitting_characters():
    long_name = "ü" * 40  # 80 bytes in UTF-8
    work = work_database_name(long_name)
    previous = previous_database_name(long_name, datetime.datetime(2026, 11, 30, 8, 0, 0))
    for name in (work, previous):
        assert len(name.encode("utf-8")) <= NAME_LIMIT
        name.encode("utf-8").decode("utf-8")  # no half character
    assert "__restoring_" in work and previous.endswith("__pre_restore_20261130T080000Z")
    assert work != work_database_name(long_name)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-11-30T08:00:00Z", datetime.datetime(2026, 11, 30, 8, tzinfo=datetime.UTC)),
        (
            "2026-11-30T09:00:00+01:00",
            datetime.datetime(2026, 11, 30, 8, tzinfo=datetime.UTC),
        ),
    ],
)
def test_parse_moment_normalises_to_utc(text, expected):
    assert parse_moment(text) == expected


@pytest.mark.parametrize(
    "text, words", [("2026-11-30T08:00:00", "no time zone"), ("last tuesday", "ISO 8601")]
)
def test_parse_moment_rejects_ambiguous_times(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_moment(text)


def test_rehearsal_never_replays_globals_and_gets_a_default_name():
    options = RestoreOptions(mode="rehearse", database="clinic_db", include_globals=True)
    assert options.include_globals is False
    assert options.target_database == "clinic_db_restore_test"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"mode": "upsert", "target_database": "x"}, "unknown restore mode"),
        ({"target_database": "a\nb"}, "control character"),
        ({"target_database": "x", "jobs": 0}, "at least 1"),
        ({"target_database": "x", "set_id": "../x"}, "set id"),
        ({"target_database": "x", "scratch_dir": "rel"}, "absolute"),
        ({"mode": "create"}, "target_database must be"),
    ],
)
def test_restore_options_reject_bad_input(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        RestoreOptions(**kwargs)


def test_row_count_comparison_names_every_difference():
    manifest = {"row_counts": {"public.a": 3, "public.b": 5, "public.c": 1}, "options": {}}
    table, problems = compare_row_counts(manifest, {"public.a": 3, "public.b": 4}, ["public.c"])
    assert [row["restored"] for row in table] == [3, 4, None]
    assert problems == [
        "table public.b has 4 rows, the backup's snapshot had 5",
        "table public.c is missing after the restore",
    ]


def test_partial_dump_may_lack_the_tables_it_left_out():
    manifest = {"row_counts": {"public.a": 3, "public.c": 1}, "options": {"tables": ["a"]}}
    _table, problems = compare_row_counts(manifest, {"public.a": 3}, ["public.c"])
    assert problems == []


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out.getvalue()


def _member(name, kind=tarfile.REGTYPE, target=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    info.mode = 0o644
    return info


def _extract(root, payload, chunk=7777):
    extractor = SafeTarExtractor(str(root))
    try:
        for start in range(0, len(payload), chunk):
            extractor(payload[start : start + chunk])
        extractor.finish()
    except BaseException:
        extractor.abort()
        raise
    return extractor


def test_extractor_writes_plain_files_privately(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    payload = _tar(
        [
            (_member("./", tarfile.DIRTYPE), b""),
            (_member("./toc.dat"), b"PGDMP" * 1000),
            (_member("./3001.dat"), os.urandom(300_000)),
        ]
    )
    extractor = _extract(root, payload)
    assert extractor.files == 2
    assert (root / "toc.dat").read_bytes() == b"PGDMP" * 1000
    assert (root / "3001.dat").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "member, words",
    [
        (_member("../evil.sql"), "parent directory reference"),
        (_member("./a/../../evil.sql"), "parent directory reference"),
        (_member("/tmp/evil.sql"), "absolute path"),
        (_member("./link", tarfile.SYMTYPE, "/etc"), "not a regular file"),
        (_member("./hard", tarfile.LNKTYPE, "/etc/passwd"), "not a regular file"),
        (_member("./fifo", tarfile.FIFOTYPE), "not a regular file"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "fifo"],
)
def test_extractor_refuses_members_escaping_or_special(tmp_path, member, words):
    root = tmp_path / "root"
    root.mkdir()
    payload = _tar([(_member("./toc.dat"), b"PGDMP"), (member, b"owned")])
    with pytest.raises(IntegrityError, match=words):
        _extract(root, payload)
    assert not (tmp_path / "evil.sql").exists()
    assert sorted(p.name for p in root.iterdir()) == ["toc.dat"]


def test_extractor_refuses_writing_through_an_existing_symlink(tmp_path):
    """Even a link planted beforehand is never followed (O_NOFOLLOW | O_EXCL)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "toc.dat").symlink_to(tmp_path / "outside")
    with pytest.raises(IntegrityError, match="cannot be extracted"):
        _extract(root, _tar([(_member("./toc.dat"), b"PGDMP")]))
    assert not (tmp_path / "outside").exists()


def test_extractor_reports_a_truncated_archive(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    payload = _tar([(_member("./toc.dat"), os.urandom(100_000))])
    with pytest.raises(IntegrityError, match="cannot be extracted"):
        _extract(root, payload[:50_000])


def test_a_full_scratch_disk_is_a_storage_error_not_a_damaged_set(tmp_path, monkeypatch):
    """ENOSPC must not send restore looking for older sets (they would all 'fail')."""
    import errno
    import shutil

    from ansible_collections.clinic.backup.plugins.module_utils.errors import StoreError

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full_disk)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(StoreError, match="No space left on device") as caught:
        _extract(root, _tar([(_member("./toc.dat"), b"PGDMP" * 100)]))
    assert not isinstance(caught.value, IntegrityError)
