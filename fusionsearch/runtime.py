"""Run any fusion plan: FusedEncoderLayer launches one generated kernel per segment in one C++ call."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .build import LibrarySpec, current_arch, library_spec, load_library
from .layout import LAYER_TENSORS, splitk_workspace, workspace_shape
from .config import LayerConfig
from .errors import ConfigError
from .plan import Plan, Segment
from .schedule import tensors_written
from .weights import TENSOR_NAMES, LayerWeights, torch_dtype


@dataclass
class KernelLibrary:
    """A loaded extension: its spec and the launch index of every segment it holds."""

    spec: LibrarySpec
    module: object

    @classmethod
    def get(cls, cfg: LayerConfig, segments: "tuple[Segment, ...] | None" = None) -> "KernelLibrary":
        """Build or load the kernels of `segments` (default: every segment) for cfg's kernel signature.

        Where this process already loaded the library of every segment for that signature, it serves any subset:
        its units are rendered the same way, and a plan's own library would cost a build (a minute with CUTLASS
        units) for kernels already in memory."""
        key = (tuple(sorted(cfg.kernel_signature().items())), current_arch())  # a spec's signature and arch
        if segments is not None and key in _FULL_LIBRARIES:
            return _FULL_LIBRARIES[key]
        spec = library_spec(cfg, segments, key[1])
        library = cls(spec, load_library(spec))
        if segments is None:
            _FULL_LIBRARIES[key] = library
        return library

    def index(self, segment: Segment) -> int:
        try:
            return self.spec.segment_names.index(segment.name)
        except ValueError:
            raise ConfigError(f"segment {segment.name} is not in library {self.spec.module_name}; build the "
                              "library with all segments or with this plan's segments") from None

    def run(self, kernel_ids: list[int], tensors: dict, batch: int, seq_len: int, eps: float, scale: float) -> None:
        """Launch kernels in order on the current stream; `tensors` maps LAYER_TENSORS names to tensors."""
        empty = _empty_like_any(tensors)
        self.module.run(kernel_ids, [tensors.get(name, empty) for name in LAYER_TENSORS], batch, seq_len, eps, scale)


# Libraries of every segment loaded in this process, by (kernel signature, arch).
_FULL_LIBRARIES: "dict[tuple, KernelLibrary]" = {}


def _empty_like_any(tensors: dict) -> torch.Tensor:
    sample = next(iter(tensors.values()))
    return torch.empty(0, device=sample.device)


def key_bias(attention_mask: "torch.Tensor | None") -> "torch.Tensor | None":
    """HF attention_mask [B, S] (1 = attend) → float32 additive bias: 0 or the lowest float32."""
    if attention_mask is None:
        return None
    lowest = torch.finfo(torch.float32).min
    return torch.where(attention_mask.to(torch.bool), 0.0, lowest).to(torch.float32).contiguous()


def attend_mask(attention_mask: "torch.Tensor | None") -> "torch.Tensor | None":
    """Any Hugging Face mask form → [B, S] with 1 = attend: the 2-D tokenizer mask, or a 4-D extended mask
    ([B, 1, 1 or S, S], boolean True = attend or additive 0 / large negative) as encoder layers receive it."""
    if attention_mask is None or attention_mask.dim() == 2:
        return attention_mask
    if attention_mask.dim() != 4:
        raise ConfigError(f"attention_mask has {attention_mask.dim()} dimensions; give [batch, seq_len] "
                          "(1 = attend) or a 4-D extended mask [batch, 1, 1 or seq_len, seq_len]")
    keys = attention_mask[:, 0, 0, :]  # key padding is the same for every query row
    if keys.dtype == torch.bool:
        return keys
    return keys > torch.finfo(keys.dtype).min / 2


class FusedEncoderLayer(nn.Module):
    """A post-LayerNorm BERT layer that runs `plan` with generated CUDA kernels (B and S chosen per call)."""

    def __init__(self, plan: Plan, weights: LayerWeights, cfg: LayerConfig,
                 library: KernelLibrary | None = None, cuda_graphs: bool = False):
        super().__init__()
        if not torch.cuda.is_available():
            raise ConfigError("FusedEncoderLayer needs a CUDA GPU and none is visible; run on a GPU machine")
        weights.check(cfg)
        self.plan, self.cfg = plan, cfg
        self.dtype = torch_dtype(cfg.dtype)
        self.library = library or KernelLibrary.get(cfg)
        self.kernel_ids = [self.library.index(seg) for seg in plan.segments]
        self._written = tensors_written(plan.segments)
        device = torch.device("cuda", torch.cuda.current_device())
        params = weights.to(device=device, dtype=self.dtype)
        for name in TENSOR_NAMES:
            self.register_buffer(name, params.tensors()[name].contiguous(), persistent=True)
        self.cuda_graphs = cuda_graphs
        self._workspaces: dict[tuple[int, int], dict] = {}
        self._splitk = splitk_workspace(device)  # shared by every shape; one stream at a time
        self._graphs: dict[tuple, tuple] = {}

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer, plan: Plan, dtype: str = "fp16", **kwargs):
        weights = LayerWeights.from_torch(layer)
        cfg = weights.config_for(1, 1, layer.self_attn.num_heads, dtype=dtype)
        return cls(plan, weights, cfg, **kwargs)

    @classmethod
    def from_hf(cls, bert_layer, plan: Plan, dtype: str = "fp16", **kwargs):
        weights = LayerWeights.from_hf(bert_layer)
        cfg = weights.config_for(1, 1, bert_layer.attention.self.num_attention_heads, dtype=dtype)
        return cls(plan, weights, cfg, **kwargs)

    def set_plan(self, plan: Plan) -> None:
        """Switch to another plan of the same library (sweeps reuse one layer and its buffers)."""
        self.plan = plan
        self.kernel_ids = [self.library.index(seg) for seg in plan.segments]
        self._written = tensors_written(plan.segments)
        for (batch, seq_len), buffers in self._workspaces.items():
            cfg = self.cfg.with_shape(batch, seq_len)
            for name in self._written - set(buffers) - {"out"}:
                buffers[name] = torch.empty(workspace_shape(name, cfg), device=self.w_qkv.device, dtype=self.dtype)
        self._graphs.clear()

    def workspace(self, batch: int, seq_len: int) -> dict:
        """Intermediate buffers of this plan for one shape, allocated once and reused."""
        key = (batch, seq_len)
        if key not in self._workspaces:
            cfg = self.cfg.with_shape(batch, seq_len)
            device = self.w_qkv.device
            self._workspaces[key] = {name: torch.empty(workspace_shape(name, cfg), device=device, dtype=self.dtype)
                                     for name in self._written if name != "out"}
        return self._workspaces[key]

    def _check_inputs(self, x: torch.Tensor, attention_mask: "torch.Tensor | None") -> tuple[int, int]:
        if x.device.type != "cuda":
            raise ConfigError(f"hidden_states is on {x.device}; the fused layer runs on CUDA; call .cuda() first")
        if x.device != self.w_qkv.device:
            raise ConfigError(f"hidden_states is on {x.device} but the layer's weights are on {self.w_qkv.device}; "
                              "move one of them")
        if x.dtype != self.dtype:
            raise ConfigError(f"hidden_states has dtype {x.dtype} but the layer was built for {self.dtype}; "
                              f"cast with .to({self.dtype}) or build the layer for {x.dtype}")
        if x.dim() != 3 or x.shape[2] != self.cfg.hidden:
            raise ConfigError(f"hidden_states has shape {list(x.shape)}; it must be [batch, seq_len, "
                              f"{self.cfg.hidden}]")
        batch, seq_len = int(x.shape[0]), int(x.shape[1])
        self.cfg.with_shape(batch, seq_len)  # validates batch and seq_len limits with a clear message
        if not x.is_contiguous():
            raise ConfigError("hidden_states is not contiguous; call .contiguous() first")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, seq_len):
                raise ConfigError(f"attention_mask has shape {list(attention_mask.shape)}; it must be "
                                  f"[{batch}, {seq_len}] with 1 = attend and 0 = padding")
            if attention_mask.device != x.device:
                raise ConfigError(f"attention_mask is on {attention_mask.device}, hidden_states on {x.device}; "
                                  "move the mask to the same device")
        return batch, seq_len

    def _check_bias(self, x: torch.Tensor, mask_bias: torch.Tensor) -> None:
        batch, seq_len = int(x.shape[0]), int(x.shape[1])
        if tuple(mask_bias.shape) != (batch, seq_len) or mask_bias.dtype != torch.float32:
            raise ConfigError(f"mask_bias is {mask_bias.dtype} {list(mask_bias.shape)}; it must be float32 "
                              f"[{batch}, {seq_len}] as fusionsearch.runtime.key_bias(attention_mask) makes it")
        if mask_bias.device != x.device or not mask_bias.is_contiguous():
            raise ConfigError(f"mask_bias is on {mask_bias.device} (contiguous: {mask_bias.is_contiguous()}); it "
                              f"must be a contiguous tensor on {x.device}, as key_bias makes it")

    def tensors_for(self, x: torch.Tensor, bias: "torch.Tensor | None", out: torch.Tensor) -> dict:
        batch, seq_len = int(x.shape[0]), int(x.shape[1])
        tensors = dict(self.workspace(batch, seq_len))
        tensors.update(self._splitk)
        tensors.update({name: getattr(self, name) for name in TENSOR_NAMES})
        tensors["x"], tensors["out"] = x, out
        if bias is not None:
            tensors["key_bias"] = bias
        return tensors

    def poison_workspace(self, batch: int, seq_len: int) -> None:
        """Fill every intermediate buffer with NaN, so a read of something no kernel wrote shows up."""
        for tensor in self.workspace(batch, seq_len).values():
            tensor.fill_(float("nan"))

    def run_into(self, x: torch.Tensor, attention_mask: "torch.Tensor | None", out: torch.Tensor) -> torch.Tensor:
        """forward() writing into a given output buffer (verification poisons it first)."""
        self._check_inputs(x, attention_mask)
        return self._launch(x, key_bias(attention_mask), out)

    def _launch(self, x: torch.Tensor, bias: "torch.Tensor | None", out: "torch.Tensor | None" = None) -> torch.Tensor:
        batch, seq_len = int(x.shape[0]), int(x.shape[1])
        out = torch.empty_like(x) if out is None else out
        tensors = self.tensors_for(x, bias, out)
        self.library.run(self.kernel_ids, tensors, batch, seq_len, self.cfg.eps, 1.0 / math.sqrt(self.cfg.head_size))
        return out

    def forward(self, hidden_states: torch.Tensor, attention_mask: "torch.Tensor | None" = None, *,
                mask_bias: "torch.Tensor | None" = None) -> torch.Tensor:
        """hidden_states [B, S, H] in the layer's dtype; attention_mask [B, S] with 1 = attend (HF) or None. Or,
        instead of the mask, mask_bias: the float32 key bias key_bias(attention_mask) makes, for callers that hand
        one mask to many layers and convert it once (patch() does)."""
        self._check_inputs(hidden_states, attention_mask)
        if mask_bias is not None:
            if attention_mask is not None:
                raise ConfigError("give attention_mask or mask_bias, not both")
            self._check_bias(hidden_states, mask_bias)
        bias = mask_bias if mask_bias is not None else key_bias(attention_mask)
        if not self.cuda_graphs or torch.cuda.is_current_stream_capturing():
            return self._launch(hidden_states, bias)
        return self._replay(hidden_states, bias)

    def _replay(self, x: torch.Tensor, bias: "torch.Tensor | None") -> torch.Tensor:
        """Capture one CUDA graph per (shape, has-mask) and replay it on copies of the inputs."""
        key = (tuple(x.shape), bias is not None)
        if key not in self._graphs:
            static_x = x.clone()
            static_bias = None if bias is None else bias.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._launch(static_x, static_bias)  # warm-up outside the capture (first launch sets attributes)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._launch(static_x, static_bias)
            self._graphs[key] = (graph, static_x, static_bias, static_out)
        graph, static_x, static_bias, static_out = self._graphs[key]
        static_x.copy_(x)
        if static_bias is not None:
            static_bias.copy_(bias)
        graph.replay()
        return static_out.clone()  # the static buffer is overwritten by the next replay

    def describe(self) -> str:
        return f"FusedEncoderLayer mask {self.plan.mask} ({self.plan.kernel_count} kernels): {self.plan.describe()}"


def run_segment(library: KernelLibrary, segment: Segment, tensors: dict, cfg: LayerConfig) -> None:
    """Launch one segment kernel on prepared buffers (for verification and per-segment timing)."""
    library.run([library.index(segment)], tensors, cfg.batch, cfg.seq_len, cfg.eps, 1.0 / math.sqrt(cfg.head_size))

