"""Measurement workers: one spawned process per device that builds, verifies and times serialisable requests.

The parent never touches CUDA for a measurement. It enforces the compile and run timeouts by killing the
worker, turns a worker's death into `runtime_error` (an illegal address poisons the CUDA context for good, so
the worker exits after any fault that leaves CUDA unusable), restarts it, and hands every finished result back.
This module imports no torch at the top: a spawned worker sets CUDA_VISIBLE_DEVICES before torch starts.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import signal
import sys
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass, field
from multiprocessing import connection
from typing import Callable, Iterable, Iterator

from .errors import FusionSearchError

DEFAULT_COMPILE_TIMEOUT_S = 900.0
DEFAULT_RUN_TIMEOUT_S = 120.0
STARTUP_TIMEOUT_S = 300.0
MAX_START_FAILURES = 3
MAX_ROTATION = 8
DEFAULT_EXECUTE = "fusionsearch.worker:execute"


class WorkerError(FusionSearchError):
    """A worker that cannot start, or a request that cannot be sent to one."""


@dataclass(frozen=True)
class Request:
    """One measurement, as plain data: what to build (plan mask, segment, baseline or ceilings) and the limits."""

    kind: str                                # plan | segment | baseline | ceilings
    key: str
    cfg: dict                                # LayerConfig.to_dict()
    mask: int | None = None                  # plans
    segment: tuple | None = None             # (first, last, attention) for segments
    baseline: str | None = None              # baselines
    seed: int = 0
    compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S
    run_timeout_s: float = DEFAULT_RUN_TIMEOUT_S
    timing: dict = field(default_factory=dict)  # keyword arguments for timing.time_cuda_graph / time_eager
    rotate: int | None = None                # input/weight sets to rotate; None: enough to exceed 2 × L2
    flush_l2: bool = False
    builder: str | None = None               # "module:function" or "/file.py:function" replacing the default
    execute: str = DEFAULT_EXECUTE           # the function that runs the whole request in the worker

    def to_dict(self) -> dict:
        return asdict(self)


def resolve(path: str) -> Callable:
    """Import 'package.module:function' or '/path/to/file.py:function'."""
    module_name, sep, attr = path.rpartition(":")
    if not sep or not module_name or not attr:
        raise WorkerError(f"function path {path!r} is not 'module:function' or '/file.py:function'")
    if module_name.endswith(".py"):
        name = "_fs_planted_" + format(zlib.crc32(module_name.encode()), "08x")
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, module_name)
            if spec is None or spec.loader is None:
                raise WorkerError(f"cannot load {module_name}; give an existing Python file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise WorkerError(f"{module_name} has no function {attr!r}; check the function path {path!r}") from None


def failure(status: str, message: str) -> dict:
    return {"status": status, "latency_us": None, "error": None, "message": message}


# ================================================================ inside the worker

class WorkerContext:
    """What an execute function may use: the device and a way to say the build phase is over."""

    def __init__(self, conn, device: str) -> None:
        self.conn = conn
        self.device = device
        self.phase_name = "build"

    def phase(self, name: str) -> None:
        """Enter phase 'build' (compile timeout) or 'run' (run timeout); the parent restarts its clock."""
        self.phase_name = name
        self.conn.send(("phase", name))

    def cuda_healthy(self) -> bool:
        """False when the CUDA context is poisoned (sticky error): the worker must then exit."""
        if "torch" not in sys.modules:
            return True
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return True
        try:
            torch.cuda.synchronize()
            torch.zeros(1, device="cuda").add_(1).item()
            return True
        except Exception:
            return False


def _die_with_parent(parent_pid: int) -> None:
    # A SIGKILLed parent cannot stop its workers; ask Linux to kill this process when the parent goes.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _classify(error: BaseException, phase: str) -> dict:
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"BuildError", "BackendCompilerFailed", "InductorError"}:
        return failure("compile_error", _describe(error))
    return failure("runtime_error", f"{phase} phase: {_describe(error)}")


def worker_main(conn, device: str, visible: str | None, parent_pid: int) -> None:
    """Entry point of a spawned worker: serve requests from `conn` until None or the pipe closes."""
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group; the parent decides what an interrupt means and kills us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from . import records

    ctx = WorkerContext(conn, device)
    conn.send(("ready", records.environment(0) if device.startswith("cuda") else _cpu_environment()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        ctx.phase_name = "build"
        try:
            result = resolve(request.execute)(request, ctx)
            result = _validated(result)
        except Exception as error:  # the request failed; the worker survives unless CUDA is poisoned
            result = _classify(error, ctx.phase_name)
        # Judge the context before replying, so the parent never sends more work to a worker about to exit.
        healthy = ctx.cuda_healthy()
        conn.send(("result", request.key, result, healthy))
        if not healthy:
            conn.close()
            os._exit(3)


def _cpu_environment() -> dict:
    from . import records

    env = records.environment(None)
    if env["gpu"]["name"] != "cpu":  # a CPU worker on a GPU machine still records as cpu
        env = {**env, "gpu": {"name": "cpu", "capability": None, "sm_count": None}}
    return env


def _validated(result) -> dict:
    from .records import STATUSES

    if not isinstance(result, dict) or result.get("status") not in STATUSES:
        raise WorkerError(f"execute returned {result!r:.200}; it must return a dict whose status is one of "
                          f"{', '.join(STATUSES)}")
    return {"latency_us": None, "error": None, "message": None, **result}


# ---------------------------------------------------------------- the default execute

def draw_inputs(cfg, seed: int, device: str):
    """Fresh N(0, 1) hidden states and a padding mask in which some keys are padded (1 = attend)."""
    import torch

    from .baselines import Inputs
    from .weights import torch_dtype

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch, cfg.seq_len, cfg.hidden, generator=gen)
    lengths = torch.randint(max(1, (cfg.seq_len + 1) // 2), cfg.seq_len + 1, (cfg.batch,), generator=gen)
    if cfg.seq_len > 1:  # at least one row pads, so a kernel that ignores the mask is caught
        lengths[-1] = max(1, cfg.seq_len - max(1, cfg.seq_len // 4))
    mask = (torch.arange(cfg.seq_len)[None, :] < lengths[:, None]).to(torch.long)
    return Inputs(x.to(device=device, dtype=torch_dtype(cfg.dtype)), mask.to(device))


def _plan_segments(segment):
    """A plan holding `segment` with every other operator a singleton (what a segment is verified inside)."""
    from .ops import NUM_OPS
    from .plan import Plan, Segment

    seg = Segment(*segment)
    spans = [(i, i) for i in range(seg.first)] + [(seg.first, seg.last)] + \
            [(i, i) for i in range(seg.last + 1, NUM_OPS)]
    return Plan.from_segments(spans, attention=seg.attention), seg


def _kernel_runner(layer, cfg, inputs, segments, out):
    """Zero-argument launcher of `segments`' kernels on the layer's buffers, the key bias computed once.

    Baselines get their additive mask precomputed (HF computes it once per model, not per layer); timing
    forward() would charge plans ~3 small mask-conversion kernels per call that baselines do not pay.
    """
    from .runtime import key_bias

    runner = getattr(layer, "segment_runner", None)
    if len(segments) == 1 and runner is not None:
        return runner(segments[0])
    if not (hasattr(layer, "tensors_for") and hasattr(layer, "library")):
        return lambda: layer(inputs.x, inputs.attention_mask)  # a runtime without the hooks: time forward()
    tensors = layer.tensors_for(inputs.x, key_bias(inputs.attention_mask), out)
    ids = [layer.library.index(seg) for seg in segments]
    scale = 1.0 / math.sqrt(cfg.head_size)
    return lambda: layer.library.run(ids, tensors, cfg.batch, cfg.seq_len, cfg.eps, scale)


def _layer_target(layer, cfg, inputs, segments):
    import torch

    from .baselines import Built

    last = {}

    def run():
        if hasattr(layer, "run_into"):  # write into a NaN-filled buffer: every element must be written
            out = torch.full_like(inputs.x, float("nan"))
            last["out"] = layer.run_into(inputs.x, inputs.attention_mask, out)
        else:
            last["out"] = layer(inputs.x, inputs.attention_mask)
        return last["out"]

    poison = getattr(layer, "poison_workspace", None)
    # Timed after run(): the workspace then holds this input set's intermediates, as segment kernels need.
    return Built(run=run, timed=lambda: _kernel_runner(layer, cfg, inputs, segments, last["out"]),
                 poison=(lambda: poison(cfg.batch, cfg.seq_len)) if poison else None)


def build_plan(request: Request, cfg, weights, inputs):
    """A FusedEncoderLayer for the request's mask (CUDA only); timed as its kernel launches."""
    from .mask import decode
    from .runtime import FusedEncoderLayer

    plan = decode(request.mask)
    layer = FusedEncoderLayer(plan, weights, cfg)
    return _layer_target(layer, cfg, inputs, list(plan.segments))


