"""Exact speculative decoding with a draft StreamedModel: the public API. The implementation
is the :mod:`qstream.spec` package (config, kv, tree, loop)."""
from __future__ import annotations

from .spec import *  # noqa: F401,F403
from .spec import __all__  # noqa: F401
