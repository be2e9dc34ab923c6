"""Cost models: predict a plan's latency (µs) and the seed's high/low class from plan features.

`XGBCostModel` regresses log-latency with XGBoost on top of a base margin, so the trees learn
log(latency / margin). The margin is the segment latency model's sum over a plan's kernels (`segmodel.py`) when
the training records hold segment measurements of three or more shapes (recorded sweeps do), else the analytic
estimate of `features`. The margin carries the scale to shapes the model never saw; the trees learn where it is
wrong.

The high/low class (1 = the plan is among the fastest q % of its shape) is a threshold on the regression, not a
separate classifier: a plan is high when its predicted latency is at most the q-th percentile of the predicted
latencies of all 18,432 canonical plans of that shape. Why: the class is relative to a shape's own distribution, so
an absolute classifier learned on other shapes does not transfer; the threshold needs no second model, costs one
batched prediction per shape, and never contradicts the ranking (a plan predicted faster than a high plan is high).
"""
from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from .config import LayerConfig
from .errors import FusionSearchError
from .features import ESTIMATE_COLUMN, FEATURE_SCHEMA, all_canonical_masks, feature_names, plan_features
from .plan import Plan
from .segmodel import SegmentLatencyModel, has_segment_shapes

MODEL_SCHEMA = 2  # 2: optional segment latency model as the base margin
MODEL_FORMAT = "fusionsearch-costmodel"
SHAPE_COLUMNS = ("batch", "seq_len", "heads", "head_size", "ffn", "dtype")
DEFAULT_Q = 10.0


class CostModelError(FusionSearchError):
    """A cost model that cannot be trained, used or loaded (no data, unfitted, wrong file version)."""


def require_xgboost() -> None:
    """Fail before any GPU work when the cost model's library is missing, not after the first batch."""
    try:
        import xgboost  # noqa: F401
    except ImportError as error:
        raise CostModelError(f"xgboost cannot be imported ({error}); the cost model needs it: "
                             "pip install 'xgboost>=2.1,<3.5' (a dependency of fusionsearch)") from None


class CostModel(ABC):
    """The seam between search and learning: fit on records, predict latency of plans under one config."""

    def __init__(self, q: float = DEFAULT_Q) -> None:
        if not 0.0 < q < 100.0:
            raise CostModelError(f"q {q} is outside (0, 100); q is the percentage of a shape's plans that count "
                                 "as high, e.g. 10")
        self.q = float(q)
        self._thresholds: dict[LayerConfig, float] = {}  # per config; fit() must clear it

    @abstractmethod
    def fit(self, records: pd.DataFrame, failure_penalty: float | None = None,
            shape_weights: "dict[LayerConfig, float] | None" = None) -> "CostModel":
        """Train on the kind=plan, status=ok rows of a records frame (failures too if failure_penalty is set)."""

    @abstractmethod
    def predict(self, plans: "Iterable[Plan | int] | np.ndarray", cfg: LayerConfig) -> np.ndarray:
        """Predicted latency in µs of each plan (or mask) under cfg."""

    @abstractmethod
    def save(self, path: "str | Path") -> Path:
        """Write the model to one versioned file."""

    @classmethod
    @abstractmethod
    def load(cls, path: "str | Path") -> "CostModel":
        """Read a file written by save, refusing other versions."""

    def threshold_us(self, cfg: LayerConfig) -> float:
        """Predicted latency at the q-th percentile of all canonical plans of cfg: the high/low boundary."""
        if cfg not in self._thresholds:
            self._thresholds[cfg] = float(np.percentile(self.predict(all_canonical_masks(), cfg), self.q))
        return self._thresholds[cfg]

    def predict_class(self, plans: "Iterable[Plan | int] | np.ndarray", cfg: LayerConfig) -> np.ndarray:
        """1 where a plan is predicted among the fastest q % of its shape (the seed's 'high'), else 0."""
        return (self.predict(plans, cfg) <= self.threshold_us(cfg)).astype(np.int64)


def layer_config(row: "pd.Series | dict") -> LayerConfig:
    """The LayerConfig of a records row (batch, seq_len, heads, head_size, ffn, dtype)."""
    return LayerConfig(batch=int(row["batch"]), seq_len=int(row["seq_len"]), heads=int(row["heads"]),
                       head_size=int(row["head_size"]), ffn=int(row["ffn"]), dtype=str(row["dtype"]))


