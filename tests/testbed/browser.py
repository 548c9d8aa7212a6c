"""Headless Chromium (Debian's ``chromium``) for rendering checks: a screenshot and the
DOM after rendering, and the console messages it logged. Offline: the page is a local
file and every network access is refused by the browser's own switches."""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Rendered:
    dom: str
    console: list[str]
    screenshot: Path


def _switches(profile: Path) -> list[str]:
    return [
        "--headless=new",
        "--no-sandbox",  # the test may run as root; the page is our own local file
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--proxy-server=127.0.0.1:9",  # nothing may load from anywhere
        "--user-data-dir=%s" % profile,
        "--enable-logging=stderr",
        "--v=0",
    ]


def render(page: Path, screenshot: Path, width: int = 1360, height: int = 2200) -> Rendered:
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (Debian package: chromium)")
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="clinic-chromium-") as profile:
        shot = subprocess.run(
            [
                binary,
                *_switches(Path(profile)),
                "--window-size=%d,%d" % (width, height),
                "--screenshot=%s" % screenshot,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        dom = subprocess.run(
            [binary, *_switches(Path(profile)), "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    if not screenshot.exists() or dom.returncode != 0:
        raise RuntimeError(
            "chromium failed (%s / %s): %s"
            % (shot.returncode, dom.returncode, (shot.stderr + dom.stderr)[-2000:])
        )
    console = [line for line in (shot.stderr + dom.stderr).splitlines() if ":CONSOLE" in line]
    return Rendered(dom=dom.stdout, console=console, screenshot=screenshot)


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit non-interlaced PNG, as
    Chromium writes them; enough to tell a rendered page from a blank one."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("%s is not a PNG" % path)
    offset, idat, header = 8, b"", None
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    width, height, depth, color, _compression, _filter, interlace = header
    if depth != 8 or interlace or color not in (2, 6):
        raise ValueError("unsupported PNG layout %r" % (header,))
    channels = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, rows


def colours(path: Path, step: int = 7) -> set[tuple[int, int, int]]:
    """The distinct RGB colours of a sample of the screenshot's pixels."""
    width, _height, rows = png_pixels(path)
    channels = len(rows[0]) // width
    found = set()
    for row in rows[::step]:
        for x in range(0, width, step):
            found.add(tuple(row[x * channels : x * channels + 3]))
    return found
