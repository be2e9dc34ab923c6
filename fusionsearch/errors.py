"""Error types that callers can catch; every message names the value, the limit and the fix."""


class FusionSearchError(ValueError):
    """Base class for every error fusionsearch raises on bad input or impossible requests."""


class ConfigError(FusionSearchError):
    """A layer configuration or shape that the kernels cannot serve."""


class MaskError(FusionSearchError):
    """A fusion mask that is malformed or out of range."""


class PlanError(FusionSearchError):
    """A fusion plan that cannot exist (segments that do not tile the 15 operators, a split attention block)."""
