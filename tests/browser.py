"""Driving the system Chromium with Playwright (its own browser download is not used): shared by the
browser tests and the README's screenshot script.

    from browser import launch, serve, screenshot
    with serve(site_dir) as url, launch() as browser:
        page = browser.new_page(); page.goto(url + "/index.html")
    screenshot(site_dir, "board.png")
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

#: the Chromium to drive (MERGESCALE_CHROMIUM overrides); `make` installs it with `apt-get install chromium`
CHROMIUM = Path(os.environ.get("MERGESCALE_CHROMIUM", "/usr/bin/chromium"))
#: headless, no sandbox (containers), and nothing that reaches the network on its own
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def missing_chromium() -> str | None:
    """Why the browser cannot run (a one-line fix), or None when it can."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: install it with `apt-get install chromium` (or set MERGESCALE_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: install mergescale[dev] (pip install playwright)"
    return None


@contextlib.contextmanager
def launch():
    """A headless Chromium (a Playwright ``Browser``), closed on exit."""
    problem = missing_chromium()
    if problem:
        raise RuntimeError(problem)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@contextlib.contextmanager
def serve(directory: Path | str) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port, a thread); yields the base URL (no slash)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="site-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def screenshot(site_dir: Path | str, png_path: Path | str, width: int = 1280, page: str = "index.html",
               height: int = 800, full_page: bool = True) -> Path:
    """A PNG of ``page`` of the static site in ``site_dir`` (served over HTTP), ``width`` CSS pixels wide."""
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with serve(site_dir) as url, launch() as browser:
        tab = browser.new_page(viewport={"width": width, "height": height})
        tab.goto(f"{url}/{page}")
        tab.wait_for_load_state("load")
        tab.screenshot(path=str(png_path), full_page=full_page)
    return png_path
