"""The one search loop every strategy shares: ask the tuner for a batch, measure it, tell the tuner, repeat."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterable, Sequence

import numpy as np

from ..config import LayerConfig
from ..errors import FusionSearchError
from ..features import all_canonical_masks, plan_features
from ..mask import decode
from ..plan import Plan, Segment

class SearchError(FusionSearchError):
    """A search that cannot run: no candidates, a replay without the needed records, a budget too small."""


@dataclass(frozen=True)
class Trial:
    """One measurement the search paid for: a whole plan (mask = canonical id) or one segment kernel alone."""

    index: int
    status: str
    latency_us: float | None
    mask: int | None = None
    segment: Segment | None = None

    @property
    def kind(self) -> str:
        return "segment" if self.segment is not None else "plan"

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.latency_us is not None and math.isfinite(self.latency_us)

    @property
    def plan(self) -> Plan | None:
        return decode(self.mask) if self.mask is not None else None


@dataclass
class SearchSpace:
    """The canonical plans a search may measure under one config; features are computed once, on demand."""

    cfg: LayerConfig
    masks: np.ndarray = field(default_factory=all_canonical_masks)

    def __post_init__(self) -> None:
        self.masks = np.unique(np.asarray(self.masks, dtype=np.int64))
        if not len(self.masks):
            raise SearchError(f"the search space for {self.cfg.shape_text} is empty; a replay needs kind=plan "
                              "records of that shape")
        self.position = {int(m): i for i, m in enumerate(self.masks)}

    def __len__(self) -> int:
        return len(self.masks)

    def __contains__(self, mask: int) -> bool:
        return int(mask) in self.position

    @cached_property
    def features(self) -> np.ndarray:
        return plan_features(self.masks, self.cfg)


class Tuner(ABC):
    """A strategy: proposes batches of requests and learns from the trials (AutoTVM's Tuner)."""

    name = "tuner"

    def __init__(self, space: SearchSpace, seed: int = 0) -> None:
        self.space = space
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.trials: list[Trial] = []
        self.visited: set[int] = set()

    @abstractmethod
    def next_batch(self, size: int) -> list:
        """Up to `size` unvisited requests (canonical ids or Segments); an empty list means nothing is left."""

    def update(self, trials: Sequence[Trial]) -> None:
        """Record the trials of the last batch (subclasses refit here)."""
        self.trials.extend(trials)
        self.visited.update(t.mask for t in trials if t.mask is not None)

    def unvisited(self) -> np.ndarray:
        """Indices into space.masks of plans not measured yet."""
        if not self.visited:
            return np.arange(len(self.space))
        seen = [self.space.position[m] for m in self.visited if m in self.space.position]
        keep = np.ones(len(self.space), dtype=bool)
        keep[seen] = False
        return np.flatnonzero(keep)


class Measurer(ABC):
    """Turns requests into (status, latency µs) pairs: on the GPU, or by replaying recorded sweeps."""

    cfg: LayerConfig

    def candidates(self) -> np.ndarray:
        """Canonical plan ids this measurer can measure (all 18,432 unless it replays a partial sweep)."""
        return all_canonical_masks()

    @abstractmethod
    def measure(self, masks: Sequence[int]) -> list[tuple[str, float | None]]:
        """Measure whole plans; one (status, median latency µs or None) per mask, in order."""

    @abstractmethod
    def measure_segments(self, segments: Sequence[Segment]) -> list[tuple[str, float | None]]:
        """Measure segment kernels alone; one (status, latency µs or None) per segment, in order."""

    @abstractmethod
    def baselines(self) -> dict[str, float]:
        """Latency µs of each PyTorch baseline that ran ok for this shape."""


@dataclass
class SearchResult:
    """Everything a search did, in order, and why it stopped."""

    strategy: str
    cfg: LayerConfig
    trials: list[Trial]
    stopped: str
    seed: int = 0

    @property
    def plan_trials(self) -> list[Trial]:
        return [t for t in self.trials if t.kind == "plan"]

    @property
    def failures(self) -> int:
        return sum(not t.ok for t in self.trials)

    @property
    def best(self) -> Trial | None:
        """The fastest plan that measured ok (failures are never best); ties go to the earlier trial."""
        ok = [t for t in self.plan_trials if t.ok]
        return min(ok, key=lambda t: (t.latency_us, t.index)) if ok else None

    def best_so_far(self) -> np.ndarray:
        """Best plan latency after each trial (inf before the first ok plan), one entry per trial."""
        values = [t.latency_us if t.kind == "plan" and t.ok else math.inf for t in self.trials]
        return np.minimum.accumulate(np.asarray(values, dtype=np.float64)) if values else np.zeros(0)


ProgressHook = Callable[[SearchResult, list[Trial]], None]


def run_search(tuner: Tuner, measurer: Measurer, budget: int, *, batch_size: int = 16, patience: int | None = None,
               prior: Iterable[Trial] = (), on_batch: ProgressHook | None = None) -> SearchResult:
    """Run tuner against measurer until `budget` trials (prior ones included), exhaustion or early stop.

    patience: stop after this many consecutive plan batches that did not improve the best latency.
    """
    if budget < 1:
        raise SearchError(f"budget {budget} is below 1; give the number of measurements the search may make")
    if batch_size < 1:
        raise SearchError(f"batch size {batch_size} is below 1; use e.g. 16")
    trials = [Trial(i, t.status, t.latency_us, t.mask, t.segment) for i, t in enumerate(prior)]
    result = SearchResult(tuner.name, measurer.cfg, trials, stopped="budget", seed=tuner.seed)
    if trials:
        tuner.update(trials)
    stale, best = 0, result.best
    while len(result.trials) < budget:
        requests = _dedupe(tuner.next_batch(min(batch_size, budget - len(result.trials))), tuner)
        if not requests:
            result.stopped = "exhausted"
            break
        batch = _measure(measurer, requests, start=len(result.trials))
        result.trials.extend(batch)
        tuner.update(batch)
        if on_batch is not None:
            on_batch(result, batch)
        if any(t.kind == "plan" for t in batch):
            new_best = result.best
            improved = new_best is not None and (best is None or new_best.latency_us < best.latency_us)
            stale = 0 if improved else stale + (best is not None)
            best = new_best
            if patience is not None and stale >= patience:
                result.stopped = "early_stop"
                break
    return result


def _dedupe(requests: list, tuner: Tuner) -> list:
    """Drop repeats and already-measured plans, and refuse plans outside the space (a tuner bug)."""
    out, seen = [], set()
    for request in requests:
        if isinstance(request, Segment):
            key = request
        else:
            key = int(request)
            if key not in tuner.space:
                raise SearchError(f"strategy {tuner.name} proposed plan {key}, which is not in the search space")
            if key in tuner.visited:
                continue
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def _measure(measurer: Measurer, requests: list, start: int) -> list[Trial]:
    plans = [r for r in requests if not isinstance(r, Segment)]
    segments = [r for r in requests if isinstance(r, Segment)]
    results: dict = {}
    if plans:
        results.update(zip(plans, measurer.measure(plans), strict=True))
    if segments:
        results.update(zip(segments, measurer.measure_segments(segments), strict=True))
    trials = []
    for offset, request in enumerate(requests):
        status, latency = results[request]
        latency = float(latency) if status == "ok" and latency is not None else None
        if isinstance(request, Segment):
            trials.append(Trial(start + offset, status, latency, segment=request))
        else:
            trials.append(Trial(start + offset, status, latency, mask=request))
    return trials
