"""Sweeps: measure plans, segments and baselines in workers, append records, resume after a crash or a kill."""
from __future__ import annotations

import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import records
from .config import LayerConfig
from .errors import FusionSearchError, MaskError
from .mask import decode, parse_mask
from .plan import Plan, Segment
from .worker import DEFAULT_COMPILE_TIMEOUT_S, DEFAULT_RUN_TIMEOUT_S, Request, WorkerPool, request_seed


class BenchError(FusionSearchError):
    """A sweep that cannot run as asked (no GPU, an unknown item, mixed GPUs)."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a sweep; every record written so far is complete and fsynced."""


@dataclass(frozen=True)
class _Entry:
    item: "Plan | Segment | str"
    key: str
    mask: int | None  # the mask as requested, for plans given as integers


def _entries(items: Iterable) -> tuple[list[_Entry], list[str]]:
    """Normalise items (Plan, Segment, baseline name, or an int/str mask): unique entries, and every item's key."""
    seen, entries, keys = set(), [], []
    for item in items:
        mask = None
        if isinstance(item, int) and not isinstance(item, bool):
            mask, item = item, decode(item)
        elif isinstance(item, str) and item not in records.BASELINE_NAMES:
            try:
                mask = parse_mask(item)
            except MaskError:
                raise BenchError(f"sweep item {item!r} is neither a mask nor a baseline; baselines are "
                                 f"{', '.join(records.BASELINE_NAMES)}") from None
            item = decode(mask)
        key = records.key_of(item)
        keys.append(key)
        if key not in seen:
            seen.add(key)
            entries.append(_Entry(item, key, mask if mask is not None else getattr(item, "mask", None)))
    return entries, keys