def training_table(records: pd.DataFrame, failure_penalty: float | None = None) -> pd.DataFrame:
    """One row per (shape, canonical plan): median latency over repeated records; failures imputed if asked.

    With failure_penalty p, a plan that never measured ok gets p × the slowest ok latency of its shape, the way
    AutoTVM scores failed configs as worst, so a search model learns to avoid failing regions.
    """
    missing = [c for c in ("kind", "status", "canonical_id", "latency_us", *SHAPE_COLUMNS) if c not in records]
    if missing:
        raise CostModelError(f"records frame lacks columns {missing}; load it with fusionsearch.records.load_frame")
    plans = records[records["kind"] == "plan"]
    keys = [*SHAPE_COLUMNS, "canonical_id"]
    ok = plans[plans["status"] == "ok"].dropna(subset=["latency_us"])
    table = ok.groupby(keys, as_index=False, sort=True)["latency_us"].median()
    table["failed"] = False
    if failure_penalty is not None:
        failed = plans[plans["status"] != "ok"][keys].drop_duplicates()
        failed = failed.merge(table[keys], on=keys, how="left", indicator=True)
        failed = failed[failed["_merge"] == "left_only"].drop(columns="_merge")
        worst = table.groupby(list(SHAPE_COLUMNS), as_index=False)["latency_us"].max()
        failed = failed.merge(worst, on=list(SHAPE_COLUMNS), how="inner")
        failed["latency_us"] *= failure_penalty
        failed["failed"] = True
        table = pd.concat([table, failed], ignore_index=True)
    table["canonical_id"] = table["canonical_id"].astype(np.int64)
    return table


def shape_groups(table: pd.DataFrame):
    """Yield (LayerConfig, rows) per shape of a training table, in a stable order."""
    for _, rows in table.groupby(list(SHAPE_COLUMNS), sort=True):
        yield layer_config(rows.iloc[0]), rows


