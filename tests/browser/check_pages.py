"""Open every page of the built book in headless Chromium and check that it renders, offline.

    python tests/browser/check_pages.py [--build _build/html] [--screenshots DIR]

The pages are served from the build on a localhost port; any request to another host is blocked and
fails the run (the book must work without internet). Per page it checks:

- no JavaScript console errors and no uncaught page errors;
- every local request succeeded (no 404 for a stylesheet, script, font or image);
- MathJax typeset every math element (an ``mjx-container`` in each, no TeX error, no raw ``$$``,
  ``\\(`` or ``\\[`` left in the text outside code);
- every ``<img>`` loaded (``naturalWidth > 0``);
- on chapter pages (``chapters/*``): every figure has a non-empty caption, every image that a code
  cell output shows sits in such a figure, and the Colab launch button opens this page's notebook
  in the repository named in ``_config.yml``.

It prints one line per page and exits non-zero on any failure. Needs Debian's Chromium
(``apt-get install chromium``) and the ``playwright`` Python package (no Playwright browser download:
it drives ``/usr/bin/chromium``).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import re
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MAX_SHOWN = 12  # problems printed per page
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads"}

# Runs in the page once it has loaded: waits for MathJax and for every image, then reports.
INSPECT_JS = """
async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const maths = [...document.querySelectorAll('.math')];
  let mathjax = 'absent';
  if (window.MathJax) {
    const t0 = Date.now();
    while (!(MathJax.startup && MathJax.startup.promise) && Date.now() - t0 < 20000) await sleep(50);
    if (MathJax.startup && MathJax.startup.promise) {
      await MathJax.startup.promise;
      mathjax = 'done';
    } else {
      mathjax = 'never started';
    }
  }
  const imgs = [...document.images];
  for (const img of imgs) img.loading = 'eager';
  await Promise.all(imgs.map((img) => img.decode().catch(() => null)));

  // Text nodes outside code, scripts and typeset math must not hold TeX delimiters.
  const raw = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
    acceptNode: (n) => n.parentElement.closest('pre, code, script, style, textarea, mjx-container')
      ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT,
  });
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const t = n.textContent;
    if (t.includes('$$') || t.includes('\\\\(') || t.includes('\\\\[')) raw.push(t.trim().slice(0, 60));
  }
  const src = (img) => img.getAttribute('src') || '';
  return {
    mathjax,
    math: maths.length,
    untypeset: maths.filter((m) => !m.querySelector('mjx-container')).map((m) => m.textContent.trim().slice(0, 60)),
    containers: document.querySelectorAll('mjx-container').length,
    texErrors: [...document.querySelectorAll('mjx-merror')].map((e) => e.getAttribute('data-mjx-error') || e.textContent),
    raw,
    imgs: imgs.length,
    brokenImgs: imgs.filter((i) => !(i.complete && i.naturalWidth > 0)).map(src),
    figures: document.querySelectorAll('figure').length,
    uncaptioned: [...document.querySelectorAll('figure')]
      .filter((f) => !(f.querySelector('figcaption') && f.querySelector('figcaption').textContent.trim()))
      .map((f) => f.id || src(f.querySelector('img') || document.createElement('img')) || '(figure)'),
    bareOutputImgs: [...document.querySelectorAll('.cell_output img')]
      .filter((i) => !i.closest('figure')).map(src),
    colab: [...document.querySelectorAll('a[href^="https://colab.research.google.com/"]')].map((a) => a.href),
  };
}
"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def discover(build: Path) -> list[str]:
    pages = []
    for path in sorted(build.rglob("*.html")):
        rel = path.relative_to(build)
        if rel.parts[0] not in SKIP_DIRS:
            pages.append(rel.as_posix())
    return pages


def redirect_target(path: Path) -> str | None:
    """The target of a page that is only a meta refresh, else None."""
    head = path.read_text(encoding="utf8", errors="replace")[:500]
    match = re.search(r'http-equiv="refresh"[^>]*url=([^"]+)"', head, re.IGNORECASE)
    return match.group(1).strip() if match and "<body" not in head.lower() else None