def build_segment(request: Request, cfg, weights, inputs):
    """The segment inside a plan of singletons: verified as a whole layer, its kernel timed alone."""
    from .runtime import FusedEncoderLayer

    plan, seg = _plan_segments(request.segment)
    layer = FusedEncoderLayer(plan, weights, cfg)
    return _layer_target(layer, cfg, inputs, [seg])


def build_baseline(request: Request, cfg, weights, inputs):
    """A PyTorch baseline from baselines.BASELINES."""
    from . import baselines

    return baselines.build(request.baseline, cfg, weights, inputs)


_DEFAULT_BUILDERS = {"plan": build_plan, "segment": build_segment, "baseline": build_baseline}


def _rotation_count(request: Request, cfg, device: str) -> int:
    """Weight + input sets to rotate so that consecutive calls miss the L2 (1 on the CPU)."""
    if request.rotate is not None:
        return max(1, int(request.rotate))
    if not device.startswith("cuda") or request.flush_l2:
        return 1
    return rotation_count(cfg)


def rotation_count(cfg) -> int:
    """Weight + input sets whose total exceeds twice the L2, so a timed call never finds its data cached."""
    from .ops import tensor_bytes
    from .timing import l2_bytes

    per_set = sum(tensor_bytes(n, cfg) for n in ("x", "out", "w_qkv", "w_o", "w_ffn1", "w_ffn2"))
    return max(1, min(MAX_ROTATION, math.ceil(2 * l2_bytes() / per_set)))


