#!/usr/bin/env python
"""Benchmark: what clinic.backup's restore rehearsal costs in RTO against bare pg_restore.

Starts a throwaway PostgreSQL cluster, loads the synthetic clinic dataset at
--scale, takes one backup set with the engine (host agent: custom format,
zstd -3, gpg AES256, sha256, manifest with row counts) into a temp repository
and two bare baseline files, then runs one untimed warm-up of every mode and
times --repeat rounds (order rotated every round, median kept):

  R1        createdb; pg_restore --single-transaction -d DB FILE       (FILE: pg_dump -Fc -f)
  R2        createdb; zstd -dc FILE.zst | pg_restore --single-transaction -d DB
            (FILE.zst: pg_dump -Fc -Z0 | zstd -3; a real OS pipeline, no shell)
  rehearse  the agent's restore-test: newest set -> sha256 -> gpg -> zstd -d ->
            pg_restore --single-transaction into a fresh work database, the globals
            artifact read through, the row count of every table compared with the
            manifest, then the work database dropped
  rehearse-nocount  (only with --modes) the same with the row-count check off

Every mode creates its database from template0 and drops it again. "sec" is the
time to a restored database (everything but the DROP DATABASE): for R1/R2 the
createdb and restore steps, for the engine its process's wall time minus the
drop, timed inside the process (a real restore renames instead of dropping).
"full" adds the drop. CPU seconds (client processes + PostgreSQL backends)
always include the drop.

The engine runs as the host agent in a child process behind a tiny wrapper
(bench_backup's AGENT_WRAPPER plus timers around the restore's phases; no
change to the engine). Its peak RSS is that process's own VmHWM; the children's
peaks (pg_restore, gpg, zstd) come from polling /proc/PID/status.

Usage: python bench/bench_restore.py [--scale 3] [--repeat 5] [--json out.json]
       [--modes R1,R2,rehearse,rehearse-nocount]
       BENCH_SCALE=... overrides the default scale.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import bench_backup  # noqa: E402  (also puts the repository root on sys.path)
from bench_backup import (  # noqa: E402
    AGENT_WRAPPER,
    GOAL_RSS_MB,
    OWNER,
    PACKAGE,
    ZSTD_LEVEL,
    MiB,
    ProcWatch,
    host_load,
    private_file,
    tool_version,
)

# ~26 MB of database per unit of scale (plus ~7 MB of catalogs): 3 gives ~85 MB.
DEFAULT_SCALE = 3.0
GOAL_T_VS_R2 = 1.5  # rehearse wall seconds <= 1.5 x R2
REHEARSAL_TARGET = "clinic_bench_restore_test"

# Timers around the restore's phases, written at exit to $BENCH_PHASES_FILE; with
# $BENCH_NO_ROW_COUNTS set, RestoreOptions gets check_row_counts=False (the agent does
# not expose it). Prepended to bench_backup's AGENT_WRAPPER (VmHWM + CPU at exit).
PHASE_PRELUDE = f"""
import atexit, json, os, time
from {PACKAGE} import restore as _restore

_phases = {{}}

def _timed(name, fn):
    def timed(*args, **kwargs):
        started = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            _phases[name] = _phases.get(name, 0.0) + time.monotonic() - started
    return timed

_restore._check_other_artifacts = _timed("globals", _restore._check_other_artifacts)
_restore._restore_database = _timed("restore", _restore._restore_database)
_restore._restored_counts = _timed("counts", _restore._restored_counts)
_restore.Server.create = _timed("create", _restore.Server.create)
_restore.Server.drop = _timed("drop", _restore.Server.drop)

