"""Makes docs/chat.png: `qwenvl-ft chat` side by side (adapter off / on) on the demo's shapes, in headless Chromium.

    qwenvl-ft train recipe=demo adapter=lora run_name=lora          # the demo with a LoRA adapter (CPU, minutes)
    python docs/chat_screenshot.py outputs/demo/lora/final docs/chat.png

Needs the ui extra, selenium, and Debian's chromium + chromium-driver.
"""

import random
import sys
import tempfile
import time
from pathlib import Path


def main(adapter: str, screenshot: str) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from qwenvl_ft.commands.chat import build_app, serve
    from qwenvl_ft.chat.engine import ChatEngine
    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.data.shapes import QUESTION, draw

    typed = validate(compose(["recipe=demo", "adapter=lora", f"chat.model_path={adapter}", "chat.port=null",
                              "chat.generation.max_new_tokens=16"], config_name="chat", output_dir="/tmp/unused"))
    app = build_app(ChatEngine.load(typed), typed.chat)
    url = serve(app, typed.chat)
    work = Path(tempfile.mkdtemp(prefix="qwenvl-ft-shot-"))
    image = work / "shape.png"
    draw("red", "circle", typed.data.shapes.image_size, random.Random(3)).save(image)  # the size it trained on

    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1300",
                 f"--user-data-dir={work / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#message textarea")))
        browser.find_element(By.CSS_SELECTOR, "input[value='side by side']").click()
        wait.until(ec.visibility_of_element_located((By.ID, "chat-base")))
        browser.find_element(By.CSS_SELECTOR, "#message input[type=file]").send_keys(str(image))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#message .thumbnail-item img")))
        browser.find_element(By.CSS_SELECTOR, "#message textarea").send_keys(QUESTION, Keys.ENTER)
        answers = (By.CSS_SELECTOR, "#chat-tuned [data-testid=bot]")
        wait.until(lambda b: b.find_elements(*answers) and b.find_elements(*answers)[-1].text.strip())
        browser.find_element(By.XPATH, "//*[normalize-space(text())='Generation settings']").click()
        time.sleep(4)  # the last streamed update, the settings opening
        browser.save_screenshot(screenshot)
    finally:
        browser.quit()
        app.close()
    print(f"wrote {screenshot}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
