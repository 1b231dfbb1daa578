"""What transformers knows about an architecture, asked without memory: the model built on
the meta device (names, shapes, module tree) and where its decoder layers are."""
from __future__ import annotations

import torch
from torch import nn

from .errors import SourceError


def meta_skeleton(config, where: str):
    """The transformers causal LM of ``config`` on the meta device: names, shapes, module tree; no memory."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as e:  # "Unrecognized configuration class ... for this kind of AutoModel"
        raise SourceError(f"{where}: model type {config.model_type!r} is not a causal LM that transformers "
                          f"can build ({str(e).splitlines()[0][:120]})") from None


def decoder_layers_prefix(model, where: str) -> str:
    """Module path of the decoder layers: the ModuleList of ``num_hidden_layers`` blocks
    holding the most parameters (an inner list of the same length, e.g. experts, holds fewer)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "num_hidden_layers", None)
    found = [(sum(p.numel() for p in m.parameters()), name) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and name]
    if not found:
        raise SourceError(f"{where}: {type(model).__name__} has no ModuleList of its {n} decoder layers; "
                          "qstream streams only models whose layers transformers keeps in one")
    return max(found, key=lambda f: (f[0], -len(f[1])))[1]
