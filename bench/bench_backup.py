#!/usr/bin/env python
"""Benchmark: clinic.backup's streaming engine against bare pg_dump baselines.

Starts a throwaway PostgreSQL cluster and a moto S3 server, loads the synthetic
clinic dataset twice (at --scale and at --scale/4), runs one untimed warm-up of
every mode, then times --repeat rounds (order rotated every round, median kept):

  A      pg_dump -Fc -f FILE                     pg_dump's built-in gzip (level 6)
  B      pg_dump -Fc -Z0 | zstd -3 -T0 > FILE    a real OS pipeline (no shell), fsynced
  local  engine -> local repository              zstd -3 + gpg AES256 + sha256 + manifest
  s3     engine -> S3 (moto on loopback) only
  both   engine -> local + S3 at once
  local-nc  (only with --modes) engine -> local with row_counts=False

The engine runs as the host agent (python -m ...module_utils.agent backup) in a
child process. Its peak RSS is that process's own VmHWM, read inside it at exit
(ru_maxrss is not used: after a fork it also counts the parent's memory). The
children's peaks (pg_dump, zstd, gpg) come from polling /proc/PID/status.
CPU seconds are reported next to wall time: on a shared 2-core host they are
the steadier figure.

Usage: python bench/bench_backup.py [--scale 7.5] [--repeat 3] [--json out.json]
       BENCH_SCALE=... overrides the default scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.testbed.dataset import load_clinic_dataset  # noqa: E402
from tests.testbed.pg import PostgresCluster  # noqa: E402
from tests.testbed.s3 import MotoS3Server, aws_env  # noqa: E402

PACKAGE = "ansible_collections.clinic.backup.plugins.module_utils"
# pg_database_size grows ~26 MB per unit of scale (plus ~7 MB of catalogs): 7.5 gives ~200 MB.
DEFAULT_SCALE = 7.5
ZSTD_LEVEL = 3
MiB = 1024 * 1024
BUCKET = "bench-backups"
OWNER = "clinic_bench"

GOAL_T_VS_A = 0.25  # engine wall seconds <= 0.25 x baseline A
GOAL_T_VS_B = 1.30  # engine wall seconds <= 1.3 x baseline B
GOAL_RSS_MB = 200.0  # peak RSS of the Python engine process
# "Flat": the peak at the big size may exceed the small size's by at most this much.
FLAT_TOLERANCE = 0.10
FLAT_SLACK_MB = 8.0

# Runs the agent in-process, then records the process's own VmHWM and CPU at exit.
AGENT_WRAPPER = f"""
import json, resource, runpy, sys
out = sys.argv[1]
sys.argv = ["clinic-backup"] + sys.argv[2:]
code = 0
try:
    runpy.run_module("{PACKAGE}.agent", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
finally:
    hwm = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    me = resource.getrusage(resource.RUSAGE_SELF)
    with open(out, "w") as fh:
        json.dump({{"vmhwm_kb": hwm, "user": me.ru_utime, "sys": me.ru_stime}}, fh)
sys.exit(code)
"""

# The S3 sink alone, fed like the engine feeds it (pipe reads of 4-64 KiB), against a
# client that only sleeps: its buffering plateau, reached once the compressed stream
# exceeds a few parts (far beyond what the benchmark's database produces).
SINK_PROBE = f"""
import json, random, sys, time
from {PACKAGE} import s3

class SlowClient:
    def create_multipart_upload(self, **kw):
        return {{"UploadId": "u"}}
    def upload_part(self, **kw):
        time.sleep(0.02)
        return {{"ETag": "e"}}
    def complete_multipart_upload(self, **kw):
        pass
    def put_object(self, **kw):
        pass
    def head_object(self, **kw):
        return {{"ContentLength": sink.size}}

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0

total = int(sys.argv[1])
before = status("VmRSS:")
sink = s3.MultipartSink(SlowClient(), "b", "k")
rnd = random.Random(1)
sent = 0
while sent < total:
    chunk = b"x" * rnd.choice((8192, 65536, 65536, 65536, 4096 * rnd.randint(1, 16)))
    sink.write(chunk)
    sent += len(chunk)
sink.close()
print(json.dumps({{"stream_mb": sent / 1048576.0, "growth_mb": status("VmHWM:") - before,
                  "part_size_mb": s3.DEFAULT_PART_SIZE / 1048576.0,
                  "concurrency": s3.DEFAULT_CONCURRENCY}}))
"""

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- /proc helpers
def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        text = _read(f"/proc/{pid}/task/{tid}/children")
        if text:
            kids.extend(int(x) for x in text.split())
    return kids


def cpu_seconds(pid: int | None, include_reaped: bool = False) -> float:
    """utime+stime of ``pid`` (all threads), optionally plus its reaped children's."""
    text = _read(f"/proc/{pid}/stat") if pid else None
    if not text:
        return 0.0
    fields = text.rpartition(")")[2].split()
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17.
    ticks = int(fields[11]) + int(fields[12])
    if include_reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def host_load() -> dict[str, Any]:
    load = (_read("/proc/loadavg") or "0 0 0").split()
    pressure = _read("/proc/pressure/cpu") or ""
    some = next((line for line in pressure.splitlines() if line.startswith("some")), "")
    avg60 = next((p.split("=")[1] for p in some.split() if p.startswith("avg60=")), None)
    return {
        "loadavg_1m": float(load[0]),
        "loadavg_5m": float(load[1]),
        "cpu_pressure_some_avg60": None if avg60 is None else float(avg60),
    }


class ProcWatch(threading.Thread):
    """Poll process trees: peak VmHWM and last-seen CPU seconds per process."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.roots: list[int] = []
        self.interval = interval
        self.hwm_kb: dict[int, tuple[str, int]] = {}
        self.cpu: dict[int, tuple[str, float]] = {}
        self._stop_event = threading.Event()

    def sample(self) -> None:
        seen: set[int] = set()
        todo = list(self.roots)
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            todo.extend(_children(pid))
            status = _read(f"/proc/{pid}/status")
            if not status:
                continue
            name, hwm = "?", 0
            for line in status.splitlines():
                if line.startswith("Name:"):
                    name = line.split(None, 1)[1].strip()
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
            if hwm:  # zombies have no memory lines
                self.hwm_kb[pid] = (name, max(hwm, self.hwm_kb.get(pid, (name, 0))[1]))
                self.cpu[pid] = (name, cpu_seconds(pid))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def peak_mb_by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, kb in self.hwm_kb.values():
            out[name] = max(out.get(name, 0.0), kb / 1024.0)
        return out

    def cpu_by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, sec in self.cpu.values():
            out[name] = out.get(name, 0.0) + sec
        return out


# ----------------------------------------------------------------------------- set-up helpers
def private_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


def make_collection_path(tmp_dir: Path, engine_root: Path) -> str:
    """tmp_dir/ansible_collections/clinic/backup -> engine_root; returns tmp_dir."""
    namespace = tmp_dir / "ansible_collections" / "clinic"
    namespace.mkdir(parents=True, exist_ok=True)
    (namespace / "backup").symlink_to(engine_root, target_is_directory=True)
    return str(tmp_dir)


def tool_version(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def _check_rc(procs: list[subprocess.Popen[bytes]], what: str) -> None:
    for proc in procs:
        if proc.returncode != 0:
            raise RuntimeError(f"{what}: {proc.args} exited with {proc.returncode}")


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.cluster: PostgresCluster | None = None
        self.moto: MotoS3Server | None = None
        self.password = secrets.token_urlsafe(18)
        self.passphrase_file = private_file(work / "passphrase", secrets.token_urlsafe(32) + "\n")
        self.pythonpath = {"": make_collection_path(work / "engine", Path(args.engine_root))}
        if args.alt_engine_root:
            self.pythonpath["alt"] = make_collection_path(work / "alt", Path(args.alt_engine_root))
        self.zstd = shutil.which("zstd") or "zstd"
        self.run_no = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.cluster = PostgresCluster()
        self.cluster.start()
        self.moto = MotoS3Server()
        self.moto.start()
        self.moto.create_bucket(BUCKET)
        self.cluster.create_role(OWNER, self.password)

    def stop(self) -> None:
        try:
            if self.moto is not None:
                self.moto.stop()
                self.moto.cleanup()
        finally:
            if self.cluster is not None:
                self.cluster.destroy()

    def load(self, dbname: str, scale: float, ratio: bool) -> dict[str, Any]:
        assert self.cluster is not None
        started = time.monotonic()
        self.cluster.create_database(dbname, owner=OWNER)
        load_clinic_dataset(self.cluster, dbname, owner=OWNER, scale=scale)
        self.cluster.psql("VACUUM ANALYZE;", dbname=dbname)
        size = self.cluster.psql("SELECT pg_database_size(current_database());", dbname=dbname)
        info: dict[str, Any] = {
            "dbname": dbname,
            "scale": scale,
            "db_bytes": int(size),
            "load_seconds": round(time.monotonic() - started, 1),
        }
        if ratio:  # the data's own zstd ratio: uncompressed custom dump vs its zstd -3 size
            raw = self.work / f"raw-{dbname}.dump"
            argv = self.pg_dump_argv(dbname, "-Z0", "-f", str(raw))
            subprocess.run(argv, env=self.pg_env(dbname), check=True, stdin=subprocess.DEVNULL)
            info["dump_bytes"] = raw.stat().st_size
            with raw.open("rb") as src:
                zst = subprocess.run(
                    [self.zstd, "-q", "-c", f"-{ZSTD_LEVEL}", "-T0"],
                    stdin=src,
                    stdout=subprocess.PIPE,
                    check=True,
                )
            info["zstd_bytes"] = len(zst.stdout)
            info["zstd_ratio"] = round(info["dump_bytes"] / info["zstd_bytes"], 2)
            raw.unlink()
            info["row_count_query_seconds"] = self.time_row_counts(dbname)
        return info

    def time_row_counts(self, dbname: str) -> float:
        """Seconds for the manifest's exact row counts (one count(*) per table), run alone."""
        assert self.cluster is not None
        tables = self.cluster.psql(
            "SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables;", dbname=dbname
        ).split()
        sql = "".join(f"SELECT count(*) FROM {t};\n" for t in tables)
        started = time.monotonic()
        self.cluster.psql("BEGIN ISOLATION LEVEL REPEATABLE READ;\n" + sql + "COMMIT;", dbname)
        return round(time.monotonic() - started, 3)

    # ------------------------------------------------------------------ helpers
    def pg_env(self, dbname: str) -> dict[str, str]:
        assert self.cluster is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(self.cluster.libpq_env(user=OWNER, dbname=dbname, password=self.password))
        return env

    def pg_dump_argv(self, dbname: str, *extra: str) -> list[str]:
        assert self.cluster is not None
        return [str(self.cluster.bin_dir / "pg_dump"), "--no-password", "-Fc", *extra, dbname]

    def out_path(self, tag: str) -> Path:
        self.run_no += 1
        return self.work / f"{self.run_no:03d}-{tag}"

    def server_cpu(self) -> float:
        """CPU of the whole cluster: postmaster, reaped backends, live children."""
        assert self.cluster is not None
        pid = self.cluster.postmaster_pid()
        if pid is None:
            return 0.0
        return cpu_seconds(pid, include_reaped=True) + sum(cpu_seconds(k) for k in _children(pid))

    def _measure(
        self,
        start: Callable[[], list[subprocess.Popen[bytes]]],
        finish: Callable[[list[subprocess.Popen[bytes]]], dict[str, Any]],
    ) -> dict[str, Any]:
        assert self.moto is not None
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        server0, moto0 = self.server_cpu(), cpu_seconds(self.moto.pid)
        watch = ProcWatch()
        started = time.monotonic()
        procs = start()
        watch.roots.extend(p.pid for p in procs)
        watch.start()
        try:
            for proc in procs:
                proc.wait()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            watch.stop()
        seconds = time.monotonic() - started
        result = finish(procs)
        time.sleep(0.1)  # let the postmaster reap the finished backends
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        result.update(
            seconds=seconds,
            client_cpu=(cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            server_cpu=self.server_cpu() - server0,
            s3_server_cpu=cpu_seconds(self.moto.pid) - moto0,
            peak_mb_by_process=watch.peak_mb_by_name(),
            cpu_by_process=watch.cpu_by_name(),
        )
        return result

    # ------------------------------------------------------------------ modes
    def run_baseline_a(self, dbname: str) -> dict[str, Any]:
        out = self.out_path("a.dump")

        def start() -> list[subprocess.Popen[bytes]]:
            argv = self.pg_dump_argv(dbname, "-f", str(out))
            return [subprocess.Popen(argv, env=self.pg_env(dbname), stdin=subprocess.DEVNULL)]

        def finish(procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
            _check_rc(procs, "baseline A")
            return {"bytes": out.stat().st_size}

        try:
            return self._measure(start, finish)
        finally:
            out.unlink(missing_ok=True)

    def run_baseline_b(self, dbname: str) -> dict[str, Any]:
        out = self.out_path("b.dump.zst")
        handle = open(out, "wb")  # closed in finish() or below

        def start() -> list[subprocess.Popen[bytes]]:
            dump = subprocess.Popen(
                self.pg_dump_argv(dbname, "-Z0"),
                env=self.pg_env(dbname),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
            )
            try:
                zstd = subprocess.Popen(
                    [self.zstd, "-q", "-c", f"-{ZSTD_LEVEL}", "-T0"],
                    stdin=dump.stdout,
                    stdout=handle,
                )
            except BaseException:
                dump.kill()
                dump.wait()
                raise
            assert dump.stdout is not None
            dump.stdout.close()  # zstd holds the only read end now
            return [dump, zstd]

        def finish(procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
            os.fsync(handle.fileno())  # pg_dump -f and the engine fsync too
            handle.close()
            _check_rc(procs, "baseline B")
            return {"bytes": out.stat().st_size}

        try:
            return self._measure(start, finish)
        finally:
            handle.close()
            out.unlink(missing_ok=True)

    def run_engine(
        self, dbname: str, local: bool, s3: bool, row_counts: bool = True, variant: str = ""
    ) -> dict[str, Any]:
        assert self.cluster is not None and self.moto is not None
        tag = ("local" if local else "") + ("s3" if s3 else "") + (variant and "-" + variant)
        repo = self.out_path(tag + "-repo")
        prefix = f"run-{self.run_no:03d}"
        config: dict[str, Any] = {
            "database": dbname,
            "login_host": self.cluster.host,
            "login_port": self.cluster.port,
            "login_user": OWNER,
            "login_password": self.password,
            "passphrase_file": str(self.passphrase_file),
            "pg_bin_dir": str(self.cluster.bin_dir),
            "compression": "zstd",
            "compression_level": ZSTD_LEVEL,
            "encrypt": True,
            "row_counts": row_counts,
        }
        if local:
            config["repository"] = str(repo)
        if s3:
            target = {"bucket": BUCKET, "prefix": prefix, "endpoint_url": self.moto.endpoint_url}
            config["s3_targets"] = [target]
        config_file = private_file(self.work / f"config-{self.run_no:03d}.json", json.dumps(config))
        usage_file = self.work / f"usage-{self.run_no:03d}.json"
        env = {k: v for k, v in aws_env(self.moto).items() if not k.startswith("PG")}
        env["PYTHONPATH"] = self.pythonpath[variant]
        stdout = tempfile.TemporaryFile(dir=self.work)
        argv = [sys.executable, "-c", AGENT_WRAPPER, str(usage_file), "backup"]
        argv += ["--config", str(config_file)]

        def start() -> list[subprocess.Popen[bytes]]:
            return [
                subprocess.Popen(
                    argv, env=env, stdin=subprocess.DEVNULL, stdout=stdout, cwd=str(self.work)
                )
            ]

        def finish(procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
            stdout.seek(0)
            text = stdout.read().decode("utf-8", "replace")
            try:
                result = json.loads(text)
            except ValueError:
                result = {"ok": False, "msg": text[-2000:]}
            if procs[0].returncode != 0 or not result.get("ok"):
                msg = result.get("msg") or text[-2000:]
                raise RuntimeError(f"engine run failed (rc={procs[0].returncode}): {msg}")
            usage = json.loads(usage_file.read_text())
            database = next(a for a in result["artifacts"] if a["name"] == "database")
            return {
                "bytes": database["size"],
                "set_bytes": result["size"],
                "engine_seconds": result["duration_seconds"],
                "rss_mb": usage["vmhwm_kb"] / 1024.0,
                "engine_cpu": usage["user"] + usage["sys"],
            }

        try:
            sample = self._measure(start, finish)
            peaks = sample["peak_mb_by_process"]
            sample["children_peak_mb"] = max(
                (mb for name, mb in peaks.items() if not name.startswith("python")), default=0.0
            )
            return sample
        finally:
            stdout.close()
            config_file.unlink(missing_ok=True)
            usage_file.unlink(missing_ok=True)
            shutil.rmtree(repo, ignore_errors=True)
            if s3:
                self._empty_prefix(prefix)

    def _empty_prefix(self, prefix: str) -> None:
        assert self.moto is not None
        client = self.moto.client()
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            keys.extend({"Key": item["Key"]} for item in page.get("Contents", []))
        for first in range(0, len(keys), 1000):
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[first : first + 1000]})

    def sink_probe(self, total_bytes: int) -> dict[str, Any]:
        env = dict(os.environ, PYTHONPATH=self.pythonpath[""])
        proc = subprocess.run(
            [sys.executable, "-c", SINK_PROBE, str(total_bytes)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(proc.stdout)


# ----------------------------------------------------------------------------- modes
ModeFn = Callable[[Bench, str], dict[str, Any]]


def engine_mode(local: bool, s3: bool, row_counts: bool = True, variant: str = "") -> ModeFn:
    return lambda bench, db: bench.run_engine(db, local, s3, row_counts, variant)


BASE_MODES: dict[str, tuple[str, ModeFn]] = {
    "A": ("A  pg_dump -Fc (gzip -6)", lambda bench, db: bench.run_baseline_a(db)),
    "B": ("B  pg_dump -Z0 | zstd -3 -T0", lambda bench, db: bench.run_baseline_b(db)),
    "local": ("engine -> local", engine_mode(True, False)),
    "s3": ("engine -> S3", engine_mode(False, True)),
    "both": ("engine -> local + S3", engine_mode(True, True)),
    "local-nc": ("engine -> local, row_counts off", engine_mode(True, False, row_counts=False)),
}
DEFAULT_MODES = ("A", "B", "local", "s3", "both")


def build_modes(selected: list[str], alt: bool) -> dict[str, tuple[str, ModeFn]]:
    modes = {m: BASE_MODES[m] for m in BASE_MODES if m in selected or m in ("A", "B")}
    if alt:
        for name in [m for m in modes if m not in ("A", "B")]:
            local, s3 = name in ("local", "local-nc", "both"), name in ("s3", "both")
            label = modes[name][0] + " [alt]"
            modes[name + "@alt"] = (label, engine_mode(local, s3, name != "local-nc", "alt"))
    return modes


def is_engine(mode: str) -> bool:
    return mode not in ("A", "B")


# ----------------------------------------------------------------------------- reporting
def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("seconds", "bytes", "client_cpu", "server_cpu", "s3_server_cpu", "engine_seconds")
    summary: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples if s.get(key) is not None]
        summary[key] = statistics.median(values) if values else None
    summary["seconds_min"] = min(s["seconds"] for s in samples)
    summary["seconds_max"] = max(s["seconds"] for s in samples)
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


def verdict(value: float, goal: float) -> str:
    return f"{value:.2f}{' ok' if value <= goal else ' MISS'}"


def print_table(
    dataset: dict[str, Any],
    modes: dict[str, tuple[str, ModeFn]],
    summaries: dict[str, dict[str, Any]],
) -> None:
    a, b = summaries["A"], summaries["B"]
    print()
    print(
        f"DB {dataset['dbname']}: scale {dataset['scale']:g}, "
        f"pg_database_size {dataset['db_bytes'] / MiB:.1f} MB, "
        f"uncompressed dump {dataset['dump_bytes'] / MiB:.1f} MB, "
        f"zstd -{ZSTD_LEVEL} ratio {dataset['zstd_ratio']:.2f}x"
    )
    head = (
        f"{'mode':<36} {'sec':>6} {'min-max':>11} {'out MB':>7} {'t/A':>9} {'t/B':>9} "
        f"{'size/A':>7} {'size/B':>7} {'RSS MB':>7} {'kids MB':>8}"
    )
    print(head)
    print("-" * len(head))
    for key, (label, _fn) in modes.items():
        s = summaries[key]
        t_a, t_b = s["seconds"] / a["seconds"], s["seconds"] / b["seconds"]
        engine = is_engine(key)
        if engine:
            rss = f"{s['rss_mb']:.1f}" + ("" if s["rss_mb"] < GOAL_RSS_MB else "!")
            kids = s["children_peak_mb"]
        else:
            rss, kids = "-", max(s["peak_mb_by_process"].values(), default=0.0)
        print(
            f"{label:<36} {s['seconds']:6.2f} {s['seconds_min']:5.2f}-{s['seconds_max']:<5.2f} "
            f"{s['bytes'] / MiB:7.1f} "
            f"{verdict(t_a, GOAL_T_VS_A) if engine else f'{t_a:.2f}':>9} "
            f"{verdict(t_b, GOAL_T_VS_B) if engine else f'{t_b:.2f}':>9} "
            f"{s['bytes'] / a['bytes']:7.3f} {s['bytes'] / b['bytes']:7.3f} {rss:>7} {kids:8.1f}"
        )
    print(
        f"goals (engine rows): t/A <= {GOAL_T_VS_A}, t/B <= {GOAL_T_VS_B}, "
        f"RSS < {GOAL_RSS_MB:.0f} MB; sec = median wall time, RSS = engine process peak, "
        "kids = largest child peak (zstd/gpg/pg_dump)"
    )
    print()
    print("where the time goes (medians, CPU seconds; 2 cores give 2 CPU-s per wall second):")
    print(
        f"{'mode':<36} {'wall':>6} {'in-eng':>6} {'client':>6} {'pg srv':>6} {'moto':>6}  "
        "client CPU by process (polled)"
    )
    for key, (label, _fn) in modes.items():
        s = summaries[key]
        per = ", ".join(f"{n} {v:.2f}" for n, v in s["cpu_by_process"].items() if v >= 0.01)
        inner = "-" if s["engine_seconds"] is None else f"{s['engine_seconds']:.2f}"
        print(
            f"{label:<36} {s['seconds']:6.2f} {inner:>6} {s['client_cpu']:6.2f} "
            f"{s['server_cpu']:6.2f} {s['s3_server_cpu']:6.2f}  {per}"
        )
    floor = b["server_cpu"] / a["seconds"]
    print(
        "in-eng = the engine's own duration_seconds (no interpreter start-up / imports); "
        "pg srv = PostgreSQL backends;\nmoto = the S3 stand-in, which shares these cores "
        f"(real S3 would not). Floor: the server's COPY alone is {floor:.2f} x A."
    )


def parse_bench_args(
    argv: list[str] | None,
    description: str,
    default_scale: float,
    repeat: int,
    default_modes: Sequence[str],
    base_modes: Iterable[str],
    baselines: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The command line both benchmarks share (scale, rounds, modes, engine checkouts)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--scale",
        type=float,
        default=float(os.environ.get("BENCH_SCALE", default_scale)),
        help="dataset scale, ~26 MB of database per unit (default %(default)s; env BENCH_SCALE)",
    )
    parser.add_argument(
        "--repeat", type=int, default=repeat, help="timed rounds; the median is kept"
    )
    parser.add_argument("--json", metavar="FILE", help="write every sample and summary here")
    parser.add_argument(
        "--modes",
        default=",".join(default_modes),
        help=f"comma-separated, from {','.join(base_modes)} ({baselines} always run)",
    )
    parser.add_argument(
        "--engine-root", default=str(REPO_ROOT), help="collection checkout to benchmark"
    )
    parser.add_argument(
        "--alt-engine-root",
        metavar="DIR",
        help="a second checkout (e.g. a patched copy); its engine modes run interleaved as '@alt'",
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.scale <= 0:
        parser.error("--repeat must be >= 1 and --scale > 0")
    unknown = set(args.modes.split(",")) - set(base_modes)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    return args


def start_report(args: argparse.Namespace, goals: dict[str, float]) -> dict[str, Any]:
    """The report's header, printed: host, load (a busy host is warned about), goals."""
    report: dict[str, Any] = {
        "command": [sys.executable, *sys.argv],
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_before": host_load(),
        "engine_root": str(Path(args.engine_root).resolve()),
        "alt_engine_root": args.alt_engine_root,
        "repeat": args.repeat,
        "goals": goals,
    }
    load = report["load_before"]
    print(
        f"host: {os.cpu_count()} CPUs, load average {load['loadavg_1m']:.2f}, "
        f"CPU pressure (avg60) {load['cpu_pressure_some_avg60']}%"
    )
    if load["loadavg_1m"] > 0.5 * (os.cpu_count() or 1):
        print("warning: the host is busy; wall times will be noisy (CPU seconds less so)")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_bench_args(
        argv,
        (__doc__ or "").split("\n\n", maxsplit=1)[0],
        DEFAULT_SCALE,
        3,
        DEFAULT_MODES,
        BASE_MODES,
        "A and B",
        extra=lambda parser: parser.add_argument(
            "--no-small", action="store_true", help="skip the small database (RSS flatness check)"
        ),
    )
    modes = build_modes(args.modes.split(","), bool(args.alt_engine_root))
    report = start_report(
        args, {"t_vs_a": GOAL_T_VS_A, "t_vs_b": GOAL_T_VS_B, "rss_mb": GOAL_RSS_MB}
    )
    work = Path(tempfile.mkdtemp(prefix="clinic-bench-"))
    bench = Bench(args, work)
    started = time.monotonic()
    try:
        bench.start()
        assert bench.cluster is not None
        report["tools"] = {
            "pg_dump": tool_version([str(bench.cluster.bin_dir / "pg_dump"), "--version"]),
            "zstd": tool_version([bench.zstd, "--version"]),
            "gpg": tool_version(["gpg", "--version"]),
        }
        print("tools: " + "; ".join(report["tools"].values()), flush=True)
        print(f"loading scale {args.scale:g} ...", flush=True)
        big = bench.load("clinic_bench", args.scale, ratio=True)
        report["dataset"] = big
        print(
            f"  {big['dbname']}: {big['db_bytes'] / MiB:.1f} MB "
            f"(loaded in {big['load_seconds']} s), "
            f"uncompressed dump {big['dump_bytes'] / MiB:.1f} MB, "
            f"zstd -{ZSTD_LEVEL} ratio {big['zstd_ratio']}x, "
            f"row-count queries alone {big['row_count_query_seconds']} s",
            flush=True,
        )
        small = None
        if not args.no_small:
            small = bench.load("clinic_bench_small", args.scale / 4, ratio=False)
            report["dataset_small"] = small
            print(f"  {small['dbname']}: {small['db_bytes'] / MiB:.1f} MB", flush=True)

        print("warm-up: one untimed run of each mode", flush=True)
        for _label, fn in modes.values():
            fn(bench, big["dbname"])
        names = list(modes)
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m in names}
        for rnd in range(args.repeat):
            # Rotate, and reverse every other round, so no mode always follows the same one.
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            if rnd % 2:
                order.reverse()
            for mode in order:
                sample = modes[mode][1](bench, big["dbname"])
                samples[mode].append(sample)
                extra = f"  RSS {sample['rss_mb']:.1f} MB" if "rss_mb" in sample else ""
                print(
                    f"  round {rnd + 1} {mode:<12} {sample['seconds']:6.2f} s "
                    f"{sample['bytes']:>10} bytes{extra}",
                    flush=True,
                )
        summaries = {m: summarize(samples[m]) for m in names}
        report["samples"], report["summary"] = samples, summaries
        print_table(big, modes, summaries)

        goals: dict[str, dict[str, Any]] = {}
        for mode in filter(is_engine, names):
            s = summaries[mode]
            goals[mode] = {
                "t_vs_a": round(s["seconds"] / summaries["A"]["seconds"], 3),
                "t_vs_b": round(s["seconds"] / summaries["B"]["seconds"], 3),
                "rss_mb": round(s["rss_mb"], 1),
            }
        if small is not None:
            print()
            print("engine peak RSS by database size (MB; largest child in brackets):")
            print(
                f"{'mode':<36} {'small ' + format(small['db_bytes'] / MiB, '.0f') + ' MB':>16} "
                f"{'big ' + format(big['db_bytes'] / MiB, '.0f') + ' MB':>16} {'flat':>5}"
            )
            by_size: dict[str, Any] = {}
            for mode in filter(is_engine, names):
                sample = modes[mode][1](bench, small["dbname"])
                s = summaries[mode]
                flat = s["rss_mb"] <= sample["rss_mb"] * (1 + FLAT_TOLERANCE) + FLAT_SLACK_MB
                by_size[mode] = {"small": sample, "big_rss_mb": s["rss_mb"], "flat": flat}
                goals[mode]["flat"] = flat
                small_cell = f"{sample['rss_mb']:8.1f} [{sample['children_peak_mb']:5.1f}]"
                big_cell = f"{s['rss_mb']:8.1f} [{s['children_peak_mb']:5.1f}]"
                print(f"{modes[mode][0]:<36} {small_cell} {big_cell} {'yes' if flat else 'NO':>5}")
            report["rss_by_size"] = by_size
            print(f"(flat: big <= small x {1 + FLAT_TOLERANCE:.2f} + {FLAT_SLACK_MB:.0f} MB)")
            probes = [bench.sink_probe(n * MiB) for n in (48, 320)]
            report["s3_sink_probe"] = probes
            p48, p320 = probes
            print(
                f"S3 sink alone (part {p48['part_size_mb']:.0f} MB, {p48['concurrency']} in flight,"
                f" slow fake client): +{p48['growth_mb']:.0f} MB for a 48 MB stream,"
                f" +{p320['growth_mb']:.0f} MB for 320 MB (the plateau, per S3 target)"
            )
            if "s3" in by_size:
                projected = by_size["s3"]["small"]["rss_mb"] + p320["growth_mb"]
                report["s3_projected_peak_mb"] = round(projected, 1)
                reach = (p48["concurrency"] + 2) * p48["part_size_mb"]
                print(
                    f"projected engine peak with one S3 target once the compressed dump exceeds"
                    f" ~{reach:.0f} MB: ~{projected:.0f} MB (small-DB S3 run + plateau)"
                    f"{'' if projected < GOAL_RSS_MB else ' MISS'}"
                )
        for g in goals.values():
            g["met"] = (
                g["t_vs_a"] <= GOAL_T_VS_A
                and g["t_vs_b"] <= GOAL_T_VS_B
                and g["rss_mb"] < GOAL_RSS_MB
                and g.get("flat", True)
            )
        report["goals_by_mode"] = goals
    finally:
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
