"""LayerConfig: the shape and numerics of one post-LayerNorm encoder layer, validated for the kernels."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from . import settings
from .errors import ConfigError

DTYPES = ("fp16", "bf16", "fp32")
_DTYPE_ALIASES = {
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}
ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def normalize_dtype(dtype: object) -> str:
    """Map 'fp16', 'float16', torch.float16 and friends to one of DTYPES."""
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPE_ALIASES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return _DTYPE_ALIASES[name]


def parse_shape(text: str) -> tuple[int, int]:
    """Parse 'BxS' (e.g. '16x128') into (batch, seq_len)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×,]\s*(\d+)\s*", str(text))
    if not match:
        raise ConfigError(f"shape {text!r} is not of the form BxS; write batch x sequence length, e.g. 16x128")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class LayerConfig:
    """One BERT-style layer: batch and seq_len vary per call, the rest fixes the compiled kernels."""

    batch: int = settings.DEFAULT_BATCH
    seq_len: int = settings.DEFAULT_SEQ_LEN
    heads: int = settings.DEFAULT_HEADS
    head_size: int = settings.DEFAULT_HEAD_SIZE
    ffn: int = settings.DEFAULT_FFN
    dtype: str = settings.DEFAULT_DTYPE
    eps: float = settings.DEFAULT_EPS
    max_seq_len: int = field(default=settings.MAX_SEQ_LEN, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        self._check_int("batch", self.batch, 1, settings.MAX_BATCH, "use a batch of at least 1 and split larger ones")
        self._check_int("seq_len", self.seq_len, 1, self.max_seq_len,
                        "shorten the input or truncate it to the model's maximum")
        if self.head_size not in settings.SUPPORTED_HEAD_SIZES:
            raise ConfigError(
                f"head_size {self.head_size} is not supported; the kernels serve head sizes "
                f"{', '.join(map(str, settings.SUPPORTED_HEAD_SIZES))}; pick a model with one of them")
        self._check_int("heads", self.heads, 1, 256, "use a model with 1 to 256 attention heads")
        self._check_int("ffn", self.ffn, 8, 65536, "use an intermediate size between 8 and 65536")
        if self.ffn % 8:
            raise ConfigError(f"ffn {self.ffn} is not a multiple of 8, which 16-byte vector loads need; "
                              f"pad the intermediate size to {self.ffn + 8 - self.ffn % 8}")
        if not (0.0 < float(self.eps) < 1.0):
            raise ConfigError(f"eps {self.eps} is outside (0, 1); LayerNorm eps is usually 1e-12 or 1e-5")

    @staticmethod
    def _check_int(name: str, value: object, low: int, high: int, fix: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} {value!r} is not an integer; {fix}")
        if not low <= value <= high:
            raise ConfigError(f"{name} {value} is outside the supported range {low} … {high}; {fix}")

    @classmethod
    def from_hidden(cls, hidden: int, heads: int, **kwargs) -> "LayerConfig":
        """Build from (hidden, heads) as models state them; hidden must equal heads × head_size."""
        if heads < 1 or hidden % heads:
            raise ConfigError(f"hidden {hidden} is not divisible by heads {heads}; hidden must equal "
                              f"heads × head_size, so choose a head count that divides {hidden}")
        return cls(heads=heads, head_size=hidden // heads, **kwargs)

    @property
    def hidden(self) -> int:
        return self.heads * self.head_size

    @property
    def tokens(self) -> int:
        """Rows of every [B·S, ·] matrix."""
        return self.batch * self.seq_len

    @property
    def element_bytes(self) -> int:
        return ELEMENT_BYTES[self.dtype]

    @property
    def shape_text(self) -> str:
        return f"{self.batch}x{self.seq_len}"

    def with_shape(self, batch: int, seq_len: int) -> "LayerConfig":
        """Same compiled kernels, another run-time shape."""
        return LayerConfig(batch, seq_len, self.heads, self.head_size, self.ffn, self.dtype, self.eps,
                           self.max_seq_len)

    def kernel_signature(self) -> dict:
        """What the compiled kernels depend on (batch and seq_len are run-time arguments)."""
        return {"hidden": self.hidden, "heads": self.heads, "head_size": self.head_size,
                "ffn": self.ffn, "dtype": self.dtype}

    def to_dict(self) -> dict:
        return asdict(self)
