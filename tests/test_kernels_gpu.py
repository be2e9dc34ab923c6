"""Generated kernels on a real GPU: every segment, random whole plans, structure (launch count, tensor cores)."""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fusionsearch.config import LayerConfig
from fusionsearch.errors import ConfigError
from fusionsearch.plan import Plan, Segment, all_segments, enumerate_plans
from fusionsearch.schedule import hopper_gemm, stages_of, uses_library_gemm
from fusionsearch.timing import run_and_list_kernels
from gpu_support import library_for

pytestmark = pytest.mark.gpu
DTYPES = ("fp16", "bf16")
# 1x32 and 2x32: resident-weight kernels (up to fs::kResidentMaxRows on sm_90); 4x128: the most rows that use
# split-K.
PLAN_SHAPES = ((1, 32), (2, 32), (3, 97), (4, 128), (16, 128), (8, 512))


def _weights(cfg):
    from fusionsearch.weights import LayerWeights
    return LayerWeights.random(cfg, seed=1234)


def _random_plans(count: int, seed: int) -> list[Plan]:
    plans = list(enumerate_plans())
    rng = random.Random(seed)
    picked = rng.sample(plans, count - 4)
    # Always include the extremes (fully unfused; everything in one kernel with the attention kernel) and the plans
    # with all three Hopper GEMM + epilogue segments, with the QKV split apart and inside the attention kernel.
    return [Plan.from_cuts(set(range(1, 15))), Plan.from_cuts(set(), attention=True),
            Plan.from_cuts({1, 2, 7, 9, 10, 12, 14}, attention=True),
            Plan.from_cuts({1, 7, 9, 10, 12, 14}, attention=True), *picked]


