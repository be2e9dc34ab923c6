"""fusionsearch: search, build and ship fused CUDA kernels for a BERT-style encoder layer."""
from .config import LayerConfig
from .errors import ConfigError, FusionSearchError, MaskError, PlanError
from .mask import decode, parse_mask, to_seed
from .plan import Plan, Segment, all_segments, enumerate_plans

__all__ = ["LayerConfig", "Plan", "Segment", "ConfigError", "FusionSearchError", "MaskError", "PlanError",
           "decode", "parse_mask", "to_seed", "all_segments", "enumerate_plans"]
__version__ = "0.1.0"
