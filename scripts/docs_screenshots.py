"""Look at the documentation site in a real browser: headless Chromium (Debian's ``chromium`` package) renders each
main page of ``build/site`` to a PNG and dumps its DOM, and the script checks what a reader would see.

    make docs && python scripts/docs_screenshots.py [--out build/screenshots]     # or: make docs-screenshots

Checks per page: the screenshot is not blank (pixel spread), the rendered DOM has the page's heading, the
navigation lists every results page, and no raw Sphinx role (":class:", ":func:") is left in the text.
Exit status 1 with the failed checks listed; the PNGs stay in --out for a human look.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urljoin

REPO = Path(__file__).resolve().parent.parent
PAGES = {  # page path -> a heading the reader must see
    "": "ki-trainer",
    "cli/": "Command line",
    "troubleshooting/": "Troubleshooting and FAQ",
    "api/": "API reference",
    "results/": "Results",
    "guides/hub/": "The Hugging Face Hub",
}
NAV_PAGES = ("results/reduced/", "results/mixed/", "results/mixed-long-teachers/", "routing/", "merge_distill/",
             "results/merge_distill_cpu/", "troubleshooting/")
RAW_ROLE = re.compile(r":(?:class|func|meth|mod|attr|exc):\s*`?\w")


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("No Chromium found: apt-get install chromium (Debian's package).")


def chromium(binary: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1280,1000", *args], capture_output=True, text=True, timeout=120)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no access log
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the browser closed a connection it no longer needed
            pass


def linked_paths(dom: str, url: str, base: str) -> set[str]:
    """Site paths (``results/reduced/``) of every link in ``dom``, resolved against the page's ``url``."""
    found = set()
    for href in re.findall(r'href="([^"#]*)', dom):
        absolute = urljoin(url, href)
        if absolute.startswith(base):
            found.add(absolute[len(base):].removesuffix("index.html"))
    return found


def not_blank(png: Path) -> bool:
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))
    return png.stat().st_size > 5000 and float(pixels[..., :3].std()) > 0.02


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default=str(REPO / "build" / "site"))
    parser.add_argument("--out", default=str(REPO / "build" / "screenshots"))
    args = parser.parse_args(argv)
    site, out = Path(args.site), Path(args.out)
    if not (site / "index.html").is_file():
        raise SystemExit(f"{site}/index.html not found: run `make docs` first.")
    out.mkdir(parents=True, exist_ok=True)
    binary = browser()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    failures = []
    try:
        for page, heading in PAGES.items():
            name = page.strip("/").replace("/", "_") or "index"
            png = out / f"{name}.png"
            shot = chromium(binary, f"--screenshot={png}", base + page)
            dom = chromium(binary, "--dump-dom", base + page).stdout
            text = re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S))
            checks = {
                "screenshot written": shot.returncode == 0 and png.is_file(),
                "screenshot not blank": png.is_file() and not_blank(png),
                f"heading {heading!r}": heading in text,
                "no raw Sphinx role": not RAW_ROLE.search(text),
                "nav lists every results page": set(NAV_PAGES) <= linked_paths(dom, base + page, base),
            }
            for check, ok in checks.items():
                print(f"{'ok  ' if ok else 'FAIL'} {page or 'index'}: {check}")
                if not ok:
                    failures.append(f"{page or 'index'}: {check}")
    finally:
        server.shutdown()
    print(f"\nscreenshots in {out}" + (f"; {len(failures)} failed check(s)" if failures else "; every check passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
