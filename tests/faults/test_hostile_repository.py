"""Fault family: hostile repository contents (bucket or repository writer without the passphrase).

The attacker can write the repository (a local directory, or an S3 prefix with leaked
keys: the ransomware case) but does not know the backup passphrase. Two real sets of a
small database are taken once by the host agent (to a local repository and an S3 prefix
at once) and verified; ``rollback_probe`` holds 1 row in the older set and 2 in the
newer one, so a restore says which set it really brought back. Every case works on a
copy of that template (a copied directory, or a fresh bucket filled by server-side
copies) and meets the attacker's work with the engine's own APIs:

1. planted set: a new set id newer than the real ones, manifest ``encryption none``,
   ``pg_dump-plain``, correct sha256 and size, a plain SQL script holding ``\\! touch
   <marker>`` (first line, after a COPY block, after a statement on the same line,
   after a ``\\restrict``/``\\unrestrict`` pair of its own) and a verification record
   saying ``ok``. verify_set must not say ok, the catalog must not offer it as the
   newest usable set, a rehearsal with require_verified must restore the real newest
   set, and even a restore of the planted set by id with allow_unauthenticated and
   allow_unencrypted (the operator opts in) must never run the command: psql runs
   restricted. A control run of the same script through an unrestricted psql proves the
   payload is live (the marker appears there, and only there).
2. forged verification: the real newest set is damaged and its verification record is
   replaced (unsealed "ok", a sealed record copied from the older set, that copy edited
   to name this set): the catalog says forged/unverified, require_verified takes the
   older set.
3. rollback by copy: the older set copied (locally also symlinked) under a newer id,
   with or without its manifest's id edited, plus a replayed older ``latest`` pointer:
   a restore without set_id restores the real newest set (set id and row counts).
4. malformed manifests (a string size, format_version "1", encryption "none", started_at
   0, a string row count; JSON nested too deep to parse): info, verify, restore and
   retention carry on with the other sets and list each bad one as corrupt, naming it;
   a deep-nested verification record or ``latest`` pointer must not break them either,
   nor tonight's backup.

The planted set is also met by retention (with the older pointer replayed: the real
newest set must not be deleted) and by backup_info's per-database summary (the planted
set must not stand in for the newest backup and hide that it is stale).

Summary columns fed here: ``code executions`` (a marker file that appeared),
``rollbacks accepted`` (an older set or a copy restored or offered as the newest while
the real newest was intact), ``false successes`` (verify or the catalog vouching for a
planted/damaged set), ``sets lost`` (retention deleting a real set, a restore that did
not bring the real newest back), and ``bad inputs`` / ``clear errors`` (every refusal
must name the set and say why).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from testbed.dataset import load_clinic_dataset
from testbed.files import write_passphrase_file

from ansible_collections.clinic.backup.plugins.module_utils import catalog, catalog_report
from ansible_collections.clinic.backup.plugins.module_utils.authentication import RecordKey
from ansible_collections.clinic.backup.plugins.module_utils.errors import BackupError
from ansible_collections.clinic.backup.plugins.module_utils.pgsource import PgConnection
from ansible_collections.clinic.backup.plugins.module_utils.repository import (
    latest_file,
    parse_time,
    utc_now,
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

from . import faultlib
from .faultlib import agent_config, helpers

DATABASE = "hostile_db"
PREFIX = "clinic"
PROBE = "public.rollback_probe"
FAMILY = "hostile repository"
BACKENDS = ("local", "s3")


# ---------------------------------------------------------------------- the real sets
@pytest.fixture(scope="module")
def template(pg, s3, collections_path, tmp_path_factory) -> Any:
    """Two sets of DATABASE taken by the agent into a local repository and an S3 prefix,
    both verified (sealed records) in both places; the pointer after the first run kept."""
    work = tmp_path_factory.mktemp("hostile")
    passphrase = write_passphrase_file(work / "passphrase")
    repo_dir = work / "template"
    repo_dir.mkdir(mode=0o700)
    bucket = "hostile-template-%s" % secrets.token_hex(4)
    s3.create_bucket(bucket)
    pg.create_database(DATABASE, owner=pg.clinic_user)
    try:
        load_clinic_dataset(pg, DATABASE, pg.clinic_user, scale=0.02)
        pg.psql(
            "SET ROLE %s; CREATE TABLE rollback_probe (id int);"
            " INSERT INTO rollback_probe VALUES (1);" % pg.clinic_user,
            dbname=DATABASE,
        )
        target = {"bucket": bucket, "prefix": PREFIX, "endpoint_url": s3.endpoint_url}
        config = agent_config(
            work, pg, DATABASE, passphrase, repository=repo_dir, s3_targets=[target]
        )
        client = faultlib.s3_client(s3.endpoint_url)
        ids = []
        old_pointer = b""
        for round_ in range(2):
            result = faultlib.run_agent(collections_path, config, env=s3.env())
            assert result.rc == 0, result.text()
            ids.append(result.doc["set_id"])
            if round_ == 0:
                old_pointer = (repo_dir / "latest" / latest_file(DATABASE)).read_bytes()
                pg.psql("INSERT INTO rollback_probe VALUES (2);", dbname=DATABASE)
        older, newer = ids
        assert newer[:16] >= older[:16]
        local = faultlib.local_repository(repo_dir)
        remote = faultlib.s3_repository(s3.endpoint_url, bucket, PREFIX)
        for repo in (local, remote):
            for set_id in ids:
                outcome = verify_set(
                    repo,
                    set_id=set_id,
                    passphrase_file=str(passphrase),
                    max_age_hours=0,
                    size_tolerance_percent=0,
                    record=True,
                )
                assert outcome["ok"], outcome
        yield {
            "repo": repo_dir,
            "bucket": bucket,
            "client": client,
            "older": older,
            "newer": newer,
            "old_pointer": old_pointer,
            "passphrase": passphrase,
            "key": RecordKey.from_file(str(passphrase)),
            "manifest": helpers.manifest(repo_dir, newer),
        }
    finally:
        pg.drop_database(DATABASE)


# ---------------------------------------------------------------------- the attacker's reach
class LocalWriter:
    """A writer of a local repository directory (no passphrase)."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def repo(self) -> Any:
        return faultlib.local_repository(self.root)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def copy_set(self, src: str, dst: str) -> None:
        shutil.copytree(self.root / "sets" / src, self.root / "sets" / dst)

    def link_set(self, src: str, dst: str) -> None:
        (self.root / "sets" / dst).symlink_to(src)

    def has_set(self, set_id: str) -> bool:
        return (self.root / "sets" / set_id / "manifest.json").is_file()


