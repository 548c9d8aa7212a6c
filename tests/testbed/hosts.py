"""Throwaway Debian 12 test hosts in rootful podman, on an internal network.

What this gives the tests (and, later, the molecule scenarios of issue #8):

* Two images built from Debian's packages only: ``mmdebstrap`` (bookworm, minbase,
  Debian's mirror) writes a tarball that ``podman import`` turns into an image. No
  registry is ever contacted (none is reachable here).

  - ``database``: what a clinic database host runs for the ``backup_agent`` role:
    python3, cron, postgresql-15 (+ client), gnupg, zstd, gzip, python3-psycopg2,
    python3-boto3, python3-apt (ansible.builtin.apt), openssh-server.
  - ``bare``: python3, cron and openssh-server only; no PostgreSQL.

  An image is tagged with the hash of its recipe (suite, variant, package list,
  mirrors, mmdebstrap options, the customize hook ``images/customize``): it is built
  once and rebuilt only when its recipe changes (or ``CLINIC_TESTBED_REBUILD=1``).
  Older tags of the same image are removed after a rebuild.

* :class:`HostNetwork`: one ``podman network create --internal --disable-dns``
  network and the hosts started on it. The hosts have no default route (a connection
  to a public address fails at once with "Network is unreachable"), no DNS server, and
  reach each other and the controller through the network's bridge (its gateway
  address is the controller's; nothing routes beyond it). Name lookups go to 127.0.0.1
  in the host, where nothing answers. netavark turns on ``net.ipv4.ip_forward`` when
  it sets up a container; nothing on an internal network needs it (the bridge
  switches, it does not route), so the value seen before the first podman call is
  written back after every host start and in the ``finally``.

* Commands in a host: :meth:`Host.exec` (``podman exec`` with an argv list; never a
  shell string). Containers and the network are removed in a ``finally``; leftovers of
  a killed run (labelled with the pid of their creator) are removed by the next one.

Where things live: ``containers.conf`` and ``storage.conf`` beside this file are handed
to every podman call as ``CONTAINERS_CONF`` / ``CONTAINERS_STORAGE_CONF`` (nothing in
/etc is read for these settings or changed); images, containers and the netavark
network files live under ``/var/cache/clinic-backup-testbed`` (outside the work tree,
kept between runs), run-time state under ``/run/clinic-backup-testbed``.

How Ansible reaches the hosts: over SSH, as in production. Each host runs sshd (and
cron) under catatonit; a per-session ed25519 key is bind-mounted read-only as
``/root/.ssh/authorized_keys``; :meth:`HostNetwork.write_inventory` writes an
inventory with ``ansible_host`` set to the host's address on the internal network.
Why not the ``containers.podman`` connection plugin: Galaxy is unreachable, and the
only other source is the full ``ansible`` package on PyPI (ansible 12.3.0: a 54 MB
wheel, ~100 collections installed into the venv's site-packages where ansible-lint,
``ansible-test sanity`` and galaxy-importer would all see them; it also pins
ansible-core itself). SSH needs nothing new in the venv (only Debian's
openssh-client on the controller), exercises the connection the clinic really uses
(ssh, sftp/scp, pipelining) and works from any Ansible tool, molecule included.

Requirements: root (rootful podman), ``podman``, ``runc``, ``netavark``, ``catatonit``,
``mmdebstrap``, ``ssh`` (``scripts/bootstrap.sh`` installs them). Where they are missing
or ``podman run`` fails, :func:`unavailable_reason` says why and the tests skip with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .files import write_private

HERE = Path(__file__).resolve().parent
CONTAINERS_CONF = HERE / "containers.conf"
STORAGE_CONF = HERE / "storage.conf"
CUSTOMIZE_HOOK = HERE / "images" / "customize"

# Must match containers.conf / storage.conf.
CACHE_DIR = Path("/var/cache/clinic-backup-testbed")
RUN_DIR = Path("/run/clinic-backup-testbed")
BUILD_DIR = CACHE_DIR / "build"

SUITE = "bookworm"
VARIANT = "minbase"
# Debian's mirror only (the machine's apt sources name the same hosts). Override with
# CLINIC_TESTBED_MIRROR / CLINIC_TESTBED_SECURITY_MIRROR (e.g. a local apt cache).
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
# Docs, man pages and translations are left out: smaller images, faster imports.
DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)
IMAGE_CMD = "/usr/local/sbin/clinic-testbed-init"
# Test networks are /24s of this /16 (the default_subnet_pools of containers.conf).
SUBNET_BASE = "10.213"
IMAGE_PREFIX = "localhost/clinic-testbed-"
LABEL = "clinic-testbed"
LABEL_PID = "clinic-testbed.pid"
# Bumped when hosts.py changes how an image is made in a way the recipe cannot see.
RECIPE_FORMAT = 1

# The sysctls netavark may turn on; written back to what they were before.
FORWARDING_SYSCTLS = (
    Path("/proc/sys/net/ipv4/ip_forward"),
    Path("/proc/sys/net/ipv6/conf/all/forwarding"),
)

Progress = Callable[[str], None]


def _stderr_progress(message: str) -> None:
    print(f"testbed: {message}", file=sys.stderr, flush=True)


class HostsError(RuntimeError):
    """A podman or image build step of the test hosts failed."""


class HostsUnavailable(RuntimeError):
    """This machine cannot run the test hosts; the message says why (tests skip)."""


# ---------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageRecipe:
    """One test host image: a name and the Debian packages on top of minbase."""

    name: str
    packages: tuple[str, ...]
    description: str = ""

    def mirrors(self) -> tuple[str, ...]:
        mirror = os.environ.get("CLINIC_TESTBED_MIRROR", DEFAULT_MIRROR)
        security = os.environ.get("CLINIC_TESTBED_SECURITY_MIRROR", DEFAULT_SECURITY_MIRROR)
        return (
            f"deb {mirror} {SUITE} main",
            f"deb {mirror} {SUITE}-updates main",
            f"deb {security} {SUITE}-security main",
        )

    def recipe(self) -> dict[str, object]:
        """Everything that decides the image's content (its hash is the image tag)."""
        return {
            "format": RECIPE_FORMAT,
            "suite": SUITE,
            "variant": VARIANT,
            "packages": sorted(self.packages),
            "mirrors": list(self.mirrors()),
            "dpkg_options": list(DPKG_OPTIONS),
            "customize_sha256": hashlib.sha256(CUSTOMIZE_HOOK.read_bytes()).hexdigest(),
            "cmd": IMAGE_CMD,
        }

    def recipe_hash(self) -> str:
        doc = json.dumps(self.recipe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    @property
    def repository(self) -> str:
        return f"{IMAGE_PREFIX}{self.name}"

    @property
    def tag(self) -> str:
        return f"{self.repository}:{self.recipe_hash()}"


# Both images: what Ansible needs (python3 + sshd) and cron, which the agent relies on.
_BASE_PACKAGES = ("python3", "cron", "openssh-server")

DATABASE_IMAGE = ImageRecipe(
    name="database",
    packages=(
        *_BASE_PACKAGES,
        "postgresql-15",
        # backup_agent_packages + backup_agent_s3_packages (roles/backup_agent/defaults),
        # so the role's apt task finds everything installed without a network.
        "postgresql-client",
        "gnupg",
        "zstd",
        "gzip",
        "python3-psycopg2",
        "python3-boto3",
        # ansible.builtin.apt needs it on the host (it cannot install it offline).
        "python3-apt",
    ),
    description="a clinic database host: PostgreSQL 15 and every tool of the backup agent",
)
BARE_IMAGE = ImageRecipe(
    name="bare",
    packages=_BASE_PACKAGES,
    description="a host without PostgreSQL: python3 and cron (and sshd for Ansible)",
)
IMAGES: dict[str, ImageRecipe] = {r.name: r for r in (DATABASE_IMAGE, BARE_IMAGE)}


# ---------------------------------------------------------------------------- podman
def podman_env() -> dict[str, str]:
    """The caller's environment plus the project-local podman configuration."""
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    env["CONTAINERS_STORAGE_CONF"] = str(STORAGE_CONF)
    # A user's containers.conf.d or registries must not change the test hosts.
    env.pop("CONTAINERS_REGISTRIES_CONF", None)
    return env


def podman(
    args: Sequence[str],
    check: bool = True,
    timeout: float = 120,
    input_bytes: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``podman ARGS`` (an argv list) with the test bed's configuration."""
    argv = ["podman", *args]
    try:
        proc = subprocess.run(
            argv,
            env=podman_env(),
            input=input_bytes,
            stdin=None if input_bytes is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise HostsError(f"{argv} did not finish in {timeout}s") from exc
    if check and proc.returncode != 0:
        output = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(
            errors="replace"
        )
        raise HostsError(f"{argv} exited {proc.returncode}: {output}")
    return proc


def _ensure_dirs() -> None:
    for path in (CACHE_DIR, BUILD_DIR, CACHE_DIR / "tmp", CACHE_DIR / "networks", RUN_DIR):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)


def unavailable_reason() -> str | None:
    """Why this machine cannot run the test hosts, or None when it (probably) can.

    Only what can be told without building anything; :func:`probe_run` checks that a
    container really starts.
    """
    if sys.platform != "linux":
        return f"test hosts need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "test hosts need rootful podman: run the tests as root"
    missing = [
        tool for tool in ("podman", "runc", "mmdebstrap", "ssh", "ssh-keygen") if not _which(tool)
    ]
    if missing:
        return (
            f"{', '.join(missing)} not installed (scripts/bootstrap.sh installs podman, runc, "
            "netavark, catatonit, mmdebstrap, openssh-client)"
        )
    if not Path("/usr/bin/catatonit").exists():
        return "catatonit is not installed (/usr/bin/catatonit; apt-get install catatonit)"
    proc = podman(["info", "--format", "{{.Host.OCIRuntime.Name}}"], check=False, timeout=60)
    if proc.returncode != 0:
        return f"`podman info` fails: {proc.stderr.decode(errors='replace').strip()}"
    return None


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def probe_run(image: str) -> str | None:
    """Start and remove one container (no network); the error text if that fails."""
    proc = podman(
        ["run", "--rm", "--pull=never", "--network=none", image, "/bin/true"],
        check=False,
        timeout=120,
    )
    if proc.returncode != 0:
        return f"`podman run` fails on this machine: {proc.stderr.decode(errors='replace').strip()}"
    return None


def image_exists(tag: str) -> bool:
    return podman(["image", "exists", tag], check=False).returncode == 0


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    _ensure_dirs()
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_image(recipe: ImageRecipe, progress: Progress = _stderr_progress) -> str:
    """The image tag for ``recipe``, built first if it is not in the cache."""
    tag = recipe.tag
    rebuild = os.environ.get("CLINIC_TESTBED_REBUILD") == "1"
    with _build_lock():
        if image_exists(tag) and not rebuild:
            progress(f"image {tag} cached")
            return tag
        started = time.monotonic()
        progress(
            f"building image {tag} ({recipe.description}) with mmdebstrap from Debian's "
            f"mirror: {len(recipe.packages)} packages on {SUITE}/{VARIANT}, "
            "a minute or two on 2 cores"
        )
        _build(recipe, tag, progress)
        progress(f"image {tag} built in {time.monotonic() - started:.0f}s")
        _remove_other_tags(recipe, keep=tag, progress=progress)
    return tag


def _unmount_leftovers() -> list[str]:
    """Mounts a failed mmdebstrap left in its chroot under the temp dir (/proc, /sys,
    /dev...): lazily unmounted, deepest first, so that nothing walking /tmp later reads
    /proc/kmsg (a read that never ends) and the next build starts clean."""
    prefix = os.path.join(tempfile.gettempdir(), "mmdebstrap.")
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return points


def _build(recipe: ImageRecipe, tag: str, progress: Progress) -> None:
    tarball = BUILD_DIR / f"{recipe.name}-{recipe.recipe_hash()}.tar"
    log_path = BUILD_DIR / f"{recipe.name}.log"
    argv = [
        "mmdebstrap",
        f"--variant={VARIANT}",
        "--mode=root",
        "--format=tar",
        f"--include={','.join(recipe.packages)}",
        '--aptopt=Acquire::Retries "3"',
        *(f"--dpkgopt={opt}" for opt in DPKG_OPTIONS),
        # An executable path without shell metacharacters: mmdebstrap execs it directly
        # with the image root as $1.
        f"--customize-hook={CUSTOMIZE_HOOK}",
        SUITE,
        str(tarball),
        *recipe.mirrors(),
    ]
    if not os.access(CUSTOMIZE_HOOK, os.X_OK):
        raise HostsError(f"{CUSTOMIZE_HOOK} is not executable (git checkout lost its mode?)")
    try:
        with open(log_path, "w") as log:
            log.write(f"+ {argv}\n")
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                # mmdebstrap's "I:" lines are its milestones (a dozen per build).
                if line.startswith("I: ") and not line.startswith("I: running"):
                    progress(f"  {recipe.name}: {line[3:].strip()}")
            rc = proc.wait()
        if rc != 0:
            _unmount_leftovers()
            tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-40:])
            raise HostsError(f"mmdebstrap for {tag} exited {rc} (log {log_path}):\n{tail}")
        progress(f"  {recipe.name}: podman import ({tarball.stat().st_size // 2**20} MiB)")
        podman(
            [
                "import",
                "--change",
                f"CMD {json.dumps([IMAGE_CMD])}",
                "--change",
                f"LABEL {LABEL}.recipe={recipe.recipe_hash()}",
                "--message",
                f"clinic.backup test host image {recipe.name}",
                str(tarball),
                tag,
            ],
            timeout=600,
        )
    finally:
        tarball.unlink(missing_ok=True)