def _error_dict(candidate, reference, eager):
    from .reference import error_budget

    budget = error_budget(reference, eager, candidate)
    diff = (candidate.detach().double() - reference.double()).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    return budget, {"rel": budget.candidate_error, "torch_rel": budget.eager_error,
                    "max_abs": max_abs if math.isfinite(max_abs) else float("nan")}


def verify(built, inputs, weights32, cfg, seed: int, device: str):
    """Run on one draw, poison the output with NaN, run on a fresh draw, compare with the fp32 reference."""
    import torch

    from .reference import reference_forward
    from .weights import torch_dtype

    first = built.run()
    if isinstance(first, torch.Tensor) and first.is_floating_point():
        with torch.inference_mode():  # allowed on inference tensors too, which a runtime may return
            first.fill_(float("nan"))  # an output buffer reused without being fully written now shows NaN
    del first
    fresh = draw_inputs(cfg, seed + 7919, device)
    inputs.x, inputs.attention_mask = fresh.x, fresh.attention_mask
    if built.poison is not None:
        built.poison()  # intermediates too: a kernel reading something no kernel wrote now sees NaN
    out = built.run()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (cfg.batch, cfg.seq_len, cfg.hidden):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return None, failure("wrong_answer", f"output is {shape}, not [{cfg.batch}, {cfg.seq_len}, {cfg.hidden}]")
    out = out.detach().clone()
    reference = reference_forward(inputs.x.float(), inputs.attention_mask, weights32, cfg, torch.float32)
    eager = reference_forward(inputs.x, inputs.attention_mask, weights32, cfg, torch_dtype(cfg.dtype))
    budget, error = _error_dict(out, reference, eager)
    if not budget.ok:
        return error, {"status": "wrong_answer", "latency_us": None, "error": error, "message": budget.reason}
    return error, None


def _time(built_list, graph: bool, request: Request, device: str) -> dict:
    from . import timing

    targets = [b.target() for b in built_list]
    current = [targets[0]]
    setters = None
    if len(targets) > 1:
        setters = [(lambda t=t: current.__setitem__(0, t)) for t in targets]

    def call():
        return current[0]()

    options = dict(request.timing)
    if graph and device.startswith("cuda"):
        return timing.time_cuda_graph(call, rotate_inputs=setters, flush_l2=request.flush_l2, **options)
    return timing.time_eager(call, rotate_inputs=setters, flush_l2=request.flush_l2, device=device, **options)