class S3Writer:
    """A holder of leaked S3 keys: can put, copy and overwrite objects under the prefix."""

    kind = "s3"

    def __init__(self, client: Any, endpoint_url: str, bucket: str) -> None:
        self.client = client
        self.endpoint_url = endpoint_url
        self.bucket = bucket

    def repo(self) -> Any:
        return faultlib.s3_repository(self.endpoint_url, self.bucket, PREFIX)

    def _key(self, rel: str) -> str:
        return "%s/%s" % (PREFIX, rel)

    def read(self, rel: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()

    def write(self, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def copy_set(self, src: str, dst: str) -> None:
        for key in helpers.s3_keys(self.client, self.bucket, self._key("sets/%s/" % src)):
            self.client.copy_object(
                Bucket=self.bucket,
                Key=self._key("sets/%s/%s" % (dst, key.rsplit("/", 1)[1])),
                CopySource={"Bucket": self.bucket, "Key": key},
            )

    def has_set(self, set_id: str) -> bool:
        keys = helpers.s3_keys(self.client, self.bucket, self._key("sets/%s/" % set_id))
        return any(k.endswith("/manifest.json") for k in keys)


def clone(template: dict[str, Any], backend: str, tmp_path: Path, s3: Any) -> Any:
    """A copy of the template repository for one case."""
    if backend == "local":
        root = tmp_path / ("repo-%s" % secrets.token_hex(3))
        shutil.copytree(template["repo"], root, symlinks=True)
        return LocalWriter(root)
    client = template["client"]
    bucket = "hostile-%s" % secrets.token_hex(6)
    s3.create_bucket(bucket)
    for key in helpers.s3_keys(client, template["bucket"], PREFIX + "/"):
        client.copy_object(
            Bucket=bucket, Key=key, CopySource={"Bucket": template["bucket"], "Key": key}
        )
    return S3Writer(client, s3.endpoint_url, bucket)


def later_id(template: dict[str, Any], seconds: int) -> str:
    """A well-formed set id ``seconds`` after the real newest one (sorts as newer)."""
    moment = datetime.datetime.strptime(template["newer"][:16], "%Y%m%dT%H%M%SZ")
    return "%s-%s-%s" % (
        (moment + datetime.timedelta(seconds=seconds)).strftime("%Y%m%dT%H%M%SZ"),
        DATABASE,
        secrets.token_hex(3),
    )


def iso_at(set_id: str) -> str:
    moment = datetime.datetime.strptime(set_id[:16], "%Y%m%dT%H%M%SZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def dump(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def edit_json(writer: Any, rel: str, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(writer.read(rel))
    edit(data)
    writer.write(rel, dump(data))


# ---------------------------------------------------------------------- meeting the damage
def rehearse(pg: Any, repo: Any, template: dict[str, Any], **options: Any) -> dict[str, Any]:
    """A restore rehearsal (the work database is dropped); raises what run_restore raises."""
    opts = RestoreOptions(
        mode="rehearse",
        database=DATABASE,
        target_database="hostile_%s" % secrets.token_hex(4),
        passphrase_file=str(template["passphrase"]),
        **options,
    )
    server = PgConnection(host=pg.host, port=pg.port, user=pg.superuser, dbname="postgres")
    return run_restore(repo, server, opts)


def databases(pg: Any) -> set[str]:
    return set(pg.psql("SELECT datname FROM pg_database").split())


def probe_rows(result: dict[str, Any]) -> int | None:
    for row in result.get("row_counts") or []:
        if row["table"] == PROBE:
            return row["restored"]
    return None


def verify(repo: Any, template: dict[str, Any], set_id: str | None) -> dict[str, Any]:
    return verify_set(
        repo,
        set_id=set_id,
        passphrase_file=str(template["passphrase"]),
        deep=True,
        max_age_hours=0,
        size_tolerance_percent=0,
        record=False,
    )


def clear(text: str, set_id: str, *words: str) -> bool:
    """A refusal that names the set and says why."""
    return set_id in text and all(w in text for w in words)


class Case:
    """Collects problems of one case (so one run reports all of them) and counts them."""

    def __init__(self, row: Any, label: str) -> None:
        self.row = row
        self.label = label
        self.problems: list[str] = []

    def check(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
            self.row.note("%s: %s" % (self.label, problem[:300]))
        return ok

    def refusal(self, text: str, set_id: str, *words: str) -> None:
        """An error message: it must name the set itself and say why."""
        ok = clear(text, set_id, *words)
        self.row.bad_input(ok)
        self.check(ok, "refusal does not name %s with %s: %s" % (set_id, list(words), text))

    def reason(self, set_id: str, text: str | None, *words: str) -> None:
        """A reason reported under the set's id (passed_over, a catalog entry, a verify
        outcome): it must be there and say why."""
        ok = text is not None and all(w in text for w in words)
        self.row.bad_input(ok)
        self.check(ok, "%s reported without %s: %s" % (set_id, list(words), text))

    def restore_newest(
        self,
        pg: Any,
        repo: Any,
        template: dict[str, Any],
        expect: str,
        passed: list[str],
        reason_words: tuple[str, ...],
        intact_newest: bool,
        **options: Any,
    ) -> dict[str, Any] | None:
        """A rehearsal without set_id must restore ``expect`` (every row count matching)
        and pass over ``passed`` naming why."""
        before = databases(pg)
        try:
            result = rehearse(pg, repo, template, **options)
        except BackupError as exc:
            self.row.add("sets_lost")
            self.check(False, "restore %s failed: %s" % (options, exc))
            return None
        except Exception as exc:  # a traceback is a finding, not a test error
            self.row.add("sets_lost")
            self.check(False, "restore %s raised %r" % (options, exc))
            return None
        restored = result["set_id"]
        self.row.add("sets_lost", restored != expect)
        self.row.rollback(intact_newest and restored != template["newer"])
        self.row.reported(restored not in (template["older"], template["newer"]), False)
        self.check(restored == expect, "restored %s, not %s" % (restored, expect))
        wanted_probe = 2 if expect == template["newer"] else 1
        self.check(
            probe_rows(result) == wanted_probe,
            "%s has %s rows after the restore, the real set had %d"
            % (PROBE, probe_rows(result), wanted_probe),
        )
        self.check(
            all(r["restored"] == r["expected"] for r in result["row_counts"]),
            "row counts differ: %s" % result["row_counts"],
        )
        reasons = {p["set_id"]: p["reason"] for p in result["passed_over"]}
        reasons.update({d["set_id"]: d["reason"] for d in result["damaged"]})
        for set_id in passed:
            self.reason(set_id, reasons.get(set_id), *reason_words)
        self.check(databases(pg) == before, "databases left behind")
        return result


# ---------------------------------------------------------------------- 1. planted set
def _meta(marker: Path) -> bytes:
    return b"\\! touch " + str(marker).encode()


HEAD = (
    b"--\n-- PostgreSQL database dump\n--\n\n"
    b"SET statement_timeout = 0;\nSET client_encoding = 'UTF8';\n\n"
)
TABLE = (
    b"CREATE TABLE public.planted (id integer);\n\n"
    b"COPY public.planted (id) FROM stdin;\n1\n2\n\\.\n\n"
)
TAIL = b"\n--\n-- PostgreSQL database dump complete\n--\n\n"

# variant -> the planted script, given the marker file its meta-command touches
PLANTED: dict[str, Callable[[Path], bytes]] = {
    "meta-command on the first line": lambda m: _meta(m) + b"\n" + HEAD + TABLE + TAIL,
    "meta-command after a COPY block": lambda m: HEAD + TABLE + _meta(m) + b"\n" + TAIL,
    "meta-command after a statement on the same line": lambda m: (
        HEAD + TABLE + b"SELECT 1; " + _meta(m) + b"\n" + TAIL
    ),
    "meta-command after a \\restrict/\\unrestrict pair of its own": lambda m: (
        b"\\restrict attacker0key\n"
        + HEAD
        + TABLE
        + b"\\unrestrict attacker0key\n"
        + _meta(m)
        + b"\n"
        + TAIL
    ),
}


def plant_set(writer: Any, template: dict[str, Any], set_id: str, script: bytes) -> None:
    """What a writer without the passphrase can make: a set that claims everything."""
    manifest = {
        k: v for k, v in template["manifest"].items() if k not in ("authentication", "snapshot")
    }
    when = iso_at(set_id)
    manifest.update(
        id=set_id,
        started_at=when,
        finished_at=when,
        format="plain",
        compression={"algorithm": "none", "level": None},
        encryption={"method": "none"},
        options=dict(manifest["options"], include_globals=False),
        row_counts={"public.planted": 2},
        artifacts=[
            {
                "name": "database",
                "file": "%s.sql" % DATABASE,
                "content": "pg_dump-plain",
                "size": len(script),
                "sha256": hashlib.sha256(script).hexdigest(),
            }
        ],
    )
    writer.write("sets/%s/%s.sql" % (set_id, DATABASE), script)
    writer.write(
        "sets/%s/verification.json" % set_id,
        dump(
            {
                "state": "ok",
                "verified_at": when,
                "checks": [{"name": "sha256", "status": "ok", "detail": "sha256 matches"}],
                "set_id": set_id,
                "manifest_mac": None,
            }
        ),
    )
    writer.write("sets/%s/manifest.json" % set_id, dump(manifest))  # last, as the engine does


# The script is judged the same wherever it is stored: every variant runs locally, the
# first one also on S3.
@pytest.mark.parametrize(
    ("variant", "backend"),
    [(v, "local") for v in PLANTED] + [(next(iter(PLANTED)), "s3")],
)
def test_planted_set_is_never_taken_and_never_runs_its_command(
    variant, backend, template, pg, s3, tmp_path, summary_row
):
    row = summary_row("%s: planted plain-SQL set with a psql meta-command (%s)" % (FAMILY, backend))
    case = Case(row, variant)
    marker = tmp_path / "planted-command-ran"
    writer = clone(template, backend, tmp_path, s3)
    planted = later_id(template, 120)
    script = PLANTED[variant](marker)
    plant_set(writer, template, planted, script)
    repo = writer.repo()
    newer = template["newer"]
    row.run()

    def ran(step: str) -> None:
        executed = marker.exists()
        row.code_execution(executed)
        case.check(not executed, "the planted command ran during %s" % step)
        if executed:
            marker.unlink()

    # backup_verify with the passphrase (the daily verify picks the newest id: this one).
    try:
        outcome = verify(repo, template, None)
    except Exception as exc:
        outcome = {"ok": False, "set_id": None, "failures": ["raised %r" % exc]}
        case.check(isinstance(exc, BackupError), "verify raised %r" % exc)
    ran("verify")
    text = "; ".join(outcome["failures"])
    row.reported(outcome["ok"], False)
    case.check(outcome["set_id"] == planted, "verify looked at %s" % outcome["set_id"])
    case.check(not outcome["ok"], "verify reported the planted set ok")
    case.reason(planted, text if outcome["set_id"] == planted else None, "carries no MAC")
    # verify's "readable" check names the meta-command wherever psql would run it.
    case.check("meta-command" in text, "verify did not name the meta-command: %s" % text)

    # The catalog (backup_info): listed, but never the newest usable or verified set.
    entries = catalog.list_catalog(repo, key=template["key"])
    by_id = {e["id"]: e for e in entries}
    entry = by_id.get(planted, {})
    case.check(entry.get("authentication") == "none", "planted set: %s" % entry)
    why = catalog.unusable_reason(entry) if entry else "not listed"
    usable = [e["id"] for e in entries if catalog.unusable_reason(e) is None and e.get("encrypted")]
    row.reported(bool(usable) and usable[0] == planted, False)
    case.check(usable[:1] == [newer], "newest usable set is %s, not %s" % (usable[:1], newer))
    case.reason(planted, why, "not authenticated")
    report = catalog_report.build_report(entries, utc_now(), database=DATABASE)
    verified = catalog_report.build_report(
        entries, utc_now(), database=DATABASE, require_verified=True
    )
    for name, rep in (("newest", report), ("newest verified", verified)):
        got = (rep["newest"] or {}).get("id")
        row.reported(got == planted, False)
        case.check(got == newer, "backup_info %s is %s, not %s" % (name, got, newer))

    # The ransomware drill: rehearsal of the newest verified set.
    case.restore_newest(
        pg,
        repo,
        template,
        newer,
        [planted],
        ("not authenticated",),
        intact_newest=True,
        require_verified=True,
    )
    ran("the require_verified rehearsal")

    # The worst case: the operator opts in to this very set.
    before = databases(pg)
    try:
        result = rehearse(
            pg,
            repo,
            template,
            set_id=planted,
            allow_unauthenticated=True,
            allow_unencrypted=True,
        )
        error = ""
        row.reported(True, False)
        case.check(False, "the planted set was restored: %s" % result)
    except BackupError as exc:
        error = "%s: %s" % (type(exc).__name__, exc)
    except Exception as exc:
        error = "raised %r" % exc
        case.check(False, "restore of the planted set raised %r" % exc)
    ran("the opted-in restore of the planted set")
    case.refusal(error, planted, "IntegrityError", "meta-command")
    case.check(databases(pg) == before, "databases left behind")

    # Control (local only): the same script through an unrestricted psql does run the
    # command, so the marker's absence above is psql's restricted mode at work.
    if backend == "local":
        scratch = "hostile_control_%s" % secrets.token_hex(3)
        pg.create_database(scratch)
        try:
            pg.psql(script.decode(), dbname=scratch)
        except Exception as exc:
            row.note("control psql: %s" % str(exc)[:200])
        finally:
            pg.drop_database(scratch)
        assert marker.exists(), "the planted payload is not live: the control proves nothing"
        marker.unlink()
    assert not case.problems, case.problems


# ---------------------------------------------------------------------- 2. forged verification
def _unsealed_ok(writer: Any, template: dict[str, Any]) -> str:
    newer = template["newer"]
    mac = template["manifest"]["authentication"]["mac"]
    writer.write(
        "sets/%s/verification.json" % newer,
        dump(
            {
                "state": "ok",
                "verified_at": iso_at(newer),
                "checks": [],
                "set_id": newer,
                "manifest_mac": mac,
            }
        ),
    )
    return "unverified"


def _copied_sealed(writer: Any, template: dict[str, Any]) -> str:
    record = writer.read("sets/%s/verification.json" % template["older"])
    writer.write("sets/%s/verification.json" % template["newer"], record)
    return "forged"


def _copied_and_edited(writer: Any, template: dict[str, Any]) -> str:
    record = json.loads(writer.read("sets/%s/verification.json" % template["older"]))
    record.update(
        set_id=template["newer"], manifest_mac=template["manifest"]["authentication"]["mac"]
    )
    writer.write("sets/%s/verification.json" % template["newer"], dump(record))
    return "forged"


FORGED = {
    "unsealed record saying ok": _unsealed_ok,
    "sealed record copied from the older set": _copied_sealed,
    "sealed record copied from the older set, edited to name this set": _copied_and_edited,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(FORGED))
def test_forged_verification_of_a_damaged_set_is_not_trusted(
    variant, backend, template, pg, s3, tmp_path, summary_row
):
    row = summary_row(
        "%s: damaged newest set with a forged verification record (%s)" % (FAMILY, backend)
    )
    case = Case(row, variant)
    writer = clone(template, backend, tmp_path, s3)
    newer, older = template["newer"], template["older"]
    artifact = next(a for a in template["manifest"]["artifacts"] if a["name"] == "database")
    rel = "sets/%s/%s" % (newer, artifact["file"])
    data = bytearray(writer.read(rel))
    data[len(data) // 2] ^= 0x04
    writer.write(rel, bytes(data))
    expected_state = FORGED[variant](writer, template)
    repo = writer.repo()
    row.run()

    entries = {e["id"]: e for e in catalog.list_catalog(repo, key=template["key"])}
    state = entries[newer]["verification"]
    row.reported(state == "ok", False)
    case.check(
        state == expected_state, "catalog says verification %s, not %s" % (state, expected_state)
    )
    case.reason(newer, entries[newer].get("verification_detail"), "verification record")
    chosen = catalog.newest_complete(repo, require_verified=True, key=template["key"])
    row.reported(bool(chosen) and chosen["id"] == newer, False)
    case.check(
        bool(chosen) and chosen["id"] == older, "newest verified set: %s" % (chosen or {}).get("id")
    )

    outcome = verify(repo, template, newer)
    row.reported(outcome["ok"], False)
    case.check(not outcome["ok"], "verify passed the damaged set")
    case.refusal("; ".join(outcome["failures"]), newer, "sha256", artifact["file"])

    case.restore_newest(
        pg,
        repo,
        template,
        older,
        [newer],
        ("verification is %s" % expected_state,),
        intact_newest=False,
        require_verified=True,
    )
    assert not case.problems, case.problems


# ---------------------------------------------------------------------- 3. rollback by copy
def _copy_edited(writer: Any, template: dict[str, Any], copy_id: str) -> tuple[str, ...]:
    writer.copy_set(template["older"], copy_id)
    edit_json(writer, "sets/%s/manifest.json" % copy_id, lambda m: m.update(id=copy_id))
    return ("fails its authentication check", "altered")


def _copy_unedited(writer: Any, template: dict[str, Any], copy_id: str) -> tuple[str, ...]:
    writer.copy_set(template["older"], copy_id)
    return ("names another set", template["older"])


def _symlink(writer: Any, template: dict[str, Any], copy_id: str) -> tuple[str, ...]:
    writer.link_set(template["older"], copy_id)
    return ("names another set", template["older"])


ROLLBACK = {
    "older set copied under a newer id, manifest id edited": _copy_edited,
    "older set copied under a newer id, unedited": _copy_unedited,
    "older set symlinked under a newer id": _symlink,
}


@pytest.mark.parametrize(
    ("variant", "backend"),
    [(v, b) for v in ROLLBACK for b in BACKENDS if b == "local" or "symlink" not in v],
)
def test_rollback_by_copy_and_replayed_pointer_is_not_accepted(
    variant, backend, template, pg, s3, tmp_path, summary_row
):
    row = summary_row(
        "%s: rollback (older set under a newer id, replayed pointer) (%s)" % (FAMILY, backend)
    )
    case = Case(row, variant)
    writer = clone(template, backend, tmp_path, s3)
    newer, older = template["newer"], template["older"]
    copy_id = later_id(template, 60)
    words = ROLLBACK[variant](writer, template, copy_id)
    writer.write("latest/%s" % latest_file(DATABASE), template["old_pointer"])
    repo = writer.repo()
    key = template["key"]
    row.run()

    entries = {e["id"]: e for e in catalog.list_catalog(repo, key=key)}
    entry = entries.get(copy_id, {})
    case.check(entry.get("state") == "corrupt", "the copy is listed as %s" % entry.get("state"))
    case.refusal("%s" % entry.get("error"), copy_id, *words)
    newest = catalog.newest_complete(repo, key=key)
    newest_verified = catalog.newest_complete(repo, require_verified=True, key=key)
    for what, got in (("newest", newest), ("newest verified", newest_verified)):
        got_id = (got or {}).get("id")
        row.rollback(got_id != newer)
        case.check(got_id == newer, "catalog %s is %s, not %s" % (what, got_id, newer))
    pointer = repo.read_latest(DATABASE, key)
    if pointer != newer:
        row.note(
            "the replayed pointer still authenticates (names %s); nothing chooses a set by it"
            % pointer
        )

    outcome = verify(repo, template, copy_id)
    row.reported(outcome["ok"], False)
    case.check(not outcome["ok"], "verify passed the copy")
    case.refusal("; ".join(outcome["failures"]), copy_id, *words)

    for options in ({}, {"require_verified": True}):
        case.restore_newest(
            pg, repo, template, newer, [copy_id], words, intact_newest=True, **options
        )
    # Asked for by id, the copy is refused naming why.
    try:
        result = rehearse(pg, repo, template, set_id=copy_id)
        row.rollback(True)
        case.check(False, "the copy was restored: %s" % result["set_id"])
    except BackupError as exc:
        case.refusal(str(exc), copy_id, *words)

    policy = RetentionPolicy(daily=1, weekly=0, monthly=0, yearly=0, min_keep=1)
    plan = apply_retention(repo, policy, database=DATABASE, check_mode=True, key=key)
    row.add("sets_lost", newer in plan["deleted"])
    case.check(newer not in plan["deleted"], "retention would delete the real newest set")
    case.check(copy_id in plan["corrupt"], "retention does not list the copy as corrupt")
    assert writer.has_set(older)
    assert not case.problems, case.problems


# ---------------------------------------------------------------------- 4. malformed manifests
def _artifact_size_string(m: dict[str, Any]) -> None:
    m["artifacts"][0]["size"] = str(m["artifacts"][0]["size"])


# name -> (edit, words the set's error must hold besides its id)
MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], None], tuple[str, ...]]] = {
    "size as a string": (_artifact_size_string, ("records size", "whole number")),
    "format_version as a string": (
        lambda m: m.update(format_version="1"),
        ("malformed format_version",),
    ),
    "encryption as a string": (lambda m: m.update(encryption="none"), ("malformed encryption",)),
    "started_at 0": (lambda m: m.update(started_at=0), ("malformed started_at",)),
    "a row count as a string": (
        lambda m: m["row_counts"].update({PROBE: "2"}),
        ("malformed row_counts",),
    ),
}


def plant_malformed(writer: Any, template: dict[str, Any], name: str, offset: int) -> str:
    edit, _field = MALFORMED[name]
    set_id = later_id(template, offset)
    writer.copy_set(template["newer"], set_id)
    manifest = json.loads(writer.read("sets/%s/manifest.json" % set_id))
    manifest["id"] = set_id
    edit(manifest)
    writer.write("sets/%s/manifest.json" % set_id, dump(manifest))
    return set_id


def meet_malformed(
    case: Case,
    row: Any,
    pg: Any,
    writer: Any,
    template: dict[str, Any],
    bad: dict[str, tuple[str, ...]],
) -> None:
    """info, verify, restore and retention over a repository holding the ``bad`` sets
    ({set id: words its error must hold}) beside the two real ones."""
    repo = writer.repo()
    key = template["key"]
    newer, older = template["newer"], template["older"]

    def guarded(what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except BackupError as exc:
            case.check(False, "%s failed: %s" % (what, exc))
        except Exception as exc:
            case.check(False, "%s raised %s: %s" % (what, type(exc).__name__, str(exc)[:200]))
        return None

    # info
    entries = guarded("list_catalog", lambda: catalog.list_catalog(repo, key=key))
    if entries is not None:
        by_id = {e["id"]: e for e in entries}
        for set_id, words in bad.items():
            entry = by_id.get(set_id, {})
            case.check(
                entry.get("state") == "corrupt", "%s is listed as %s" % (set_id, entry.get("state"))
            )
            case.refusal(str(entry.get("error")), set_id, *words)
        for set_id in (newer, older):
            case.check(by_id.get(set_id, {}).get("state") == "complete", "%s not complete" % set_id)
        report = guarded(
            "backup_info report",
            lambda: catalog_report.build_report(entries, utc_now(), database=DATABASE),
        )
        if report is not None:
            case.check(
                (report["newest"] or {}).get("id") == newer, "info newest: %s" % report["newest"]
            )
            warned = " ".join(report["warnings"])
            case.check(all(s in warned for s in bad), "info does not warn about every bad set")

    # verify: each bad set fails naming itself, the real ones still verify
    for set_id, words in bad.items():
        outcome = guarded("verify %s" % set_id, lambda s=set_id: verify(repo, template, s))
        if outcome is not None:
            row.reported(outcome["ok"], False)
            case.check(not outcome["ok"], "verify passed %s" % set_id)
            case.refusal("; ".join(outcome["failures"]), set_id, *words)
    outcome = guarded("verify newest", lambda: verify(repo, template, newer))
    case.check(bool(outcome) and outcome["ok"], "the real newest set no longer verifies")
    row.add("sets_lost", not (outcome and outcome["ok"]))
    daily = guarded("verify without set_id", lambda: verify(repo, template, None))
    if daily is not None:
        row.reported(daily["ok"] and daily["set_id"] in bad, False)

    # restore: the real newest, each bad set passed over naming why
    for set_id, words in bad.items():
        before = databases(pg)
        try:
            rehearse(pg, repo, template, set_id=set_id)
            case.check(False, "restore of %s by id succeeded" % set_id)
        except BackupError as exc:
            case.refusal(str(exc), set_id, *words)
        except Exception as exc:
            case.check(False, "restore of %s raised %s: %s" % (set_id, type(exc).__name__, exc))
        case.check(databases(pg) == before, "databases left behind")
    case.restore_newest(pg, repo, template, newer, list(bad), ("manifest",), intact_newest=True)

    # retention (a real run): the bad sets are corrupt, left alone, the real newest kept
    policy = RetentionPolicy(daily=1, weekly=0, monthly=0, yearly=0, min_keep=1)
    result = guarded(
        "apply_retention",
        lambda: apply_retention(repo, policy, database=DATABASE, key=key),
    )
    if result is not None:
        row.add("sets_lost", newer in result["deleted"])
        case.check(newer in result["kept"], "retention did not keep the real newest set")
        case.check(
            sorted(result["corrupt"]) == sorted(bad), "retention corrupt: %s" % result["corrupt"]
        )
        for set_id in bad:
            case.check(writer.has_set(set_id), "retention touched the corrupt set %s" % set_id)


@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_manifests_are_listed_corrupt_and_never_break_the_others(
    backend, template, pg, s3, tmp_path, summary_row
):
    row = summary_row("%s: malformed manifests (%s)" % (FAMILY, backend))
    case = Case(row, "malformed manifests")
    writer = clone(template, backend, tmp_path, s3)
    bad = {}
    for offset, name in enumerate(MALFORMED, start=30):
        set_id = plant_malformed(writer, template, name, offset)
        bad[set_id] = MALFORMED[name][1]
    row.run()
    meet_malformed(case, row, pg, writer, template, bad)
    assert not case.problems, case.problems


@pytest.mark.parametrize(
    ("record", "backend"),
    [
        ("manifest.json", "local"),
        ("manifest.json", "s3"),
        ("verification.json", "local"),
        ("latest pointer", "local"),
    ],
)
def test_json_nested_too_deep_is_corrupt_not_a_traceback(
    record, backend, template, pg, s3, tmp_path, summary_row, collections_path
):
    """A record of 100,000 nested arrays: json.loads raises RecursionError, not ValueError."""
    row = summary_row("%s: malformed manifests (%s)" % (FAMILY, backend))
    case = Case(row, "JSON nested too deep in %s" % record)
    writer = clone(template, backend, tmp_path, s3)
    deep = b"[" * 100000 + b"]" * 100000
    bad: dict[str, tuple[str, ...]] = {}
    if record == "manifest.json":
        set_id = later_id(template, 40)
        writer.copy_set(template["newer"], set_id)
        writer.write("sets/%s/manifest.json" % set_id, deep)
        bad[set_id] = ("manifest",)
    elif record == "verification.json":
        writer.write("sets/%s/verification.json" % template["newer"], deep)
    else:
        writer.write("latest/%s" % latest_file(DATABASE), deep)
    row.run()
    meet_malformed(case, row, pg, writer, template, bad)
    if backend == "local":
        # Tonight's backup must still run: a planted record must not stop the backups.
        config = agent_config(
            tmp_path, pg, DATABASE, template["passphrase"], repository=writer.root
        )
        result = faultlib.run_agent(collections_path, config)
        set_id = result.doc.get("set_id")
        good = result.rc == 0 and bool(set_id) and writer.has_set(set_id)
        row.add("sets_lost", not good)
        last = (result.stderr.strip().splitlines() or [""])[-1]
        case.check(good, "the next backup failed (rc=%s): %s" % (result.rc, result.msg or last))
    assert not case.problems, case.problems


# ---------------------------------------------------------------------- 1b. planted sets elsewhere
@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_set_and_replayed_pointer_do_not_make_retention_delete_the_newest(
    backend, template, s3, tmp_path, summary_row
):
    """Retention with the key must count only authenticated sets: a planted set (with a
    verification record saying ok) plus the older pointer replayed must not push the real
    newest set out of the policy."""
    row = summary_row("%s: planted plain-SQL set with a psql meta-command (%s)" % (FAMILY, backend))
    case = Case(row, "planted set + replayed pointer, met by retention")
    writer = clone(template, backend, tmp_path, s3)
    planted = later_id(template, 120)
    plant_set(writer, template, planted, HEAD + TABLE + TAIL)
    writer.write("latest/%s" % latest_file(DATABASE), template["old_pointer"])
    repo = writer.repo()
    row.run()
    policy = RetentionPolicy(daily=1, weekly=0, monthly=0, yearly=0, min_keep=1)
    # An hour after the real newest set: the planted one is in the past, and counts.
    now = parse_time(template["manifest"]["started_at"]) + datetime.timedelta(hours=1)
    result = apply_retention(repo, policy, database=DATABASE, key=template["key"], now=now)
    decisions = {d["id"]: d for d in result["decisions"]}
    lost = [s for s in (template["newer"],) if not writer.has_set(s)]
    row.add("sets_lost", len(lost))
    row.rollback(bool(lost) and writer.has_set(template["older"]))
    case.check(
        not lost,
        "retention deleted the real newest set %s (kept %s for %s; planted %s kept for %s)"
        % (
            template["newer"],
            result["kept"],
            decisions.get(template["older"], {}).get("reasons"),
            planted,
            decisions.get(planted, {}).get("reasons"),
        ),
    )
    assert not case.problems, case.problems


@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_set_does_not_stand_in_for_the_newest_in_backup_info(
    backend, template, s3, tmp_path, summary_row
):
    """backup_info's per-database summary (newest id, age, staleness: what monitoring
    reads) must not take a planted, unauthenticated set for the newest backup: dated now,
    it would keep ``stale: false`` while no real backup runs."""
    row = summary_row("%s: planted plain-SQL set with a psql meta-command (%s)" % (FAMILY, backend))
    case = Case(row, "planted set met by backup_info")
    writer = clone(template, backend, tmp_path, s3)
    planted = later_id(template, 29 * 3600)  # an hour old when the real one is 30 hours
    plant_set(writer, template, planted, HEAD + TABLE + TAIL)
    newer = template["newer"]
    row.run()
    entries = catalog.list_catalog(writer.repo(), key=template["key"])
    now = parse_time(template["manifest"]["started_at"]) + datetime.timedelta(hours=30)
    report = catalog_report.build_report(entries, now, database=DATABASE, max_age_hours=25)
    summary = report["databases"].get(DATABASE, {})
    row.reported(summary.get("newest") == planted, False)
    row.reported(summary.get("stale") is False, False)  # the real newest is 30 hours old
    case.check((report["newest"] or {}).get("id") == newer, "newest: %s" % report["newest"])
    case.check(
        summary.get("newest") == newer and summary.get("stale") is True,
        "backup_info databases[%s] = %s: the planted, unauthenticated set %s stands in for "
        "the real newest %s (30 hours old, so stale)" % (DATABASE, summary, planted, newer),
    )
    assert not case.problems, case.problems
