"""The demo page in a real browser: Debian's Chromium, driven by Selenium through Debian's chromedriver (nothing is
downloaded). Typing goes through the page's Type WebSocket to a real server."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import ROOT
from tests.e2e.test_server import start

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the browser tests: .ci/run installs chromium and chromium-driver")
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(driver, condition, seconds: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda _: condition())


def screenshot(driver, tmp_path, name: str) -> None:
    """Saved beside the test, and where NEXTWORD_SCREENSHOTS says (the docs' pictures are made so)."""
    driver.save_screenshot(str(tmp_path / name))
    folder = os.environ.get("NEXTWORD_SCREENSHOTS")
    if folder:
        driver.save_screenshot(os.path.join(folder, name))


@pytest.fixture(scope="module")
def english():
    server, _, _ = start(os.path.join(ROOT, "models", "default.pt"), http_port=0)
    yield server
    server.stop(0)


def test_typing_shows_suggestions_and_tab_takes_the_first(browser, english, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(f"http://127.0.0.1:{english.http_port}/")
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"))
    text = browser.find_element(By.ID, "text")
    text.send_keys("And the LO")
    row = browser.find_element(By.ID, "row")
    wait(browser, lambda: row.is_displayed() and "LORD" in row.text)
    first = browser.find_elements(By.CSS_SELECTOR, "#row [role=option]")[0]
    assert first.text.replace("1", "", 1).strip() == "LORD"  # shown as written, first
    screenshot(browser, tmp_path, "demo-english.png")
    text.send_keys(Keys.TAB)
    wait(browser, lambda: text.get_attribute("value") == "And the LORD ")
    text.send_keys(Keys.ESCAPE)
    assert not row.is_displayed()


def test_continue_streams_generated_text_in(browser, english):
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{english.http_port}/")
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"))
    text = browser.find_element(By.ID, "text")
    text.send_keys("And God said")
    browser.find_element(By.ID, "continue").click()
    wait(browser, lambda: len(text.get_attribute("value")) > len("And God said") + 5)


def test_a_server_error_shows_on_the_page(browser, tmp_path):
    from selenium.webdriver.common.by import By

    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-for-someone-0123456789\n")
    server, _, _ = start(os.path.join(ROOT, "models", "default.pt"), http_port=0, auth_token_file=str(tokens))
    try:
        browser.get(f"http://127.0.0.1:{server.http_port}/")
        error = browser.find_element(By.ID, "error")
        wait(browser, lambda: error.is_displayed())
        assert "UNAUTHENTICATED" in error.text and "bearer token" in error.text
    finally:
        server.stop(0)


def test_pinyin_composes_picks_a_word_and_shows_association(browser, tiny_ime_model, tmp_path):
    from selenium.webdriver.common.by import By

    server, _, _ = start(tiny_ime_model, http_port=0)
    try:
        browser.get(f"http://127.0.0.1:{server.http_port}/")
        wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"))
        text = browser.find_element(By.ID, "text")
        row = browser.find_element(By.ID, "row")
        text.send_keys("nihao")
        wait(browser, lambda: row.is_displayed() and "你好" in row.text)
        assert text.get_attribute("value") == ""  # letters compose; nothing is committed yet
        screenshot(browser, tmp_path, "demo-pinyin.png")
        choices = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#row [role=option]")]
        number = next(str(i + 1) for i, choice in enumerate(choices) if choice[1:].strip() == "你好")
        text.send_keys(number)
        wait(browser, lambda: text.get_attribute("value") == "你好")
        # association: what may follow 你好, in place of the candidates
        wait(browser, lambda: row.is_displayed() and row.text.strip() and "nihao" not in row.text)
    finally:
        server.stop(0)
