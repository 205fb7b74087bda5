"""Open every page of the built book in headless Chromium, offline, and check what a reader sees.

Usage (``make check-html`` runs the first form after ``make book``)::

    python tools/check_html.py [--html _build/html] [--out _build/check-html]
                               [--chromium PATH] [--serve] [--timeout 90]

Each page is opened in a fresh browser context (so first-visit code paths run on every page) with
every request that leaves the book blocked: by default the pages are opened as ``file://`` URLs,
as a reader opens ``_build/html/index.html``; ``--serve`` serves them from a local HTTP server on
127.0.0.1 instead, as a web host would. After MathJax has typeset the page and its images have
loaded, the checker writes a full-page screenshot to ``<out>/<page>.png`` and looks for:

* **tex**: raw TeX in the rendered text outside code blocks (``\\(``, ``\\[``, ``$$``, ``\\frac``,
  ``\\times``, any ``\\command``, ``$x$``) and equations MathJax did not typeset or could not parse;
* **links**: ``<a href>`` to a file of the book that does not exist, or to an anchor (``#id``)
  that the target page does not have; links to other sites are counted but not followed;
* **images**: ``<img src>`` that is missing, does not decode, or points outside the book;
* **outputs**: notebook cells whose stored outputs are errors (stderr streams, tracebacks);
* **console**: browser console errors and uncaught JavaScript exceptions;
* **network**: requests the page tried to make outside the book (blocked), and local files it
  asked for that do not exist.

It prints a table with one row per page and the problems found, writes the same text to
``<out>/report.txt``, and exits with 1 when any page has a problem (2 when it cannot run at all).
It needs the ``check`` extra (Playwright) and a Chromium: Debian's ``chromium`` package
(``apt-get install chromium``), or Playwright's own build where downloads are allowed.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import re
import shutil
import sys
import threading
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Folders of the build that hold assets, not pages.
ASSET_DIRS = {"_static", "_sources", "_images", "_downloads"}
# Chromium executables to try, in order, when --chromium is not given.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Schemes of links that are neither local files nor checked (other sites are only counted).
SKIPPED_SCHEMES = {"mailto", "javascript", "tel", "data"}

# TeX that MathJax should have turned into math: delimiters, environments, any \command, and
# $...$ (no space just inside the dollars, so "$3 and $4" is not taken for math).
RAW_TEX = re.compile(
    r"\\[()\[\]]"  # \( \) \[ \]
    r"|\$\$"  # $$
    r"|\\(?:begin|end)\{"  # \begin{align}
    r"|\\[A-Za-z]{2,}"  # \frac, \times, \mathbf, ...
    r"|\$[^\s$](?:[^$\n]{0,200}?[^\s$\\])?\$"  # $x_i$
)

# Stored notebook outputs that are errors, as myst-nb (and nbconvert) render them.
ERROR_OUTPUT_SELECTOR = ", ".join(
    (
        ".output.stderr",
        ".output.traceback",
        ".output.error",
        ".output_stderr",
        ".output_error",
    )
)

# Runs in the page after load: waits for MathJax's first typeset, all images and web fonts.
SETTLE_JS = """
async () => {
  for (const img of document.images) img.loading = "eager";
  const mj = window.MathJax;
  if (mj && mj.startup && mj.startup.promise) await mj.startup.promise;
  await Promise.all([...document.images].map((img) => img.complete ? null : new Promise((ok) => {
    img.addEventListener("load", ok); img.addEventListener("error", ok); setTimeout(ok, 20000);
  })));
  await document.fonts.ready;
  return mj && mj.version ? mj.version : null;
}
"""

# Runs in the page after the screenshot: collects what the Python side checks.
COLLECT_JS = """
(errorSelector) => {
  const text = (el) => (el.innerText || el.textContent || "").trim().replace(/\\s+/g, " ");
  // The rendered text outside code: hide code blocks and typeset math, read innerText.
  const style = document.createElement("style");
  style.textContent = "pre, code, .highlight, script, style, mjx-container, .MathJax, "
    + "mjx-assistive-mml { display: none !important; }";
  document.head.appendChild(style);
  const prose = document.body.innerText;
  style.remove();
  const math = [...document.querySelectorAll(".math")];
  // TeX that MathJax parsed into an error, or into red text for an undefined TeX command.
  const mathErrors = () => {
    const mj = window.MathJax;
    if (!(mj && mj.startup && mj.startup.document && mj.startup.toMML)) return [];
    return [...mj.startup.document.math]
      .filter((item) => /<merror|mathcolor="red"/.test(mj.startup.toMML(item.root)))
      .map((item) => item.math);
  };
  return {
    prose,
    fullText: document.body.innerText,
    mathTotal: math.length,
    mathUntypeset: math.filter((el) => !el.querySelector("mjx-container")).map(text),
    mathErrors: mathErrors(),
    links: [...document.querySelectorAll("a[href]")].map(
      (a) => ({href: a.getAttribute("href"), url: a.href})),
    images: [...document.querySelectorAll("img")].map((img) => ({
      src: img.getAttribute("src") || "", url: img.currentSrc || img.src,
      ok: img.complete && img.naturalWidth > 0})),
    errorOutputs: [...document.querySelectorAll(errorSelector)].map((el) => text(el)),
  };
}
"""


@dataclass
class PageReport:
    """What was checked on one page and the problems found, by kind."""

    page: str
    mathjax: str | None = None
    math_total: int = 0
    links_local: int = 0
    links_external: int = 0
    images: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, message: str) -> None:
        """Record one problem of a kind (tex, links, images, outputs, console, network)."""
        self.problems.setdefault(kind, []).append(message)

    @property
    def ok(self) -> bool:
        return not self.problems


class _IdCollector(HTMLParser):
    """Collects the ``id`` and ``name`` attributes of an HTML file: the anchors a link can use."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if key in ("id", "name") and value:
                self.ids.add(value)


