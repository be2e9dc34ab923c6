"""fusionsearch: search, build and ship fused CUDA kernels for a BERT-style encoder layer."""
from .config import LayerConfig
from .errors import ConfigError, FusionSearchError, MaskError, PlanError
from .mask import decode, parse_mask, to_seed
from .plan import Plan, Segment, all_segments, enumerate_plans

__all__ = ["patch", "LayerConfig", "Plan", "Segment", "ConfigError", "FusionSearchError", "MaskError", "PlanError",
           "decode", "parse_mask", "to_seed", "all_segments", "enumerate_plans"]
__version__ = "0.1.0"


def __getattr__(name):
    # patch() needs torch; import it on first use so the codec and CLI start fast.
    if name == "patch":
        from .patching import patch
        return patch
    raise AttributeError(f"module 'fusionsearch' has no attribute {name!r}")
