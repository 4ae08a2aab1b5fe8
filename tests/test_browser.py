"""The tutorial in a real browser: JupyterLab on loopback, headless Chromium driven by Playwright.

Opens 01_routing and 06_dashboard from a throw-away copy of notebooks/ (JupyterLab autosaves executed
notebooks), runs all cells, moves widgets, and checks that the widget's plot is re-rendered and that no
cell shows an error or anything on stderr. Screenshots go to a temporary directory (printed).

Needs Debian's Chromium (`apt-get install -y chromium`; not `playwright install`) and the playwright
package. Where either is missing the test is skipped, unless the environment variable CI is set: in CI a
skipped browser test would hide a broken tutorial, so there it fails.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "moe-tut-browser-test"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMG = ".widget-output img"
# JupyterLab renders stderr streams and errors (tracebacks) with this MIME type.
ERROR_OUTPUT = "[data-mime-type='application/vnd.jupyter.stderr']"
IDLE = re.compile(r"Python 3 \(ipykernel\) \| Idle")


def _missing() -> list[str]:
    missing = [] if CHROMIUM else ["chromium (apt-get install -y chromium)"]
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright; the browser is Debian's chromium: no `playwright install`)")
    return missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    missing = _missing()
    if missing:
        msg = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; CI is set, so a skipped browser test counts as a failure")
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("lab")
    copy = root / "notebooks"
    shutil.copytree(NOTEBOOKS_DIR, copy, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    dirs = {name: root / name for name in ("config", "runtime", "workspaces", "settings", "ipython")}
    for d in dirs.values():
        d.mkdir()
    (dirs["config"] / "labconfig").mkdir()
    # Removes the "get notified about Jupyter news?" popup.
    (dirs["config"] / "labconfig" / "page_config.json").write_text(
        '{"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": true}}')
    # Keep every cell in the DOM (no windowing), so the error check sees every output.
    tracker = dirs["settings"] / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(dirs["config"]), "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
           "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]), "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
           "IPYTHONDIR": str(dirs["ipython"])}
    port = _free_port()
    log = (root / "lab.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip", "127.0.0.1", "--port", str(port),
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={copy}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.extension_manager=readonly", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{(root / 'lab.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab not ready after 60 s:\n{(root / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield base, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def _open_and_run_all(browser, base: str, name: str, run_all_timeout_ms: int):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(60_000)
    page.goto(f"{base}/lab/tree/{name}?token={TOKEN}&reset")
    idle = page.get_by_text(IDLE)
    idle.wait_for(timeout=90_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_selector(IMG, timeout=run_all_timeout_ms)
    # Finished when no cell prompt shows [*] (running or queued) and the kernel is idle.
    page.wait_for_function(
        "() => ![...document.querySelectorAll('.jp-InputArea-prompt')].some(e => e.textContent.includes('*'))",
        timeout=run_all_timeout_ms)
    idle.wait_for(timeout=run_all_timeout_ms)
    return page


def _wait_for_new_plot(page, old_src: str, timeout_ms: int = 60_000) -> str:
    changed = "([s, o]) => { const e = document.querySelector(s); return e && e.getAttribute('src') !== o; }"
    page.wait_for_function(changed, arg=[IMG, old_src], timeout=timeout_ms)
    return page.locator(IMG).first.get_attribute("src")


def _no_errors(page, name: str, shots: Path) -> None:
    n = page.locator(ERROR_OUTPUT).count()
    if n:
        page.screenshot(path=str(shots / f"{name}_error.png"), full_page=True)
        texts = page.locator(ERROR_OUTPUT).all_inner_texts()
        pytest.fail(f"{name}: {n} output(s) on stderr or with an error:\n" + "\n---\n".join(t[-1500:] for t in texts))


def _control(page, kind: str, label: str):
    """The ipywidgets control of `kind` (slider, dropdown) whose description is `label`."""
    return page.locator(f".widget-{kind}", has=page.locator(".widget-label", has_text=re.compile(f"^{label}$")))


def test_routing_widgets_rerender(lab, browser):
    base, root = lab
    page = _open_and_run_all(browser, base, "01_routing.ipynb", run_all_timeout_ms=120_000)
    _no_errors(page, "01_routing", root)
    src0 = page.locator(IMG).first.get_attribute("src")
    slider = _control(page, "slider", "top-k")
    before = slider.locator(".widget-readout").inner_text()
    handle = slider.locator(".noUi-handle")
    handle.focus()
    handle.press("ArrowRight")
    src1 = _wait_for_new_plot(page, src0)
    assert int(slider.locator(".widget-readout").inner_text()) == int(before) + 1
    _control(page, "dropdown", "skew").locator("select").select_option("all_to_one")
    _wait_for_new_plot(page, src1)
    page.screenshot(path=str(root / "01_routing.png"), full_page=True)
    print(f"screenshot: {root / '01_routing.png'}")
    _no_errors(page, "01_routing", root)
    page.close()


def test_dashboard_run_button_rerenders(lab, browser):
    base, root = lab
    page = _open_and_run_all(browser, base, "06_dashboard.ipynb", run_all_timeout_ms=240_000)
    _no_errors(page, "06_dashboard", root)
    assert "run 1:" in page.locator(".widget-html", has_text="run 1:").first.inner_text()
    src0 = page.locator(IMG).first.get_attribute("src")
    _control(page, "dropdown", "seq").locator("select").select_option("8")
    page.wait_for_timeout(500)
    assert page.locator(IMG).first.get_attribute("src") == src0, "changing a control must not start a run"
    page.locator(".widget-button", has_text="Run").click()
    _wait_for_new_plot(page, src0, timeout_ms=180_000)
    page.locator(".widget-html", has_text="run 2:").first.wait_for(timeout=30_000)
    assert "T=8" in page.locator(".widget-html", has_text="run 2:").first.inner_text()
    page.screenshot(path=str(root / "06_dashboard.png"), full_page=True)
    print(f"screenshot: {root / '06_dashboard.png'}")
    _no_errors(page, "06_dashboard", root)
    page.close()
