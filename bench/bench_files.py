#!/usr/bin/env python
"""Incremental file sets: what an hourly run costs against a full run, measured in one run.

Generates an uploads-like tree in a temp dir (default 10,240 files, 1.1 GB of random
bytes: scans and PDFs do not compress), then, per round, into a fresh local repository:

* ``plain full``   - files_backup as it is by default (incremental: false), the baseline;
* ``chain full``   - the first set of an incremental chain (reads and hashes everything,
                     writes the index too);
* ``unchanged``    - the next hourly run, nothing changed;
* ``10 changed``   - the run after 10 files were rewritten with new content.

Prints the medians over ``--repeat`` rounds, time and stored bytes as ratios to the chain's
full run (goals: unchanged <= 5 % of its time and <= 1 % of its bytes; 10 changed stores
about the changed files' size), then restores the last set of the chain (its archive and
those of the two sets it builds on) and checks that it reproduces the tree of its moment
exactly (bytes, modes, mtimes, directories). Everything lives in one temp dir, removed
at the end.

    python bench/bench_files.py [--files 10240] [--mb 1100] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import stat
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ansible_collections.clinic.backup.plugins.module_utils"


def import_engine(work: Path):
    namespace = work / "import" / "ansible_collections" / "clinic"
    namespace.mkdir(parents=True)
    (namespace / "backup").symlink_to(REPO_ROOT, target_is_directory=True)
    sys.path.insert(0, str(work / "import"))
    import importlib

    return (
        importlib.import_module(PACKAGE + ".file_backup"),
        importlib.import_module(PACKAGE + ".file_restore"),
        importlib.import_module(PACKAGE + ".repository"),
    )


def make_tree(root: Path, files: int, total_bytes: int, seed: int) -> None:
    """``files`` files of random bytes (sizes log-uniform from 2 kB to 2 MB, scaled to
    ``total_bytes``) in directories of ~80 files, year/month like a clinic's uploads."""
    rng = random.Random(seed)
    sizes = [int(2 ** rng.uniform(11, 21)) for _file in range(files)]
    scale = total_bytes / sum(sizes)
    sizes = [max(1, int(s * scale)) for s in sizes]
    per_dir = 80
    for index, size in enumerate(sizes):
        directory = (
            root
            / ("%04d" % (2020 + index // (per_dir * 12)))
            / ("%02d-%03d" % (index // per_dir % 12 + 1, index // per_dir))
        )
        if index % per_dir == 0:
            directory.mkdir(parents=True, exist_ok=True)
        path = directory / ("scan-%05d.%s" % (index, "pdf" if index % 3 else "dcm"))
        with open(path, "wb") as handle:
            remaining = size
            while remaining:
                step = min(remaining, 1 << 20)
                handle.write(os.urandom(step))
                remaining -= step
        moment = 1_600_000_000 + index * 600
        os.utime(path, (moment, moment))


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for current, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(current) / name
            info = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISDIR(info.st_mode):
                out[rel] = ("d", stat.S_IMODE(info.st_mode), int(info.st_mtime))
            elif stat.S_ISLNK(info.st_mode):
                out[rel] = ("l", os.readlink(path))
            else:
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    for block in iter(lambda h=handle: h.read(1 << 20), b""):
                        digest.update(block)
                out[rel] = ("f", stat.S_IMODE(info.st_mode), int(info.st_mtime), digest.hexdigest())
    return out


def cpu_seconds():
    """CPU seconds of this process and its finished children (gpg, zstd)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


CPU = {}


def timed(function, *args, **kwargs):
    """(wall seconds, result); the CPU seconds of the call are left in CPU["last"]."""
    cpu = cpu_seconds()
    start = time.perf_counter()
    result = function(*args, **kwargs)
    CPU["last"] = cpu_seconds() - cpu
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--files", type=int, default=10_240)
    parser.add_argument("--mb", type=int, default=1100, help="total size of the tree in MB")
    parser.add_argument("--changed", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (debugging)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-files-"))
    try:
        file_backup, file_restore, repository = import_engine(work)
        passphrase = work / "passphrase"
        fd = os.open(passphrase, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(24).hex().encode() + b"\n")
        os.close(fd)
        root = work / "uploads"
        print("generating %d files, %d MB in %s ..." % (args.files, args.mb, root), flush=True)
        seconds, _tree = timed(make_tree, root, args.files, args.mb * 1_000_000, args.seed)
        tree_bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print("  %.1f s, %d files, %.1f MB" % (seconds, args.files, tree_bytes / 1e6), flush=True)
        rng = random.Random(args.seed + 1)
        all_files = sorted(p for p in root.rglob("*") if p.is_file())

        def options(incremental):
            return file_backup.FileBackupOptions(
                "uploads",
                [str(root)],
                passphrase_file=str(passphrase),
                incremental=incremental,
            )

        rows = {k: [] for k in ("plain full", "chain full", "unchanged", "10 changed")}
        changed_bytes = []
        last = None
        for round_number in range(args.repeat):
            repo_dir = work / ("repo-%d" % round_number)
            repo = repository.LocalRepository(str(repo_dir), must_exist=False)
            plain_repo = repository.LocalRepository(str(work / "plain"), must_exist=False)
            for name, repo_used, opts in (
                ("plain full", plain_repo, options(False)),
                ("chain full", repo, options(True)),
                ("unchanged", repo, options(True)),
            ):
                seconds, result = timed(file_backup.run_file_backup, [repo_used], opts)
                rows[name].append((seconds, result["size"], result["files"]["count"], CPU["last"]))
                print(
                    "  round %d %-11s %6.2f s (%.2f CPU-s) %12d bytes stored"
                    % (round_number + 1, name, seconds, CPU["last"], result["size"]),
                    flush=True,
                )
            shutil.rmtree(work / "plain")
            chosen = rng.sample(all_files, args.changed)
            size = 0
            for path in chosen:
                new = os.urandom(path.stat().st_size)
                path.write_bytes(new)
                size += len(new)
            seconds, result = timed(file_backup.run_file_backup, [repo], options(True))
            archive = sum(a["size"] for a in result["artifacts"] if a["name"] == "files")
            changed_bytes.append((size, archive, result["size"] - archive))
            rows["10 changed"].append(
                (seconds, result["size"], result["files"]["count"], CPU["last"])
            )
            print(
                "  round %d %-11s %6.2f s %12d bytes stored (%d bytes changed)"
                % (round_number + 1, "10 changed", seconds, result["size"], size),
                flush=True,
            )
            if last is not None:
                shutil.rmtree(last[0])
            last = (repo_dir, repo, result)

        print("restoring the last set of the chain and comparing the tree ...", flush=True)
        expected = snapshot(root)
        target = work / "restored"
        repo_dir, repo, result = last
        restore_seconds, restored = timed(
            file_restore.restore_files,
            repo,
            file_restore.FileRestoreOptions(
                str(target), set_id=result["set_id"], passphrase_file=str(passphrase)
            ),
        )
        exact = snapshot(target) == expected
        shutil.rmtree(target)

        def median(name, column):
            return statistics.median(row[column] for row in rows[name])

        full_t, full_b = median("chain full", 0), median("chain full", 1)
        full_c = median("chain full", 3)
        print()
        print(
            "tree: %d files, %.1f MB; median of %d rounds; local repository, zstd -3 + gpg AES256;"
            " load average %.1f" % (args.files, tree_bytes / 1e6, args.repeat, os.getloadavg()[0])
        )
        print(
            "| run | seconds | CPU seconds | stored bytes | files stored | t / chain full |"
            " CPU / chain full | bytes / chain full |"
        )
        print("|---|---|---|---|---|---|---|---|")
        figures = {}
        for name in rows:
            t, b, n, c = (median(name, i) for i in range(4))
            figures[name] = {
                "seconds": t,
                "cpu_seconds": c,
                "stored_bytes": b,
                "files_stored": n,
                "time_ratio": t / full_t,
                "cpu_ratio": c / full_c,
                "bytes_ratio": b / full_b,
            }
            print(
                "| %s | %.2f | %.2f | %d | %d | %.4f | %.4f | %.5f |"
                % (name, t, c, b, n, t / full_t, c / full_c, b / full_b)
            )
        unchanged = figures["unchanged"]
        # Per round (each changes other files): the archive against the changed bytes; the
        # index (every path of the tree) is a fixed cost on top.
        changed_ratio = statistics.median(archive / size for size, archive, _i in changed_bytes)
        index_bytes = statistics.median(index for _s, _a, index in changed_bytes)
        print()
        print(
            "unchanged: %.2f %% of the full run's time, %.2f %% of its CPU (goal <= 5 %%), %.3f %% "
            "of its bytes (goal <= 1 %%)"
            % (
                100 * unchanged["time_ratio"],
                100 * unchanged["cpu_ratio"],
                100 * unchanged["bytes_ratio"],
            )
        )
        print(
            "10 changed: the archive stores %.3f x the changed files' bytes (goal: about 1), "
            "plus the index of the whole tree (%d bytes)" % (changed_ratio, index_bytes)
        )
        print(
            "chain full vs plain full: %.2f x the time (sha256 of every file + the index)"
            % (full_t / figures["plain full"]["seconds"])
        )
        print(
            "restore of %s (chain of %d): %.2f s, tree %s"
            % (
                result["set_id"],
                len(restored["chain"]),
                restore_seconds,
                "EXACT" if exact else "DIFFERENT",
            )
        )
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "files": args.files,
                        "tree_bytes": tree_bytes,
                        "repeat": args.repeat,
                        "runs": figures,
                        "changed": changed_bytes,
                        "index_bytes": index_bytes,
                        "changed_ratio": changed_ratio,
                        "restore_seconds": restore_seconds,
                        "restore_exact": exact,
                    },
                    indent=2,
                )
                + "\n"
            )
        return 0 if exact else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