@functools.cache
def anchors_of(path: Path) -> frozenset[str]:
    """The anchors (ids and names) of an HTML file, parsed once per run."""
    collector = _IdCollector()
    collector.feed(path.read_text(encoding="utf-8", errors="replace"))
    return frozenset(collector.ids)


def find_pages(html_dir: Path) -> list[Path]:
    """Every ``.html`` page of the build, outside the asset folders, sorted."""
    return sorted(
        path
        for path in html_dir.rglob("*.html")
        if not ASSET_DIRS.intersection(path.relative_to(html_dir).parts[:-1])
    )


def find_chromium(explicit: str | None) -> str | None:
    """The Chromium to drive: --chromium, else the first of CHROMIUM_NAMES on PATH."""
    if explicit:
        return explicit
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def snippet(text: str, start: int, end: int, width: int = 40) -> str:
    """The text around ``text[start:end]`` on one line, for a report."""
    left = text[max(0, start - width) : start]
    right = text[end : end + width]
    return " ".join(f"...{left}[{text[start:end]}]{right}...".split())


class Book:
    """Maps the URLs a page uses back to files of the build (file:// or a local server)."""

    def __init__(self, html_dir: Path, base_url: str) -> None:
        self.html_dir = html_dir.resolve()
        self.base_url = base_url  # "file:///abs/html/" or "http://127.0.0.1:PORT/"

    def url_of(self, page: Path) -> str:
        return self.base_url + page.resolve().relative_to(self.html_dir).as_posix()

    def is_local(self, url: str) -> bool:
        return url.startswith(self.base_url) or url.split("#")[0] == self.base_url.rstrip("/")

    def allows(self, url: str) -> bool:
        """Whether the browser may load ``url``: the book's own files and inline data only."""
        return self.is_local(url) or urlsplit(url).scheme in ("data", "blob", "about")

    def file_of(self, url: str) -> Path | None:
        """The file a local URL names (a folder's index.html), or None outside the book."""
        if not self.is_local(url):
            return None
        rel = unquote(urlsplit(url).path)[len(unquote(urlsplit(self.base_url).path)) :]
        path = self.html_dir / rel
        if path.is_dir():
            path = path / "index.html"
        return path


