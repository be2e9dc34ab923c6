"""The segment latency model: sums of kernel predictions, failed kernels, too few shapes, files, and zero-shot
ranking on the recorded H100 sweeps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic_sweeps import fixture_masks, sweep_records, write_sweep

from fusionsearch.config import LayerConfig
from fusionsearch.costmodel import XGBCostModel
from fusionsearch.features import all_canonical_masks, segment_incidence
from fusionsearch.plan import all_segments
from fusionsearch.records import load_frame
from fusionsearch.segmodel import SegmentLatencyModel, SegmentModelError, has_segment_shapes, segment_terms

SHAPES = (LayerConfig(1, 128), LayerConfig(8, 128), LayerConfig(64, 512))
SWEEPS = Path(__file__).resolve().parents[1] / "experiments" / "data" / "sweeps"


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> pd.DataFrame:
    folder = tmp_path_factory.mktemp("synthetic")
    return load_frame([write_sweep(folder / f"s_{cfg.shape_text}.jsonl",
                                   sweep_records(cfg, fixture_masks(cfg, 300), baselines=False)) for cfg in SHAPES])


def test_a_plan_is_predicted_as_the_sum_of_its_kernels(frame):
    model = SegmentLatencyModel.fit(frame)
    cfg = LayerConfig(16, 256)
    masks = all_canonical_masks()[:500]
    kernels = model.segment_latency(cfg)
    assert kernels.shape == (len(all_segments()),) and (kernels > 0).all()
    assert np.allclose(model.predict(masks, cfg), segment_incidence(masks) @ kernels)


def test_a_kernel_that_never_ran_ok_prices_its_plans_out(frame):
    model = SegmentLatencyModel.fit(frame)
    assert not model.measured.all()  # the synthetic sweeps hold kernels that fail to build
    cfg = LayerConfig(8, 128)
    masks = all_canonical_masks()
    uses_failed = segment_incidence(masks)[:, ~model.measured].any(axis=1)
    kernels = model.segment_latency(cfg)
    assert np.all(kernels[~model.measured] == 2.0 * kernels[model.measured].max())
    predicted = model.predict(masks, cfg)
    assert predicted[uses_failed].min() >= 2.0 * kernels[model.measured].max()
    assert not uses_failed[np.argsort(predicted)[:100]].any()  # the model's first picks can run


def test_too_few_shapes_is_refused_with_the_fix(frame):
    two = frame[frame["batch"] != 64]
    assert not has_segment_shapes(two) and has_segment_shapes(frame)
    with pytest.raises(SegmentModelError, match=r"2 shape\(s\).*bench --segments"):
        SegmentLatencyModel.fit(two)


def test_the_model_round_trips_through_json(frame):
    model = SegmentLatencyModel.fit(frame)
    again = SegmentLatencyModel.from_json(model.to_json())
    cfg = LayerConfig(3, 97)
    assert np.array_equal(again.segment_latency(cfg), model.segment_latency(cfg))
    with pytest.raises(SegmentModelError, match="retrain"):
        SegmentLatencyModel.from_json({**model.to_json(), "schema": 0})


def test_flash_terms_count_waves_of_blocks():
    flash = next(s for s in all_segments() if s.attention)
    # 1x128: 12 blocks, one wave of 2 key tiles; 64x512: 3,072 blocks over 264 slots = 12 waves of 8 tiles.
    assert segment_terms(flash, LayerConfig(1, 128), 132)[2] == 2
    assert segment_terms(flash, LayerConfig(64, 512), 132)[2] == 96


def test_cost_model_uses_segments_only_when_the_records_hold_them(frame):
    assert XGBCostModel(n_estimators=5).fit(frame).segment_model is not None
    plans_only = frame[frame["kind"] == "plan"]
    assert XGBCostModel(n_estimators=5).fit(plans_only).segment_model is None


@pytest.mark.slow
@pytest.mark.parametrize("held_out", ["1x128", "64x128"])
def test_zero_shot_top1_on_the_recorded_h100_sweeps(held_out):
    """Trained on the other six recorded shapes, the model's first pick is within 5 % of the true optimum."""
    paths = sorted(SWEEPS.glob("sweep-*-fp16.jsonl.gz"))
    if len(paths) < 7:
        pytest.skip("the recorded H100 sweeps are not in this checkout")
    frame = load_frame(paths)
    batch, seq = map(int, held_out.split("x"))
    own = (frame["batch"] == batch) & (frame["seq_len"] == seq)
    truth = frame[own & (frame["kind"] == "plan") & (frame["status"] == "ok")].groupby("canonical_id")["latency_us"]
    truth = truth.median()
    model = XGBCostModel(seed=0).fit(frame[~own])
    predicted = model.predict(truth.index.to_numpy(dtype=np.int64), LayerConfig(batch, seq))
    assert truth.iloc[int(np.argmin(predicted))] / truth.min() <= 1.05
