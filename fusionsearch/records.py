"""Measurement records (docs/records.md, schema 1): build, append (fsynced), read, resume and load as a DataFrame."""
from __future__ import annotations

import fcntl
import gzip
import json
import math
import os
import shutil
import warnings
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Iterable, Iterator

from .config import LayerConfig
from .errors import FusionSearchError
from .plan import Plan, Segment

SCHEMA_VERSION = 1
READABLE_SCHEMAS = (1,)
KINDS = ("plan", "segment", "baseline", "started")
STATUSES = ("ok", "compile_error", "runtime_error", "timeout", "wrong_answer")
BASELINE_NAMES = ("eager", "eager_graph", "sdpa", "sdpa_graph", "nn_fastpath", "compile", "compile_graph",
                  "compile_max_autotune", "hf_bert", "hf_bert_graph")
LATENCY_FIELDS = ("median", "p20", "p80", "mean", "min", "max", "repeats")
# Fields `expect` may pin, and where each lives in a record.
_EXPECT_FIELDS = {"gpu_name": ("gpu", "name"), "dtype": ("dtype",), "template_hash": ("template_hash",)}
# Record fields that identify a sweep: resume only trusts results measured under all of them.
SWEEP_FIELDS = ("batch", "seq_len", "heads", "head_size", "ffn", "dtype", "gpu_name", "template_hash")


class RecordError(FusionSearchError):
    """A records file that cannot be read as schema-1 measurements of the expected GPU, dtype and templates."""


# ---------------------------------------------------------------- building

def plan_key(plan: Plan) -> str:
    return f"plan:{plan.canonical_id}"


def segment_key(segment: Segment) -> str:
    return f"segment:{segment.name}"


def baseline_key(name: str) -> str:
    return f"baseline:{name}"


def key_of(item: "Plan | Segment | str") -> str:
    """The record key of a sweep item: a Plan, a Segment or a baseline name."""
    if isinstance(item, Plan):
        return plan_key(item)
    if isinstance(item, Segment):
        return segment_key(item)
    if isinstance(item, str) and item in BASELINE_NAMES:
        return baseline_key(item)
    raise RecordError(f"sweep item {item!r} is neither a Plan, a Segment nor a baseline name; "
                      f"baselines are {', '.join(BASELINE_NAMES)}")


def kind_of(item: "Plan | Segment | str") -> str:
    return "plan" if isinstance(item, Plan) else "segment" if isinstance(item, Segment) else "baseline"


def _template_hash() -> str:
    from .resources import sources_hash

    try:
        return sources_hash()
    except FileNotFoundError:  # an install without templates cannot build kernels, but can still record baselines
        return "none"


@cache
def environment(device_index: int | None = None) -> dict:
    """gpu / torch / cuda / template_hash of this process (gpu name 'cpu' without CUDA); cached per device."""
    import torch

    gpu = {"name": "cpu", "capability": None, "sm_count": None}
    if torch.cuda.is_available():
        index = torch.cuda.current_device() if device_index is None else device_index
        props = torch.cuda.get_device_properties(index)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "sm_count": props.multi_processor_count}
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
            "template_hash": _template_hash()}


def _identity(item: "Plan | Segment | str | None") -> dict:
    fields = {"mask": None, "canonical_id": None, "attention": None, "segments": None, "baseline": None}
    if isinstance(item, Plan):
        fields.update(mask=item.mask, canonical_id=item.canonical_id, attention=item.attention,
                      segments=[[s.first, s.last, s.attention] for s in item.segments])
    elif isinstance(item, Segment):
        fields.update(attention=item.attention, segments=[[item.first, item.last, item.attention]])
    elif isinstance(item, str):
        fields.update(baseline=item)
    return fields