def _remove_other_tags(recipe: ImageRecipe, keep: str, progress: Progress) -> None:
    proc = podman(
        [
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}}",
            "--filter",
            f"reference={recipe.repository}",
        ]
    )
    for ref in proc.stdout.decode().split():
        if ref != keep and ref.startswith(recipe.repository + ":"):
            progress(f"removing outdated image {ref}")
            podman(["rmi", "--force", ref], check=False)


# ---------------------------------------------------------------------------- apt repository
# Where a host sees the local apt repository (bind-mounted read-only) and the one line
# of its apt sources that names it. Unsigned (trusted=yes): the .debs in it were
# fetched and checked against Debian's signed archive by mmdebstrap on the controller.
APT_REPO_MOUNT = "/srv/clinic-testbed-apt"
APT_REPO_SOURCE = f"deb [trusted=yes] file:{APT_REPO_MOUNT} ./"
# What a bare host installs from it: PostgreSQL and every tool of the agent (the
# database image's packages, python3-apt included, and backup_agent_packages' logrotate),
# with all their dependencies.
APT_REPO_RECIPE = ImageRecipe(
    name="apt-repository",
    packages=(*DATABASE_IMAGE.packages, "logrotate"),
    description="a local apt repository: the database image's packages as Debian's .debs",
)


