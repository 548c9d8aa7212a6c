"""Test hosts for molecule's delegated driver: ``python -m testbed.hosts_cli ...``.

molecule runs each stage as its own ansible-playbook process, so the hosts of
:mod:`testbed.hosts` must outlive the command that starts them: ``create`` starts the
network, the hosts (and, with ``--s3``, moto) and writes their state to
``STATE_DIR/testbed.json`` and an Ansible inventory to ``STATE_DIR/inventory.yml``;
``remove-host`` kills one host (a server that died); ``destroy`` removes everything
the state names. The molecule scenarios' create.yml / destroy.yml call these.

The hosts are labelled with the pid of the molecule process (found among this
command's ancestors, or ``--owner-pid``): when molecule dies without its destroy
stage, the next test bed run removes them as leftovers.

S3 (``--s3``): moto listens on the network's gateway address only, the controller's
address on the internal bridge. The hosts reach it through that network and nothing
else (they have no other route); on the controller it is not on loopback or any
public interface.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .files import write_private
from .hosts import (
    APT_REPO_MOUNT,
    APT_REPO_SOURCE,
    IMAGES,
    ForwardingGuard,
    HostNetwork,
    HostsError,
    HostsUnavailable,
    ensure_apt_repository,
    podman,
    prepare_images,
    unavailable_reason,
)
from .netutil import free_port, http_ok, pid_alive, wait_until
from .s3 import AWS_LEAKS, DEFAULT_REGION, DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY

STATE_FILE = "testbed.json"
INVENTORY_FILE = "inventory.yml"
# Exit code of `create` when this machine cannot run the hosts (the caller skips).
EXIT_UNAVAILABLE = 3


def _progress(message: str) -> None:
    print(f"testbed: {message}", file=sys.stderr, flush=True)


def _molecule_ancestor() -> int | None:
    """The pid of the nearest ancestor process running molecule, if any."""
    pid = os.getppid()
    while pid > 1:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
        except OSError:
            return None
        if any(part.endswith(b"molecule") for part in cmdline[:2]):
            return pid
        pid = int(stat.rpartition(")")[2].split()[1])
    return None


def _parse_host(spec: str) -> tuple[str, str, list[str]]:
    """``NAME:IMAGE[:GROUP,GROUP...]`` -> (name, image, groups)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[1] not in IMAGES:
        raise SystemExit(
            f"--host {spec!r}: expected NAME:IMAGE[:GROUP,...] with IMAGE one of {sorted(IMAGES)}"
        )
    groups = [g for g in parts[2].split(",") if g] if len(parts) == 3 else []
    return parts[0], parts[1], groups


def _start_moto(state_dir: Path, address: str) -> dict[str, Any]:
    port = free_port(address)
    log = open(state_dir / "moto.log", "wb")
    env = {k: v for k, v in os.environ.items() if k not in AWS_LEAKS}
    env.update(
        AWS_ACCESS_KEY_ID=DUMMY_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=DUMMY_SECRET_KEY,
        AWS_DEFAULT_REGION=DEFAULT_REGION,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", address, "-p", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    endpoint = f"http://{address}:{port}"
    wait_until(lambda: http_ok(f"{endpoint}/moto-api/"), timeout=30, what="moto server")
    _progress(f"moto S3 at {endpoint} (the internal network's gateway only)")
    return {"pid": proc.pid, "endpoint_url": endpoint, "log": str(state_dir / "moto.log")}


def _create_buckets(endpoint: str, buckets: list[str]) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=DEFAULT_REGION,
        aws_access_key_id=DUMMY_ACCESS_KEY,
        aws_secret_access_key=DUMMY_SECRET_KEY,
    )
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)


def _inventory(network: HostNetwork, groups: dict[str, list[str]], extra: dict[str, Any]) -> str:
    children: dict[str, Any] = {}
    for host, host_groups in groups.items():
        for group in host_groups:
            children.setdefault(group, {"hosts": {}})["hosts"][host] = None
    doc = {
        "all": {
            "hosts": {name: {"ansible_host": h.ip} for name, h in network.hosts.items()},
            "children": children,
            "vars": {
                "ansible_connection": "ssh",
                "ansible_user": "root",
                "ansible_port": 22,
                "ansible_ssh_private_key_file": str(network.key_file),
                "ansible_ssh_common_args": (
                    "-F /dev/null -o UserKnownHostsFile=/dev/null "
                    "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=no "
                    "-o IdentitiesOnly=yes -o LogLevel=ERROR "
                    "-o ControlMaster=auto -o ControlPersist=60s"
                ),
                "ansible_ssh_pipelining": True,
                "ansible_python_interpreter": "/usr/bin/python3",
                **extra,
            },
        }
    }
    return yaml.safe_dump(doc, sort_keys=False)


