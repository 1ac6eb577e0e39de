"""A screenshot of the `mdn serve` page with photos dropped in (the README's docs/serve.png).

    python scripts/page_screenshot.py runs/toy/best.pt photo1.jpg photo2.jpg --output docs/serve.png

Serves the checkpoint from this process, opens the page in Debian's headless Chromium
(apt-get install chromium chromium-driver), uploads the files through the page's file input,
waits for every card and saves the screenshot. `chrome()` is also what the browser test uses.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@contextlib.contextmanager
def chrome(profile: Path | None = None, width: int = 1280, height: int = 900) -> Iterator:
    """Headless Chromium through Selenium, with a fresh profile and no network of its own
    (flags that work as root in a container)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory() as fallback:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={width},{height}",
                     f"--user-data-dir={profile or fallback}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("files", type=Path, nargs="+", help="photos (or anything) to drop on the page")
    parser.add_argument("--output", type=Path, default=Path("docs/serve.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from mdn_cli.api import Model
    from mdn_cli.serve import create_app, in_thread

    model = Model.load(args.checkpoint, "cpu")
    with in_thread(create_app(model)) as url, chrome(width=args.width, height=args.height) as driver:
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "components" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "files").send_keys("\n".join(str(f.resolve()) for f in args.files))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card")) == len(args.files)
                   and not d.find_elements(By.CSS_SELECTOR, ".card[data-state=loading]"))
        # the page's full height, so every card is in the picture
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(args.width, max(args.height, height))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.output))
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