def apt_repository_dir(recipe: ImageRecipe = APT_REPO_RECIPE) -> Path:
    return CACHE_DIR / "apt" / recipe.recipe_hash()


def ensure_apt_repository(
    recipe: ImageRecipe = APT_REPO_RECIPE, progress: Progress = _stderr_progress
) -> Path:
    """A flat apt repository of ``recipe``'s packages and their dependencies; its path.

    mmdebstrap resolves and downloads them from Debian's mirror exactly as for the
    images (``--skip=download/empty`` keeps the .debs, a ``sync-out`` hook copies them
    out) and the index is written from each .deb's own control fields. Built once per
    recipe and kept in the cache, like the images.
    """
    target = apt_repository_dir(recipe)
    rebuild = os.environ.get("CLINIC_TESTBED_REBUILD") == "1"
    with _build_lock():
        if (target / "Packages").exists() and not rebuild:
            progress(f"apt repository {target} cached")
            return target
        started = time.monotonic()
        progress(f"building {recipe.description} with mmdebstrap (a minute or two)")
        work = target.parent / f".{target.name}.{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        (work / "debs").mkdir(parents=True, mode=0o755)
        log_path = BUILD_DIR / f"{recipe.name}.log"
        argv = [
            "mmdebstrap",
            f"--variant={VARIANT}",
            "--mode=root",
            "--format=null",
            f"--include={','.join(recipe.packages)}",
            '--aptopt=Acquire::Retries "3"',
            "--skip=download/empty",
            f"--customize-hook=sync-out /var/cache/apt/archives {work / 'debs'}",
            SUITE,
            "/dev/null",
            *recipe.mirrors(),
        ]
        with open(log_path, "w") as log:
            # Twice at most: mmdebstrap sometimes fails to unmount its chroot's /proc
            # ("target is busy") after a complete download.
            for attempt in range(2):
                log.write(f"+ {argv}\n")
                log.flush()
                rc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=False,
                ).returncode
                if rc == 0:
                    break
                left = _unmount_leftovers()
                log.write(f"attempt {attempt + 1} exited {rc}; unmounted leftovers: {left}\n")
                shutil.rmtree(work / "debs", ignore_errors=True)
                (work / "debs").mkdir(parents=True, mode=0o755)
        if rc != 0:
            tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-40:])
            shutil.rmtree(work, ignore_errors=True)
            raise HostsError(
                f"mmdebstrap for the apt repository exited {rc} (log {log_path}):\n{tail}"
            )
        debs = sorted((work / "debs").glob("*.deb"))
        for deb in debs:
            deb.rename(work / deb.name)
        shutil.rmtree(work / "debs")  # apt's lock and partial/ are left in it
        (work / "Packages").write_text("".join(_packages_stanza(work / d.name) for d in debs))
        work.chmod(0o755)
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)
        for other in target.parent.iterdir():
            if other != target and not other.name.startswith("."):
                shutil.rmtree(other, ignore_errors=True)
        progress(
            f"apt repository {target} built in {time.monotonic() - started:.0f}s "
            f"({len(debs)} packages)"
        )
    return target


