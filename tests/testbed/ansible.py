"""Run the real ``ansible-playbook`` against localhost with this checkout as clinic.backup.

The collection is exposed through a symlink ``<tmp>/ansible_collections/clinic/backup``
pointing at the repository, so tests always exercise the working tree. Results come
back through the test bed's own stdout callback (``callback_plugins/``): ansible-core
has no JSON stdout callback of its own (``ansible.posix.json`` is a separate collection).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .files import write_private
from .s3 import AWS_LEAKS

REPO_ROOT = Path(__file__).resolve().parents[2]
CALLBACK_DIR = Path(__file__).resolve().parent / "callback_plugins"
CALLBACK_NAME = "clinic_testbed_json"
COLLECTION_NAMESPACE = "clinic"
COLLECTION_NAME = "backup"


class PlaybookTimeout(RuntimeError):
    """ansible-playbook ran longer than its timeout and was killed."""


@dataclass
class PlaybookResult:
    """Outcome of one ansible-playbook run."""

    rc: int
    stdout: str
    stderr: str
    results: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """True when ansible-playbook failed or any task failed / was unreachable."""
        return self.rc != 0 or any(
            r.get("_status") in ("failed", "unreachable") for r in self.results
        )

    def task_results(self, name: str | None = None) -> list[dict[str, Any]]:
        """Per-host result dicts in execution order, optionally only for task ``name``.

        Each dict is the module's result plus ``_host``, ``_task``, ``_action`` and
        ``_status`` (ok, changed, failed, ignored, skipped, unreachable).
        """
        return [r for r in self.results if name is None or r.get("_task") == name]

    def result(self, name: str) -> dict[str, Any]:
        """The single result of task ``name`` (raises if there is not exactly one)."""
        found = self.task_results(name)
        if len(found) != 1:
            raise LookupError(f"{len(found)} results for task {name!r}\n{self.output()}")
        return found[0]

    def output(self) -> str:
        """stdout and stderr together, for assertion messages."""
        return (
            f"--- rc={self.rc} argv={self.argv}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )

    def assert_ok(self) -> PlaybookResult:
        """Raise AssertionError with the full output unless the run succeeded."""
        if self.failed:
            raise AssertionError(f"playbook failed\n{self.output()}")
        return self


def make_collection_path(tmp_dir: str | os.PathLike[str]) -> str:
    """Link the repository as ``tmp_dir/ansible_collections/clinic/backup``; return tmp_dir."""
    root = Path(tmp_dir)
    namespace_dir = root / "ansible_collections" / COLLECTION_NAMESPACE
    namespace_dir.mkdir(parents=True, exist_ok=True)
    link = namespace_dir / COLLECTION_NAME
    if link.is_symlink() and link.resolve() == REPO_ROOT:
        return str(root)
    if link.exists() or link.is_symlink():
        raise FileExistsError(f"{link} exists and is not a link to {REPO_ROOT}")
    link.symlink_to(REPO_ROOT, target_is_directory=True)
    return str(root)


def venv_bin() -> Path:
    """The bin directory of the interpreter running the tests (not symlink-resolved)."""
    return Path(sys.executable).parent


def ansible_env(collections_path: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for ansible commands: this checkout as clinic.backup, no user config.

    Ansible's temp dirs and home go under ``collections_path`` so a run never
    touches ~/.ansible; modules run with this venv's Python (boto3, psycopg2).
    """
    # A developer's own Ansible config, libpq settings or AWS profile must not change
    # what the tests see, nor point a module at a real server.
    env = {k: v for k, v in os.environ.items() if not _leaks_outside(k)}
    base = Path(collections_path)
    dirs = {name: base / f".ansible-{name}" for name in ("local", "remote", "home")}
    for path in dirs.values():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(base),
        ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="False",
        ANSIBLE_HOST_KEY_CHECKING="False",
        ANSIBLE_RETRY_FILES_ENABLED="False",
        ANSIBLE_LOCAL_TEMP=str(dirs["local"]),
        ANSIBLE_REMOTE_TEMP=str(dirs["remote"]),
        ANSIBLE_HOME=str(dirs["home"]),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        PATH=os.pathsep.join([str(venv_bin()), env.get("PATH", "/usr/bin:/bin")]),
    )
    if extra:
        env.update(extra)
    return env


def _leaks_outside(name: str) -> bool:
    return name == "ANSIBLE_CONFIG" or name.startswith("PG") or name in AWS_LEAKS