def check_links(report: PageReport, book: Book, links: list[dict]) -> None:
    """Local links must name an existing file of the book and, with #anchor, an existing anchor."""
    for link in links:
        href, url = link["href"], link["url"]
        scheme = urlsplit(url).scheme
        if scheme in SKIPPED_SCHEMES:
            continue
        if not book.is_local(url):
            if scheme in ("http", "https"):
                report.links_external += 1
            else:
                report.add("links", f"{href} points outside the book ({url})")
            continue
        report.links_local += 1
        target = book.file_of(url)
        if target is None or not target.is_file():
            report.add("links", f"{href}: no such file")
            continue
        fragment = unquote(urlsplit(url).fragment)
        if fragment and target.suffix == ".html" and fragment not in anchors_of(target):
            report.add("links", f"{href}: no anchor #{fragment} in {target.name}")


def check_images(report: PageReport, book: Book, images: list[dict]) -> None:
    """Images must be files of the book (or inline data) and must have decoded."""
    for image in images:
        report.images += 1
        src, url = image["src"], image["url"]
        inline = urlsplit(url).scheme == "data"
        target = book.file_of(url)
        if not src:
            report.add("images", "<img> without src")
        elif not inline and target is None:
            report.add("images", f"{src} is outside the book (needs a network)")
        elif not inline and not target.is_file():
            report.add("images", f"{src}: no such file")
        elif not image["ok"]:
            report.add("images", f"{src}: did not load or decode")


def check_text(report: PageReport, data: dict) -> None:
    """Raw TeX outside code, untypeset or broken equations, error outputs and tracebacks."""
    report.math_total = data["mathTotal"]
    prose = data["prose"]
    for match in list(RAW_TEX.finditer(prose))[:5]:
        report.add("tex", f"raw TeX {snippet(prose, match.start(), match.end())!r}")
    for source in data["mathUntypeset"][:5]:
        report.add("tex", f"equation not typeset: {source[:80]!r}")
    for source in data["mathErrors"][:5]:
        report.add("tex", f"MathJax could not typeset: {source[:120]!r}")
    for output in data["errorOutputs"]:
        report.add("outputs", f"error output: {output[:120]!r}")
    full, marker = data["fullText"], "Traceback (most recent call last)"
    at = full.find(marker)
    if at >= 0 and not any(marker in output for output in data["errorOutputs"]):
        report.add("outputs", f"traceback in the page: {snippet(full, at, at + len(marker))!r}")


def settle(page, attempts: int = 3) -> str | None:
    """Run SETTLE_JS; a page that redirects (meta refresh) is settled once it has arrived."""
    for attempt in range(attempts):
        try:
            return page.evaluate(SETTLE_JS)
        except Exception as exc:
            if "context was destroyed" not in str(exc) or attempt == attempts - 1:
                raise
            page.wait_for_load_state("networkidle")
    return None


