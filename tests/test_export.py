"""Exported modules and patch(): import without fusionsearch, clear errors without CUDA, reports on CPU models."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fusionsearch.cli import main
from fusionsearch.config import LayerConfig
from fusionsearch.export import export_plan
from fusionsearch.mask import decode
from fusionsearch.patching import patch
from fusionsearch.schedule import uses_library_gemm

MASK = 40636  # [0–1] [2–5 attn] [6] [7] [8] [9–12] [13–14]


@pytest.fixture()
def exported(tmp_path):
    return export_plan(decode(MASK), LayerConfig(), tmp_path / "bert_fused.py", "90")


def test_exported_module_embeds_only_the_plans_kernels(exported):
    text = exported.read_text()
    plan = decode(MASK)
    for seg in plan.segments:
        if not uses_library_gemm(seg):
            assert f"fs_{seg.name}_fp16_sm90_" in text
    assert "seg_07_07_cublas" in text
    assert "fs_seg_00_14_fp16" not in text
    assert "fs_common.cuh" in text and "def from_hf" in text


def test_exported_module_imports_without_fusionsearch_and_refuses_to_run_without_cuda(exported, tmp_path):
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(exported.parent)!r})\n"
        "import bert_fused\n"
        "assert 'fusionsearch' not in sys.modules\n"
        "print(bert_fused.PLAN['mask'], bert_fused.CONFIG['dtype'], len(bert_fused.PLAN['segments']))\n"
        "layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, dropout=0, activation='gelu', batch_first=True)\n"
        "try:\n"
        "    bert_fused.FusedEncoderLayer.from_torch(layer)\n"
        "except RuntimeError as error:\n"
        "    print('refused:', error)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FUSIONSEARCH_CACHE_DIR"] = str(tmp_path / "cache")
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{MASK} fp16 7"
    assert "refused:" in result.stdout and "CUDA GPU" in result.stdout


def test_export_cli_writes_a_module_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "fused_layer.py"
    assert main(["export", "--mask", "0x9abc", "-o", str(out)]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out
    assert main(["export", "--mask", "70000", "-o", str(out)]) == 2
    assert main(["export", "--mask", "1", "-o", str(tmp_path / "not-a-name.py")]) == 2
    assert main(["export", "--from-search", str(tmp_path), "-o", str(out)]) == 2
    assert "best.json" in capsys.readouterr().err


def test_export_takes_the_best_plan_of_a_replayed_search(tmp_path, capsys):
    from pathlib import Path
    sweep = Path(__file__).parent / "fixtures" / "synthetic_sweep_8x128.jsonl.gz"
    out = tmp_path / "search"
    assert main(["search", "--shape", "8x128", "--replay", str(sweep), "--budget", "40", "--out", str(out)]) == 0
    best = json.loads((out / "best.json").read_text())["best"]["mask"]
    module = tmp_path / "searched.py"
    assert main(["export", "--from-search", str(out), "--shape", "8x128", "-o", str(module)]) == 0
    assert f"fusion plan mask {best}" in module.read_text()


def _bert(layers=2, act="gelu"):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=128, num_attention_heads=2, intermediate_size=512,
                                     num_hidden_layers=layers, hidden_act=act)
    return transformers.BertModel(config).eval()


def test_patch_on_a_cpu_model_reports_what_it_would_replace():
    model = _bert()
    with pytest.warns(UserWarning, match="not on a CUDA GPU"):
        report = patch(model, MASK)
    assert report.replaced == ["encoder.layer.0", "encoder.layer.1"] and not report.applied
    assert type(model.encoder.layer[0]).__name__ == "BertLayer"  # nothing swapped


def test_patch_leaves_unsupported_layers_alone_with_a_warning_naming_them():
    encoder = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(64, 2, 128, activation="relu", batch_first=True), 2,
        enable_nested_tensor=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = patch(encoder, MASK, dry_run=True)
    assert report.replaced == [] and set(report.skipped) == {"layers.0", "layers.1"}
    assert any("layers.0" in str(w.message) and "GELU" in str(w.message) for w in caught)
    pre_ln = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(64, 2, 128, activation="gelu", batch_first=True, norm_first=True), 1,
        enable_nested_tensor=False)
    with pytest.warns(UserWarning, match="norm_first"):
        assert patch(pre_ln, MASK, dry_run=True).skipped
