"""CLI commands that run a sharded model: generate, eval, bench, report."""
from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    pass