# 3×97: 291 rows, split-K over 64×128 tiles; 2×45: 90 rows, the few-row 32×64 tiles with a partial row tile;
# 1×45: on sm_90 the resident-weight kernels with a partial row group.
@pytest.mark.parametrize("dtype,batch,seq", [("fp16", 3, 97), ("bf16", 3, 97), ("fp16", 2, 45), ("bf16", 1, 45)])
def test_every_segment_kernel_matches_reference_with_padding(dtype, batch, seq):
    from fusionsearch.verify import verify_segment

    cfg = LayerConfig(batch=batch, seq_len=seq, dtype=dtype)
    library = library_for(cfg)
    weights = _weights(cfg)
    failures = []
    for index, segment in enumerate(all_segments()):
        budget = verify_segment(library, segment, weights, cfg, seed=index)
        if not budget.ok:
            failures.append(f"{segment.name}: {budget.reason}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PLAN_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_random_plans_match_reference_end_to_end(dtype, shape):
    from fusionsearch.runtime import FusedEncoderLayer
    from fusionsearch.verify import verify_plan

    cfg = LayerConfig(batch=shape[0], seq_len=shape[1], dtype=dtype)
    library = library_for(cfg)
    weights = _weights(cfg)
    count = 64 if dtype == "fp16" else 16
    failures = []
    for index, plan in enumerate(_random_plans(count, seed=hash(shape) & 0xFFFF)):
        layer = FusedEncoderLayer(plan, weights, cfg, library=library)
        budget = verify_plan(layer, weights, cfg, seed=index)
        if not budget.ok:
            failures.append(f"mask {plan.mask} {plan.describe()}: {budget.reason}")
    assert not failures, "\n".join(failures)


# Widths whose 8-element chunks do not deal evenly over a warp's lanes: 384 (48 chunks: lanes hold two or one) and
# 128 (16 chunks: half the lanes hold none), where a LayerNorm pass pools unequal counts.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [6, 2])
def test_layernorm_passes_match_reference_where_chunks_deal_unevenly(dtype, heads):
    from fusionsearch.verify import verify_segment

    cfg = LayerConfig.from_hidden(64 * heads, heads, batch=2, seq_len=45, dtype=dtype, ffn=256 * heads)
    segments = (Segment(8, 9), Segment(9, 9), Segment(13, 14), Segment(14, 14))
    library, weights = library_for(cfg, segments), _weights(cfg)
    failures = [f"{segment.name}: {budget.reason}" for index, segment in enumerate(segments)
                if not (budget := verify_segment(library, segment, weights, cfg, seed=index)).ok]
    assert not failures, "\n".join(failures)


# Widths the resident-weight kernels split differently from BERT-base: at 192 wide (ffn 768) the output GEMM's K in
# two splits and FFN2's in one, each still left to the LayerNorm after it; an intermediate size of 1000, which FFN2
# cannot split into 32-deep chunks, so the segments holding FFN2 fall back to their tiled kernels. (96 wide, where
# the output GEMM's K is one split too, is compiled by test_codegen.)
@pytest.mark.parametrize("heads,head_size,ffn,ffn2_splits", [(3, 64, 768, True), (12, 64, 1000, False)])
def test_resident_kernels_match_reference_where_widths_split_k_unevenly(heads, head_size, ffn, ffn2_splits):
    import torch
    from fusionsearch.verify import verify_segment

    cfg = LayerConfig(batch=1, seq_len=32, heads=heads, head_size=head_size, ffn=ffn, dtype="fp16")
    segments = (Segment(0, 14, True), Segment(6, 9), Segment(10, 14))
    library, weights = library_for(cfg, segments), _weights(cfg)
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    failures = []
    for index, segment in enumerate(segments):
        budget, names = run_and_list_kernels(lambda: verify_segment(library, segment, weights, cfg, seed=index))
        ran_resident = any(n.startswith(f"fs_{segment.name}_") and n.endswith("_resident") for n in names)
        expect_resident = sm90 and (ffn2_splits or segment.last < 12)
        if not budget.ok or ran_resident != expect_resident:
            failures.append(f"{segment.name}: {budget.reason or 'ok'}, resident kernel ran: {ran_resident}")
    assert not failures, "\n".join(failures)


HOPPER_SEGMENTS = (Segment(7, 8), Segment(10, 11), Segment(12, 13))


def _is_cutlass_kernel(name: str) -> bool:
    return "cutlass" in name and "device_kernel" in name


@pytest.mark.parametrize("dtype", DTYPES)
def test_hopper_gemm_segments_match_reference_and_switch_to_cutlass_above_64_rows(dtype):
    import torch
    from fusionsearch.verify import verify_segment

    sm90 = torch.cuda.get_device_capability() == (9, 0)
    failures = []
    # 45 rows: below the switch (the resident-weight kernel); then one shape per configuration tier
    # (fs_gemm_sm90.cuh), the middle two and the last with ragged tiles: 512 rows, 1055 (below kFewRows), 2991
    # (below kManyRows), 4096, 8483 (from kPingpongRows: FFN1's pingpong tiles)
    for batch, seq in ((1, 45), (4, 128), (5, 211), (3, 997), (8, 512), (17, 499)):
        cfg = LayerConfig(batch=batch, seq_len=seq, dtype=dtype)
        library, weights = library_for(cfg), _weights(cfg)
        for segment in HOPPER_SEGMENTS:
            budget, names = run_and_list_kernels(
                lambda: verify_segment(library, segment, weights, cfg, seed=batch))
            cutlass = any(_is_cutlass_kernel(n) for n in names)
            generated = any(n.startswith(f"fs_{segment.name}_") for n in names)
            expect_cutlass = sm90 and batch * seq >= 65  # fs::sm90::kMinRows
            if not budget.ok or cutlass != expect_cutlass or generated == expect_cutlass:
                failures.append(f"{segment.name} at {batch}x{seq}: {budget.reason or 'ok'}, CUTLASS ran: {cutlass}, "
                                f"generated kernel ran: {generated}")
    assert not failures, "\n".join(failures)


# The attention stage alone in its kernel, in each of its forms: reading split heads or the QKV GEMM output, storing
# heads or merged rows.
ATTENTION_SEGMENTS = (Segment(2, 5, True), Segment(1, 5, True), Segment(2, 6, True), Segment(1, 6, True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_hopper_attention_segments_match_reference_and_switch_to_warpgroup_mma_from_128_keys(dtype):
    import torch
    from fusionsearch.verify import verify_segment

    sm90 = torch.cuda.get_device_capability() == (9, 0)
    failures = []
    # 127 keys: below the switch (the mma.sync kernel); 128 and 255: 64-key tiles, ragged at 255; 256 exactly two
    # tiles of queries and keys; ragged tiles of both at 2×499 and 3×300; 1024 keys: eight key tiles. 24×200,
    # 16×300 and 6×1000 have more items of 64 query rows than an H100 holds blocks at once (64- and 128-key tiles).
    for batch, seq in ((2, 127), (2, 128), (2, 255), (2, 256), (2, 499), (3, 300), (1, 1024), (24, 200), (16, 300),
                       (6, 1000)):
        cfg = LayerConfig(batch=batch, seq_len=seq, dtype=dtype)
        library, weights = library_for(cfg), _weights(cfg)
        for segment in ATTENTION_SEGMENTS:
            budget, names = run_and_list_kernels(
                lambda: verify_segment(library, segment, weights, cfg, seed=batch + seq))
            wgmma = any("wgmma_attention_kernel" in n for n in names)
            expect_wgmma = sm90 and seq >= 128  # fs::sm90::kAttentionMinSeq
            if not budget.ok or wgmma != expect_wgmma:
                failures.append(f"{segment.name} at {batch}x{seq}: {budget.reason or 'ok'}, warpgroup-MMA kernel ran: "
                                f"{wgmma}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("seq", [40, 300, 600])  # 600: five key tiles, the key scan runs; no open key: every tile
def test_fully_masked_entry_matches_unfused_attention(seq):
    import torch
    from fusionsearch.runtime import FusedEncoderLayer

    cfg = LayerConfig(batch=2, seq_len=seq)
    weights = _weights(cfg)
    cuts = set(range(1, 15)) - {3, 4, 5}
    fused = FusedEncoderLayer(Plan.from_cuts(cuts, attention=True), weights, cfg, library=library_for(cfg))
    unfused = FusedEncoderLayer(Plan.from_cuts(cuts), weights, cfg, library=library_for(cfg))
    x = torch.randn(2, seq, cfg.hidden, device="cuda", dtype=torch.float16)
    mask = torch.ones(2, seq, dtype=torch.int64, device="cuda")
    mask[1] = 0
    out = fused(x, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, unfused(x, mask), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("attention", [False, True])
def test_fully_masked_batch_entry_gives_no_nan(attention):
    import torch
    from fusionsearch.runtime import FusedEncoderLayer

    cfg = LayerConfig(batch=2, seq_len=40)
    weights = _weights(cfg)
    plan = Plan.from_cuts(set(), attention=attention)
    layer = FusedEncoderLayer(plan, weights, cfg, library=library_for(cfg))
    x = torch.randn(2, 40, cfg.hidden, device="cuda", dtype=torch.float16)
    mask = torch.ones(2, 40, dtype=torch.int64, device="cuda")
    mask[1] = 0
    out = layer(x, mask)
    assert torch.isfinite(out).all()


def test_plan_of_k_segments_launches_k_kernels():
    import torch
    from fusionsearch.runtime import FusedEncoderLayer

    cfg = LayerConfig(batch=2, seq_len=64)
    weights = _weights(cfg)
    library = library_for(cfg)
    x = torch.randn(2, 64, cfg.hidden, device="cuda", dtype=torch.float16)
    # 128 rows: on sm_90 a GEMM + epilogue segment launches its CUTLASS kernel instead (from fs::sm90::kMinRows)
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    for plan in _random_plans(6, seed=7):
        layer = FusedEncoderLayer(plan, weights, cfg, library=library)
        layer(x)  # first call sets kernel attributes
        torch.cuda.synchronize()
        _, kernels = run_and_list_kernels(lambda: layer(x))
        launched = [n for n in kernels if n.startswith("fs_seg_")]
        cutlass = [n for n in kernels if _is_cutlass_kernel(n)]
        generated = [s for s in plan.segments if not uses_library_gemm(s)]
        on_cutlass = [s for s in generated if sm90 and hopper_gemm(s)]
        own = [s for s in generated if s not in on_cutlass]
        assert len(launched) == len(own), (plan.describe(), launched)
        assert sorted(n.split("_fp16")[0][3:] for n in launched) == sorted(s.name for s in own)
        assert len(cutlass) == len(on_cutlass), (plan.describe(), cutlass)


# Split-K over 64×128 tiles, over 32×64 tiles, and across resident-weight blocks (sm_90).
@pytest.mark.parametrize("batch,seq", [(4, 77), (2, 45), (1, 45)])
def test_cuda_graph_replay_matches_direct_launch(batch, seq):
    import torch
    from fusionsearch.runtime import FusedEncoderLayer

    cfg = LayerConfig(batch=batch, seq_len=seq)
    weights = _weights(cfg)
    plan = Plan.from_cuts({1, 7, 10}, attention=True)
    direct = FusedEncoderLayer(plan, weights, cfg, library=library_for(cfg))
    graphed = FusedEncoderLayer(plan, weights, cfg, library=library_for(cfg), cuda_graphs=True)
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(batch, seq, cfg.hidden, device="cuda", dtype=torch.float16)
        mask = (torch.rand(batch, seq, device="cuda") > 0.2).long()
        mask[:, 0] = 1
        torch.testing.assert_close(graphed(x, mask), direct(x, mask), rtol=0, atol=0)


def test_bad_inputs_are_rejected_with_clear_errors():
    import torch
    from fusionsearch.runtime import FusedEncoderLayer

    cfg = LayerConfig(batch=2, seq_len=16)
    layer = FusedEncoderLayer(Plan.from_cuts(set()), _weights(cfg), cfg, library=library_for(cfg))
    good = torch.randn(2, 16, cfg.hidden, device="cuda", dtype=torch.float16)
    with pytest.raises(ConfigError, match="dtype"):
        layer(good.float())
    with pytest.raises(ConfigError, match="CUDA"):
        layer(good.cpu())
    with pytest.raises(ConfigError, match="shape"):
        layer(good[:, :, :100].contiguous())
    with pytest.raises(ConfigError, match="contiguous"):
        layer(good.transpose(0, 1))
    with pytest.raises(ConfigError, match="seq_len"):
        layer(torch.randn(1, 2048, cfg.hidden, device="cuda", dtype=torch.float16))
    with pytest.raises(ConfigError, match="attention_mask"):
        layer(good, torch.ones(2, 15, device="cuda"))


def _sass_by_function(library_path: Path) -> dict[str, str]:
    """Function name → SASS of every kernel in a shared object. With one cuobjdump over the whole library the
    test below took about 155 s on the H100 machine; the library embeds one cubin per unit, so they are taken
    out first and disassembled in parallel."""
    def disassemble(path: Path) -> str:
        return subprocess.run(["cuobjdump", "-sass", str(path)], capture_output=True, text=True, check=True).stdout

    with tempfile.TemporaryDirectory() as folder:
        extracted = subprocess.run(["cuobjdump", "-xelf", "all", str(library_path.resolve())], cwd=folder,
                                   capture_output=True)
        cubins = sorted(Path(folder).glob("*.cubin")) if extracted.returncode == 0 else []
        cubins = cubins or [library_path]  # nothing taken out: the whole library in one go, as before
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            texts = list(pool.map(disassemble, cubins))
    functions = {}
    for text in texts:
        parts = re.split(r"\n\s*Function : (\S+)\n", text)
        functions.update(zip(parts[1::2], parts[2::2]))
    return functions


@pytest.mark.skipif(shutil.which("cuobjdump") is None, reason="needs cuobjdump")
def test_gemm_bearing_kernels_use_tensor_cores():
    import torch
    from fusionsearch.build import build_dir

    cfg = LayerConfig()
    library = library_for(cfg)
    shared_objects = list(Path(library.module.__file__).parent.glob("*.so")) or [Path(library.module.__file__)]
    sass = _sass_by_function(shared_objects[0])
    checked = 0
    generated = [s for s in all_segments() if not uses_library_gemm(s)]
    for segment, unit in zip(generated, library.spec.units):
        has_matmul = any(stage.kind in ("gemm", "attention") for stage in stages_of(segment))
        body = sass.get(unit.kernel_name)
        assert body is not None, f"{unit.kernel_name} not found in {shared_objects[0]} ({build_dir(library.spec)})"
        if has_matmul:
            assert re.search(r"\b(HMMA|HGMMA)\b", body), f"{unit.kernel_name} has no tensor-core instruction"
            checked += 1
    assert checked >= 100
    if torch.cuda.get_device_capability() == (9, 0):  # the attention segments' warpgroup-MMA kernels (mangled names)
        wgmma = [body for name, body in sass.items() if "wgmma_attention_kernel" in name]
        # four attention segments, each with 64- and 128-key tiles
        assert len(wgmma) == 8 and all(re.search(r"\bHGMMA\b", body) for body in wgmma)