def make_record(item: "Plan | Segment | str", cfg: LayerConfig, status: str, *, kind: str | None = None,
                latency_us: dict | None = None, error: dict | None = None, message: str | None = None,
                mask: int | None = None, env: dict | None = None) -> dict:
    """One record per docs/records.md; `env` (from environment(), possibly a worker's) fills gpu/torch/cuda/hash."""
    kind = kind or kind_of(item)
    if kind not in KINDS:
        raise RecordError(f"record kind {kind!r} is not one of {', '.join(KINDS)}")
    allowed = ("started",) if kind == "started" else STATUSES
    if status not in allowed:
        raise RecordError(f"status {status!r} is not valid for kind {kind!r}; use one of {', '.join(allowed)}")
    if latency_us is not None:
        missing = [f for f in LATENCY_FIELDS if f not in latency_us]
        if missing:
            raise RecordError(f"latency_us lacks {', '.join(missing)}; give all of {', '.join(LATENCY_FIELDS)}")
        latency_us = {f: latency_us[f] for f in LATENCY_FIELDS}
    env = env or environment()
    record = {"schema": SCHEMA_VERSION, "kind": kind, "status": status, "key": key_of(item), **_identity(item)}
    if mask is not None:  # the mask as requested, which may be a non-canonical spelling of the plan
        record["mask"] = int(mask)
    record.update(batch=cfg.batch, seq_len=cfg.seq_len, heads=cfg.heads, head_size=cfg.head_size, ffn=cfg.ffn,
                  dtype=cfg.dtype, latency_us=latency_us if status == "ok" else None, error=_finite(error),
                  message=_one_line(message), gpu=dict(env["gpu"]), torch=env["torch"], cuda=env["cuda"],
                  template_hash=env["template_hash"],
                  time=datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"))
    return record


def started_record(item: "Plan | Segment | str", cfg: LayerConfig, *, env: dict | None = None,
                   mask: int | None = None) -> dict:
    """The marker written before a measurement: a `started` without its result is evidence of a crash."""
    return make_record(item, cfg, "started", kind="started", env=env, mask=mask)


def _finite(value):
    """Replace NaN and infinities by None: records stay strict JSON that every reader parses."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _one_line(message: str | None) -> str | None:
    if message is None:
        return None
    text = " ".join(str(message).split())
    return text[:2000] + " …" if len(text) > 2000 else text


# ---------------------------------------------------------------- writing

class RecordWriter:
    """Append-only JSON-lines writer: each record is one line, flushed and fsynced under an flock."""

    def __init__(self, path: "str | os.PathLike") -> None:
        self.path = Path(path).expanduser()
        if self.path.suffix == ".gz":
            raise RecordError(f"records file {self.path} is compressed; append to the .jsonl file and call "
                              f"records.compress() when the sweep is finished")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        with self._locked():
            self._drop_torn_tail()

    def _locked(self):
        return _FileLock(self._file.fileno())

    def _drop_torn_tail(self) -> None:
        # A writer killed mid-line leaves bytes without a newline; appending after them would turn the torn
        # line into a malformed middle line, so cut it (it never held a finished record).
        size = os.fstat(self._file.fileno()).st_size
        if size == 0:
            return
        with open(self.path, "rb") as reader:
            reader.seek(max(0, size - 1))
            if reader.read(1) == b"\n":
                return
            keep = _last_newline_end(reader, size)
        os.truncate(self.path, keep)
        warnings.warn(f"{self.path}: dropped a torn last line of {size - keep} bytes left by an interrupted "
                      f"writer", stacklevel=3)

    def write(self, record: dict) -> None:
        """Append one record and make it durable before returning."""
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._locked():
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def started(self, item: "Plan | Segment | str", cfg: LayerConfig, *, env: dict | None = None,
                mask: int | None = None) -> dict:
        """Write the `started` marker for `item` and return it."""
        record = started_record(item, cfg, env=env, mask=mask)
        self.write(record)
        return record

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _FileLock:
    """An flock held for one write: it dies with its holder, so a killed writer never blocks the next."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def _last_newline_end(reader, size: int) -> int:
    """Offset just past the last newline before `size` (0 if none)."""
    block = 1 << 16
    end = size
    while end > 0:
        start = max(0, end - block)
        reader.seek(start)
        chunk = reader.read(end - start)
        index = chunk.rfind(b"\n")
        if index >= 0:
            return start + index + 1
        end = start
    return 0


def compress(path: "str | os.PathLike", *, keep: bool = True) -> Path:
    """Write PATH.gz next to a finished .jsonl (atomically) for committing; remove the original unless keep."""
    source = Path(path)
    target = source.with_name(source.name + ".gz")
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(source, "rb") as raw, gzip.open(temp, "wb", compresslevel=9) as packed:
        shutil.copyfileobj(raw, packed)
    os.replace(temp, target)
    if not keep:
        source.unlink()
    return target


# ---------------------------------------------------------------- reading

def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def _lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, is_last) for each line of a .jsonl or .jsonl.gz file."""
    try:
        with _open_text(path) as handle:
            previous, number = None, 0
            for number, text in enumerate(handle, 1):
                if previous is not None:
                    yield number - 1, previous, False
                previous = text
            if previous is not None:
                yield number, previous, True
    except (EOFError, gzip.BadGzipFile, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise RecordError(f"records file {path} does not exist; check the path or run a sweep first") from None
        raise RecordError(f"records file {path} cannot be read ({error}); a truncated .gz must be recompressed "
                          f"from its .jsonl") from None


def _field(record: dict, path: tuple[str, ...]):
    value = record
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def read_records(path: "str | os.PathLike", *, allow_foreign: bool = False, expect: dict | None = None,
                 kinds: Iterable[str] | None = None) -> Iterator[dict]:
    """Yield the records of a .jsonl / .jsonl.gz file, checking schema and (if given) gpu_name/dtype/template_hash."""
    path = Path(path).expanduser()
    pinned = {name: value for name, value in (expect or {}).items() if value is not None}
    unknown = set(pinned) - set(_EXPECT_FIELDS)
    if unknown:
        raise RecordError(f"expect names {', '.join(sorted(unknown))}; it may pin {', '.join(_EXPECT_FIELDS)}")
    wanted = None if kinds is None else set(kinds)
    for number, text, is_last in _lines(path):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as error:
            if is_last and not text.endswith("\n"):
                warnings.warn(f"{path}:{number}: skipped a torn last line (an interrupted write); "
                              f"the next writer removes it", stacklevel=2)
                return
            raise RecordError(f"{path}:{number}: malformed record ({error}); only a torn last line is "
                              f"skipped; repair or remove this line") from None
        version = record.get("schema")
        if version not in READABLE_SCHEMAS:
            raise RecordError(f"{path}:{number}: record schema {version!r} is unknown to this build, which reads "
                              f"schema {', '.join(map(str, READABLE_SCHEMAS))}; upgrade fusionsearch to read it")
        if not allow_foreign:
            for name, value in pinned.items():
                found = _field(record, _EXPECT_FIELDS[name])
                if found != value:
                    raise RecordError(
                        f"{path}:{number}: record has {name} {found!r} but {value!r} was expected; latencies of "
                        f"another GPU, dtype or template version do not mix; pass allow_foreign=True "
                        f"(--allow-foreign) to read them anyway")
        if wanted is None or record.get("kind") in wanted:
            yield record


def expect_here(dtype: str, env: dict | None = None) -> dict:
    """An `expect` pinning this process's GPU name and template hash and the given dtype."""
    env = env or environment()
    return {"gpu_name": env["gpu"]["name"], "dtype": dtype, "template_hash": env["template_hash"]}