def check_page(browser, book: Book, page_path: Path, out_dir: Path, timeout_s: float) -> PageReport:
    """Open one page in a fresh, offline browser context, screenshot it and check it."""
    name = page_path.resolve().relative_to(book.html_dir).as_posix()
    report = PageReport(name)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(timeout_s * 1000)

    def route(request_route) -> None:
        url = request_route.request.url
        if book.allows(url):
            request_route.continue_()
        else:
            report.add("network", f"blocked request to {url[:120]}")
            request_route.abort("blockedbyclient")

    context.route("**/*", route)
    page = context.new_page()
    page.on(
        "console",
        lambda msg: (
            report.add("console", f"{msg.text[:200]} ({msg.location.get('url', '')})")
            if msg.type == "error"
            else None
        ),
    )
    page.on("pageerror", lambda exc: report.add("console", f"uncaught {exc}"[:200]))
    page.on(
        "requestfailed",
        lambda req: (
            report.add("network", f"{req.url[:120]}: {req.failure}")
            if book.is_local(req.url)
            else None
        ),
    )
    page.on(
        "response",
        lambda resp: (
            report.add("network", f"{resp.url[:120]}: HTTP {resp.status}")
            if resp.status >= 400
            else None
        ),
    )
    try:
        page.goto(book.url_of(page_path), wait_until="load")
        page.wait_for_load_state("networkidle")
        report.mathjax = settle(page)
        if page.url.split("#")[0] != book.url_of(page_path):  # index.html redirects
            report.page += f" -> {page.url.removeprefix(book.base_url)}"
        shot = out_dir / Path(name).with_suffix(".png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        data = page.evaluate(COLLECT_JS, ERROR_OUTPUT_SELECTOR)
    except Exception as exc:  # a timeout or a crashed page is a finding, not a crash of the run
        report.add("console", f"page did not finish: {type(exc).__name__}: {exc}"[:300])
        context.close()
        return report
    context.close()
    check_text(report, data)
    check_links(report, book, data["links"])
    check_images(report, book, data["images"])
    return report


KINDS = ("tex", "links", "images", "outputs", "console", "network")


def format_report(reports: list[PageReport], mode: str) -> str:
    """The table of pages (counts checked, problems by kind) followed by each problem."""
    header = ["page", "math", "links", "images", *KINDS, "result"]
    rows = [header]
    for r in reports:
        counts = [str(len(r.problems.get(kind, []))) for kind in KINDS]
        links = f"{r.links_local}+{r.links_external}ext"
        rows.append(
            [r.page, str(r.math_total), links, str(r.images), *counts, "ok" if r.ok else "FAIL"]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    versions = sorted({r.mathjax for r in reports if r.mathjax})
    lines.append("")
    lines.append(
        f"{len(reports)} pages opened offline ({mode}); MathJax {', '.join(versions) or 'not loaded'}"
        "; math: equations on the page; links: local checked + external counted"
    )
    failed = [r for r in reports if not r.ok]
    for r in failed:
        lines.append("")
        lines.append(f"{r.page}:")
        for kind in KINDS:
            for message in r.problems.get(kind, []):
                lines.append(f"  [{kind}] {message}")
    lines.append("")
    lines.append(
        f"check-html: {len(failed)} of {len(reports)} pages with problems"
        if failed
        else f"check-html: all {len(reports)} pages passed"
    )
    return "\n".join(lines)


def serve(html_dir: Path) -> http.server.ThreadingHTTPServer:
    """Serve the build on 127.0.0.1 (a free port) from a daemon thread, without request logs."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            pass

    handler = functools.partial(QuietHandler, directory=str(html_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--html", type=Path, default=Path("_build/html"), help="the built book")
    parser.add_argument(
        "--out", type=Path, default=Path("_build/check-html"), help="screenshots and report"
    )
    parser.add_argument("--chromium", help="Chromium executable (default: found on PATH)")
    parser.add_argument(
        "--serve", action="store_true", help="open pages from a 127.0.0.1 server, not file://"
    )
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per page step")
    args = parser.parse_args(argv)

    pages = find_pages(args.html) if args.html.is_dir() else []
    if not pages:
        print(f"check-html: no pages in {args.html}; build the book first (make book)")
        return 2
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("check-html: Playwright is not installed: pip install -e '.[check]'")
        return 2
    chromium = find_chromium(args.chromium)

    server = serve(args.html) if args.serve else None
    if server is not None:
        host, port = server.server_address[:2]
        book = Book(args.html, f"http://{host}:{port}/")
    else:
        book = Book(args.html, args.html.resolve().as_uri() + "/")
    mode = "served from 127.0.0.1" if server else "file:// URLs"

    with sync_playwright() as playwright:
        try:
            # No proxy and no DNS: whatever the routes let through still cannot leave the host.
            browser = playwright.chromium.launch(
                executable_path=chromium,
                args=[
                    "--no-proxy-server",
                    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                ],
            )
        except PlaywrightError as exc:
            print(f"check-html: cannot start Chromium ({chromium or 'Playwright build'}): {exc}")
            print(
                "Install one: apt-get install chromium (Debian; as root, or with sudo), "
                "or .venv/bin/playwright install chromium where downloads are allowed, "
                "or pass --chromium PATH / CHROMIUM=PATH"
            )
            return 2
        print(f"check-html: {len(pages)} pages, Chromium {browser.version}, {mode}", flush=True)
        # The browser runs: replace the previous run's screenshots (not before, so a failed start
        # leaves them in place).
        for old in args.out.rglob("*.png") if args.out.is_dir() else []:
            old.unlink()
        args.out.mkdir(parents=True, exist_ok=True)
        reports = []
        for page_path in pages:
            reports.append(check_page(browser, book, page_path, args.out, args.timeout))
        browser.close()
    if server is not None:
        server.shutdown()

    text = format_report(reports, mode)
    (args.out / "report.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"screenshots: {args.out}/")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
