"""qstream: run language models larger than your GPU.

    qstream.load(DIR, gpu_memory="4GiB")   -> a StreamedModel (see qstream.runtime)
"""
import logging

__version__ = "0.1.0"

from .errors import QstreamError  # noqa: E402

# bitsandbytes announces at import that an optional CPU matmul kernel is absent; qstream never uses
# it, so the notice would only confuse API users (the CLI silenced it already)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def load(*args, **kwargs):
    """Open a shard directory for inference; see :func:`qstream.runtime.build.load`.
    (Imported on call: ``import qstream`` stays light for the CLI's --help and for tools.)"""
    from .runtime.build import load as _load

    return _load(*args, **kwargs)


__all__ = ["__version__", "QstreamError", "load"]