if os.environ.get("BENCH_NO_ROW_COUNTS"):
    _init = _restore.RestoreOptions.__init__
    def _no_counts(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        self.check_row_counts = False
    _restore.RestoreOptions.__init__ = _no_counts

def _write_phases():
    with open(os.environ["BENCH_PHASES_FILE"], "w") as fh:
        json.dump(_phases, fh)

atexit.register(_write_phases)
"""
ENGINE_WRAPPER = PHASE_PRELUDE + AGENT_WRAPPER

# Phase columns of the "where the time goes" table; "other" = the engine process's
# wall time not in any timed phase (interpreter start-up, imports, config, connect,
# catalog and manifest, gpg set-up).
PHASES = ("other", "globals", "create", "restore", "counts", "drop")

Popens = list[subprocess.Popen[bytes]]
Step = Callable[[], Popens]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class RestoreBench(bench_backup.Bench):
    """bench_backup's Bench (load, pg_env, pg_dump_argv, server_cpu...) without moto."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        super().__init__(args, work)
        self.repo = work / "repository"
        self.dump_file = work / "baseline.dump"
        self.zst_file = work / "baseline.dump.zst"
        self.rehearse_cfg = work / "restore-test.json"

    def start(self) -> None:
        self.cluster = bench_backup.PostgresCluster()
        self.cluster.start()
        self.cluster.create_role(OWNER, self.password)

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.destroy()

    # ------------------------------------------------------------------ helpers
    def su_env(self) -> dict[str, str]:
        """libpq env of the restoring role: the superuser over TCP (trust on 127.0.0.1)."""
        assert self.cluster is not None
        env = _clean_env()
        env.update(self.cluster.libpq_env(user=self.cluster.superuser, dbname="postgres"))
        return env

    def bin(self, tool: str) -> str:
        assert self.cluster is not None
        return str(self.cluster.bin_dir / tool)

    def engine_config(self, dbname: str) -> dict[str, Any]:
        assert self.cluster is not None
        return {
            "database": dbname,
            "login_host": self.cluster.host,
            "login_port": self.cluster.port,
            "login_user": OWNER,
            "login_password": self.password,
            "passphrase_file": str(self.passphrase_file),
            "pg_bin_dir": str(self.cluster.bin_dir),
            "repository": str(self.repo),
            "format": "custom",
            "compression": "zstd",
            "compression_level": ZSTD_LEVEL,
            "encrypt": True,
            "row_counts": True,
            "stale_seconds": 0,
        }

    # ------------------------------------------------------------------ set-up
    def prepare(self, dbname: str) -> dict[str, Any]:
        """One engine backup set and the two baseline files; returns their sizes."""
        assert self.cluster is not None
        config = self.engine_config(dbname)
        backup_cfg = private_file(self.work / "backup.json", json.dumps(config))
        config["restore_test"] = {"login_user": self.cluster.superuser, "login_password": None}
        private_file(self.rehearse_cfg, json.dumps(config))
        env = dict(_clean_env(), PYTHONPATH=self.pythonpath[""])
        argv = [sys.executable, "-m", PACKAGE + ".agent", "backup", "--config", str(backup_cfg)]
        started = time.monotonic()
        proc = subprocess.run(
            argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
        backup_seconds = time.monotonic() - started
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            doc = {"ok": False, "msg": proc.stdout[-2000:] + proc.stderr[-2000:]}
        if proc.returncode != 0 or not doc.get("ok"):
            raise RuntimeError(f"engine backup failed (rc={proc.returncode}): {doc.get('msg')}")
        database = next(a for a in doc["artifacts"] if a["name"] == "database")

        dump_env = self.pg_env(dbname)
        subprocess.run(
            self.pg_dump_argv(dbname, "-f", str(self.dump_file)),
            env=dump_env,
            stdin=subprocess.DEVNULL,
            check=True,
        )
        with self.zst_file.open("wb") as out:
            dump = subprocess.Popen(
                self.pg_dump_argv(dbname, "-Z0"),
                env=dump_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
            )
            assert dump.stdout is not None
            zstd = subprocess.Popen(
                [self.zstd, "-q", "-c", f"-{ZSTD_LEVEL}", "-T0"], stdin=dump.stdout, stdout=out
            )
            dump.stdout.close()
            zstd.wait()
            dump.wait()
        bench_backup._check_rc([dump, zstd], "pg_dump -Z0 | zstd")
        return {
            "set_id": doc["set_id"],
            "backup_seconds": round(backup_seconds, 2),
            "engine_database_bytes": database["size"],
            "engine_set_bytes": doc["size"],
            "r1_file_bytes": self.dump_file.stat().st_size,
            "r2_file_bytes": self.zst_file.stat().st_size,
        }

    # ------------------------------------------------------------------ measuring
    def _measure_steps(
        self, steps: list[tuple[str, Step]], finish: Callable[[Popens], dict[str, Any]]
    ) -> dict[str, Any]:
        """Run ``steps`` one after the other (each starts processes that run together);
        wall time per step and in all, CPU of the bench's children and of the server."""
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        server0 = self.server_cpu()
        watch = ProcWatch()
        watch.start()
        step_seconds: dict[str, float] = {}
        last: Popens = []
        started = time.monotonic()
        try:
            for name, step in steps:
                step_started = time.monotonic()
                last = step()
                watch.roots.extend(p.pid for p in last)
                try:
                    for proc in last:
                        proc.wait()
                finally:
                    for proc in last:
                        if proc.poll() is None:
                            proc.kill()
                            proc.wait()
                step_seconds[name] = time.monotonic() - step_started
                if name != "engine":  # the engine's failures are reported by finish()
                    bench_backup._check_rc(last, name)
        finally:
            watch.stop()
        wall = time.monotonic() - started
        result = finish(last)
        time.sleep(0.1)  # let the postmaster reap the finished backends
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        result.update(
            wall=wall,
            client_cpu=(cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            server_cpu=self.server_cpu() - server0,
            peak_mb_by_process=watch.peak_mb_by_name(),
            cpu_by_process=watch.cpu_by_name(),
        )
        result["cpu"] = result["client_cpu"] + result["server_cpu"]
        result.setdefault("phases", step_seconds)
        # Time to a restored database: everything but the drop.
        result["seconds"] = wall - result["phases"].get("drop", 0.0)
        peaks = result["peak_mb_by_process"]
        result["children_peak_mb"] = max(
            (mb for name, mb in peaks.items() if not name.startswith("python")), default=0.0
        )
        return result

    def run_bare(self, compressed: bool) -> dict[str, Any]:
        """R1 (compressed=False: pg_restore FILE) or R2 (zstd -dc FILE.zst | pg_restore)."""
        self.run_no += 1
        db = f"bench_r{'2' if compressed else '1'}_{self.run_no:03d}"
        env = self.su_env()
        restore = [self.bin("pg_restore"), "--no-password", "--exit-on-error"]
        restore += ["--single-transaction", "--dbname", db]

        def createdb() -> Popens:
            argv = [self.bin("createdb"), "--no-password", "--template=template0", db]
            return [subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)]

        def restore_step() -> Popens:
            if not compressed:
                argv = [*restore, str(self.dump_file)]
                return [subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)]
            zstd = subprocess.Popen(
                [self.zstd, "-q", "-d", "-c", str(self.zst_file)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
            )
            assert zstd.stdout is not None
            try:
                pg_restore = subprocess.Popen(restore, env=env, stdin=zstd.stdout)
            except BaseException:
                zstd.kill()
                zstd.wait()
                raise
            zstd.stdout.close()  # pg_restore holds the only read end now
            return [zstd, pg_restore]

        def dropdb() -> Popens:
            argv = [self.bin("dropdb"), "--no-password", "--if-exists", db]
            return [subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)]

        steps = [("create", createdb), ("restore", restore_step), ("drop", dropdb)]
        try:
            return self._measure_steps(steps, lambda procs: {})
        except BaseException:
            assert self.cluster is not None
            try:
                self.cluster.drop_database(db)
            except Exception:  # the original failure matters more
                pass
            raise

    def run_rehearse(self, row_counts: bool = True, variant: str = "") -> dict[str, Any]:
        self.run_no += 1
        usage_file = self.work / f"usage-{self.run_no:03d}.json"
        phases_file = self.work / f"phases-{self.run_no:03d}.json"
        env = dict(_clean_env(), PYTHONPATH=self.pythonpath[variant])
        env["BENCH_PHASES_FILE"] = str(phases_file)
        if not row_counts:
            env["BENCH_NO_ROW_COUNTS"] = "1"
        argv = [sys.executable, "-c", ENGINE_WRAPPER, str(usage_file), "restore-test"]
        argv += ["--config", str(self.rehearse_cfg)]
        stdout = tempfile.TemporaryFile(dir=self.work)
        stderr = tempfile.TemporaryFile(dir=self.work)

        def engine() -> Popens:
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
            )
            return [proc]

        def finish(procs: Popens) -> dict[str, Any]:
            stdout.seek(0)
            text = stdout.read().decode("utf-8", "replace")
            try:
                result = json.loads(text)
            except ValueError:
                stderr.seek(0)
                result = {
                    "ok": False,
                    "msg": text[-2000:] + stderr.read()[-2000:].decode("utf-8", "replace"),
                }
            if procs[0].returncode != 0 or not result.get("ok"):
                msg = result.get("msg") or text[-2000:]
                raise RuntimeError(f"restore-test failed (rc={procs[0].returncode}): {msg}")
            counts = result.get("row_counts") or []
            if row_counts and (not counts or any(r["restored"] != r["expected"] for r in counts)):
                raise RuntimeError(f"restore-test row counts missing or off: {counts}")
            usage = json.loads(usage_file.read_text())
            phases = json.loads(phases_file.read_text())
            return {
                "phases": phases,
                "engine_seconds": result["duration_seconds"],
                "restored_bytes": result["restored_bytes"],
                "tables_counted": len(counts),
                "rss_mb": usage["vmhwm_kb"] / 1024.0,
                "engine_cpu": usage["user"] + usage["sys"],
            }

        try:
            sample = self._measure_steps([("engine", engine)], finish)
            phases = sample["phases"]
            phases["other"] = sample["wall"] - sum(phases.values())
            return sample
        finally:
            stdout.close()
            stderr.close()
            usage_file.unlink(missing_ok=True)
            phases_file.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- modes
