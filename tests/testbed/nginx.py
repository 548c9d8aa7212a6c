"""A throwaway nginx serving on a free loopback port: the "live" web server whose site
configuration the configuration restore puts back, validates (``nginx -t``) and reloads.

Debian's nginx (package nginx-light, see scripts/bootstrap.sh) runs with its own prefix
directory (``-p``), configuration, pid file, temp paths and error log, in the foreground
under the test's control, as any user. The site lives in ``<prefix>/sites/clinic.conf``,
included by the main configuration, as /etc/nginx/sites-enabled is on a real host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from testbed.netutil import LOOPBACK, free_port, port_is_open, stop_process_group, wait_until

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def site(port: int, body: str) -> str:
    """A site answering every request with ``body``."""
    return (
        "server {\n"
        f"    listen {LOOPBACK}:{port};\n"
        "    location / {\n"
        "        default_type text/plain;\n"
        f'        return 200 "{body}\\n";\n'
        "    }\n"
        "}\n"
    )


class Nginx:
    """nginx -p <prefix> in the foreground; ``site`` is the file a restore replaces."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = Path(prefix)
        self.conf = self.prefix / "nginx.conf"
        self.site = self.prefix / "sites" / "clinic.conf"
        self.error_log = self.prefix / "error.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return os.access(NGINX, os.X_OK)

    def argv(self, *extra: str) -> list[str]:
        """nginx with this instance's prefix and configuration, plus ``extra``."""
        return [NGINX, "-p", str(self.prefix), "-c", str(self.conf), *extra]

    @property
    def test_argv(self) -> list[str]:
        return self.argv("-t", "-q")

    @property
    def reload_argv(self) -> list[str]:
        return self.argv("-s", "reload")

    def write_config(self, body: str) -> None:
        (self.prefix / "sites").mkdir(parents=True, exist_ok=True)
        (self.prefix / "temp").mkdir(exist_ok=True)
        temp = self.prefix / "temp"
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers keep the test's user
        self.conf.write_text(
            user + "worker_processes 1;\n"
            f"pid {self.prefix / 'nginx.pid'};\n"
            f"error_log {self.error_log} notice;\n"
            "events { worker_connections 64; }\n"
            "http {\n"
            f"    access_log off;\n"
            f"    client_body_temp_path {temp / 'body'};\n"
            f"    proxy_temp_path {temp / 'proxy'};\n"
            f"    fastcgi_temp_path {temp / 'fastcgi'};\n"
            f"    uwsgi_temp_path {temp / 'uwsgi'};\n"
            f"    scgi_temp_path {temp / 'scgi'};\n"
            f"    include {self.prefix / 'sites'}/*;\n"
            "}\n"
        )
        self.site.write_text(site(self.port, body))
        os.chmod(self.site, 0o644)

    def start(self) -> None:
        subprocess.run(self.test_argv, check=True, capture_output=True)
        self.proc = subprocess.Popen(
            self.argv("-g", "daemon off;"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(lambda: port_is_open(self.port), 15, what="nginx on port %d" % self.port)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None

    def get(self) -> str:
        """The body nginx serves now."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open("http://%s:%d/" % (LOOPBACK, self.port), timeout=5) as resp:
            return resp.read().decode().strip()

    def reloads(self) -> int:
        """How many reloads the master process has carried out (its error log says so)."""
        if not self.error_log.exists():
            return 0
        return self.error_log.read_text().count("(SIGHUP) received")

    def wait_for_body(self, body: str, timeout: float = 15) -> None:
        """A reload is asynchronous: wait until the new workers answer."""

        def serving() -> bool:
            try:
                return self.get() == body
            except (urllib.error.URLError, OSError):
                return False

        wait_until(serving, timeout, what="nginx to serve %r" % body)
