"""qstream: run language models larger than your GPU.

    qstream.load(DIR, gpu_memory="4GiB")   -> a StreamedModel (see qstream.runtime)
"""
__version__ = "0.1.0"

from .errors import QstreamError  # noqa: E402


def load(*args, **kwargs):
    """Open a shard directory for inference; see :func:`qstream.runtime.build.load`.
    (Imported on call: ``import qstream`` stays light for the CLI's --help and for tools.)"""
    from .runtime.build import load as _load

    return _load(*args, **kwargs)


__all__ = ["__version__", "QstreamError", "load"]
