"""The gateway's chat page in a real headless browser: a typed message gets a reply that streams in piece by piece,
the next turn continues the conversation (its prompt comes from the worker's KV), and each reply shows its cached
tokens and speed. The screenshot is kept as an artifact: its path is printed (pytest -s or -rA shows it), and
it is copied to $LLAMAQ_TEST_ARTIFACTS when that names a directory."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from .gateway_serving import serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="no headless browser: apt-get install chromium chromium-driver",
    ),
]

# Counts the page's DOM changes inside the reply being written, so the test can tell a streamed reply (many
# changes) from one that arrived whole (one change).
COUNT_UPDATES = """
window.llamaqUpdates = 0;
new MutationObserver(() => { window.llamaqUpdates += 1; })
  .observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true});
"""


async def test_chat_page_streams_replies_and_keeps_the_conversation(
    redis_url: str, model_path: Path, tmp_path: Path
) -> None:
    async with serving(redis_url, model_path) as served:
        screenshot = await asyncio.to_thread(chat_in_browser, served.url, tmp_path / "gateway_chat_page.png")
    print(f"chat page screenshot: {screenshot}")
    artifacts = os.environ.get("LLAMAQ_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(artifacts) / screenshot.name)


def chat_in_browser(url: str, screenshot: Path) -> Path:
    """Two turns of a chat through the page, checked as a person would see them; the screenshot's path."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,760"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"{url}/")
        wait = WebDriverWait(driver, 60, poll_frequency=0.05)
        wait.until(lambda d: "SmolLM2" in d.find_element(By.ID, "model").text)
        driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
        for field, value in (("max-tokens", "48"), ("temperature", "0")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)

        stats = []
        for turn, question in enumerate(["What is the capital of France?", "And of Germany?"], start=1):
            driver.execute_script(COUNT_UPDATES)
            driver.find_element(By.ID, "input").send_keys(question, Keys.ENTER)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant .stats")) == turn)  # noqa: B023
            replies = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")
            reply = replies[-1].find_element(By.CSS_SELECTOR, ".content").text
            assert reply.strip(), "the reply is empty"
            assert driver.execute_script("return window.llamaqUpdates") > 5, "the reply did not stream in pieces"
            stats.append(replies[-1].find_element(By.CSS_SELECTOR, ".stats"))
        assert "error" not in (stats[0].get_attribute("class") or "")
        assert "tokens/s" in stats[1].text and "cached" in stats[1].text
        # The second turn resends the first with the same conversation id: its prompt comes from the KV.
        assert int(stats[1].get_attribute("data-cached-tokens") or 0) > 20
        assert [m.text for m in driver.find_elements(By.CSS_SELECTOR, ".message.user")] == [
            "What is the capital of France?",
            "And of Germany?",
        ]
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    return screenshot