def _ansible_command(name: str) -> str:
    candidate = venv_bin() / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def run_playbook(
    playbook: str | os.PathLike[str],
    env: Mapping[str, str],
    extra_vars: Mapping[str, Any] | None = None,
    inventory: str = "localhost,",
    check: bool = False,
    verbosity: int = 0,
    timeout: float = 900,
    cwd: str | os.PathLike[str] | None = None,
) -> PlaybookResult:
    """Run ``ansible-playbook -c local`` and collect every task result.

    Extra vars travel as a 0600 JSON file (``-e @file``), never on the command line.
    ``cwd`` defaults to a private temp dir so no stray ansible.cfg is picked up.
    """
    with tempfile.TemporaryDirectory(prefix="clinic-ansible-") as work:
        results_file = Path(work, "results.json")
        argv = [_ansible_command("ansible-playbook"), "-i", inventory, "-c", "local"]
        if extra_vars is not None:
            vars_file = Path(work, "extra_vars.json")
            write_private(vars_file, json.dumps(dict(extra_vars)))
            argv += ["-e", f"@{vars_file}"]
        if check:
            argv.append("--check")
        if verbosity > 0:
            argv.append("-" + "v" * verbosity)
        argv.append(str(playbook))
        run_env = dict(env)
        run_env.update(
            ANSIBLE_STDOUT_CALLBACK=CALLBACK_NAME,
            ANSIBLE_CALLBACK_PLUGINS=os.pathsep.join(
                p for p in (str(CALLBACK_DIR), env.get("ANSIBLE_CALLBACK_PLUGINS", "")) if p
            ),
            CLINIC_TESTBED_RESULTS=str(results_file),
        )
        rc, stdout, stderr = _run(argv, run_env, timeout, cwd or work)
        doc: dict[str, Any] = {}
        if results_file.exists():
            doc = json.loads(results_file.read_text())
        return PlaybookResult(
            rc=rc,
            stdout=stdout,
            stderr=stderr,
            results=doc.get("results", []),
            stats=doc.get("stats", {}),
            argv=argv,
        )


def run_module(
    module: str,
    args: Mapping[str, Any],
    env: Mapping[str, str],
    check: bool = False,
    timeout: float = 900,
) -> dict[str, Any]:
    """Run one module on localhost and return its result dict.

    ``module`` is a FQCN or a short name of this collection (``"backup"`` becomes
    ``clinic.backup.backup``). The ad-hoc ``ansible -a`` would put the arguments on
    the command line, so a one-task playbook is generated instead (0600, deleted
    afterwards); the arguments are tagged ``!unsafe`` so Jinja never evaluates them.
    A failing module is returned, not raised: check ``result["failed"]``.
    """
    fqcn = module if "." in module else f"{COLLECTION_NAMESPACE}.{COLLECTION_NAME}.{module}"
    play = [
        {
            "name": "testbed run_module",
            "hosts": "all",
            "gather_facts": False,
            "tasks": [{"name": "run_module", fqcn: _UnsafeArgs(args)}],
        }
    ]
    with tempfile.TemporaryDirectory(prefix="clinic-module-") as work:
        playbook = Path(work, "run_module.yml")
        write_private(playbook, yaml.dump(play, Dumper=_UnsafeDumper, sort_keys=False))
        result = run_playbook(playbook, env, check=check, timeout=timeout)
    found = result.task_results("run_module")
    if len(found) != 1:
        raise RuntimeError(f"module {fqcn} produced no result\n{result.output()}")
    return found[0]


class _UnsafeArgs(dict):  # type: ignore[type-arg]
    """Module arguments dumped as one ``!unsafe`` mapping.

    The tag goes on the mapping, not on each string: ansible-core 2.19 re-resolves an
    ``!unsafe`` scalar as if it were plain, so ``!unsafe 'false'`` became the bool False
    (and then the string "False"). On a mapping, nested scalars keep their quoted types
    and every string inside is still marked unsafe.
    """


class _UnsafeDumper(yaml.SafeDumper):
    pass


_UnsafeDumper.add_representer(
    _UnsafeArgs, lambda dumper, data: dumper.represent_mapping("!unsafe", dict(data))
)


def _run(
    argv: list[str], env: Mapping[str, str], timeout: float, cwd: str | os.PathLike[str]
) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        argv,
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Own process group: a timeout takes down ansible's forks and the modules too.
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise PlaybookTimeout(
            f"{argv} killed after {timeout}s\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        ) from exc
    except BaseException:
        # KeyboardInterrupt etc.: do not leave ansible running in its own session.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, stdout, stderr
