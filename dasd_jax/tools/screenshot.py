"""A PNG of a page the project writes (e.g. `analysis/tokens.html`), taken by headless Chromium.

    python -m dasd_jax.tools.screenshot PAGE.html OUT.png [--width=1100] [--height=900]

Needs a Chromium-family browser on PATH (Debian: `apt install chromium`). The page is rendered
as a browser shows it, so the screenshot is what a reader of the page sees.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from dasd_jax import atomic
from dasd_jax.errors import UserError, exit_on_user_error

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_S = 120


def find_browser() -> str | None:
    """The first Chromium-family executable on PATH, or None."""
    return next(filter(None, map(shutil.which, BROWSERS)), None)


def screenshot(page: Path, out: Path, *, width: int = 1100, height: int = 900) -> Path:
    """Renders `page` at `width` x `height` CSS pixels into the PNG `out` (written whole or not
    at all); returns `out`."""
    page = Path(page).expanduser().absolute()
    if not page.is_file():
        raise UserError(f"{page}: no such page to take a screenshot of")
    browser = find_browser()
    if browser is None:
        raise UserError(f"no Chromium-family browser on PATH (looked for {', '.join(BROWSERS)}); "
                        "install one, e.g. `apt install chromium`")
    out = Path(out).expanduser().absolute()
    with tempfile.TemporaryDirectory(prefix="dasd_jax_screenshot_") as scratch:
        taken = Path(scratch) / "page.png"
        command = [browser, "--headless", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={scratch}/profile", f"--window-size={width},{height}",
                   f"--screenshot={taken}", page.as_uri()]
        if os.geteuid() == 0:  # Chromium refuses to run as root inside its own sandbox
            command.insert(1, "--no-sandbox")
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise UserError(f"{browser} took over {TIMEOUT_S} s to render {page}") from None
        if result.returncode != 0 or not taken.is_file():
            detail = " ".join(result.stderr.split())[-400:]
            raise UserError(f"{browser} could not render {page} (exit {result.returncode}): "
                            f"{detail}")
        atomic.write_bytes(out, taken.read_bytes())
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="the HTML page")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1100, help="CSS pixels")
    parser.add_argument("--height", type=int, default=900, help="CSS pixels")
    args = parser.parse_args(argv)
    print(screenshot(args.page, args.out, width=args.width, height=args.height))


if __name__ == "__main__":
    main()
