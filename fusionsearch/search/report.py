"""What a finished search hands back: a JSON-ready report, and best.json / model.json / search.json / a PNG."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .. import mask as codec
from ..costmodel import CostModelError, XGBCostModel
from .loop import SearchResult
from .strategies import trials_frame


def search_report(result: SearchResult, baselines: dict[str, float], source: str) -> dict:
    """The search in one dict: layer, strategy, counts, best plan with segments, best baseline and speed-up."""
    cfg, best = result.cfg, result.best
    baseline = None
    if baselines:
        name = min(baselines, key=baselines.get)
        baseline = {"name": name, "latency_us": baselines[name]}
    plan = None
    if best is not None:
        data = codec.to_json(best.mask)
        plan = {"mask": best.mask, "bits": data["bits"], "seed": data["seed"], "latency_us": best.latency_us,
                "trial": best.index, "kernel_count": data["kernel_count"], "segments": data["segments"],
                "describe": best.plan.describe()}
    return {
        "layer": {"shape": cfg.shape_text, **cfg.to_dict(), "hidden": cfg.hidden},
        "strategy": result.strategy, "seed": result.seed, "trials": len(result.trials),
        "plan_trials": len(result.plan_trials), "failures": result.failures, "stopped": result.stopped,
        "best": plan, "baseline": baseline, "baselines": baselines,
        "speedup": baseline["latency_us"] / best.latency_us if baseline and best else None,
        "source": source,
    }


def final_model(result: SearchResult, warm: pd.DataFrame | None = None) -> XGBCostModel | None:
    """A cost model fit on the search's ok plan trials (and warm records): None if there is nothing to learn."""
    frame = trials_frame(result.trials, result.cfg)
    if warm is not None:
        frame = pd.concat([warm, frame], ignore_index=True)
    try:
        return XGBCostModel(seed=result.seed).fit(frame)
    except CostModelError:
        return None


def _write_json(path: Path, data) -> None:
    from ..build import write_atomic

    write_atomic(path, json.dumps(data, indent=1, default=str))


def plot_curve(result: SearchResult, path: Path, optimum_us: float | None = None) -> Path | None:
    """PNG of each plan trial's latency and the best so far; None (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed, so no search curve was drawn; pip install 'fusionsearch[plots]'",
                      stacklevel=2)
        return None
    index = [t.index + 1 for t in result.plan_trials if t.ok]
    latency = [t.latency_us for t in result.plan_trials if t.ok]
    best = result.best_so_far()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(index, latency, s=6, alpha=0.4, label="plan trial")
    finite = np.isfinite(best)
    ax.step(np.arange(1, len(best) + 1)[finite], best[finite], where="post", color="C3", label="best so far")
    if optimum_us is not None:
        ax.axhline(optimum_us, color="k", lw=0.8, ls="--", label="optimum")
    ax.set_xlabel("trial (segments included)")
    ax.set_ylabel("latency µs")
    ax.set_title(f"{result.strategy} search, {result.cfg.shape_text} {result.cfg.dtype}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_outputs(out: Path, result: SearchResult, report: dict, warm: pd.DataFrame | None = None) -> dict[str, str]:
    """Write best.json, model.json, search.json (every trial) and search_curve.png under out; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    saved = {}
    if report["best"] is not None:
        _write_json(out / "best.json", {k: report[k] for k in ("layer", "best", "baseline", "speedup", "strategy",
                                                                 "seed", "source")})
        saved["best plan"] = str(out / "best.json")
    model = final_model(result, warm)
    if model is not None:
        saved["cost model"] = str(model.save(out / "model.json"))
    trials = [{"trial": t.index, "kind": t.kind, "mask": t.mask, "segment": t.segment.name if t.segment else None,
               "status": t.status, "latency_us": t.latency_us} for t in result.trials]
    _write_json(out / "search.json", {**{k: v for k, v in report.items() if k != "saved"}, "trial_log": trials})
    saved["trials"] = str(out / "search.json")
    curve = plot_curve(result, out / "search_curve.png")
    if curve is not None:
        saved["search curve"] = str(curve)
    return saved