ModeFn = Callable[[RestoreBench], dict[str, Any]]

BASE_MODES: dict[str, tuple[str, ModeFn]] = {
    "R1": ("R1 pg_restore FILE (gzip -6)", lambda bench: bench.run_bare(False)),
    "R2": ("R2 zstd -dc | pg_restore", lambda bench: bench.run_bare(True)),
    "rehearse": ("engine rehearse", lambda bench: bench.run_rehearse()),
    "rehearse-nocount": (
        "engine rehearse, no row counts",
        lambda bench: bench.run_rehearse(row_counts=False),
    ),
}
DEFAULT_MODES = ("R1", "R2", "rehearse")


def build_modes(selected: list[str], alt: bool) -> dict[str, tuple[str, ModeFn]]:
    modes = {m: BASE_MODES[m] for m in BASE_MODES if m in selected or m in ("R1", "R2")}
    if alt:
        for name in [m for m in modes if is_engine(m)]:
            counts = name == "rehearse"
            modes[name + "@alt"] = (
                modes[name][0] + " [alt]",
                lambda bench, counts=counts: bench.run_rehearse(counts, "alt"),
            )
    return modes


def is_engine(mode: str) -> bool:
    return mode not in ("R1", "R2")


# ----------------------------------------------------------------------------- reporting
def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key in ("seconds", "wall", "cpu", "client_cpu", "server_cpu", "engine_seconds"):
        values = [s[key] for s in samples if s.get(key) is not None]
        summary[key] = statistics.median(values) if values else None
    summary["seconds_min"] = min(s["seconds"] for s in samples)
    summary["seconds_max"] = max(s["seconds"] for s in samples)
    summary["phases"] = {
        name: statistics.median(s["phases"][name] for s in samples)
        for name in PHASES
        if name in samples[0]["phases"]
    }
    if "rss_mb" in samples[0]:
        summary["rss_mb"] = max(s["rss_mb"] for s in samples)
    summary["children_peak_mb"] = statistics.median(s["children_peak_mb"] for s in samples)
    peaks: dict[str, float] = {}
    for s in samples:
        for name, value in s["peak_mb_by_process"].items():
            peaks[name] = max(peaks.get(name, 0.0), value)
    summary["peak_mb_by_process"] = peaks
    names = sorted({name for s in samples for name in s["cpu_by_process"]})
    summary["cpu_by_process"] = {
        name: statistics.median(s["cpu_by_process"].get(name, 0.0) for s in samples)
        for name in names
    }
    return summary


