"""GPU proof of export and patch: an exported module in a clean process, a patched 12-layer BertModel.

    PYTHONPATH=. python experiments/export_proof.py --out DIR [--mask M] [--shapes 1x128 16x128 64x512]

1. exports the plan, imports it in a fresh process without fusionsearch on the path, and compares
   FusedEncoderLayer.from_torch / from_hf with the fp32 layer (error ≤ 2× PyTorch's own fp16 error);
2. patches a 12-layer BERT-base BertModel (random weights, seed 0, padded batch) and compares its last hidden
   state with the unpatched fp16 model, both against the fp32 model;
3. times the encoder against HF eager, HF SDPA + CUDA graph and torch.compile at each shape.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bert_models import bert_inputs, make_bert, time_model  # noqa: E402

CLEAN_PROCESS_CHECK = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    import fused_bert
    assert "fusionsearch" not in sys.modules
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer
    torch.manual_seed(0)
    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())
    x = torch.randn(3, 97, 768, device="cuda")
    mask = torch.ones(3, 97, dtype=torch.long, device="cuda"); mask[1, 60:] = 0; mask[2, 90:] = 0
    nn_layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, dropout=0, activation="gelu",
                                                batch_first=True).cuda().eval()
    with torch.no_grad():
        ref = nn_layer(x, src_key_padding_mask=~mask.bool())
        low = nn_layer.half()(x.half(), src_key_padding_mask=~mask.bool())
    nn_layer.float()
    fused = fused_bert.FusedEncoderLayer.from_torch(nn_layer)
    out = fused(x.half(), mask)
    hf_layer = BertLayer(BertConfig()).cuda().eval()
    ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        hf_ref = hf_layer(x, ext)
        hf_ref = hf_ref[0] if isinstance(hf_ref, tuple) else hf_ref
        hf_low = hf_layer.half()(x.half(), ext.half().clamp_min(-65504))
        hf_low = hf_low[0] if isinstance(hf_low, tuple) else hf_low
    hf_layer.float()
    hf_out = fused_bert.FusedEncoderLayer.from_hf(hf_layer)(x.half(), mask)
    valid = mask.bool()
    result = {"from_torch": {"fused_rel": rel(out[valid], ref[valid]), "torch_fp16_rel": rel(low[valid], ref[valid])},
              "from_hf": {"fused_rel": rel(hf_out[valid], hf_ref[valid]), "torch_fp16_rel": rel(hf_low[valid], hf_ref[valid])},
              "describe": fused.describe()}
    print(json.dumps(result))
""")


def clean_process_check(module_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", CLEAN_PROCESS_CHECK, str(module_dir)], cwd=tempfile.gettempdir(),
                            env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit("clean-process check failed:\n" + result.stderr[-4000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mask", default=None, help="plan to export (default: attention kernel, 5 kernels)")
    parser.add_argument("--shapes", nargs="+", default=["1x128", "16x128", "64x512"])
    args = parser.parse_args()
    from fusionsearch.config import LayerConfig, parse_shape
    from fusionsearch.export import export_plan
    from fusionsearch.mask import decode
    from fusionsearch.patching import patch
    from fusionsearch.plan import Plan

    plan = decode(args.mask) if args.mask else Plan.from_cuts({2, 7, 10, 12}, attention=True)
    args.out.mkdir(parents=True, exist_ok=True)
    module_dir = Path(tempfile.mkdtemp(prefix="fs-export-"))
    major, minor = torch.cuda.get_device_capability()
    export_plan(plan, LayerConfig(), module_dir / "fused_bert.py", f"{major}{minor}")
    report = {"mask": plan.mask, "plan": plan.describe(), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "clean_process": clean_process_check(module_dir)}
    print(json.dumps(report["clean_process"], indent=1), flush=True)

    ref_model = make_bert(torch.float32)
    low_model = make_bert(torch.float16)
    fused_model = make_bert(torch.float16)
    patch_report = patch(fused_model, plan, dtype="fp16")
    report["patched_layers"] = len(patch_report.replaced)
    ids, mask = bert_inputs(4, 128)
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask).last_hidden_state
        low = low_model(ids, attention_mask=mask).last_hidden_state
        fused = fused_model(ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    def rel(a, b):
        return float((a[valid].float() - b[valid].float()).norm() / b[valid].float().norm())
    report["bert12"] = {"hf_fp16_vs_fp32": rel(low, ref), "patched_vs_fp32": rel(fused, ref),
                        "patched_vs_hf_fp16": rel(fused, low), "finite": bool(torch.isfinite(fused).all())}
    print(json.dumps(report["bert12"], indent=1), flush=True)

    eager_model = make_bert(torch.float16, attn="eager")
    compiled = torch.compile(low_model)
    timings = {}
    for shape in args.shapes:
        batch, seq = parse_shape(shape)
        ids, mask = bert_inputs(batch, seq, seed=1)
        def run(model):
            return lambda: model(ids, attention_mask=mask).last_hidden_state
        with torch.no_grad():
            timings[shape] = {
                "hf_eager": time_model(run(eager_model), graph=False),
                "hf_sdpa_graph": time_model(run(low_model), graph=True),
                "torch_compile_graph": time_model(run(compiled), graph=True),
                "fused_graph": time_model(run(fused_model), graph=True),
            }
        print(shape, {k: round(v["median"], 1) for k, v in timings[shape].items()}, flush=True)
    report["latency_us"] = timings
    (args.out / "export-proof.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
