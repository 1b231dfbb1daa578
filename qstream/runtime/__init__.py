from .model import StreamedModel, load
from .plan import TierPlan, parse_bytes, plan_tiers

__all__ = ["StreamedModel", "load", "TierPlan", "parse_bytes", "plan_tiers"]
