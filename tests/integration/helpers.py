"""Shared steps of the integration tests: stock-tool pipelines and repository inspection."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = REPO_ROOT / "tests" / "integration" / "playbooks"


def pipe(*argvs, stdin_path=None, env=None) -> bytes:
    """Run argv lists as an OS pipeline (no shell); raise if any stage fails; return stdout.

    A reader that stops early (pg_restore --list needs only the TOC) breaks the
    pipe of the stages before it; that is not a failure when the reader succeeded.
    """
    procs = []
    source = open(stdin_path, "rb") if stdin_path else None
    stdin = source or subprocess.DEVNULL
    try:
        for argv in argvs:
            err = tempfile.TemporaryFile()
            proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=err, env=env)
            if procs:
                procs[-1][0].stdout.close()  # the child holds it now
            procs.append((proc, err))
            stdin = proc.stdout
        out = procs[-1][0].stdout.read()
        for proc, _err in procs:
            proc.wait()
        errors = []
        for (proc, err), argv in zip(procs, argvs, strict=True):
            proc.wait()
            if proc.returncode != 0:
                err.seek(0)
                text = err.read().decode()
                if (
                    proc is not procs[-1][0]
                    and procs[-1][0].returncode == 0
                    and (proc.returncode == -13 or "Broken pipe" in text)
                ):
                    continue
                err.seek(0)
                errors.append("%s: exit %d: %s" % (argv[0], proc.returncode, err.read().decode()))
        if errors:
            raise AssertionError("; ".join(errors))
        return out
    finally:
        for proc, err in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.close()
        if source is not None:
            source.close()


def stock_gpg(passphrase_file, home, *action: str) -> list[str]:
    """Stock gpg as an operator would type it, passphrase from the file; default --decrypt."""
    return [
        "gpg",
        "--homedir",
        str(home),
        "--batch",
        "--quiet",
        "--pinentry-mode",
        "loopback",
        "--passphrase-file",
        str(passphrase_file),
        *(action or ("--decrypt",)),
    ]


def kill_gpg_agent(home) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)


def local_sets(repository) -> list[str]:
    sets = Path(repository) / "sets"
    return (
        sorted(p.name for p in sets.iterdir() if (p / "manifest.json").exists())
        if sets.exists()
        else []
    )


def staging_leftovers(repository) -> list[str]:
    staging = Path(repository) / ".staging"
    return sorted(os.listdir(staging)) if staging.exists() else []


def manifest(repository, set_id) -> dict:
    return json.loads((Path(repository) / "sets" / set_id / "manifest.json").read_text())


def artifact_path(repository, set_id, name="database") -> Path:
    entry = next(a for a in manifest(repository, set_id)["artifacts"] if a["name"] == name)
    return Path(repository) / "sets" / set_id / entry["file"]


def s3_keys(client, bucket, prefix="") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def open_multipart_uploads(client, bucket) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def bare_public_name(qualified: str) -> str:
    """'public."it''s"' -> "it's": manifest names in the form table_fingerprints uses."""
    schema, _dot, table = qualified.partition(".")
    assert schema == "public", qualified
    if table.startswith('"'):
        table = table[1:-1].replace('""', '"')
    return table