def _packages_stanza(deb: Path) -> str:
    """The Packages index entry of one .deb: its control fields plus where and what it is."""
    control = subprocess.run(
        ["dpkg-deb", "--field", str(deb)], capture_output=True, text=True, check=True
    ).stdout.rstrip("\n")
    data = deb.read_bytes()
    return (
        f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
        f"MD5sum: {hashlib.md5(data).hexdigest()}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n\n"
    )


# ---------------------------------------------------------------------------- forwarding
class ForwardingGuard:
    """Remembers the IP forwarding sysctls and writes back any that netavark turned on."""

    def __init__(self) -> None:
        self.before: dict[Path, str] = {}
        for path in FORWARDING_SYSCTLS:
            with contextlib.suppress(OSError):
                self.before[path] = path.read_text().strip()

    def restore(self) -> list[str]:
        """Write back every changed value; returns what was restored (for the log)."""
        restored = []
        for path, value in self.before.items():
            try:
                now = path.read_text().strip()
                if now != value:
                    path.write_text(value + "\n")
                    restored.append(f"{path}: {now} -> {value}")
            except OSError as exc:
                raise HostsError(f"cannot restore {path} to {value}: {exc}") from exc
        return restored


# ---------------------------------------------------------------------------- hosts
@dataclass
class ExecResult:
    """What a command in a host did (text, decoded as UTF-8 with replacement)."""

    argv: list[str]
    rc: int
    stdout: str
    stderr: str

    def check(self) -> ExecResult:
        if self.rc != 0:
            raise HostsError(
                f"{self.argv} exited {self.rc}\n"
                f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
            )
        return self


