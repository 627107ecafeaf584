"""The explorer in a real browser: headless Chromium drives the static dashboard and ``qscope app``.

Skipped (with the reason) without selenium, Chromium / chromedriver or Gradio; CI installs them
(``.ci/run``). The browser may reach only 127.0.0.1, so a page that needs the network fails here.
A screenshot of each tab and page is saved under the test's tmp dir.
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path

import pytest
from _browser import chrome, network_urls, quit_chrome, requested_urls, screenshot
from _nano_explorer import LANGUAGE_FEATURE, a_text, b_text, index_dir, nano, switch_prompt

OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


@pytest.fixture(scope="module")
def browser():
    driver = chrome(OFFLINE)
    yield driver
    quit_chrome(driver)


def _wait(driver, predicate, timeout: float = 30.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # the element is not there yet
            pass
        time.sleep(0.1)
    shot = Path(tempfile.gettempdir()) / "qscope-browser-failure.png"
    driver.save_screenshot(str(shot))
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (screenshot: {shot})")


def test_static_dashboard_opens_from_disk(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from qscope_plugins.app.dashboard import write_dashboard
    from qscope_plugins.recipes.feature_index import FeatureIndex

    layer, feature = LANGUAGE_FEATURE
    index = FeatureIndex.open(index_dir())
    neighbour = index.effects[f"l{layer}_nbr_ids"][feature][0]
    out = tmp_path / "dash"
    write_dashboard(index, [(layer, feature), (layer, int(neighbour))], out)
    browser.get((out / "index.html").as_uri())
    screenshot(browser, tmp_path / "dashboard-index.png")
    browser.find_element(By.LINK_TEXT, str(feature)).click()
    _wait(browser, lambda: browser.find_element(By.ID, f"feature-{layer}-{feature}"), what="the feature page")
    assert browser.title == f"layer {layer} feature {feature}"
    spans = browser.find_elements(By.CSS_SELECTOR, ".qs-top .qs-peak")
    assert len(spans) == 20 and float(spans[0].get_attribute("title")) > 0
    assert browser.find_elements(By.CSS_SELECTOR, "svg.qs-hist rect")
    screenshot(browser, tmp_path / "dashboard-feature.png")
    browser.find_element(By.LINK_TEXT, str(neighbour)).click()  # neighbour pages link to each other
    _wait(browser, lambda: browser.find_element(By.ID, f"feature-{layer}-{neighbour}"), what="the neighbour page")
    urls = requested_urls(browser)
    assert any(u.startswith("file://") for u in urls) and network_urls(urls) == []  # from disk, nothing fetched


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'qscope-plugins[app]')")
    from qscope_plugins.app.explorer import Explorer
    from qscope_plugins.app.gradio_app import launch
    from qscope_plugins.demo.assets import ASSETS, MODEL_DIR, SAE_DIR
    from qscope_plugins.recipes.feature_index import FeatureIndex

    backend, saes, k = nano()
    explorer = Explorer(backend, saes, model=str(ASSETS / MODEL_DIR), sae=str(ASSETS / SAE_DIR), k=k,
                        index=FeatureIndex.open(index_dir()))
    port = _free_port()
    demo = launch(explorer, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _tab(driver, name: str):
    from selenium.webdriver.common.by import By

    button = _wait(driver, lambda: next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                                        if b.text.strip() == name), what=f"the {name} tab")
    button.click()


def _type(driver, elem_id: str, text: str):
    from selenium.webdriver.common.by import By

    box = _wait(driver, lambda: driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input"),
                what=elem_id)
    box.clear()
    box.send_keys(text)


def _click(driver, elem_id: str):
    from selenium.webdriver.common.by import By

    _wait(driver, lambda: driver.find_element(By.ID, elem_id)).click()


def test_app_tabs_in_the_browser(browser, app_url, tmp_path):
    from selenium.webdriver.common.by import By

    layer, feature = LANGUAGE_FEATURE
    browser.get(app_url)
    _wait(browser, lambda: browser.find_element(By.ID, "text-run"), 60, "the app to load")

    # Text: the planted language feature is among the top features of a language-B text
    _type(browser, "text-input", b_text())
    _click(browser, "text-run")
    rows = _wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#text-heatmap th.qs-row"), what="heatmap")
    labels = [r.text for r in rows]
    assert f"L{layer} #{feature}" in labels, labels
    assert browser.find_elements(By.CSS_SELECTOR, "#text-heatmap td[title]")
    screenshot(browser, tmp_path / "tab-text.png")

    # Compare: two texts, a table of the top features per layer
    _tab(browser, "Compare")
    _type(browser, "compare-a", b_text())
    _type(browser, "compare-b", a_text())
    _click(browser, "compare-run")
    _wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#compare-out table.qs-compare tr td"),
          what="the comparison table")
    screenshot(browser, tmp_path / "tab-compare.png")

    # Steer: clamping the language feature at 0 keeps a switching prompt from switching into B
    _tab(browser, "Steer")
    _type(browser, "steer-prompt", switch_prompt())
    _type(browser, "steer-features", str(feature))
    browser.find_element(By.XPATH, "//label[.//span[text()='clamp activation']]").click()
    browser.find_element(By.XPATH, "//label[.//span[text()='Custom']]").click()
    _type(browser, "steer-custom", "0")
    _click(browser, "steer-run")

    def outputs():
        base = browser.find_element(By.CSS_SELECTOR, "#steer-baseline textarea").get_attribute("value")
        steered = browser.find_element(By.CSS_SELECTOR, "#steer-steered textarea").get_attribute("value")
        return (base, steered) if base and steered else None

    base, steered = _wait(browser, outputs, 60, "the generations")
    assert base != steered
    command = browser.find_element(By.ID, "steer-command").text
    assert "qscope steer" in command and f"--feature {feature}" in command and "--clamp 0" in command
    screenshot(browser, tmp_path / "tab-steer.png")

    # Feature: the page from the index
    _tab(browser, "Feature")
    _type(browser, "feature-id", str(feature))
    _click(browser, "feature-run")
    _wait(browser, lambda: browser.find_element(By.ID, f"feature-{layer}-{feature}"), what="the feature page")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#feature-page .qs-top .qs-peak")) == 20
    screenshot(browser, tmp_path / "tab-feature.png")
    urls = requested_urls(browser)
    assert any(u.startswith(app_url) for u in urls)
    assert network_urls(urls, allowed=app_url) == []  # nothing is fetched from anywhere but the app


def test_app_monitor_tab(browser, app_url, tmp_path):
    from selenium.webdriver.common.by import By

    from qscope_plugins.recipes.classifier import FeatureClassifier

    layer, feature = LANGUAGE_FEATURE
    path = tmp_path / "language.json"
    FeatureClassifier((feature,), (layer,), 512).save(path)
    browser.get(app_url)
    _tab(browser, "Monitor")
    _type(browser, "monitor-path", str(path))
    _type(browser, "monitor-text", b_text())
    _click(browser, "monitor-run")
    verdict = _wait(browser, lambda: browser.find_element(By.CSS_SELECTOR, "#monitor-out .qs-verdict").text,
                    what="the verdict")
    assert verdict.startswith("Text flagged")
    screenshot(browser, tmp_path / "tab-monitor.png")
