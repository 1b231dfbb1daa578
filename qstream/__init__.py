__version__ = "0.1.0"

from .errors import QstreamError  # noqa: E402


def load(*args, **kwargs):
    """Open a shard directory for inference; see :func:`qstream.runtime.model.load`."""
    from .runtime.model import load as _load

    return _load(*args, **kwargs)


__all__ = ["__version__", "QstreamError", "load"]
