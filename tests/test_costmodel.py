"""The XGBoost cost model on SYNTHETIC sweeps (tests/synthetic_sweeps.py): fit, predict, class, save and load."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xgboost
from synthetic_sweeps import fixture_masks, sweep_records, write_sweep

from fusionsearch.config import LayerConfig
from fusionsearch.costmodel import CostModelError, XGBCostModel, training_table
from fusionsearch.features import all_canonical_masks, estimate_us
from fusionsearch.mask import decode
from fusionsearch.records import load_frame

SHAPES = (LayerConfig(1, 128), LayerConfig(8, 128), LayerConfig(64, 512))


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> pd.DataFrame:
    """Synthetic records of 1,500 plans for each of three shapes, read back through records.load_frame."""
    folder = tmp_path_factory.mktemp("synthetic")
    paths = [write_sweep(folder / f"synthetic_{cfg.shape_text}.jsonl",
                         sweep_records(cfg, fixture_masks(cfg, 1500), baselines=False)) for cfg in SHAPES]
    return load_frame(paths)


@pytest.fixture(scope="module")
def model(frame) -> XGBCostModel:
    return XGBCostModel(seed=0).fit(frame)


def ok_plans(frame, cfg) -> pd.Series:
    rows = frame[(frame["kind"] == "plan") & (frame["status"] == "ok") & (frame["batch"] == cfg.batch)
                 & (frame["seq_len"] == cfg.seq_len)]
    return rows.groupby("canonical_id")["latency_us"].median()


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    da, db = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])
    return float((da * db).sum() / np.sqrt((da != 0).sum() * (db != 0).sum()))


def test_model_learns_held_out_plans_of_trained_shapes(frame):
    cfg = SHAPES[1]
    truth = ok_plans(frame, cfg)
    held = truth.index.to_numpy()[::4]
    train = frame[~((frame["batch"] == cfg.batch) & frame["canonical_id"].isin(held))]
    model = XGBCostModel(seed=0).fit(train)
    predicted = model.predict(held, cfg)
    actual = truth.loc[held].to_numpy()
    assert np.median(np.abs(predicted / actual - 1)) < 0.08
    # The synthetic truth has 4 % plan-specific noise no model can learn; the analytic estimate alone ranks worse.
    assert kendall(predicted, actual) > 0.65
    assert kendall(predicted, actual) > kendall(estimate_us(held, cfg), actual) + 0.1


def test_unseen_shape_gets_latencies_on_the_right_scale(frame):
    # The analytic estimate is the base margin, so even a shape outside the training range lands near its scale.
    cfg = SHAPES[2]
    model = XGBCostModel(seed=0).fit(frame[frame["batch"] != cfg.batch])
    truth = ok_plans(frame, cfg)
    ratio = model.predict(truth.index.to_numpy(), cfg) / truth.to_numpy()
    assert 0.5 < np.median(ratio) < 2.0


def test_predictions_are_positive_and_equal_for_a_plan_and_its_masks(model):
    plan = decode(0b0001101010101010)
    values = model.predict([plan, plan.mask, plan.mask ^ 0x7FFF], SHAPES[0])
    assert (values > 0).all() and values[0] == values[1] == values[2]


def test_high_class_is_the_predicted_fastest_q_percent_and_never_contradicts_the_ranking(model):
    cfg = LayerConfig(16, 128)
    masks = all_canonical_masks()
    predicted = model.predict(masks, cfg)
    high = model.predict_class(masks, cfg).astype(bool)
    assert abs(high.mean() - model.q / 100) < 0.01
    assert predicted[high].max() <= predicted[~high].min()


def test_fit_is_deterministic_for_a_seed(frame):
    masks = all_canonical_masks()[::11]
    first = XGBCostModel(seed=3).fit(frame).predict(masks, SHAPES[0])
    second = XGBCostModel(seed=3).fit(frame).predict(masks, SHAPES[0])
    assert np.array_equal(first, second)


def test_training_uses_only_ok_plan_records_grouped_by_shape(frame, model):
    table = training_table(frame)
    assert not table["failed"].any()
    assert len(table) == sum(len(ok_plans(frame, cfg)) for cfg in SHAPES)
    shapes = {(s["batch"], s["seq_len"]): s["plans"] for s in model.trained_on}
    assert shapes == {(cfg.batch, cfg.seq_len): len(ok_plans(frame, cfg)) for cfg in SHAPES}


def test_failure_penalty_scores_failed_plans_as_slower_than_any_ok_plan(frame):
    table = training_table(frame, failure_penalty=2.0)
    for _, rows in table.groupby("batch"):
        ok, failed = rows[~rows["failed"]], rows[rows["failed"]]
        assert len(failed) > 0
        assert np.allclose(failed["latency_us"], 2.0 * ok["latency_us"].max())


def test_repeated_measurements_of_a_plan_train_as_their_median():
    rows = pd.DataFrame({"kind": "plan", "status": ["ok", "ok", "ok", "timeout"], "canonical_id": [5, 5, 5, 5],
                         "latency_us": [10.0, 30.0, 11.0, None], "batch": 1, "seq_len": 32, "heads": 12,
                         "head_size": 64, "ffn": 3072, "dtype": "fp16"})
    table = training_table(rows)
    assert table["latency_us"].tolist() == [11.0]


def test_fit_without_ok_plan_records_says_what_to_do(frame):
    failed = frame[frame["status"] != "ok"]
    with pytest.raises(CostModelError, match="status ok"):
        XGBCostModel().fit(failed)


def test_saved_model_loads_with_identical_predictions(model, tmp_path):
    path = model.save(tmp_path / "model.json")
    data = json.loads(path.read_text())
    assert data["schema"] == 2 and data["xgboost_version"] == xgboost.__version__ and data["q"] == model.q
    assert data["feature_names"] == model.to_json()["feature_names"]
    loaded = XGBCostModel.load(path)
    masks = all_canonical_masks()[::13]
    cfg = LayerConfig(4, 256)
    assert np.array_equal(loaded.predict(masks, cfg), model.predict(masks, cfg))
    assert loaded.threshold_us(cfg) == model.threshold_us(cfg)
    assert loaded.trained_on == model.trained_on


@pytest.mark.parametrize("change, message", [
    ({"schema": 1}, "schema 1"),
    ({"feature_schema": 99}, "feature schema 99"),
    ({"feature_names": ["a", "b"]}, "retrain"),
    ({"xgboost_version": "99.0.0"}, "upgrade xgboost"),
    ({"format": "something-else"}, "not a fusionsearch cost model"),
])
def test_load_refuses_a_mismatched_file_with_a_clear_message(model, tmp_path, change, message):
    data = {**model.to_json(), **change}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CostModelError, match=message):
        XGBCostModel.load(path)


def test_load_names_a_missing_or_non_json_file(tmp_path):
    with pytest.raises(CostModelError, match="does not exist"):
        XGBCostModel.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CostModelError, match="not JSON"):
        XGBCostModel.load(tmp_path / "bad.json")


def test_unfitted_model_and_bad_q_are_refused():
    with pytest.raises(CostModelError, match="not fitted"):
        XGBCostModel().predict([0], SHAPES[0])
    with pytest.raises(CostModelError, match="q 0"):
        XGBCostModel(q=0)