def create(args: argparse.Namespace) -> int:
    state_dir = Path(args.state).resolve()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (state_dir / STATE_FILE).exists():
        _progress(f"{state_dir / STATE_FILE} exists: destroying those hosts first")
        destroy(args)
    specs = [_parse_host(spec) for spec in args.host]
    try:
        prepare_images([IMAGES[i] for i in sorted({spec[1] for spec in specs})], _progress)
    except HostsUnavailable as exc:
        print(f"test hosts unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    repo = ensure_apt_repository(progress=_progress) if args.apt_repo else None
    owner = args.owner_pid or _molecule_ancestor() or os.getppid()
    network = HostNetwork(state_dir, progress=_progress, owner_pid=owner)
    state: dict[str, Any] = {"owner_pid": owner, "hosts": {}, "groups": {}}
    try:
        network.create()
        state.update(
            network=network.name,
            subnet=network.subnet,
            gateway=network.gateway,
            forwarding_before={str(k): v for k, v in network.forwarding_before.items()},
        )
        _save(state_dir, state)
        for name, image, groups in specs:
            mounts = {str(repo): APT_REPO_MOUNT} if repo and image == "bare" else None
            host = network.start(name, IMAGES[image], read_only_mounts=mounts)
            state["hosts"][name] = {"container": host.container, "ip": host.ip, "image": image}
            state["groups"][name] = groups
            _save(state_dir, state)
            if mounts:
                # The replacement server's apt sources: the local repository only (the
                # host has no route to Debian's mirror).
                host.exec(["rm", "-f", "/etc/apt/sources.list"])
                host.exec(
                    ["tee", "/etc/apt/sources.list.d/clinic-testbed.list"],
                    input_text=APT_REPO_SOURCE + "\n",
                )
        extra: dict[str, Any] = {"clinic_testbed_gateway": network.gateway}
        if args.s3:
            state["s3"] = _start_moto(state_dir, network.gateway)
            _save(state_dir, state)
            _create_buckets(state["s3"]["endpoint_url"], args.bucket)
            extra.update(
                clinic_testbed_s3_endpoint=state["s3"]["endpoint_url"],
                clinic_testbed_s3_access_key=DUMMY_ACCESS_KEY,
                clinic_testbed_s3_secret_key=DUMMY_SECRET_KEY,
            )
        write_private(state_dir / INVENTORY_FILE, _inventory(network, state["groups"], extra))
    except BaseException:
        with contextlib.suppress(Exception):
            network.close()
        destroy(args)
        raise
    _progress(f"inventory {state_dir / INVENTORY_FILE}")
    return 0


def _save(state_dir: Path, state: dict[str, Any]) -> None:
    tmp = state_dir / f".{STATE_FILE}.tmp"
    write_private(tmp, json.dumps(state, indent=2))
    tmp.replace(state_dir / STATE_FILE)


def _load(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None


def remove_host(args: argparse.Namespace) -> int:
    state_dir = Path(args.state).resolve()
    state = _load(state_dir)
    if state is None or args.name not in state["hosts"]:
        raise SystemExit(f"no host {args.name} in {state_dir / STATE_FILE}")
    podman(["rm", "--force", "--time", "0", state["hosts"][args.name]["container"]])
    _progress(f"host {args.name} removed (its container and disk are gone)")
    state["hosts"][args.name]["removed"] = True
    _save(state_dir, state)
    return 0


def destroy(args: argparse.Namespace) -> int:
    state_dir = Path(args.state).resolve()
    state = _load(state_dir)
    if state is None:
        _progress(f"nothing to destroy ({state_dir / STATE_FILE} does not exist)")
        return 0
    if unavailable_reason() is not None:
        (state_dir / STATE_FILE).unlink()
        return 0
    guard = ForwardingGuard()
    guard.before.update({Path(k): v for k, v in state.get("forwarding_before", {}).items()})
    errors = []
    try:
        moto = state.get("s3")
        if moto and pid_alive(moto["pid"]):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(moto["pid"], signal.SIGTERM)
            deadline = time.monotonic() + 10
            while pid_alive(moto["pid"]) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(moto["pid"], signal.SIGKILL)
        for host in state.get("hosts", {}).values():
            proc = podman(
                ["rm", "--force", "--ignore", "--time", "0", host["container"]], check=False
            )
            if proc.returncode != 0:
                errors.append(proc.stderr.decode(errors="replace").strip())
        if state.get("network"):
            proc = podman(["network", "rm", "--force", state["network"]], check=False)
            if proc.returncode != 0 and b"network not found" not in proc.stderr:
                errors.append(proc.stderr.decode(errors="replace").strip())
    finally:
        for change in guard.restore():
            _progress(f"restored {change}")
    if errors:
        raise HostsError("destroying the test hosts failed: " + "; ".join(errors))
    (state_dir / STATE_FILE).unlink()
    (state_dir / INVENTORY_FILE).unlink(missing_ok=True)
    _progress(f"destroyed network {state.get('network')} and its hosts")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.hosts_cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_create = sub.add_parser("create", help="start the network and hosts, write the inventory")
    p_create.add_argument(
        "--state", required=True, help="directory for testbed.json / inventory.yml"
    )
    p_create.add_argument(
        "--host", action="append", required=True, help="NAME:IMAGE[:GROUP,...] (repeatable)"
    )
    p_create.add_argument(
        "--apt-repo", action="store_true", help="mount the local apt repository into bare hosts"
    )
    p_create.add_argument("--s3", action="store_true", help="moto S3 on the network's gateway")
    p_create.add_argument("--bucket", action="append", default=[], help="bucket to create")
    p_create.add_argument("--owner-pid", type=int, default=0)
    p_create.set_defaults(func=create)
    p_remove = sub.add_parser("remove-host", help="kill one host (a server that died)")
    p_remove.add_argument("--state", required=True)
    p_remove.add_argument("name")
    p_remove.set_defaults(func=remove_host)
    p_destroy = sub.add_parser("destroy", help="remove every host, moto and the network")
    p_destroy.add_argument("--state", required=True)
    p_destroy.set_defaults(func=destroy)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