def sweep_match(cfg: LayerConfig, env: dict) -> dict:
    """The SWEEP_FIELDS values a record must carry to count as part of the sweep of `cfg` on `env`."""
    return {"batch": cfg.batch, "seq_len": cfg.seq_len, "heads": cfg.heads, "head_size": cfg.head_size,
            "ffn": cfg.ffn, "dtype": cfg.dtype, "gpu_name": env["gpu"]["name"],
            "template_hash": env["template_hash"]}


def _matches(record: dict, match: dict | None) -> bool:
    if not match:
        return True
    for name, value in match.items():
        found = _field(record, _EXPECT_FIELDS[name]) if name in _EXPECT_FIELDS else record.get(name)
        if found != value:
            return False
    return True


def final_records(path: "str | os.PathLike", *, match: dict | None = None) -> dict[str, dict]:
    """key → the last record with a final status among those matching `match` (a missing file gives {})."""
    path = Path(path).expanduser()
    if not path.exists():
        return {}
    latest: dict[str, dict] = {}
    for record in read_records(path, allow_foreign=True):
        if record.get("kind") != "started" and record.get("status") in STATUSES and _matches(record, match):
            latest[record["key"]] = record
    return latest


def done_keys(path: "str | os.PathLike", *, match: dict | None = None, retry: Iterable[str] = ()) -> set[str]:
    """Keys that already have a final status (resume skips them); statuses in `retry` count as not done."""
    again = set(retry)
    return {key for key, rec in final_records(path, match=match).items() if rec["status"] not in again}


# ---------------------------------------------------------------- pandas

FRAME_COLUMNS = ("schema", "kind", "status", "key", "mask", "canonical_id", "attention", "segments", "baseline",
                 "batch", "seq_len", "heads", "head_size", "ffn", "dtype", "latency_us", "p20_us", "p80_us",
                 "mean_us", "min_us", "max_us", "repeats", "error_rel", "error_torch_rel", "error_max_abs",
                 "message", "gpu_name", "gpu_capability", "gpu_sm_count", "torch", "cuda", "template_hash", "time",
                 "source")


def _flatten(record: dict, source: str) -> dict:
    row = {name: record.get(name) for name in FRAME_COLUMNS}
    latency = record.get("latency_us") or {}
    row.update(latency_us=latency.get("median"), p20_us=latency.get("p20"), p80_us=latency.get("p80"),
               mean_us=latency.get("mean"), min_us=latency.get("min"), max_us=latency.get("max"),
               repeats=latency.get("repeats"))
    error = record.get("error") or {}
    row.update(error_rel=error.get("rel"), error_torch_rel=error.get("torch_rel"), error_max_abs=error.get("max_abs"))
    gpu = record.get("gpu") or {}
    row.update(gpu_name=gpu.get("name"), gpu_capability=gpu.get("capability"), gpu_sm_count=gpu.get("sm_count"),
               source=source)
    return row


def load_frame(path_or_paths, *, include_started: bool = False, **kw):
    """Records of one or more files as a DataFrame: latency_us = median, p20_us, p80_us, repeats, gpu_name, …"""
    import pandas as pd

    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    rows = []
    for path in paths:
        for record in read_records(path, **kw):
            if include_started or record.get("kind") != "started":
                rows.append(_flatten(record, str(path)))
    frame = pd.DataFrame(rows, columns=list(FRAME_COLUMNS))
    for name in ("latency_us", "p20_us", "p80_us", "mean_us", "min_us", "max_us", "error_rel", "error_torch_rel",
                 "error_max_abs"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype(float)
    frame["repeats"] = frame["repeats"].astype("Int64")
    return frame