def print_table(
    dataset: dict[str, Any],
    modes: dict[str, tuple[str, ModeFn]],
    summaries: dict[str, dict[str, Any]],
) -> None:
    r1, r2 = summaries["R1"], summaries["R2"]
    print()
    print(
        f"DB {dataset['dbname']}: scale {dataset['scale']:g}, "
        f"pg_database_size {dataset['db_bytes'] / MiB:.1f} MB; restored from "
        f"R1 file {dataset['r1_file_bytes'] / MiB:.1f} MB, "
        f"R2 file {dataset['r2_file_bytes'] / MiB:.1f} MB, "
        f"engine artifact {dataset['engine_database_bytes'] / MiB:.1f} MB"
    )
    head = (
        f"{'mode':<32} {'sec':>6} {'min-max':>11} {'full':>6} {'t/R1':>5} {'t/R2':>9} "
        f"{'CPU s':>6} {'cpu/R2':>6} {'RSS MB':>7} {'kids MB':>8}"
    )
    print(head)
    print("-" * len(head))
    for key, (label, _fn) in modes.items():
        s = summaries[key]
        t_r1, t_r2 = s["seconds"] / r1["seconds"], s["seconds"] / r2["seconds"]
        if is_engine(key):
            mark = " ok" if t_r2 <= GOAL_T_VS_R2 else " MISS"
            t_r2_cell = f"{t_r2:.2f}{mark}"
            rss = f"{s['rss_mb']:.1f}" + ("" if s["rss_mb"] < GOAL_RSS_MB else "!")
        else:
            t_r2_cell, rss = f"{t_r2:.2f}", "-"
        print(
            f"{label:<32} {s['seconds']:6.2f} {s['seconds_min']:5.2f}-{s['seconds_max']:<5.2f} "
            f"{s['wall']:6.2f} {t_r1:5.2f} {t_r2_cell:>9} {s['cpu']:6.2f} "
            f"{s['cpu'] / r2['cpu']:6.2f} {rss:>7} {s['children_peak_mb']:8.1f}"
        )
    print(
        f"goals (engine rows): t/R2 <= {GOAL_T_VS_R2}, RSS < {GOAL_RSS_MB:.0f} MB. "
        "sec = median wall time to a restored database (create + restore [+ checks]),\n"
        "full = with the DROP DATABASE; CPU s = client processes + PostgreSQL backends, "
        "drop included;\nRSS = engine process peak (own VmHWM), kids = largest child peak "
        "(pg_restore/zstd/gpg/psql)"
    )
    print()
    print("where the time goes (medians, wall seconds; CPU seconds on the right):")
    print(
        f"{'mode':<32} "
        + " ".join(f"{p:>7}" for p in PHASES)
        + f" {'client':>6} {'pg srv':>6}  client CPU by process (polled)"
    )
    for key, (label, _fn) in modes.items():
        s = summaries[key]
        cells = [f"{s['phases'][p]:7.2f}" if p in s["phases"] else f"{'-':>7}" for p in PHASES]
        per = ", ".join(f"{n} {v:.2f}" for n, v in s["cpu_by_process"].items() if v >= 0.01)
        print(f"{label:<32} {' '.join(cells)} {s['client_cpu']:6.2f} {s['server_cpu']:6.2f}  {per}")
    print(
        "other = engine process time outside the timed phases (interpreter start-up, imports,\n"
        "connect, catalog and manifest, gpg set-up); globals = the globals artifact read "
        "through gpg/zstd;\nrestore = sha256 -> gpg -> zstd -d -> pg_restore (engine) or "
        "the bare restore; counts = count(*) per table"
    )


