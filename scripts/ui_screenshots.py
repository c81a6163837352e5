"""Screenshots of the MLflow UI as a user sees it, in headless Chromium (for experiments/ui/ and issue checks).

Runs in a venv of its own with Playwright, against a running `mlflow ui`/`mlflow server` on 127.0.0.1:

    apt-get install -y chromium
    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5055 &
    /tmp/pw/bin/python scripts/ui_screenshots.py http://127.0.0.1:5055 OUT_DIR NAME=PATH [NAME=PATH ...]

Each NAME=PATH is a page of the UI (PATH as after the server's address, e.g.
`/#/experiments/1?compareRunsMode=TABLE`), saved as OUT_DIR/NAME.png once the page has settled.
"""

import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

SETTLE_S = 6  # the UI loads its tables after the page itself (it polls: never "network idle")


def main() -> None:
    base, out, pages = sys.argv[1].rstrip("/"), Path(sys.argv[2]), sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        for spec in pages:
            name, _, path = spec.partition("=")
            page.goto(f"{base}{path}", wait_until="load", timeout=60000)
            time.sleep(SETTLE_S)
            page.screenshot(path=str(out / f"{name}.png"), full_page=False)
            print(out / f"{name}.png")
        browser.close()


if __name__ == "__main__":
    main()