def colab_url(config_path: Path, page: str) -> str:
    config = yaml.safe_load(config_path.read_text(encoding="utf8"))
    repo = urlsplit(config["repository"]["url"]).path.strip("/")
    branch = config["repository"].get("branch", "main")
    colab = config["launch_buttons"]["colab_url"].rstrip("/")
    return f"{colab}/github/{repo}/blob/{branch}/{page.removesuffix('.html')}.ipynb"


def check_page(context, base: str, page: str, build: Path, args, external: list[str]) -> list[str]:
    problems: list[str] = []
    target = redirect_target(build / page)
    if target is not None:  # Jupyter Book's index.html: a meta refresh; its target is checked as a page.
        if not (build / page).parent.joinpath(target).is_file():
            problems.append(f"redirects to missing {target}")
        print(f"{'FAIL' if problems else 'ok  '} {page}  redirect to {target}")
        for p in problems:
            print(f"       - {p}")
        return problems

    tab = context.new_page()
    tab.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    tab.on(
        "requestfailed",
        lambda r: r.url.startswith(base) and problems.append(f"request failed: {r.url} ({r.failure})"),
    )
    tab.on(
        "response",
        lambda r: r.url.startswith(base) and r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"),
    )
    before = len(external)
    tab.goto(f"{base}/{page}", wait_until="load")
    info = tab.evaluate(INSPECT_JS)
    tab.wait_for_load_state("networkidle")
    problems += [f"external request blocked: {url}" for url in external[before:]]

    if info["math"]:
        if info["mathjax"] != "done":
            problems.append(f"{info['math']} math elements but MathJax {info['mathjax']}")
        if info["containers"] == 0:
            problems.append("no mjx-container: MathJax typeset nothing")
        problems += [f"math not typeset: {t!r}" for t in info["untypeset"]]
    problems += [f"TeX error: {t!r}" for t in info["texErrors"]]
    problems += [f"raw TeX in text: {t!r}" for t in info["raw"]]
    problems += [f"image did not load: {s}" for s in info["brokenImgs"]]

    if page.startswith("chapters/"):
        problems += [f"figure without caption: {f}" for f in info["uncaptioned"]]
        problems += [f"output image not in a captioned figure: {s[:60]}" for s in info["bareOutputImgs"]]
        want = colab_url(args.config, page)
        if want not in info["colab"]:
            problems.append(f"no Colab button to {want} (found {info['colab'] or 'none'})")

    if args.screenshots:
        shot = args.screenshots / (page.removesuffix(".html").replace("/", "__") + ".png")
        tab.screenshot(path=str(shot), full_page=True)
    tab.close()

    summary = (
        f"math={info['math']} mjx={info['containers']} imgs={info['imgs']} "
        f"figures={info['figures']} colab={'yes' if info['colab'] else 'no'}"
    )
    print(f"{'FAIL' if problems else 'ok  '} {page}  {summary}")
    for p in problems[:MAX_SHOWN]:
        print(f"       - {p}")
    if len(problems) > MAX_SHOWN:
        print(f"       - ... and {len(problems) - MAX_SHOWN} more")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", type=Path, default=ROOT / "_build" / "html", help="the built HTML book")
    parser.add_argument("--config", type=Path, default=ROOT / "_config.yml", help="the book's _config.yml")
    parser.add_argument("--screenshots", type=Path, help="write a full-page PNG of each page here")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    args = parser.parse_args()

    build = args.build.resolve()
    pages = discover(build)
    if not pages:
        print(f"FAIL no HTML pages under {build}: build the book first (make book)")
        return 1
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)

    server = serve(build)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    external: list[str] = []

    def route(r):
        url = r.request.url
        if url.startswith(base + "/") or url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            external.append(url)
            r.abort("blockedbyclient")

    failed = 0
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.route("**/*", route)
            for page in pages:
                failed += bool(check_page(context, base, page, build, args, external))
            browser.close()
    finally:
        server.shutdown()

    print(f"{len(pages) - failed}/{len(pages)} pages passed" + (f"; screenshots in {args.screenshots}" if args.screenshots else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
