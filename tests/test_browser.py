"""The lab notebook in a real browser: JupyterLab headless, Chromium via Playwright.

Select with ``pytest -m browser tests/test_browser.py``. Starts ``jupyter lab`` on a free loopback
port with a random token (settings, workspaces and runtime files in a temporary folder, so no
earlier session leaks in), opens ``notebooks/05_steering_lab.ipynb`` in Debian's Chromium
(``apt-get install -y chromium``; Playwright's own browser download is not used), runs all cells,
then checks the two promises of the lab: moving the coefficient slider changes the steered text,
and a click on a heatmap cell changes the expert mask. A screenshot goes to
``artifacts/steering_lab.png``. The server is always shut down. Without Chromium the test skips,
except where ``CI`` is set (CI runs with ``CI=true``): there a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = "notebooks/05_steering_lab.ipynb"
CHROMIUM = os.environ.get("LABKIT_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"jupyter lab did not answer {url} in {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@pytest.fixture()
def jupyter_lab(tmp_path):
    """A JupyterLab server on a free port; yields its base URL and token; always stopped."""
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
    }
    # Never autosave the repository's notebook with this run's outputs; no news prompt; no windowing.
    for plugin, settings in {
        "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": '{"autosave": false}',
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": '{"fetchNews": "false"}',
        # Render every cell: with JupyterLab 4's default windowing, cells scrolled out of view
        # (the panels, once "run all" has scrolled to the end) are not in the DOM at all.
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": '{"windowingMode": "none"}',
    }.items():
        path = tmp_path / "settings" / plugin
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(settings)
    log = tmp_path / "jupyter.log"
    command = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={REPO}", "--ServerApp.port_retries=0",
        "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", process, log)
        yield base, token
    finally:
        _stop(process)


def _accept_kernel_dialog(page) -> bool:
    """Click "Select" on a "Select Kernel" dialog if one is open (the preselected kernel)."""
    accept = page.locator(".jp-Dialog .jp-mod-accept")
    if accept.count() and accept.first.is_visible():
        accept.first.click()
        return True
    return False


def _text(page, selector: str) -> str:
    return page.locator(selector).first.inner_text()


def _wait_text(page, selector: str, predicate, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        if page.locator(selector).count():
            text = _text(page, selector)
            if predicate(text):
                return text
        page.wait_for_timeout(250)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last text of {selector}: {text!r}")


def require_chromium(path: str = CHROMIUM, environ=os.environ) -> str:
    """The browser's path; without one, a failure in CI (``CI`` set, as CI services do) and a skip
    elsewhere -- CI must run this test for real, a laptop without Chromium need not."""
    if Path(path).exists():
        return path
    message = f"{path} is absent; install it with: apt-get install -y chromium (or set LABKIT_CHROMIUM)"
    if environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI={environ['CI']!r}: the browser test must run in CI, but {message}", pytrace=False)
    pytest.skip(message)


def test_missing_chromium_fails_in_ci_and_skips_elsewhere(tmp_path):
    absent = str(tmp_path / "no-chromium")
    for value in ("true", "1", "yes"):
        with pytest.raises(pytest.fail.Exception, match="must run in CI"):
            require_chromium(absent, {"CI": value})
    for environ in ({}, {"CI": ""}, {"CI": "false"}, {"CI": "0"}):
        with pytest.raises(pytest.skip.Exception, match="is absent"):
            require_chromium(absent, environ)
    present = tmp_path / "chromium"
    present.write_text("")
    assert require_chromium(str(present), {"CI": "true"}) == str(present)


@pytest.fixture()
def chromium() -> str:
    return require_chromium()


def test_steering_lab_in_chromium(chromium, jupyter_lab):
    from playwright.sync_api import sync_playwright

    base, token = jupyter_lab
    ARTIFACTS.mkdir(exist_ok=True)
    started = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}", wait_until="domcontentloaded")
            # The kernel status lives on a hidden element: wait for it attached, not visible.
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", state="attached", timeout=60_000)

            # A fresh settings folder may ask which kernel to start; the dialog blocks the menus.
            for _ in range(20):
                if _accept_kernel_dialog(page):
                    break
                page.wait_for_timeout(250)
            page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()

            # Every code cell has run when no prompt shows [*] and every prompt has a number.
            all_ran = """() => {
                const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
                return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
            }"""
            deadline = time.monotonic() + 240
            while not page.evaluate(all_ran):
                assert time.monotonic() < deadline, "the notebook's cells did not all run in 240 s"
                _accept_kernel_dialog(page)
                page.wait_for_timeout(500)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'] .jp-RenderedText pre, .jp-RenderedText[data-mime-type='application/vnd.jupyter.error']")
            assert page.locator("[data-mime-type='application/vnd.jupyter.error']").count() == 0, errors.all_inner_texts()

            # --- steering: move the slider, the steered text must change -------------------------
            steered = ".labkit-steered .labkit-steered-text"
            before = _wait_text(page, steered, lambda t: len(t.strip()) > 0, 60, "the first steered completion")
            _wait_text(page, ".labkit-status", lambda t: "tokens in" in t, 60, "the first generation to finish")
            handle = page.locator(".labkit-coefficient .noUi-handle").first
            handle.scroll_into_view_if_needed()
            handle.click()
            handle.press("Home")  # coefficient to its minimum: the opposite steering direction
            _wait_text(page, ".labkit-coefficient .widget-readout", lambda t: t.strip()[:1] in ("-", "\u2212"), 20,
                       "the slider readout to move")
            after = _wait_text(page, ".labkit-status", lambda t: "coefficient -" in t, 90,
                               "the regeneration at the new coefficient")
            after = _text(page, steered)
            assert after.strip() != before.strip(), f"steered text did not change: {after!r}"
            assert page.locator(".labkit-error-area .labkit-error").count() == 0

            # --- experts: click a heatmap cell, the mask must change ------------------------------
            label = ".labkit-mask-label"
            initial = _wait_text(page, label, lambda t: "mask:" in t, 30, "the mask label")
            plot = page.locator(".labkit-heatmap .nsewdrag").first
            plot.scroll_into_view_if_needed()
            box = plot.bounding_box()
            page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
            changed = _wait_text(page, label, lambda t: t != initial, 20, "the mask label to change after a click")
            assert "1 off" in changed, changed
            mask_json = page.locator(".labkit-mask-json textarea").first.input_value()
            assert '"mode": "off"' in mask_json, mask_json

            page.screenshot(path=str(ARTIFACTS / "steering_lab.png"), full_page=True)
        except BaseException:
            try:
                page.screenshot(path=str(ARTIFACTS / "steering_lab_failure.png"), full_page=True)
            except Exception:  # noqa: BLE001 - the original failure matters more
                pass
            raise
        finally:
            browser.close()
    print(f"browser test: {time.monotonic() - started:.1f} s in the browser")