def execute(request: Request, ctx: WorkerContext) -> dict:
    """Build (compile phase), verify against the fp32 reference, then time (run phase); return a result dict."""
    import torch

    from .baselines import Built
    from .config import LayerConfig
    from .weights import LayerWeights, torch_dtype

    if request.kind == "ceilings":
        from .baselines import measure_ceilings

        ctx.phase("run")
        return {"status": "ok", "ceilings": measure_ceilings(LayerConfig(**request.cfg).dtype)}
    device = ctx.device
    if device.startswith("cuda"):
        # fp32 must mean fp32: TF32 would move the reference (and fp32 baselines) by ~3e-4.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cfg = LayerConfig(**request.cfg)
    builder = resolve(request.builder) if request.builder else _DEFAULT_BUILDERS.get(request.kind)
    if builder is None:
        raise WorkerError(f"request kind {request.kind!r} has no builder; use plan, segment, baseline or ceilings")
    dtype = torch_dtype(cfg.dtype)
    count = _rotation_count(request, cfg, device)
    weights32, sets = None, []
    for k in range(count):
        w32 = LayerWeights.random(cfg, seed=request.seed + 1000 * k, device=device)
        if weights32 is None:
            weights32 = w32
        inputs = draw_inputs(cfg, request.seed + k, device)
        built = builder(request, cfg, w32.to(dtype=dtype), inputs)
        sets.append((inputs, built if isinstance(built, Built) else Built(run=built)))
    ctx.phase("run")
    inputs, built = sets[0]
    error, failed = verify(built, inputs, weights32, cfg, request.seed, device)
    if failed:
        return failed
    for other_inputs, other in sets[1:]:
        other.run()  # every instance runs once before timing (segment runners need the buffers filled)
    latency = _time([b for _, b in sets], built.graph, request, device)
    return {"status": "ok", "latency_us": latency, "error": error, "message": None}


# ================================================================ in the parent

def _visible_id(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry for the parent's device `index` (respecting the parent's own list)."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    if parent is None or not parent.strip():
        return str(index)
    entries = [e.strip() for e in parent.split(",") if e.strip()]
    if index >= len(entries):
        raise WorkerError(f"GPU {index} is not visible: CUDA_VISIBLE_DEVICES={parent!r} lists {len(entries)} "
                          f"devices; pick an index below {len(entries)}")
    return entries[index]


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.process = None
        self.conn = None
        self.env: dict | None = None
        self.request: Request | None = None
        self.phase = "build"
        self.deadline = math.inf
        self.start_failures = 0
        self.started_at = 0.0
        self.retiring = False

    def start(self, ctx) -> None:
        visible = _visible_id(int(self.device.split(":")[1])) if self.device.startswith("cuda") else None
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=worker_main, args=(child_conn, "cuda:0" if visible else "cpu",
                                                             visible, os.getpid()),
                                   name=f"fusionsearch-worker-{self.device}", daemon=True)
        self.process.start()
        child_conn.close()
        self.conn, self.env, self.request, self.retiring = parent_conn, None, None, False
        self.started_at = time.monotonic()
        self.deadline = self.started_at + STARTUP_TIMEOUT_S

    @property
    def ready(self) -> bool:
        return self.env is not None and self.request is None and not self.retiring

    def send(self, request: Request) -> None:
        self.request, self.phase = request, "build"
        self.deadline = time.monotonic() + request.compile_timeout_s
        self.conn.send(request)

    def kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
        if self.process is not None:
            self.process.join(5)
        if self.conn is not None:
            self.conn.close()
        self.process, self.conn = None, None

    def exit_text(self) -> str:
        code = self.process.exitcode if self.process is not None else None
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"