def main(argv: list[str] | None = None) -> int:
    # Rounds are short (seconds at the default scale) and CREATE DATABASE alone jitters by
    # ~0.1 s, so more rounds than bench_backup's 3.
    args = bench_backup.parse_bench_args(
        argv,
        (__doc__ or "").split("\n\n", maxsplit=1)[0],
        DEFAULT_SCALE,
        5,
        DEFAULT_MODES,
        BASE_MODES,
        "R1 and R2",
    )
    modes = build_modes(args.modes.split(","), bool(args.alt_engine_root))
    # SIGTERM takes the same way out as Ctrl-C: the cluster is stopped, the temp dir removed.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    report = bench_backup.start_report(args, {"t_vs_r2": GOAL_T_VS_R2, "rss_mb": GOAL_RSS_MB})
    work = Path(tempfile.mkdtemp(prefix="clinic-bench-restore-"))
    started = time.monotonic()
    bench: RestoreBench | None = None
    try:
        bench = RestoreBench(args, work)
        bench.start()
        assert bench.cluster is not None
        report["tools"] = {
            "pg_restore": tool_version([bench.bin("pg_restore"), "--version"]),
            "zstd": tool_version([bench.zstd, "--version"]),
            "gpg": tool_version(["gpg", "--version"]),
        }
        print("tools: " + "; ".join(report["tools"].values()), flush=True)
        print(f"loading scale {args.scale:g} ...", flush=True)
        dataset = bench.load("clinic_bench", args.scale, ratio=False)
        dataset.update(bench.prepare(dataset["dbname"]))
        report["dataset"] = dataset
        print(
            f"  {dataset['dbname']}: {dataset['db_bytes'] / MiB:.1f} MB "
            f"(loaded in {dataset['load_seconds']} s); engine set {dataset['set_id']} "
            f"in {dataset['backup_seconds']} s",
            flush=True,
        )

        print("warm-up: one untimed run of each mode", flush=True)
        for _label, fn in modes.values():
            fn(bench)
        names = list(modes)
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m in names}
        for rnd in range(args.repeat):
            # Rotate, and reverse every other round, so no mode always follows the same one.
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            if rnd % 2:
                order.reverse()
            for mode in order:
                sample = modes[mode][1](bench)
                samples[mode].append(sample)
                extra = f"  RSS {sample['rss_mb']:.1f} MB" if "rss_mb" in sample else ""
                print(
                    f"  round {rnd + 1} {mode:<18} {sample['seconds']:6.2f} s "
                    f"(full {sample['wall']:6.2f} s, CPU {sample['cpu']:6.2f} s){extra}",
                    flush=True,
                )
        summaries = {m: summarize(samples[m]) for m in names}
        report["samples"], report["summary"] = samples, summaries
        print_table(dataset, modes, summaries)
        goals: dict[str, dict[str, Any]] = {}
        for mode in filter(is_engine, names):
            s = summaries[mode]
            t_vs_r2 = s["seconds"] / summaries["R2"]["seconds"]
            goals[mode] = {
                "t_vs_r1": round(s["seconds"] / summaries["R1"]["seconds"], 3),
                "t_vs_r2": round(t_vs_r2, 3),
                "cpu_vs_r2": round(s["cpu"] / summaries["R2"]["cpu"], 3),
                "rss_mb": round(s["rss_mb"], 1),
                "met": t_vs_r2 <= GOAL_T_VS_R2 and s["rss_mb"] < GOAL_RSS_MB,
            }
        report["goals_by_mode"] = goals
    finally:
        if bench is not None:
            bench.stop()
        shutil.rmtree(work, ignore_errors=True)
    report["load_after"] = host_load()
    report["bench_seconds"] = round(time.monotonic() - started, 1)
    print(
        f"\nbenchmark took {report['bench_seconds']:.0f} s; "
        f"load average now {report['load_after']['loadavg_1m']:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