def cuda_devices(gpus: "Iterable[int] | None" = None) -> list[str]:
    """['cuda:0', …] for the given or all visible GPUs; BenchError without CUDA."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise BenchError(f"benchmarking needs a CUDA GPU and torch {torch.__version__} sees none "
                         f"(torch.cuda.is_available() is False); run on a machine with an NVIDIA GPU")
    chosen = list(range(count)) if gpus is None else list(gpus)
    for index in chosen:
        if not 0 <= index < count:
            raise BenchError(f"GPU {index} does not exist; this machine shows {count} (0 … {count - 1})")
    return [f"cuda:{i}" for i in chosen]


def _request(entry: _Entry, cfg: LayerConfig, *, seed: int, compile_timeout_s: float, run_timeout_s: float,
             timing: dict | None, rotate: int | None, flush_l2: bool, builder: str | None) -> Request:
    item = entry.item
    common = dict(key=entry.key, cfg=cfg.to_dict(), seed=request_seed(seed, entry.key),
                  compile_timeout_s=compile_timeout_s, run_timeout_s=run_timeout_s, timing=dict(timing or {}),
                  rotate=rotate, flush_l2=flush_l2, builder=builder)
    if isinstance(item, Plan):
        return Request(kind="plan", mask=entry.mask, **common)
    if isinstance(item, Segment):
        return Request(kind="segment", segment=(item.first, item.last, item.attention), **common)
    return Request(kind="baseline", baseline=item, **common)


class _Interrupts:
    """Turn SIGINT/SIGTERM into SweepInterrupted, deferred while a record is being written."""

    def __init__(self) -> None:
        self._critical = False
        self._pending: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self._critical:
            self._pending = signum
        else:
            raise SweepInterrupted(f"sweep interrupted by {signal.Signals(signum).name}")

    @contextmanager
    def critical(self):
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise SweepInterrupted(f"sweep interrupted by {signal.Signals(signum).name}")


def _sweep_env(pool: WorkerPool) -> dict:
    envs = pool.environments()
    names = {env["gpu"]["name"] for env in envs}
    if len(names) > 1:
        raise BenchError(f"the sweep's devices are different GPUs ({', '.join(sorted(names))}); their latencies "
                         f"do not mix in one sweep; pick one model with --gpus")
    return envs[0]


def _progress(total: int, cfg: LayerConfig, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"bench {cfg.shape_text} {cfg.dtype}", unit="trial", dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()), file=sys.stderr)


def run_sweep(cfg: LayerConfig, items: Iterable, records_path: "str | Path", *, resume: bool = True,
              gpus: "Iterable[int] | None" = None, devices: "list[str] | None" = None, progress: bool = True,
              compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S, run_timeout_s: float = DEFAULT_RUN_TIMEOUT_S,
              seed: int = 0, timing: dict | None = None, rotate: int | None = None, flush_l2: bool = False,
              builder: str | None = None, retry: Iterable[str] = (), pool: WorkerPool | None = None) -> list[dict]:
    """Measure every item (Plan, Segment, baseline name or mask) into records_path; return one final record per
    item, in order (items that denote the same plan are measured once and share their record)."""
    entries, item_keys = _entries(items)
    retry = set(retry)
    unknown = retry - set(records.STATUSES)
    if unknown:
        raise BenchError(f"retry statuses {sorted(unknown)} are unknown; use some of {', '.join(records.STATUSES)}")
    if pool is None and devices is None:
        devices = cuda_devices(gpus)
    _check_baselines(entries, devices if pool is None else pool.devices)
    path = Path(records_path).expanduser()
    new: dict[str, dict] = {}
    own_pool = pool is None
    with _Interrupts() as interrupts, records.RecordWriter(path) as writer:
        failed = True
        try:
            pool = pool or WorkerPool(devices)
            env = _sweep_env(pool)
            previous = records.final_records(path, match=records.sweep_match(cfg, env)) if resume else {}
            todo = [e for e in entries if e.key not in previous or previous[e.key]["status"] in retry]
            by_key = {e.key: e for e in todo}
            requests = [_request(e, cfg, seed=seed, compile_timeout_s=compile_timeout_s,
                                 run_timeout_s=run_timeout_s, timing=timing, rotate=rotate, flush_l2=flush_l2,
                                 builder=builder) for e in todo]

            def on_start(request: Request, worker_env: dict) -> None:
                entry = by_key[request.key]
                with interrupts.critical():
                    writer.started(entry.item, cfg, env=worker_env, mask=entry.mask)

            bar = _progress(len(requests), cfg, progress)
            best, failures = None, 0
            try:
                for request, result, worker_env in pool.run(requests, on_start=on_start):
                    entry = by_key[request.key]
                    with interrupts.critical():
                        record = records.make_record(
                            entry.item, cfg, result["status"], latency_us=result.get("latency_us"),
                            error=result.get("error"), message=result.get("message"), mask=entry.mask,
                            env=worker_env or env)
                        writer.write(record)
                    new[entry.key] = record
                    if record["status"] == "ok":
                        median = record["latency_us"]["median"]
                        if best is None or median < best[1]:
                            best = (entry.key, median)
                    else:
                        failures += 1
                    bar.update(1)
                    bar.set_postfix_str(
                        (f"best {best[0]} {best[1]:.1f} µs" if best else "best –") + f", failures {failures}")
            finally:
                bar.close()
            failed = False
        finally:
            if pool is not None and (own_pool or failed):
                pool.close()  # on failure too: a busy worker must not finish a measurement nobody records
    return [new.get(key) or previous[key] for key in item_keys]


def _check_baselines(entries: list[_Entry], devices: list[str]) -> None:
    names = [e.item for e in entries if isinstance(e.item, str)]
    if not names:
        return  # spare the parent a torch import: plans alone need nothing checked here
    from .baselines import unavailable_reason

    for entry in entries:
        if isinstance(entry.item, str):
            reasons = [unavailable_reason(entry.item, d) for d in devices]
            if any(reasons):
                raise BenchError(next(r for r in reasons if r))


def measure_plans(cfg: LayerConfig, plans: Iterable, records_path: "str | Path", **kw) -> list[dict]:
    """run_sweep over plans (Plan objects or masks)."""
    return run_sweep(cfg, plans, records_path, **kw)


def measure_baselines(cfg: LayerConfig, names: "Iterable[str] | None", records_path: "str | Path", **kw) -> list[dict]:
    """run_sweep over PyTorch baselines (None: the default set that can run on the sweep's devices)."""
    if names is None:
        from .baselines import default_names

        devices = kw["pool"].devices if kw.get("pool") is not None else kw.get("devices")
        names = default_names(devices[0] if devices else "cuda")
    return run_sweep(cfg, list(names), records_path, **kw)


def measure_ceilings(cfg: LayerConfig, *, pool: WorkerPool | None = None, gpus=None, run_timeout_s: float = 300.0
                     ) -> dict | None:
    """Matmul TFLOP/s and copy TB/s measured in a worker (None with a warning if that fails)."""
    own = pool is None
    pool = pool or WorkerPool(cuda_devices(gpus)[:1])
    try:
        result, _ = pool.call(Request(kind="ceilings", key="ceilings", cfg=cfg.to_dict(),
                                      compile_timeout_s=run_timeout_s, run_timeout_s=run_timeout_s))
    finally:
        if own:
            pool.close()
    if result["status"] != "ok":
        warnings.warn(f"measuring the ceilings failed ({result['status']}: {result['message']}); no floor shown")
        return None
    return result["ceilings"]


def best_of(found: list[dict], kind: str) -> dict | None:
    """The ok record of `kind` with the lowest median latency."""
    ok = [r for r in found if r and r["kind"] == kind and r["status"] == "ok"]
    return min(ok, key=lambda r: r["latency_us"]["median"]) if ok else None
