"""Fixtures of the fault-injection suite and its summary.

The summary counts, per fault, what the tests *observed*: each test calls
``fault_summary.row(name)`` and adds observations (a run executed, a set that a fault
made disappear, an agent that reported success for a set that is missing or fails
verify, a secret found somewhere, a bad input and whether its error was clear, a command
planted in the repository that ran, an older set accepted as the newest). It is
printed at the end of the session and written to tests/output/fault-summary.{json,md}.
"""

from __future__ import annotations

import datetime
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testbed.faultproxy import FaultProxy
from testbed.pg import PostgresCluster

from . import faultlib

OUTPUT_DIR = Path(__file__).resolve().parents[1] / "output"

COLUMNS = (
    ("runs", "runs"),
    ("sets_lost", "sets lost"),
    ("false_successes", "false successes"),
    ("incomplete_listed", "incomplete listed"),
    ("leftovers", "leftovers"),
    ("recovered", "recovered"),
    ("secrets_leaked", "secrets leaked"),
    ("bad_inputs", "bad inputs"),
    ("clear_errors", "clear errors"),
    ("code_executions", "code executions"),
    ("rollbacks_accepted", "rollbacks accepted"),
)


class FaultRow:
    """Observed counters of one fault."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts = {key: 0 for key, _label in COLUMNS}
        self.notes: list[str] = []
        self.tests: set[str] = set()

    def add(self, key: str, amount: int | bool = 1) -> None:
        if key not in self.counts:
            raise KeyError(key)
        self.counts[key] += int(amount)

    def note(self, text: str) -> None:
        text = " ".join(str(text).split())  # one line, whatever the error looked like
        if text not in self.notes:
            self.notes.append(text)

    # Observation helpers: each takes facts and counts them.
    def run(self) -> None:
        self.add("runs")

    def reported(self, reported_ok: bool, set_good: bool) -> None:
        """The agent/module said "ok" while the set is missing or fails verify."""
        if reported_ok and not set_good:
            self.add("false_successes")

    def bad_input(self, clear: bool) -> None:
        self.add("bad_inputs")
        if clear:
            self.add("clear_errors")

    def code_execution(self, executed: bool) -> None:
        """A command planted in the repository ran (its marker file appeared)."""
        if executed:
            self.add("code_executions")

    def rollback(self, accepted: bool) -> None:
        """An older set was taken for the newest (a copy under a newer id, a replayed
        pointer) while the real newest set was intact."""
        if accepted:
            self.add("rollbacks_accepted")


class FaultSummary:
    def __init__(self) -> None:
        self.rows: dict[str, FaultRow] = {}
        self.started = time.time()

    def row(self, name: str, test: str | None = None) -> FaultRow:
        row = self.rows.setdefault(name, FaultRow(name))
        if test:
            row.tests.add(test)
        return row

    def totals(self) -> dict[str, int]:
        return {key: sum(r.counts[key] for r in self.rows.values()) for key, _label in COLUMNS}

    def as_dict(self) -> dict[str, Any]:
        return {
            "generated_at": datetime.datetime.now(datetime.UTC).isoformat(),
            "duration_seconds": round(time.time() - self.started, 1),
            "repeat": faultlib.repeat_count(),
            "columns": [key for key, _label in COLUMNS],
            "faults": [
                {"fault": r.name, **r.counts, "tests": sorted(r.tests), "notes": r.notes}
                for r in self.rows.values()
            ],
            "totals": self.totals(),
        }

    def table(self) -> list[str]:
        header = ["fault"] + [label for _key, label in COLUMNS]
        rows = [[r.name] + [str(r.counts[k]) for k, _l in COLUMNS] for r in self.rows.values()]
        rows.append(["TOTAL"] + [str(v) for v in self.totals().values()])
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

        def fmt(row: list[str]) -> str:
            return "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )

        return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]

    def markdown(self) -> str:
        header = ["fault"] + [label for _key, label in COLUMNS]
        lines = [
            "# clinic.backup fault-injection summary",
            "",
            "FAULT_REPEAT=%d, %.0f s" % (faultlib.repeat_count(), time.time() - self.started),
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for r in self.rows.values():
            lines.append(
                "| " + " | ".join([r.name] + [str(r.counts[k]) for k, _l in COLUMNS]) + " |"
            )
        lines.append("| **TOTAL** | " + " | ".join(str(v) for v in self.totals().values()) + " |")
        notes = [(r.name, n) for r in self.rows.values() for n in r.notes]
        if notes:
            lines += ["", "## Notes", ""] + ["- **%s**: %s" % (name, note) for name, note in notes]
        return "\n".join(lines) + "\n"


_SUMMARY_KEY = pytest.StashKey[FaultSummary]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SUMMARY_KEY] = FaultSummary()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.faults)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    summary = config.stash.get(_SUMMARY_KEY, None)
    if summary is None or not summary.rows:
        return
    terminalreporter.section("clinic.backup fault summary")
    for line in summary.table():
        terminalreporter.write_line(line)
    for row in summary.rows.values():
        for note in row.notes:
            terminalreporter.write_line("note [%s]: %s" % (row.name, note))
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUTPUT_DIR / "fault-summary.json").write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    (OUTPUT_DIR / "fault-summary.md").write_text(summary.markdown())
    terminalreporter.write_line(
        "written: %s, %s" % (OUTPUT_DIR / "fault-summary.json", OUTPUT_DIR / "fault-summary.md")
    )


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def fault_summary(request: pytest.FixtureRequest) -> FaultSummary:
    return request.config.stash[_SUMMARY_KEY]


@pytest.fixture
def summary_row(fault_summary: FaultSummary, request: pytest.FixtureRequest):
    """``summary_row(name)`` -> the FaultRow ``name``, tagged with this test."""
    return lambda name: fault_summary.row(name, request.node.nodeid)


@pytest.fixture(scope="session")
def fault_repeat() -> int:
    return faultlib.repeat_count()


@pytest.fixture(autouse=True)
def _reap_gpg_agents() -> Iterator[None]:
    """gpg-agent daemons survive a SIGKILLed backup (see the engine bug report): stop ours."""
    yield
    faultlib.reap_marked_gpg_agents()


@pytest.fixture(scope="session")
def faults_db(pg: PostgresCluster) -> Iterator[str]:
    """A database in the shared cluster with a ~6.5 MB dump artifact (2-part multipart upload)."""
    name = "faults_db"
    pg.create_database(name, owner=pg.clinic_user)
    try:
        faultlib.load_fault_data(pg, name, pg.clinic_user)
        yield name
    finally:
        pg.drop_database(name)


@pytest.fixture
def proxy(s3: Any) -> Iterator[FaultProxy]:
    """A fault proxy in front of the shared moto server (healed: no rules)."""
    with FaultProxy(s3.port) as fp:
        yield fp


@pytest.fixture
def fresh_bucket(s3: Any, request: pytest.FixtureRequest) -> str:
    name = "f-%s-%s" % (
        "".join(c for c in request.node.name.lower() if c.isalnum())[:40],
        secrets.token_hex(3),
    )
    s3.create_bucket(name)
    return name


@pytest.fixture
def direct_s3(s3: Any) -> Any:
    """The engine's boto3 client straight to moto, for looking at what really got stored."""
    return faultlib.s3_client(s3.endpoint_url)
