"""The flash-attention segment (operators 2–5) against PyTorch SDPA on [B, 12, S, 64], same process, same inputs.

    PYTHONPATH=. python experiments/attention_bench.py [--seqs 128 256 512 1024] [--tokens 32768] [--out F.json]

Each row: our segment kernel alone (reading Q/K/V heads, key-padding bias, writing context heads), SDPA with
the same additive key mask (what a padded BERT batch runs), and SDPA without a mask (its flash backend). All
three are checked against an fp32 softmax(QKᵀ)V before timing; timings are CUDA events over graph replays. Each
row also names the GPU kernels each of them launched, so the SDPA backend behind a figure is on record.
For a profiler, --only runs one of the three and names no kernels (ncu -k 'regex:fs_seg|wgmma_attention' for
ours: on sm_90 from 128 keys the segment launches fs::sm90::wgmma_attention_kernel; the SDPA kernel's name
from an earlier run for SDPA).
"""
from __future__ import annotations

import argparse
import json
import math

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", nargs="+", type=int, default=[128, 256, 512, 1024])
    parser.add_argument("--tokens", type=int, default=32768, help="batch × sequence length per row")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--only", choices=["ours", "sdpa_mask", "sdpa_flash_nomask"], default=None,
                        help="check and time only this one (for profilers)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from fusionsearch.config import LayerConfig
    from fusionsearch.plan import Plan, Segment
    from fusionsearch.runtime import FusedEncoderLayer, KernelLibrary, key_bias
    from fusionsearch.timing import launched_kernels, time_cuda_graph
    from fusionsearch.verify import random_inputs
    from fusionsearch.weights import LayerWeights, torch_dtype

    attention = Segment(2, 5, True)
    # A plan holding the attention segment; its other kernels only fill the buffers the segment reads.
    plan = Plan.from_cuts(set(range(1, 15)) - {3, 4, 5}, attention=True)
    dtype = torch_dtype(args.dtype)
    rows = []
    for seq in args.seqs:
        batch = max(1, args.tokens // seq)
        cfg = LayerConfig(batch=batch, seq_len=seq, dtype=args.dtype)
        library = KernelLibrary.get(cfg, plan.segments)
        weights = LayerWeights.random(cfg, seed=0, device="cuda")
        layer = FusedEncoderLayer(plan, weights, cfg, library=library)
        x, mask = random_inputs(cfg, seed=1)
        x = x.to(dtype)
        bias = key_bias(mask)
        tensors = layer.tensors_for(x, bias, torch.empty_like(x))
        layer.run_into(x, mask, torch.empty_like(x))  # fills qkv_heads
        kernel = [library.index(attention)]
        scale = 1.0 / math.sqrt(cfg.head_size)

        def ours():
            library.run(kernel, tensors, batch, seq, cfg.eps, scale)

        qkv = tensors["qkv_heads"].view(3, batch, cfg.heads, seq, cfg.head_size)
        q, k, v = qkv[0], qkv[1], qkv[2]
        additive = bias.view(batch, 1, 1, seq).clamp(min=torch.finfo(dtype).min).to(dtype)
        ref = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale + bias.view(batch, 1, 1, seq).float(),
                            dim=-1) @ v.float()
        tensors["ctx_heads"].fill_(float("nan"))  # the layer run above wrote it with this very kernel
        ours()
        ctx = tensors["ctx_heads"].view(batch, cfg.heads, seq, cfg.head_size)
        row = {"batch": batch, "seq": seq, "dtype": args.dtype,
               "flops": 4.0 * batch * cfg.heads * seq * seq * cfg.head_size}
        row["ours_rel_err"] = float((ctx.float() - ref).norm() / ref.norm())
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if args.only in (None, "sdpa_mask"):
            out = sdpa(q, k, v, attn_mask=additive)
            row["sdpa_mask_rel_err"] = float((out.float() - ref).norm() / ref.norm())
        runs = {"ours": ours, "sdpa_mask": lambda: sdpa(q, k, v, attn_mask=additive),
                "sdpa_flash_nomask": lambda: sdpa(q, k, v)}
        row["kernels"] = {}
        for name, fn in runs.items():
            if args.only in (None, name):
                row[name] = time_cuda_graph(fn)
                row[name]["tflops"] = row["flops"] / (row[name]["median"] * 1e-6) / 1e12
                if args.only is None:  # under ncu (--only), torch's profiler would compete for CUPTI
                    row["kernels"][name] = launched_kernels(fn)
        rows.append(row)
        timed = "; ".join(f"{name} {row[name]['median']:.1f} µs ({row[name]['tflops']:.0f} TFLOP/s)"
                          for name in runs if name in row)
        print(f"B={batch} S={seq}: {timed}; our error {row['ours_rel_err']:.1e}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
