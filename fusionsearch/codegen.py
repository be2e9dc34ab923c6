"""Segment → CUDA source: render the Jinja templates into one translation unit per segment kernel."""
from __future__ import annotations

import hashlib
from functools import cache

import jinja2

from . import __version__
from .build import GeneratedUnit
from .config import LayerConfig
from .errors import ConfigError
from .layout import INPUT_TENSORS, LAYER_TENSORS
from .plan import Segment
from .resources import templates_dir
from .schedule import (blocks_per_sm, few_item_stages, hopper_attention, hopper_gemm, prefetched_weights,
                       resident_weight_ops, resident_weight_stages, stages_of, uses_library_gemm)

CTYPES = {"fp16": "half", "bf16": "__nv_bfloat16"}


@cache
def environment() -> jinja2.Environment:
    """The one template environment: files under templates/, undefined names are errors."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["cbool"] = lambda value: "true" if value else "false"
    return env


def _dims(cfg: LayerConfig) -> dict:
    return {"hidden": cfg.hidden, "heads": cfg.heads, "d": cfg.head_size, "ffn": cfg.ffn}


def _ctype(cfg: LayerConfig) -> str:
    if cfg.dtype not in CTYPES:
        raise ConfigError(f"dtype {cfg.dtype} has no generated kernels; use one of {', '.join(CTYPES)}")
    return CTYPES[cfg.dtype]


def render_segment(segment: Segment, cfg: LayerConfig, arch: str) -> GeneratedUnit:
    """Render the kernel of one segment for cfg's kernel signature and a compute capability like '90'."""
    env = environment()
    kernels = [_kernel(env, stages_of(segment), "", "the segment")]
    few = few_item_stages(segment)
    if few:
        kernels.append(_kernel(env, few, "_few_items", "the same stages in smaller items, for small batches"))
    hopper_arch = arch.rstrip("af") == "90"
    resident = resident_weight_stages(segment) if hopper_arch else None
    if resident:
        kernels.append(_kernel(env, resident, "_resident", "the same stages with resident weights, for few rows"))
    # On Hopper a GEMM + epilogue segment also carries the CUTLASS path it takes at many rows, and the attention
    # stage alone its warpgroup-MMA kernel for long sequences.
    hopper = hopper_gemm(segment) if hopper_arch else None
    attention = hopper_attention(segment) if hopper_arch and cfg.head_size == 64 else None
    context = {"version": __version__, "segment": segment, "dtype": cfg.dtype, "ctype": _ctype(cfg),
               "arch_label": f"sm_{arch}", "dims": _dims(cfg), "kernels": kernels, "hopper_gemm": hopper,
               "hopper_attention": attention, "prefetch_ops": prefetched_weights(segment)}
    template = env.get_template("segment.cu.j2")
    # The name carries a hash of the source it names, so different code never shares a symbol.
    draft = template.render(**context, kernel_name="KERNEL", source_hash="-")
    digest = hashlib.sha256(draft.encode()).hexdigest()
    kernel_name = f"fs_{segment.name}_{cfg.dtype}_sm{arch}_{digest[:8]}"
    source = template.render(**context, kernel_name=kernel_name, source_hash=digest[:16])
    return GeneratedUnit(f"{kernel_name}.cu", kernel_name, source)


def _kernel(env: jinja2.Environment, stages, suffix: str, summary: str) -> dict:
    """One __global__ kernel of a segment unit: its stages rendered through their stage templates."""
    rendered = []
    for stage in stages:
        macros = env.get_template(f"stage_{stage.kind}.cu.j2").module
        rendered.append({"stage": stage, "call": str(macros.call(stage)).strip(),
                         "smem": str(macros.smem(stage)).strip(), "work": str(macros.work(stage)).strip()})
    return {"suffix": suffix, "summary": summary, "stages": rendered, "blocks_per_sm": blocks_per_sm(tuple(stages)),
            "resident_ops": resident_weight_ops(tuple(stages))}


def render_binding(segments, kernel_of: dict[str, str], cfg: LayerConfig, arch: str,
                   library_name: str) -> GeneratedUnit:
    """Render the single torch binding unit: entry i launches segment i, through its generated kernel
    (`kernel_of[segment.name]`) or, for a lone GEMM, through cuBLAS via ATen."""
    entries = [{"segment": seg.name, "kernel": kernel_of.get(seg.name), "library_op": seg.first}
               for seg in segments]
    for entry in entries:
        if entry["kernel"] is None and not uses_library_gemm(next(s for s in segments if s.name == entry["segment"])):
            raise ValueError(f"segment {entry['segment']} has neither a generated kernel nor a library GEMM")
    source = environment().get_template("binding.cpp.j2").render(
        version=__version__, library_name=library_name, entries=entries,
        kernels=[e["kernel"] for e in entries if e["kernel"]], dtype=cfg.dtype,
        arch_label=f"sm_{arch}", tensor_names=LAYER_TENSORS, input_names=INPUT_TENSORS)
    return GeneratedUnit(f"{library_name}_binding.cpp", "", source)
