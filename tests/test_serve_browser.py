"""The chat page at / in a real headless browser (Debian's chromium + chromedriver, driven by selenium):
send a message, see streamed text and the stats line. A screenshot is saved to
$TMPDIR/mimoflash-test-artifacts/serve_page.png (the path is printed).
Skips, saying why, only where no browser is installed (scripts/setup.sh installs one)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

selenium = pytest.importorskip("selenium", reason="needs the dev extra (pip install -e '.[dev]')")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from test_serve import ServerProcess  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(tempfile.gettempdir()) / "mimoflash-test-artifacts"


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium/chromedriver on PATH: scripts/setup.sh installs "
                                                      "Debian's chromium and chromium-driver (apt) where it can")
def test_chat_page_streams_and_shows_stats():
    server = ServerProcess()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,800"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        driver.get(server.url + "/")
        WebDriverWait(driver, 20).until(lambda d: "mimoflash-default" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "thinking").click()                  # thinking on: the template leaves it open
        box = driver.find_element(By.ID, "max_tokens")
        box.clear()
        box.send_keys("48")
        driver.find_element(By.ID, "input").send_keys("def fibonacci(n):")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 60).until(lambda d: "cost $" in d.find_element(By.ID, "stats").text)
        stats = driver.find_element(By.ID, "stats").text
        answer = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
        user = driver.find_elements(By.CSS_SELECTOR, ".msg.user")[-1].text
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "serve_page.png"))
        print(f"\nscreenshot: {ARTIFACTS / 'serve_page.png'}")
        assert user == "def fibonacci(n):"
        assert answer.strip(), "no streamed text"
        assert "tok/s" in stats and "TTFT" in stats and "tokens" in stats, stats
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
        # a second turn goes through too (history, incl. any reasoning, is sent back)
        driver.find_element(By.ID, "input").send_keys("again")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
                                        and d.find_element(By.ID, "send").is_enabled())
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
        assert (ARTIFACTS / "serve_page.png").stat().st_size > 1000
    finally:
        driver.quit()
        code, out = server.stop()
        assert code == 0, out
