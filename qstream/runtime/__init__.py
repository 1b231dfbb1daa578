"""The streaming runtime: plan (pure tier arithmetic), pipeline and stats (the
mechanism of streaming), qlinear and embedding (modules), hooks (binding streamed
tensors), build (``load``), model (the StreamedModel API), twin (the dense reference)."""
from .build import load
from .model import StreamedModel
from .plan import TierPlan, parse_bytes, plan_tiers

__all__ = ["load", "StreamedModel", "TierPlan", "parse_bytes", "plan_tiers"]