class XGBCostModel(CostModel):
    """Log-latency XGBoost regression over plan features on top of a base margin: the log of the segment latency
    model's sum (segmodel.py) when the training records hold segment measurements of ≥ 3 shapes, else the
    analytic estimate. The margin carries what transfers across shapes; the trees learn the rest."""

    DEFAULT_PARAMS = {"max_depth": 6, "eta": 0.15, "min_child_weight": 1.0, "lambda": 1.0, "subsample": 1.0,
                      "colsample_bytree": 1.0, "max_bin": 64, "tree_method": "hist",
                      "objective": "reg:squarederror", "nthread": 1}

    def __init__(self, n_estimators: int = 80, seed: int = 0, q: float = DEFAULT_Q, **params) -> None:
        super().__init__(q)
        self.n_estimators = int(n_estimators)
        self.seed = int(seed)
        # nthread 1: a fixed summation order keeps the trees independent of the machine's core count; the fits
        # hold hundreds to a few thousand rows, where more threads gained nothing when tried on 2 cores.
        self.params = {**self.DEFAULT_PARAMS, **params, "seed": self.seed}
        self.booster = None
        self.trained_on: list[dict] = []
        self.segment_model: SegmentLatencyModel | None = None

    def fit(self, records: pd.DataFrame, failure_penalty: float | None = None,
            shape_weights: "dict[LayerConfig, float] | None" = None) -> "XGBCostModel":
        """Train on kind=plan, status=ok records (median per shape and plan); shape_weights weighs rows by shape."""
        import xgboost

        table = training_table(records, failure_penalty)
        if table.empty:
            raise CostModelError("no kind=plan records with status ok to train on; measure some plans first "
                                 "(fusionsearch search or bench) or pass a records file that holds them")
        self.segment_model = SegmentLatencyModel.fit(records) if has_segment_shapes(records) else None
        features, target, margin, weight, shapes = [], [], [], [], []
        for cfg, rows in shape_groups(table):
            weight.append(np.full(len(rows), (shape_weights or {}).get(cfg, 1.0)))
            masks = rows["canonical_id"].to_numpy()
            x = plan_features(masks, cfg)
            features.append(x)
            margin.append(self._margin(x, masks, cfg))
            target.append(np.log(rows["latency_us"].to_numpy(dtype=np.float64)))
            shapes.append({**{c: getattr(cfg, c) for c in SHAPE_COLUMNS}, "plans": int((~rows["failed"]).sum()),
                           "failed_plans": int(rows["failed"].sum())})
        # No feature_names on the DMatrix: xgboost re-validates them every boosting round, a third of a small fit;
        # the saved file carries feature_names and load() checks them.
        matrix = xgboost.DMatrix(np.vstack(features), label=np.concatenate(target), weight=np.concatenate(weight),
                                 base_margin=np.concatenate(margin), nthread=1)
        self.booster = xgboost.train(self.params, matrix, num_boost_round=self.n_estimators)
        self.trained_on = shapes
        self._thresholds.clear()
        return self

    def _margin(self, features: np.ndarray, masks: np.ndarray, cfg: LayerConfig) -> np.ndarray:
        """log µs the trees start from: the segment model's sum, or the analytic estimate without one."""
        if self.segment_model is None:
            return features[:, ESTIMATE_COLUMN]
        return np.log(self.segment_model.predict(masks, cfg))

    def predict_features(self, features: np.ndarray, masks: np.ndarray, cfg: LayerConfig) -> np.ndarray:
        """Predicted latency (µs) of `masks` under cfg from their plan_features rows (a search featurises its
        space once and passes slices)."""
        import xgboost

        if self.booster is None:
            raise CostModelError("the cost model is not fitted; call fit(records) or load a saved model")
        matrix = xgboost.DMatrix(features, base_margin=self._margin(features, np.asarray(masks), cfg), nthread=1)
        return np.exp(self.booster.predict(matrix))

    def predict(self, plans: "Iterable[Plan | int] | np.ndarray", cfg: LayerConfig) -> np.ndarray:
        """Predicted latency in µs of each plan (or mask) under cfg."""
        masks = np.array([p.mask if isinstance(p, Plan) else int(p) for p in plans], dtype=np.int64)
        return self.predict_features(plan_features(masks, cfg), masks, cfg)

    def default_config(self, batch: int, seq_len: int, dtype: str | None = None) -> LayerConfig:
        """A config of the given shape with the layer sizes (and dtype) the model was trained on."""
        if not self.trained_on:
            return LayerConfig(batch, seq_len, **({"dtype": dtype} if dtype else {}))
        first = self.trained_on[0]
        return LayerConfig(batch, seq_len, heads=first["heads"], head_size=first["head_size"], ffn=first["ffn"],
                           dtype=dtype or first["dtype"])

    def to_json(self) -> dict:
        """The whole model as a JSON-ready dict (schema, features, xgboost version, q, booster)."""
        import xgboost

        if self.booster is None:
            raise CostModelError("the cost model is not fitted; there is nothing to save")
        return {
            "format": MODEL_FORMAT, "schema": MODEL_SCHEMA, "model": type(self).__name__,
            "feature_schema": FEATURE_SCHEMA, "feature_names": feature_names(),
            "xgboost_version": xgboost.__version__, "q": self.q, "seed": self.seed,
            "n_estimators": self.n_estimators, "params": self.params,
            "target": "log(latency_us), base margin: log of the segment model's sum, else log_t_estimate_us",
            "segment_model": self.segment_model.to_json() if self.segment_model else None,
            "class_rule": f"high (1) iff predicted latency <= the {self.q:g}th percentile of predictions over all "
                          "canonical plans of the shape",
            "trained_on": self.trained_on,
            "booster": json.loads(bytes(self.booster.save_raw(raw_format="json"))),
        }

    def save(self, path: "str | Path") -> Path:
        """Write the model as one versioned JSON file (atomically: temp file, then rename)."""
        from .build import write_atomic

        path = Path(path).expanduser()
        write_atomic(path, json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, path: "str | Path") -> "XGBCostModel":
        """Read a saved model, refusing another schema, another feature set or a newer xgboost."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CostModelError(f"model file {path} does not exist; train one with `fusionsearch search` "
                                 "(it saves model.json under --out)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CostModelError(f"model file {path} is not JSON ({error}); pass a file written by "
                                 "XGBCostModel.save") from None
        return cls.from_json(data, source=str(path))

    @classmethod
    def from_json(cls, data: dict, source: str = "model") -> "XGBCostModel":
        """Rebuild a model from to_json() output, with the same checks as load."""
        import xgboost

        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
            raise CostModelError(f"{source} is not a fusionsearch cost model (format {data.get('format') if isinstance(data, dict) else None!r}, "
                                 f"expected {MODEL_FORMAT!r})")
        if data.get("schema") != MODEL_SCHEMA:
            raise CostModelError(f"{source} has cost-model schema {data.get('schema')!r}; this fusionsearch reads "
                                 f"schema {MODEL_SCHEMA} only; retrain the model with this version")
        if data.get("feature_schema") != FEATURE_SCHEMA or data.get("feature_names") != feature_names():
            raise CostModelError(f"{source} was trained on feature schema {data.get('feature_schema')!r} with "
                                 f"{len(data.get('feature_names') or [])} features; this fusionsearch computes "
                                 f"schema {FEATURE_SCHEMA} with {len(feature_names())} features; retrain the model")
        saved, running = _version(data.get("xgboost_version", "0")), _version(xgboost.__version__)
        if saved[:2] > running[:2]:
            raise CostModelError(f"{source} was saved by xgboost {data['xgboost_version']}, newer than the installed "
                                 f"{xgboost.__version__}; upgrade xgboost to ≥ {data['xgboost_version']} or retrain")
        if saved[:1] != running[:1]:
            warnings.warn(f"{source} was saved by xgboost {data['xgboost_version']}; loading it with "
                          f"{xgboost.__version__}", stacklevel=2)
        model = cls(n_estimators=data["n_estimators"], seed=data["seed"], q=data["q"])
        model.params = dict(data["params"])
        model.trained_on = list(data.get("trained_on", []))
        if data.get("segment_model"):
            model.segment_model = SegmentLatencyModel.from_json(data["segment_model"], source)
        model.booster = xgboost.Booster()
        model.booster.load_model(bytearray(json.dumps(data["booster"]).encode()))
        return model


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
