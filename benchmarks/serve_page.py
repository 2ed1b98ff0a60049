"""One edit through ``p2p-run serve``'s page against the same edit from the shell.

Starts ``p2p-run serve`` on the demo model (one CPU thread), drives the page with Playwright
and Debian's Chromium (as ``tests/test_serve_browser.py`` does): uploads a render of a demo
scene, inverts it with ``direct`` and edits it at ``--steps``, then moves the cross-replace
slider twice (the inversion reused). Then runs the command the page shows, twice, in a fresh
process each (the first inverts, the second finds the inversion in the cache). Prints a
Markdown table: the page's time from the click to the images in the browser and the run's
own time, and the shell's process time and ``run.json``'s ``total`` (run and model load).

Needs ``pip install 'p2p-framework[ui]' playwright`` and ``apt-get install chromium``;
run from the repository root (it reuses the browser test's helpers):

    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 python benchmarks/serve_page.py    # about 1.5 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_serve_browser import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    PROMPT,
    TARGET,
    Server,
    _set_steps,
)

from p2p_framework.demo.shapes import render, sample_scene  # noqa: E402

#: Gradio's progress texts in the status box ("processing", "queue", "3/10 steps | 0.7s").
BUSY = r"/processing|queue|\|/"


def page_runs(server: Server, photo: Path, steps: int) -> tuple[list[tuple[str, float, str]], str]:
    """The page's runs: ``(what, click-to-images seconds, status line)``, and its command."""
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(300_000)
        page.goto(server.url)
        page.wait_for_selector("#run")
        page.get_by_label("Invert a photo").check()
        page.set_input_files("#photo input[type=file]", str(photo))
        page.wait_for_selector("#status:has-text('ready')")
        page.locator("#method input").click()
        page.get_by_role("option", name="direct").click()
        page.fill("#prompt textarea", PROMPT)
        page.fill("#targets textarea", TARGET)
        _set_steps(page, steps)
        for index, slider in enumerate(["0.8", "0.5", "0.3"]):
            page.locator("#cross-replace input[type=range]").fill(slider)
            want = "computed" if index == 0 else "reused"
            began = time.perf_counter()
            page.click("#run")
            status_text = "document.querySelector('#status').innerText"
            page.wait_for_function(f"() => {BUSY}.test({status_text})")
            page.wait_for_function(
                "([busy, want]) => { const s = document.querySelector('#status').innerText;"
                " return !new RegExp(busy).test(s) && s.includes('Done') && s.includes(want); }",
                arg=[BUSY.strip("/"), want],
            )
            page.wait_for_function(
                "[...document.querySelectorAll('#gallery img')]"
                ".filter(i => i.complete && i.naturalWidth > 0).length == 2"
            )
            seconds = time.perf_counter() - began
            status = page.inner_text("#status").splitlines()[0]
            rows.append((f"page, inversion {want}", seconds, status))
        lines = page.inner_text("#command").splitlines()
        command = next(line for line in lines if line.startswith("p2p-run"))
        browser.close()
    return rows, command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    root = Path(tempfile.mkdtemp(prefix="p2p-serve-bench-"))
    photo = root / "shapes.png"
    render(sample_scene(np.random.default_rng(0)), 128)[0].save(photo)
    began = time.perf_counter()
    server = Server(root)
    try:
        server.wait_ready()
        print(f"server ready in {time.perf_counter() - began:.1f} s", file=sys.stderr)
        rows, command = page_runs(server, photo, args.steps)
    finally:
        server.stop()
    print("| run | seconds | what the page or run.json says |")
    print("| --- | --- | --- |")
    for what, seconds, status in rows:
        print(f"| {what} (click to images) | {seconds:.2f} | {status} |")
    env = {**os.environ, "P2P_FRAMEWORK_CACHE_DIR": str(root / "shell-cache")}
    for index in range(2):
        out = root / f"shell-{index}"
        began = time.perf_counter()
        subprocess.run(
            [*shlex.split(command), "--out", str(out), "--threads", "1"],
            cwd=root,
            env=env,
            check=True,
            capture_output=True,
        )
        seconds = time.perf_counter() - began
        record = json.loads((out / "run.json").read_text())
        timings = record["timings"]
        print(
            f"| shell, inversion {record['source_info']['inversion']['cache']} (process) "
            f"| {seconds:.2f} | total {timings['total']:.2f} s (load_model "
            f"{timings['load_model']:.2f} s) |"
        )
    print(f"\ncommand: `{command}`")


if __name__ == "__main__":
    main()
