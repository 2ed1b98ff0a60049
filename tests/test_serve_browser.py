"""A real browser against ``p2p-run serve`` on the demo model, end to end.

Headless Chromium (Debian's ``chromium`` package, ``apt-get install chromium``; Playwright
never downloads a browser here) drives the page: upload a photo, set a target, run, see the
edited image; move a slider and see the second run reuse the inversion; stop a long run and
see the server stop it at its next step.

Skipped, with the reason, where Gradio, Playwright or Chromium is missing; CI installs them
and sets ``P2P_REQUIRE_BROWSER=1``, which turns the skip into a failure. Set
``P2P_SERVE_SCREENSHOT=docs/serve.png`` to write the page's screenshot for the docs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2p_framework.demo.shapes import render, sample_scene

CHROMIUM = os.environ.get("P2P_CHROMIUM", "/usr/bin/chromium")
# No sandbox (CI runs as root), no GPU, and nothing the browser would fetch on its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing() -> str | None:
    for module, install in (
        ("gradio", "pip install 'p2p-framework[ui]'"),
        ("playwright", "pip install playwright"),
    ):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install})"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set P2P_CHROMIUM)"
    return None


MISSING = _missing()
if os.environ.get("P2P_REQUIRE_BROWSER") and MISSING:
    raise RuntimeError(f"P2P_REQUIRE_BROWSER is set but {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))

PROMPT = "a red square on a yellow background"  # the demo scene of seed 0
TARGET = "a red circle on a yellow background"
STEPS = 10


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """``p2p-run serve`` in a subprocess; its stderr in a file."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = root / "serve.err"
        env = {
            **os.environ,
            "P2P_FRAMEWORK_CACHE_DIR": str(root / "cache"),
            "GRADIO_TEMP_DIR": str(root / "gradio"),
            "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1",
        }
        env.pop("P2P_FRAMEWORK_MODEL", None)
        command = [sys.executable, "-m", "p2p_framework.cli", "serve", "--port", str(self.port)]
        command += ["--threads", "1", "--device", "cpu", "--dtype", "float32"]
        with self.log.open("w") as err:
            self.process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=root
            )

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"p2p-run serve exited: {self.stderr()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"p2p-run serve did not answer in {seconds} s: {self.stderr()}")

    def wait_log(self, pattern: str, seconds: float) -> re.Match[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = re.search(pattern, self.stderr())
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in the server's log: {self.stderr()}")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_EARLY: dict[str, Server] = {}


def start_early(config: pytest.Config) -> None:
    """Start the server when the session's tests are collected (called by conftest.py):
    it boots in about 20 s (Gradio, torch, the model) on the core that the other tests,
    one thread each, leave idle, and is ready when these tests run."""
    if MISSING is None and "server" not in _EARLY:
        root = Path(tempfile.mkdtemp(prefix="p2p-serve-e2e-"))
        server = _EARLY["server"] = Server(root)
        config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))
        config.add_cleanup(server.stop)  # also when the session ends before these tests


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = _EARLY.pop("server", None) or Server(tmp_path_factory.mktemp("serve-e2e"))
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(server.url)
    page.wait_for_selector("#run")
    yield page
    page.close()


def _status(page: Any, text: str, timeout: float = 120_000) -> str:
    page.wait_for_selector(f"#status:has-text({text!r})", timeout=timeout)
    return str(page.inner_text("#status"))


def _set_steps(page: Any, steps: int) -> None:
    box = page.locator("#steps input[type=number]")
    if not box.is_visible():
        page.get_by_text("Advanced").click()
    committed = "v => document.querySelector('#steps input[type=range]').value === v"
    # A re-render of the page (a run ending or being stopped) can swallow a fill: try again.
    for attempt in range(3):
        box.fill(str(steps))
        box.press("Tab")  # the field commits its value when it loses focus
        try:
            page.wait_for_function(committed, arg=str(steps), timeout=20_000)
            return
        except Exception:
            if attempt == 2:
                raise


def test_upload_edit_then_move_a_slider_and_reuse_the_inversion(
    page: Any, server: Server, tmp_path: Path
) -> None:
    photo = tmp_path / "shapes.png"
    render(sample_scene(np.random.default_rng(0)), 128)[0].save(photo)

    page.get_by_label("Invert a photo").check()
    page.set_input_files("#photo input[type=file]", str(photo))
    assert "Photo shapes.png ready." in _status(page, "ready")
    page.locator("#method input").click()
    page.get_by_role("option", name="direct").click()
    page.fill("#prompt textarea", PROMPT)
    page.fill("#targets textarea", TARGET)
    _set_steps(page, STEPS)

    page.click("#run")
    status = _status(page, "Done")
    assert "Inversion computed" in status and "Error" not in status
    images = page.locator("#gallery img")
    assert images.count() == 2
    for index in range(2):  # both images arrived and decoded in the browser
        width = images.nth(index).evaluate("img => img.complete ? img.naturalWidth : 0")
        assert width == 64
    assert page.locator("#attention img").count() == 1

    page.locator("#cross-replace input[type=range]").fill("0.5")  # move the slider
    page.click("#run")
    status = _status(page, "reused")
    assert "Inversion reused from the cache (only the edit ran)." in status
    command = page.inner_text("#command")
    assert "--image shapes.png --source direct" in command
    assert "--cross-replace 0.5" in command and f"--steps {STEPS}" in command
    # A third-party plugin's options became controls without UI code (the example package,
    # where it is installed), and path options have no field.
    if importlib.util.find_spec("p2p_example_plugin") is not None:
        page.get_by_text("suppress-word:").click()  # its fold
        page.wait_for_selector("#opt-suppress-word-factor")

    screenshot = os.environ.get("P2P_SERVE_SCREENSHOT")
    if screenshot:
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=screenshot)


def test_stop_ends_the_run_at_its_next_step(page: Any, server: Server) -> None:
    page.fill("#prompt textarea", PROMPT)
    page.fill("#targets textarea", TARGET)
    _set_steps(page, 200)
    page.click("#run")
    page.wait_for_selector("text=/Editing/", timeout=60_000)  # the progress bar is running
    page.click("#stop")
    stopped = server.wait_log(r"run cancelled at denoise step (\d+) of 200", seconds=30)
    assert int(stopped.group(1)) < 200
    # The model is free again: a short run goes through.
    _set_steps(page, 3)
    page.click("#run")
    assert "Done" in _status(page, "Done")
