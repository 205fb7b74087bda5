"""Execution time of every chapter of the book, in a fresh kernel each, as `make execute` runs them.

Runs each notebook of ``book/`` top to bottom on a copy (the stored notebooks are not touched) and
prints a markdown table of wall times and each chapter's share of the total. The book's budget is
4 minutes per chapter on 2 CPU cores.

    python benchmarks/book_times.py [NOTEBOOK ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 240.0


def run_notebook(path: Path, timeout: int = 900) -> float:
    """Execute a copy of the notebook with the book's kernel settings; return the wall time (s)."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": path.parent}},
    )
    start = time.perf_counter()
    client.execute()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="default: every book/*.ipynb")
    args = parser.parse_args(argv)
    # Same environment as `make execute`: quiet TensorFlow, the book's IPython profile.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("IPYTHONDIR", str(ROOT / "book" / ".ipython"))
    paths = [Path(p) for p in args.notebooks] or sorted((ROOT / "book").glob("*.ipynb"))
    times = {}
    for path in paths:
        times[path.name] = run_notebook(path.resolve())
        print(f"{path.name}: {times[path.name]:.1f} s", file=sys.stderr)
    total = sum(times.values())
    print(f"cores: {os.cpu_count()}\n")
    print("| chapter | wall time (s) | share | within 4 min |")
    print("|---|---:|---:|:---:|")
    for name, seconds in times.items():
        ok = "yes" if seconds <= BUDGET_S else "NO"
        print(f"| {name} | {seconds:.1f} | {seconds / total:.0%} | {ok} |")
    print(f"| **total** | {total:.1f} | 100% | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