class WorkerPool:
    """One spawned worker per device; `run(requests)` yields (request, result, env) as results arrive."""

    def __init__(self, devices: Iterable[str]) -> None:
        import multiprocessing

        self.devices = list(devices)
        if not self.devices:
            raise WorkerError("a worker pool needs at least one device, e.g. ['cuda:0'] or ['cpu']")
        self._ctx = multiprocessing.get_context("spawn")
        self._workers = [_Worker(d) for d in self.devices]
        self.restarts = 0
        for worker in self._workers:
            worker.start(self._ctx)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop idle workers politely and kill busy ones (their measurement is abandoned, not recorded)."""
        for worker in self._workers:
            if worker.process is None:
                continue
            if worker.request is None and worker.conn is not None:
                try:
                    worker.conn.send(None)
                    worker.process.join(0.5)
                except (OSError, ValueError):
                    pass
            worker.kill()

    def _restart(self, worker: _Worker) -> None:
        worker.kill()
        self.restarts += 1
        worker.start(self._ctx)

    def environments(self) -> list[dict]:
        """Wait until every worker is ready; return their environments (gpu, torch, cuda, template hash)."""
        while any(w.env is None for w in self._workers):
            for _ in self._wait():  # nothing is in flight yet, so nothing is yielded
                pass
        return [w.env for w in self._workers]

    def call(self, request: Request) -> tuple[dict, dict]:
        """Run one request to its end; return (result, env)."""
        for _, result, env in self.run([request]):
            return result, env
        raise WorkerError(f"request {request.key} produced no result")

    def run(self, requests: Iterable[Request], on_start: Callable[[Request, dict], None] | None = None
            ) -> Iterator[tuple[Request, dict, dict]]:
        """Dispatch requests to idle workers; yield each (request, result, env); on_start runs before dispatch."""
        pending = deque(requests)
        while pending or any(w.request is not None for w in self._workers):
            for worker in self._workers:
                if pending and worker.ready:
                    request = pending.popleft()
                    if on_start is not None:
                        on_start(request, worker.env)
                    worker.send(request)
            yield from self._wait()

    def _wait(self) -> Iterator[tuple[Request, dict, dict]]:
        live = [w for w in self._workers if w.process is not None]
        deadline = min(w.deadline for w in live)
        waitables = [w.conn for w in live if w.conn is not None] + [w.process.sentinel for w in live]
        connection.wait(waitables, timeout=max(0.0, min(deadline - time.monotonic(), 1.0)))
        for worker in live:
            yield from self._drain(worker)
            if worker.process is None:
                continue
            if worker.retiring:  # it said its CUDA context is poisoned and is exiting
                self._restart(worker)
            elif not worker.process.is_alive() or worker.conn is None:
                yield from self._died(worker)
            elif time.monotonic() > worker.deadline:
                yield from self._timed_out(worker)

    def _drain(self, worker: _Worker) -> Iterator[tuple[Request, dict, dict]]:
        # Read everything the worker sent before judging its death: a result sent just before exit counts.
        while worker.conn is not None:
            try:
                if not worker.conn.poll():
                    return
                message = worker.conn.recv()
            except (EOFError, OSError):
                worker.conn.close()
                worker.conn = None
                return
            tag = message[0]
            if tag == "ready":
                worker.env, worker.start_failures = message[1], 0
                worker.deadline = math.inf
            elif tag == "phase" and worker.request is not None:
                worker.phase = message[1]
                limit = worker.request.run_timeout_s if worker.phase == "run" else worker.request.compile_timeout_s
                worker.deadline = time.monotonic() + limit
            elif tag == "result" and worker.request is not None:
                request, worker.request, worker.deadline = worker.request, None, math.inf
                worker.retiring = not message[3]
                yield request, message[2], worker.env

    def _count_start_failure(self, worker: _Worker, what: str) -> None:
        """One more failed start; past MAX_START_FAILURES close the pool and say what happened."""
        worker.start_failures += 1
        if worker.start_failures >= MAX_START_FAILURES:
            self.close()
            raise WorkerError(f"the worker for {worker.device} {what}")

    def _died(self, worker: _Worker) -> Iterator[tuple[Request, dict, dict]]:
        if worker.process is not None:
            worker.process.join(5)
        how = worker.exit_text()
        request, env = worker.request, worker.env
        if env is None:
            self._count_start_failure(worker, f"died {worker.start_failures + 1} times before it was ready ({how}); "
                                              "check that torch imports and the device works there")
        self._restart(worker)
        if request is not None:
            yield request, failure(
                "runtime_error",
                f"worker on {worker.device} died in the {worker.phase} phase ({how}); a CUDA fault such as an "
                f"illegal memory access poisons the context, so the worker was restarted"), env

    def _timed_out(self, worker: _Worker) -> Iterator[tuple[Request, dict, dict]]:
        request, env = worker.request, worker.env
        if request is None:  # never became ready
            self._count_start_failure(worker, f"did not start within {STARTUP_TIMEOUT_S:g} s "
                                              f"{worker.start_failures + 1} times; check the device and the torch install")
            self._restart(worker)
            return
        phase = worker.phase
        limit = request.run_timeout_s if phase == "run" else request.compile_timeout_s
        option = "--run-timeout" if phase == "run" else "--compile-timeout"
        self._restart(worker)
        yield request, failure("timeout", f"the {phase} phase exceeded its limit of {limit:g} s and the worker was "
                                          f"killed; raise {option} if the work is legitimately slow"), env


def request_seed(base_seed: int, key: str) -> int:
    """A fresh but reproducible seed per measurement."""
    return (base_seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 31)
