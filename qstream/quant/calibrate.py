"""Calibration activations for GPTQ, carried layer by layer while sharding.

The model is a skeleton on the meta device (no weight memory); ``start`` materializes the
embeddings, runs the model's own forward until layer 0 (which prepares the attention mask
and rotary embeddings exactly as inference does, the trick of StreamedModel._embed_batches)
and keeps layer 0's input and keyword arguments. Then for each layer i:

    hessians = cal.collect(i, tensors)   # layer i in float32 from the source; H of each linear
    ... quantize layer i with them ...
    cal.advance(i, dequantized)          # run the QUANTIZED layer: layer i+1's inputs

so layer i is quantized against inputs that went through the already-quantized layers
0..i-1 (GPTQ's sequential scheme), and only one layer's weights are materialized at a time.
Everything runs in float32 on the CPU (or the given device).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import RecipeError

SEQ = 512  # tokens per calibration sequence: the context the quality measurements use


def calibration_ids(tokenizer, text_file: str | Path, tokens: int) -> torch.Tensor:
    """The first ``tokens`` token ids of the file as [tokens // SEQ, SEQ] (one sequence if shorter)."""
    text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise RecipeError(f"field 'calibration.text_file': {text_file} has {len(ids)} tokens, fewer than "
                          f"calibration.tokens = {tokens}; use a longer text or fewer tokens")
    seq = min(SEQ, tokens)
    n = tokens // seq
    return torch.tensor(ids[:n * seq]).view(n, seq)


def _set(root: nn.Module, name: str, t: torch.Tensor) -> None:
    path, attr = name.rsplit(".", 1)
    root.get_submodule(path)._parameters[attr] = nn.Parameter(t, requires_grad=False)


def _empty_model(config, device: torch.device) -> nn.Module:
    """The float32 model of ``config`` with its weights on meta (set later, one by one) and its real
    buffers (rotary tables) on ``device``."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for mod in model.modules():
        for k, b in list(mod._buffers.items()):
            if b is not None and b.device.type != "meta":
                mod._buffers[k] = b.to(device)
    return model


class Calibrator:
    def __init__(self, config, ids: torch.Tensor, layers_prefix: str, device: torch.device | str = "cpu",
                 reference: bool = False):
        self.device = torch.device(device)
        self.reference = reference  # also carry the unquantized model's activations (signround's targets)
        self.ref: torch.Tensor | None = None
        self.model = _empty_model(config, self.device)
        self.ids = ids
        self.prefix = layers_prefix
        self.layers = self.model.get_submodule(layers_prefix)
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict = {}
        self.stages: list[list[str]] = []

    @torch.no_grad()
    def start(self, embed: dict[str, torch.Tensor]) -> None:
        """Layer 0's inputs from the embedding tensors (names as stored)."""
        for n, t in embed.items():
            _set(self.model, n, t.float().to(self.device))

        class _Caught(Exception):
            pass

        def catch(module, args, kw):
            self.hidden = args[0] if args else kw.pop("hidden_states")
            self.kwargs = {k: v for k, v in kw.items() if k != "hidden_states"}
            raise _Caught

        h = self.layers[0].register_forward_pre_hook(catch, with_kwargs=True, prepend=True)
        try:
            self.model.base_model(input_ids=self.ids.to(self.device), use_cache=False)
        except _Caught:
            pass
        finally:
            h.remove()
        if self.hidden is None:
            raise RuntimeError("calibration: the model's forward never reached its first decoder layer")
        if self.reference:
            self.ref = self.hidden
        for n in embed:  # the embeddings are not needed again
            _set(self.model, n, torch.empty(0, device="meta"))

    def _load(self, i: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
        for n, t in tensors.items():
            _set(self.model, n, t.float().to(self.device))
        return self.layers[i]

    def _run(self, layer: nn.Module) -> torch.Tensor:
        out = layer(self.hidden, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def collect(self, i: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Layer i with ``tensors`` (its float weights): {weight name: H = X^T X / N [in, in]} of
        every linear, X its inputs over all calibration tokens. ``self.stages`` then lists the
        linears grouped by shared input in execution order (q/k/v, o, gate/up, down), what
        true-sequential quantization walks through."""
        layer = self._load(i, tensors)
        sums: dict[str, torch.Tensor] = {}
        count = self.hidden.shape[0] * self.hidden.shape[1]
        hooks = []
        last: list = [None, None]  # (input tensor, its X^T X): q/k/v (and gate/up) share one input
        stages: list[list[str]] = []  # linears grouped by shared input, in execution order

        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                key = f"{self.prefix}.{i}.{name}.weight"

                def hook(m, args, key=key):
                    if args[0] is not last[0]:  # identity, not address: `last` keeps the tensor alive
                        x = args[0].reshape(-1, args[0].shape[-1]).float()
                        last[0], last[1] = args[0], x.T @ x
                        stages.append([])
                    if key not in stages[-1]:
                        stages[-1].append(key)
                    sums[key] = sums[key] + last[1] if key in sums else last[1]

                hooks.append(mod.register_forward_pre_hook(hook))
        try:
            self._run(layer)
        finally:
            for h in hooks:
                h.remove()
        self.stages = stages
        return {k: v / count for k, v in sums.items()}  # a new tensor per key: shared sums stay unchanged

    @torch.no_grad()
    def reference_step(self, i: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Layer i with its unquantized ``tensors`` on the unquantized model's activations: its output,
        which is also the next layer's reference input."""
        layer = self._load(i, tensors)
        out = layer(self.ref, **self.kwargs)
        self.ref = out[0] if isinstance(out, tuple) else out
        return self.ref

    @torch.no_grad()
    def advance(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Run layer i with ``tensors`` (what the runtime will compute with) on the current inputs."""
        layer = self._load(i, tensors)
        self.hidden = self._run(layer)
        for n in tensors:  # free the layer: at most one layer's float weights are held here
            _set(self.model, n, torch.empty(0, device="meta"))


def loss_sensitivity(config, read: Callable[[str], torch.Tensor], ids: torch.Tensor,
                     device: torch.device | str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{weight name: (out_scale [out], in_scale [in])} of every linear of the whole model (float32,
    every weight materialized: for mixed precision's choice, before sharding). ``in_scale`` is the mean
    squared input of each input feature; ``out_scale`` the mean squared gradient of the next-token loss
    with respect to each output feature (the empirical Fisher's diagonal at the linear's output). A
    weight error dW then costs about 0.5 * sum_ij out_i * in_j * dW_ij^2 in loss (second order, cross
    terms dropped): one unit for every linear of every layer, which the plain output error is not
    (it ignores how much of a layer's output reaches the loss)."""
    dev = torch.device(device)
    model = _empty_model(config, dev)
    for name, _ in model.named_parameters(remove_duplicate=False):
        _set(model, name, read(name).float().to(dev))
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            key = f"{name}.weight"

            def fwd(m, args, out, key=key):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                ins[key] = ins.get(key, 0) + x.square().sum(0)
                if out.requires_grad:
                    out.register_hook(lambda g, key=key: outs.__setitem__(
                        key, outs.get(key, 0) + g.reshape(-1, g.shape[-1]).float().square().sum(0)))

            hooks.append(mod.register_forward_hook(fwd))
    count = 0
    try:
        for seq in ids.to(dev):  # one sequence at a time: the activations of one backward pass only
            emb = model.get_input_embeddings()(seq[None]).detach().requires_grad_(True)
            loss = model(inputs_embeds=emb, labels=seq[None], use_cache=False).loss
            loss.backward()
            count += seq.numel()
    finally:
        for h in hooks:
            h.remove()
    del model
    return {k: (outs[k] / count, ins[k] / count) for k in ins if k in outs}