@dataclass
class Host:
    """One running test host."""

    name: str
    image: ImageRecipe
    container: str
    ip: str
    network: str
    _started: float = field(default_factory=time.monotonic)

    def exec(
        self,
        argv: Sequence[str],
        user: str | None = None,
        check: bool = True,
        timeout: float = 120,
        input_text: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the host (``podman exec``): a list, never a shell string."""
        if isinstance(argv, str):
            raise TypeError("Host.exec takes an argv list, not a string")
        args = ["exec"]
        if input_text is not None:
            args.append("--interactive")
        if user is not None:
            args += ["--user", user]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        args += [self.container, *argv]
        proc = podman(
            args,
            check=False,
            timeout=timeout,
            input_bytes=input_text.encode() if input_text is not None else None,
        )
        result = ExecResult(
            argv=list(argv),
            rc=proc.returncode,
            stdout=proc.stdout.decode(errors="replace"),
            stderr=proc.stderr.decode(errors="replace"),
        )
        return result.check() if check else result

    def ssh_ready(self) -> bool:
        """True when sshd on the host answers with its banner."""
        try:
            with socket.create_connection((self.ip, 22), timeout=1) as sock:
                sock.settimeout(2)
                return sock.recv(64).startswith(b"SSH-")
        except OSError:
            return False


class HostNetwork:
    """An internal podman network and the hosts started on it; ``close()`` removes all.

    Use as a context manager (or call :meth:`close` in a ``finally``)::

        with HostNetwork(work_dir) as net:
            db = net.start("db1", DATABASE_IMAGE)
            db.exec(["pg_lsclusters"])
    """

    def __init__(
        self,
        work_dir: Path,
        progress: Progress = _stderr_progress,
        owner_pid: int | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.progress = progress
        # The process whose death makes these hosts leftovers (remove_leftovers): this
        # one by default; molecule's create step names the molecule process instead,
        # since the hosts outlive the short command that started them.
        self.owner_pid = owner_pid or os.getpid()
        self.token = secrets.token_hex(4)
        self.name = f"clinic-tb-{self.token}"
        self.hosts: dict[str, Host] = {}
        self.subnet = ""
        self.gateway = ""
        self._guard = ForwardingGuard()
        self._created = False
        self.key_file = self.work_dir / "id_ed25519"
        self.public_key_file = self.work_dir / "id_ed25519.pub"

    @property
    def forwarding_before(self) -> dict[Path, str]:
        """The forwarding sysctls as they were before this network was created."""
        return dict(self._guard.before)

    def __enter__(self) -> HostNetwork:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        _ensure_dirs()
        remove_leftovers(self.progress)
        self.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                self.name,
                "-f",
                str(self.key_file),
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        try:
            self.subnet, self.gateway = self._create_network()
            self._created = True
            info = json.loads(podman(["network", "inspect", self.name]).stdout)[0]
            if not info.get("internal") or info.get("dns_enabled"):
                raise HostsError(f"network {self.name} is not internal without DNS: {info}")
        finally:
            self._restore_forwarding()

    def _create_network(self, attempts: int = 8) -> tuple[str, str]:
        """Create the network on a free /24 of SUBNET_BASE; returns (subnet, gateway).

        The subnet and gateway are given explicitly: without DNS, netavark puts no
        address on the bridge of an internal network, and the controller (ansible over
        ssh) could not reach the hosts. The gateway address is the controller's own
        address on the bridge; the hosts get no default route through it.
        """
        last = ""
        for _attempt in range(attempts):
            third = _free_third_octet()
            subnet, gateway = f"{SUBNET_BASE}.{third}.0/24", f"{SUBNET_BASE}.{third}.1"
            proc = podman(
                [
                    "network",
                    "create",
                    "--internal",
                    "--disable-dns",
                    "--subnet",
                    subnet,
                    "--gateway",
                    gateway,
                    "--label",
                    f"{LABEL}=1",
                    "--label",
                    f"{LABEL_PID}={self.owner_pid}",
                    self.name,
                ],
                check=False,
            )
            if proc.returncode == 0:
                return subnet, gateway
            last = proc.stderr.decode(errors="replace").strip()
        raise HostsError(f"podman network create {self.name} failed {attempts} times: {last}")

    def start(
        self,
        name: str,
        image: ImageRecipe,
        wait: float = 60,
        read_only_mounts: Mapping[str, str] | None = None,
    ) -> Host:
        """Start host ``name`` from ``image`` (which must be built) and wait for sshd.

        ``read_only_mounts`` maps controller paths to paths in the host (bind mounts,
        read-only), e.g. the local apt repository of :func:`ensure_apt_repository`.
        """
        if name in self.hosts:
            raise ValueError(f"host {name} already started")
        container = f"{self.name}-{name}"
        mounts: list[str] = []
        for source, target in (read_only_mounts or {}).items():
            mounts += ["--volume", f"{source}:{target}:ro"]
        try:
            podman(
                [
                    "run",
                    "--detach",
                    "--pull=never",
                    "--init",
                    "--name",
                    container,
                    "--hostname",
                    name,
                    "--network",
                    self.name,
                    # podman 4.3 copies the controller's resolv.conf even with
                    # --dns=none; a loopback resolver where nothing listens fails at once.
                    "--dns=127.0.0.1",
                    "--label",
                    f"{LABEL}=1",
                    "--label",
                    f"{LABEL_PID}={self.owner_pid}",
                    "--volume",
                    f"{self.public_key_file}:/root/.ssh/authorized_keys:ro",
                    *mounts,
                    image.tag,
                ]
            )
            info = json.loads(podman(["container", "inspect", container]).stdout)[0]
        finally:
            self._restore_forwarding()
        ip = info["NetworkSettings"]["Networks"][self.name]["IPAddress"]
        host = Host(name=name, image=image, container=container, ip=ip, network=self.name)
        self.hosts[name] = host
        deadline = time.monotonic() + wait
        while not host.ssh_ready():
            if time.monotonic() > deadline:
                logs = podman(["logs", container], check=False)
                raise HostsError(
                    f"sshd on {name} ({ip}) did not answer in {wait}s; container log:\n"
                    f"{logs.stdout.decode(errors='replace')}{logs.stderr.decode(errors='replace')}"
                )
            time.sleep(0.1)
        self.progress(f"host {name} ({image.name}) up at {ip} on internal network {self.name}")
        return host

    def remove(self, name: str) -> None:
        """Remove host ``name`` now (a server that died); the network stays."""
        host = self.hosts.pop(name)
        podman(["rm", "--force", "--time", "0", host.container])
        self.progress(f"host {name} removed")

    def write_inventory(self, path: Path | None = None) -> Path:
        """An Ansible inventory (YAML) of every host, grouped by image name; returns it.

        Connection settings are host variables, so they win over ``-c local`` and over
        ANSIBLE_PYTHON_INTERPRETER of the controller's environment.
        """
        path = path or self.work_dir / "inventory.yml"
        groups: dict[str, dict[str, dict[str, None]]] = {}
        hostvars: dict[str, dict[str, object]] = {}
        for host in self.hosts.values():
            groups.setdefault(f"{host.image.name}_hosts", {"hosts": {}})["hosts"][host.name] = None
            hostvars[host.name] = {"ansible_host": host.ip}
        doc = {
            "all": {
                "hosts": hostvars,
                "children": groups,
                "vars": {
                    "ansible_connection": "ssh",
                    "ansible_user": "root",
                    "ansible_port": 22,
                    "ansible_ssh_private_key_file": str(self.key_file),
                    # No user or system ssh config, no known_hosts written anywhere.
                    "ansible_ssh_common_args": (
                        "-F /dev/null -o UserKnownHostsFile=/dev/null "
                        "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=no "
                        "-o IdentitiesOnly=yes -o LogLevel=ERROR "
                        "-o ControlMaster=auto -o ControlPersist=15s"
                    ),
                    "ansible_ssh_pipelining": True,
                    "ansible_python_interpreter": "/usr/bin/python3",
                },
            }
        }
        write_private(path, yaml.safe_dump(doc, sort_keys=False))
        return path

    def close(self) -> None:
        """Remove every host and the network; write back the forwarding sysctls."""
        errors = []
        try:
            for host in list(self.hosts.values()):
                proc = podman(["rm", "--force", "--time", "0", host.container], check=False)
                if proc.returncode != 0:
                    errors.append(proc.stderr.decode(errors="replace").strip())
            self.hosts.clear()
            if self._created:
                proc = podman(["network", "rm", "--force", self.name], check=False)
                if proc.returncode != 0:
                    errors.append(proc.stderr.decode(errors="replace").strip())
                self._created = False
        finally:
            self._restore_forwarding()
        if errors:
            raise HostsError("cleaning up the test hosts failed: " + "; ".join(errors))

    def _restore_forwarding(self) -> None:
        for change in self._guard.restore():
            self.progress(f"restored {change}")


def _free_third_octet() -> int:
    """A random x for SUBNET_BASE.x.0/24 that no podman network or host route uses."""
    used: set[int] = set()
    proc = podman(["network", "ls", "--format", "json"], check=False)
    for entry in json.loads(proc.stdout or b"[]") if proc.returncode == 0 else []:
        for subnet in entry.get("subnets") or []:
            used |= _third_octets(str(subnet.get("subnet", "")))
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            destination = socket.inet_ntoa(int(fields[1], 16).to_bytes(4, "little"))
            mask = bin(int(fields[7], 16)).count("1")
            if mask == 0:
                continue  # the default route overlaps everything and decides nothing
            used |= _third_octets(f"{destination}/{mask}")
    free = [x for x in range(1, 255) if x not in used]
    if not free:
        raise HostsError(f"no free /24 left in {SUBNET_BASE}.0.0/16")
    return secrets.choice(free)


def _third_octets(cidr: str) -> set[int]:
    """Third octets of SUBNET_BASE.x.0/24 networks that overlap ``cidr``."""
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return set()
    base = ipaddress.ip_network(f"{SUBNET_BASE}.0.0/16")
    if net.version != 4 or not net.overlaps(base):
        return set()
    if net.prefixlen <= 16:
        return set(range(256))
    if net.prefixlen > 24:
        net = net.supernet(new_prefix=24)
    return {int(sub.network_address.packed[2]) for sub in net.subnets(new_prefix=24)}


def remove_leftovers(progress: Progress = _stderr_progress) -> None:
    """Remove containers and networks of test bed runs whose process is gone."""

    def dead(labels: Mapping[str, str] | None) -> bool:
        pid = (labels or {}).get(LABEL_PID, "")
        return pid.isdigit() and not Path(f"/proc/{pid}").exists()

    proc = podman(["ps", "--all", "--filter", f"label={LABEL}=1", "--format", "json"], check=False)
    for entry in json.loads(proc.stdout or b"[]") if proc.returncode == 0 else []:
        if dead(entry.get("Labels")):
            name = (entry.get("Names") or [entry["Id"]])[0]
            progress(f"removing leftover container {name}")
            podman(["rm", "--force", "--time", "0", name], check=False)
    proc = podman(
        ["network", "ls", "--filter", f"label={LABEL}=1", "--format", "json"], check=False
    )
    for entry in json.loads(proc.stdout or b"[]") if proc.returncode == 0 else []:
        if dead(entry.get("labels")):
            progress(f"removing leftover network {entry['name']}")
            podman(["network", "rm", "--force", entry["name"]], check=False)


def purge_cache(progress: Progress = _stderr_progress) -> None:
    """Remove every test host image, container and network, and the cache directory."""
    guard = ForwardingGuard()
    try:
        if _which("podman") and os.geteuid() == 0:
            progress(f"podman system reset of the test bed storage ({CACHE_DIR})")
            podman(["system", "reset", "--force"], check=False, timeout=600)
        for path in (CACHE_DIR, RUN_DIR):
            if path.exists():
                progress(f"removing {path}")
                shutil.rmtree(path)
    finally:
        guard.restore()


def prepare_images(
    recipes: Sequence[ImageRecipe] = (BARE_IMAGE, DATABASE_IMAGE),
    progress: Progress = _stderr_progress,
) -> dict[str, str]:
    """Build (or find cached) every image; raise HostsUnavailable if none can run.

    The smallest image is built first and a container started from it, so a machine
    whose ``podman run`` fails says so before minutes go into the other builds.
    """
    reason = unavailable_reason()
    if reason:
        raise HostsUnavailable(reason)
    _ensure_dirs()
    tags: dict[str, str] = {}
    ordered = sorted(recipes, key=lambda r: len(r.packages))
    for index, recipe in enumerate(ordered):
        tags[recipe.name] = ensure_image(recipe, progress)
        if index == 0:
            guard = ForwardingGuard()
            try:
                reason = probe_run(tags[recipe.name])
            finally:
                guard.restore()
            if reason:
                raise HostsUnavailable(reason)
    return tags
