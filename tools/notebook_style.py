"""Reading comfort for the book's notebooks: one idempotent pass over ``book/*.ipynb``.

Usage::

    python tools/notebook_style.py book/00_*.ipynb          # rewrite in place
    python tools/notebook_style.py --check book/*.ipynb     # exit 1 if a file would change

Only sources and cell tags change; outputs are left as they are, so a notebook needs no
re-execution after this pass unless the figure-setup rule (4) changed its first code cells (the
stored figures then still have the old style until it is re-executed). Running the pass twice
gives the same file. What the pass cannot fix is listed on stderr (it does not change the exit
status): code lines still over the line length, and stored figures wider than the text column
(``<Figure size WxH ...>`` with W > ``COLUMN_PX`` = 720 at 72 dpi: give them a figsize of at most
10 in, 9.4 in where the layout allows (not scaled at all in the 676 px output area), then
re-execute). The rules:

1. **nbval markers become cell tags.** A comment line ``# NBVAL_IGNORE_OUTPUT`` (likewise
   ``NBVAL_SKIP``, ``NBVAL_CHECK_OUTPUT``, ``NBVAL_RAISES_EXCEPTION``) is removed from the source
   and the equivalent nbval tag (``nbval-ignore-output``, ...) is added to the cell's metadata, so
   readers do not see test plumbing. nbval >= 0.9.2 reads the tags exactly like the comments.

2. **Code is formatted to the text column.** ``ruff format --line-length 75`` on the notebook. At
   a 1280 px window sphinx-book-theme gives a code block 640 px of text (672 px less 2 x 16 px of
   padding) in a 14 px monospace font whose glyphs are 0.6 em wide (DejaVu Sans Mono, Menlo,
   SF Mono, Source Code Pro: 8.43 px), so 75 characters fit without a horizontal scroll bar.
   ruff does not break strings or comments. Before ruff, a trailing comment that makes its line
   too long is moved to a comment line of its own just above (ruff would otherwise wrap the code
   in parentheses to make room for it). After ruff, a line that is still too long is split when
   it belongs to a block of whole-line comments (the block is re-wrapped as one paragraph at word
   boundaries) or holds one string literal, e.g. an ``f"..."`` argument of ``print``, optionally
   ``keyword=f"..."`` (split at spaces outside ``{}`` into implicitly concatenated literals,
   which is the same string; the ``f`` prefix is kept only on pieces with a placeholder), and
   ruff runs again. Other long lines
   (docstrings, trailing comments, long expressions) are left to the author. The package keeps
   its line length of 100 (``pyproject.toml``); ``make lint`` checks the notebooks with 75.

3. **Long material is collapsed** with Jupyter Book's cell tags, so the prose leads and the code
   is one click away (the cell still runs and is still compared by nbval):

   * ``hide-output`` on a cell that prints a source listing (its source calls
     ``inspect.getsource``) of at least ``LONG_OUTPUT`` (30) lines of text and shows no figure;
   * ``hide-output`` on a training cell (its source calls ``.fit(``) that prints at least
     ``TRAINING_LOG`` (3) lines, or that prints at least that many log lines of
     :class:`dlnotes.training.EpochLog` (``step   200: loss ...``): the training logs;
   * ``hide-input`` on a cell of at least ``LONG_FIGURE_SOURCE`` (30) formatted source lines whose
     outputs are figures only: diagram and plot drawing code.

   A cell tagged ``no-auto-hide`` is left alone by this rule; tags are only ever added.

4. **Figure setup leaves the style to the kernel profile.** In a notebook's first code cells,
   ``%config InlineBackend.figure_formats = ["png"]`` is removed and
   ``plt.rcParams.update({"figure.dpi": 72, "savefig.dpi": 72, "font.size": 10})`` becomes
   ``plt.rcParams.update({"figure.dpi": 72})``. The notebook still pins ``figure.dpi`` (the
   ``<Figure size WxH ...>`` lines nbval compares are figsize x figure.dpi, with or without the
   profile); ``book/.ipython/profile_default/ipython_kernel_config.py`` sets the book's figure
   format (PNG at twice the resolution, shown at the logical size) and font size.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tokenize
from pathlib import Path

LINE_LENGTH = 75
LONG_OUTPUT = 30
TRAINING_LOG = 3
LONG_FIGURE_SOURCE = 30
OPT_OUT_TAG = "no-auto-hide"
# Widest stored figure: 10 in at 72 dpi. A cell's output area in the 740 px text column (1280 px
# window) is 676 px, so a 10 in figure is shown at 94 %: 11 pt text at 10.4 px.
COLUMN_PX = 720
_FIGURE_SIZE = re.compile(r"<Figure size ([0-9.]+)x([0-9.]+) with")

_NBVAL_COMMENT = re.compile(
    r"^[ \t]*#[ \t]*(NBVAL_IGNORE_OUTPUT|NBVAL_CHECK_OUTPUT|NBVAL_RAISES_EXCEPTION|NBVAL_SKIP)"
    r"[ \t]*$"
)
_OLD_FORMATS = re.compile(r'^%config InlineBackend\.figure_formats = \["png"\]\n', re.M)
_OLD_RC = 'plt.rcParams.update({"figure.dpi": 72, "savefig.dpi": 72, "font.size": 10})'
_NEW_RC = 'plt.rcParams.update({"figure.dpi": 72})'


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return src if isinstance(src, str) else "".join(src)


def _set_source(cell: dict, text: str) -> None:
    cell["source"] = text.splitlines(keepends=True)


def _add_tag(cell: dict, tag: str) -> None:
    tags = cell.setdefault("metadata", {}).setdefault("tags", [])
    if tag not in tags:
        tags.append(tag)


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def nbval_comments_to_tags(cell: dict) -> None:
    """Rule 1."""
    lines = _source(cell).splitlines(keepends=True)
    kept = []
    for line in lines:
        match = _NBVAL_COMMENT.match(line.rstrip("\n"))
        if match:
            _add_tag(cell, match.group(1).lower().replace("_", "-"))
        else:
            kept.append(line)
    if len(kept) != len(lines):
        _set_source(cell, "".join(kept))


def figure_setup(cell: dict) -> None:
    """Rule 4."""
    text = _source(cell)
    new = _OLD_FORMATS.sub("", text).replace(_OLD_RC, _NEW_RC)
    if new != text:
        _set_source(cell, new)


def _text_lines(cell: dict) -> int:
    count = 0
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            text = out.get("text", "")
        elif "image/png" not in out.get("data", {}):
            text = out.get("data", {}).get("text/plain", "")
        else:
            continue
        count += len(("".join(text) if isinstance(text, list) else text).splitlines())
    return count


_LOG_LINE = re.compile(r"^step +\d+: loss ", re.MULTILINE)


def _log_lines(cell: dict) -> int:
    """Lines of ``dlnotes.training.EpochLog`` (``step   200: loss ...``) in the text outputs."""
    texts = (out.get("text", "") for out in cell.get("outputs", []))
    return sum(len(_LOG_LINE.findall("".join(t) if isinstance(t, list) else t)) for t in texts)


def _has_figure(cell: dict) -> bool:
    return any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def hide_tags(cell: dict) -> None:
    """Rule 3."""
    if OPT_OUT_TAG in _tags(cell):
        return
    source = _source(cell)
    lines = _text_lines(cell)
    if "inspect.getsource" in source and lines >= LONG_OUTPUT and not _has_figure(cell):
        _add_tag(cell, "hide-output")
    if ".fit(" in source and lines >= TRAINING_LOG:
        _add_tag(cell, "hide-output")
    if _log_lines(cell) >= TRAINING_LOG:
        _add_tag(cell, "hide-output")
    if len(source.splitlines()) >= LONG_FIGURE_SOURCE and _has_figure(cell) and lines == 0:
        _add_tag(cell, "hide-input")


_STRING_LINE = re.compile(
    r'^(?P<indent>[ ]*)(?P<kw>\w+=)?(?P<f>f?)"(?P<body>(?:[^"\\]|\\.)*)"(?P<end>,?)$'
)
_COMMENT_LINE = re.compile(r"^(?P<indent>[ ]*)# (?P<text>.*)$")


def _split_points(body: str, fstring: bool) -> list[int]:
    """Indices just after a space of ``body`` that are outside ``{...}`` placeholders."""
    points, depth, i = [], 0, 0
    while i < len(body):
        ch = body[i]
        if fstring and body[i : i + 2] in ("{{", "}}") and depth == 0:
            i += 2
            continue
        if fstring and ch == "{":
            depth += 1
        elif fstring and ch == "}":
            depth -= 1
        elif ch == " " and depth == 0 and 0 < i + 1 < len(body):
            points.append(i + 1)
        i += 1
    return points


def _split_string_line(line: str) -> list[str]:
    """Rule 2: one too-long string-literal line -> implicitly concatenated pieces."""
    match = _STRING_LINE.match(line)
    if not match:
        return [line]
    indent, kw, prefix, body, end = match.group("indent", "kw", "f", "body", "end")
    kw = kw or ""
    pieces = []
    lead = indent + kw
    while len(lead) + len(prefix) + len(body) + 2 + len(end) > LINE_LENGTH:
        room = LINE_LENGTH - len(lead) - len(prefix) - 2
        fits = [p for p in _split_points(body, bool(prefix)) if p <= room]
        if not fits:
            break
        head, body = body[: fits[-1]], body[fits[-1] :]
        pieces.append(f'{lead}{prefix if "{" in head else ""}"{head}"')
        lead = indent
    if not pieces:
        return [line]
    pieces.append(f'{lead}{prefix if "{" in body else ""}"{body}"{end}')
    return pieces


_CLOSING_ONLY = re.compile(r"^[ ]*[)\]}]+[,:]?[ ]*$")


def hoist_trailing_comments(cell: dict) -> None:
    """Rule 2, before ruff: a too-long line's trailing comment goes on its own line above it.

    A trailing comment after a line of closing brackets only (what ruff makes of a too-long
    trailing comment: the code wrapped in parentheses, the comment after the ``)``) goes above
    the statement's first line, and ruff then joins the code again.
    """
    source = _source(cell)
    lines = source.split("\n")
    try:
        tokens = list(tokenize.generate_tokens(iter(line + "\n" for line in lines).__next__))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return
    moves = {}  # row of the comment (0-based) -> (its column, row to put it above)
    for tok in tokens:
        row, col = tok.start[0] - 1, tok.start[1]
        if tok.type != tokenize.COMMENT or not lines[row][:col].strip() or row in moves:
            continue
        if _CLOSING_ONLY.match(lines[row][:col]):
            depth = len(lines[row]) - len(lines[row].lstrip())
            for above in range(row - 1, -1, -1):
                text = lines[above]
                if text.strip() and len(text) - len(text.lstrip()) == depth:
                    moves[row] = (col, above)
                    break
        elif len(lines[row]) > LINE_LENGTH:
            moves[row] = (col, row)
    if not moves:
        return
    above = {}
    for row, (col, target) in moves.items():
        indent = lines[target][: len(lines[target]) - len(lines[target].lstrip())]
        above.setdefault(target, []).append(indent + lines[row][col:])
    out = []
    for row, line in enumerate(lines):
        out += above.get(row, [])
        out.append(line[: moves[row][0]].rstrip() if row in moves else line)
    _set_source(cell, "\n".join(out))


def _wrap_comment_block(block: list[str], indent: str) -> list[str]:
    """Rule 2: whole-line comments at one indent -> the same words re-wrapped as a paragraph."""
    if all(len(line) <= LINE_LENGTH for line in block):
        return block
    words = " ".join(_COMMENT_LINE.match(line).group("text") for line in block)
    prefix = indent + "# "
    return (
        textwrap.wrap(
            words,
            LINE_LENGTH,
            initial_indent=prefix,
            subsequent_indent=prefix,
            break_long_words=False,
            break_on_hyphens=False,
        )
        or block
    )


def split_long_lines(cell: dict) -> bool:
    """Rule 2, after ruff: split the long lines that ruff leaves. True if the source changed."""
    source = _source(cell)
    out: list[str] = []
    block: list[str] = []
    block_indent = None

    def flush():
        nonlocal block, block_indent
        if block:
            out.extend(_wrap_comment_block(block, block_indent))
        block, block_indent = [], None

    for line in source.split("\n"):
        match = _COMMENT_LINE.match(line)
        if match and "noqa" not in line and "type:" not in line:
            if block and match.group("indent") != block_indent:
                flush()
            block.append(line)
            block_indent = match.group("indent")
            continue
        flush()
        out.extend(_split_string_line(line) if len(line) > LINE_LENGTH else [line])
    flush()
    new = "\n".join(out)
    if new != source:
        _set_source(cell, new)
        return True
    return False


def _ruff() -> str:
    candidate = Path(sys.executable).with_name("ruff")
    return str(candidate) if candidate.exists() else (shutil.which("ruff") or "ruff")


def ruff_format(path: Path) -> None:
    """Rule 2 (in place)."""
    subprocess.run(
        [_ruff(), "format", "--quiet", "--line-length", str(LINE_LENGTH), str(path)], check=True
    )


def _dump(nb: dict) -> str:
    # nbformat's layout (indent 1, keys sorted, non-ASCII kept), as Jupyter writes it.
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def restyle(text: str) -> str:
    """The notebook JSON ``text`` after all rules."""
    nb = json.loads(text)
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for cell in code_cells[:3]:
        figure_setup(cell)
    for cell in code_cells:
        nbval_comments_to_tags(cell)
        hoist_trailing_comments(cell)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "notebook.ipynb"
        scratch.write_text(_dump(nb), encoding="utf-8")
        ruff_format(scratch)
        nb = json.loads(scratch.read_text(encoding="utf-8"))
        split = [split_long_lines(c) for c in nb["cells"] if c["cell_type"] == "code"]
        if any(split):
            scratch.write_text(_dump(nb), encoding="utf-8")
            ruff_format(scratch)
            nb = json.loads(scratch.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            hide_tags(cell)
    return _dump(nb)


def leftovers(text: str) -> list[str]:
    """What the rules leave for the author: long code lines, figures wider than the column."""
    notes = []
    code_cells = [c for c in json.loads(text)["cells"] if c["cell_type"] == "code"]
    for number, cell in enumerate(code_cells, 1):
        for line in _source(cell).splitlines():
            if len(line) > LINE_LENGTH:
                notes.append(f"code cell {number}: line of {len(line)} characters: {line.strip()}")
        for out in cell.get("outputs", []):
            plain = out.get("data", {}).get("text/plain", "")
            match = _FIGURE_SIZE.search("".join(plain) if isinstance(plain, list) else plain)
            if match and float(match.group(1)) > COLUMN_PX:
                width, height = match.groups()
                notes.append(f"code cell {number}: figure {width} x {height} px, over {COLUMN_PX}")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a notebook would change"
    )
    args = parser.parse_args(argv)
    stale = []
    for path in args.notebooks:
        old = path.read_text(encoding="utf-8")
        new = restyle(old)
        for note in leftovers(new):
            print(f"{path}: {note}", file=sys.stderr)
        if new == old:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(new, encoding="utf-8")
    verb = "would restyle" if args.check else "restyled"
    for path in stale:
        print(f"{verb} {path}")
    if args.check and stale:
        print(f"run: python tools/notebook_style.py {' '.join(map(str, stale))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
