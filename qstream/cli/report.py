"""`qstream report`."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import EvalError
from ..eval.report import write_report
from .common import COMMON


def _cmd_report(a: argparse.Namespace) -> int:
    notes = None
    if a.notes:
        p = Path(a.notes)
        if not p.is_file():
            raise EvalError(f"--notes file not found: {p}")
        notes = p.read_text()
    readme = write_report(a.results, a.out, title=a.title, notes=notes)
    print(f"wrote {readme}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("report", parents=[COMMON], help="table and plots across the variants of a model",
                       description="Read result files of `qstream eval ppl|lm-eval --json` and `qstream bench --json`, "
                       "match them by shard directory, and write OUT/README.md (size, bits per weight, perplexity and "
                       "its change, accuracy, speed, quality targets marked MISS when missed) and PNG plots.")
    s.add_argument("results", nargs="+", metavar="RESULT.json", help="result files")
    s.add_argument("--out", required=True, metavar="DIR", help="directory for README.md and the plots")
    s.add_argument("--title", help="heading of the README")
    s.add_argument("--notes", metavar="FILE", help="markdown appended to the README (method, caveats)")
    s.set_defaults(func=_cmd_report)
