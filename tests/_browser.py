"""Headless Chromium for the explorer tests (Debian's ``chromium`` + ``chromium-driver``, driven by selenium).

:func:`chrome` skips the calling test, with the reason, when selenium or the browser is missing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")


def _find(*names: str) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


def chrome(*extra_flags: str):
    """A selenium Chrome driver on the system Chromium, with a fresh empty profile."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    binary = _find("chromium", "chromium-browser", "google-chrome")
    driver_path = _find("chromedriver")
    if not binary or not driver_path:
        pytest.skip("no Chromium / chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*FLAGS, *extra_flags):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # see requested_urls()
    profile = tempfile.mkdtemp(prefix="qscope-chrome-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    driver._qscope_profile = profile  # removed by quit()
    return driver


def quit_chrome(driver) -> None:
    driver.quit()
    shutil.rmtree(getattr(driver, "_qscope_profile", ""), ignore_errors=True)


def screenshot(driver, path: Path) -> Path:
    """Save a PNG of the whole page (the window grows to the page height first)."""
    height = driver.execute_script("return Math.max(document.body.scrollHeight, 800)")
    driver.set_window_size(1400, min(int(height) + 100, 4000))
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    return path


def requested_urls(driver) -> list[str]:
    """Every URL the browser requested since the last call (from Chrome's performance log)."""
    import json

    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def network_urls(urls: list[str], allowed: str = "") -> list[str]:
    """The http(s)/ws(s) ``urls`` that do not start with ``allowed`` (Chrome's own ``chrome://`` pages,
    ``data:`` and ``file:`` URLs are not network requests)."""
    return [u for u in urls
            if u.startswith(("http://", "https://", "ws://", "wss://")) and not (allowed and u.startswith(allowed))]
