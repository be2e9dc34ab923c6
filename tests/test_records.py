"""Records: round trip, durable append, torn and malformed lines, schema and foreign refusal, resume keys, gz, frame."""
from __future__ import annotations

import gzip
import json
import os
import warnings

import pytest

from fusionsearch import records
from fusionsearch.config import LayerConfig
from fusionsearch.mask import decode
from fusionsearch.plan import Segment

CFG = LayerConfig(batch=2, seq_len=16, heads=2, head_size=32, ffn=256, dtype="fp16")
ENV = {"gpu": {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "sm_count": 132},
       "torch": "2.13.0", "cuda": "13.0", "template_hash": "abcdef0123456789"}
LAT = {"median": 10.0, "p20": 9.5, "p80": 10.5, "mean": 10.1, "min": 9.0, "max": 12.0, "repeats": 50}
ERR = {"rel": 1e-3, "torch_rel": 8e-4, "max_abs": 0.01}


def ok_record(item, median=10.0, env=ENV, cfg=CFG, **kw):
    return records.make_record(item, cfg, "ok", latency_us={**LAT, "median": median}, error=ERR, env=env, **kw)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_plan_record_follows_the_schema_and_round_trips(tmp_path):
    requested = 6826 ^ 0x7FFF  # the complement spells the same plan as canonical mask 6826
    plan = decode(requested)
    path = tmp_path / "sub" / "dir" / "r.jsonl"  # parents are created
    with records.RecordWriter(path) as writer:
        writer.started(plan, CFG, env=ENV, mask=requested)
        writer.write(ok_record(plan, mask=requested))
    started, final = list(records.read_records(path))
    assert started["kind"] == "started" and started["status"] == "started" and started["latency_us"] is None
    assert set(final) == {"schema", "kind", "status", "key", "mask", "canonical_id", "attention", "segments",
                          "baseline", "batch", "seq_len", "heads", "head_size", "ffn", "dtype", "latency_us",
                          "error", "message", "gpu", "torch", "cuda", "template_hash", "time"}
    assert final["schema"] == 1 and final["kind"] == "plan" and final["key"] == f"plan:{plan.canonical_id}"
    assert final["mask"] == requested and final["canonical_id"] == plan.canonical_id == 6826
    assert final["segments"] == [[s.first, s.last, s.attention] for s in plan.segments]
    assert final["latency_us"] == LAT and final["error"] == ERR and final["gpu"] == ENV["gpu"]
    assert final["time"].endswith("Z") and final["dtype"] == "fp16" and final["ffn"] == 256


def test_segment_and_baseline_records_carry_their_identity():
    seg = records.make_record(Segment(2, 5, True), CFG, "timeout", message="slow\nkernel", env=ENV)
    assert seg["key"] == "segment:seg_02_05_fa" and seg["segments"] == [[2, 5, True]] and seg["attention"] is True
    assert seg["latency_us"] is None and seg["message"] == "slow kernel"  # one line
    base = records.make_record("sdpa_graph", CFG, "ok", latency_us=LAT, env=ENV)
    assert base["key"] == "baseline:sdpa_graph" and base["baseline"] == "sdpa_graph" and base["mask"] is None


def test_bad_status_latency_or_item_is_refused():
    with pytest.raises(records.RecordError, match="status 'fast'"):
        records.make_record("eager", CFG, "fast", env=ENV)
    with pytest.raises(records.RecordError, match="lacks p20"):
        records.make_record("eager", CFG, "ok", latency_us={"median": 1.0}, env=ENV)
    with pytest.raises(records.RecordError, match="neither a Plan"):
        records.key_of("not_a_baseline")


def test_nan_errors_are_written_as_null_so_the_file_stays_strict_json(tmp_path):
    path = tmp_path / "r.jsonl"
    with records.RecordWriter(path) as writer:
        writer.write(records.make_record("eager", CFG, "wrong_answer", error={"rel": float("nan"), "torch_rel": 1e-3,
                                                                              "max_abs": float("inf")}, env=ENV))
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert next(records.read_records(path))["error"] == {"rel": None, "torch_rel": 1e-3, "max_abs": None}


def test_every_write_is_flushed_and_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(records.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    path = tmp_path / "r.jsonl"
    writer = records.RecordWriter(path)
    writer.write(ok_record("eager"))
    # Visible to an independent reader before close: flushed, not buffered.
    assert len(path.read_text().splitlines()) == 1 and len(synced) == 1
    writer.write(ok_record("sdpa"))
    assert len(path.read_text().splitlines()) == 2 and len(synced) == 2
    writer.close()


def test_torn_last_line_is_skipped_with_a_warning_naming_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    good = json.dumps(ok_record("eager"))
    path.write_text(good + "\n" + good[: len(good) // 2])
    with pytest.warns(UserWarning, match=r"r\.jsonl:2: skipped a torn last line"):
        found = list(records.read_records(path))
    assert len(found) == 1


def test_writer_cuts_a_torn_tail_before_appending(tmp_path):
    path = tmp_path / "r.jsonl"
    good = json.dumps(ok_record("eager"))
    path.write_text(good + "\n" + good[:40])
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        writer = records.RecordWriter(path)
    writer.write(ok_record("sdpa"))
    writer.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keys = [r["key"] for r in records.read_records(path)]
    assert keys == ["baseline:eager", "baseline:sdpa"]


def test_malformed_middle_line_raises_with_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    good = json.dumps(ok_record("eager"))
    write_lines(path, [good, "{not json", good])
    with pytest.raises(records.RecordError, match=r"r\.jsonl:2: malformed record"):
        list(records.read_records(path))
    # A complete (newline-terminated) last line that is malformed is corruption, not a torn write.
    write_lines(path, [good, "[1, 2]"])
    with pytest.raises(records.RecordError, match=r"r\.jsonl:2: malformed record"):
        list(records.read_records(path))


def test_unknown_schema_version_is_refused_naming_both_versions(tmp_path):
    path = tmp_path / "r.jsonl"
    write_lines(path, [json.dumps({**ok_record("eager"), "schema": 7})])
    with pytest.raises(records.RecordError, match=r"schema 7 is unknown to this build, which reads schema 1"):
        list(records.read_records(path))


@pytest.mark.parametrize("field,value", [("gpu_name", "NVIDIA A100-SXM4-80GB"), ("dtype", "bf16"),
                                         ("template_hash", "0000000000000000")])
def test_foreign_records_are_refused_unless_allowed(tmp_path, field, value):
    path = tmp_path / "r.jsonl"
    write_lines(path, [json.dumps(ok_record("eager"))])
    expect = {"gpu_name": ENV["gpu"]["name"], "dtype": "fp16", "template_hash": ENV["template_hash"]}
    assert len(list(records.read_records(path, expect=expect))) == 1
    expect[field] = value
    with pytest.raises(records.RecordError, match=rf"{field} .* but '{value}' was expected.*allow_foreign=True"):
        list(records.read_records(path, expect=expect))
    assert len(list(records.read_records(path, expect=expect, allow_foreign=True))) == 1


def test_done_keys_need_a_final_status_and_a_matching_sweep(tmp_path):
    path = tmp_path / "r.jsonl"
    plan_a, plan_b = decode(6826), decode(1365)
    other_shape = LayerConfig(batch=4, seq_len=16, heads=2, head_size=32, ffn=256, dtype="fp16")
    with records.RecordWriter(path) as writer:
        writer.started(plan_a, CFG, env=ENV)
        writer.write(ok_record(plan_a))
        writer.started(plan_b, CFG, env=ENV)  # crashed: no result
        writer.started("eager", CFG, env=ENV)
        writer.write(records.make_record("eager", CFG, "timeout", env=ENV))
        writer.write(ok_record("sdpa", cfg=other_shape))
    match = records.sweep_match(CFG, ENV)
    assert records.done_keys(path, match=match) == {records.plan_key(plan_a), "baseline:eager"}
    assert records.done_keys(path, match=match, retry=["timeout"]) == {records.plan_key(plan_a)}
    assert "baseline:sdpa" in records.done_keys(path)  # without a match every shape counts
    foreign = {**ENV, "gpu": {**ENV["gpu"], "name": "other"}}
    assert records.done_keys(path, match=records.sweep_match(CFG, foreign)) == set()
    assert records.done_keys(tmp_path / "missing.jsonl") == set()


def test_compressed_records_read_like_plain_ones(tmp_path):
    path = tmp_path / "r.jsonl"
    with records.RecordWriter(path) as writer:
        writer.write(ok_record("eager"))
        writer.write(ok_record("sdpa", median=7.0))
    packed = records.compress(path, keep=False)
    assert packed.name == "r.jsonl.gz" and not path.exists()
    with gzip.open(packed, "rt") as handle:
        assert len(handle.read().splitlines()) == 2
    assert [r["key"] for r in records.read_records(packed)] == ["baseline:eager", "baseline:sdpa"]
    with pytest.raises(records.RecordError, match="compressed"):
        records.RecordWriter(packed)


def test_truncated_gz_is_an_error_not_silently_short(tmp_path):
    path = tmp_path / "r.jsonl"
    with records.RecordWriter(path) as writer:
        for i in range(50):
            writer.write(ok_record("eager", median=float(i)))
    packed = records.compress(path)
    data = packed.read_bytes()
    packed.write_bytes(data[: len(data) // 2])
    with pytest.raises(records.RecordError, match="cannot be read"):
        list(records.read_records(packed))


def test_load_frame_flattens_latency_and_gpu(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    with records.RecordWriter(first) as writer:
        writer.started(decode(6826), CFG, env=ENV)
        writer.write(ok_record(decode(6826), median=12.5, mask=6826))
    plain = tmp_path / "b.jsonl"
    with records.RecordWriter(plain) as writer:
        writer.write(records.make_record("eager", CFG, "runtime_error", message="boom", env=ENV))
    records.compress(plain, keep=False)
    frame = records.load_frame([first, second])
    assert len(frame) == 2  # `started` markers are left out
    for column in ("latency_us", "p20_us", "p80_us", "repeats", "gpu_name", "gpu_capability", "mask",
                   "canonical_id", "segments", "status", "dtype", "template_hash"):
        assert column in frame.columns
    row = frame.iloc[0]
    assert row["latency_us"] == 12.5 and row["p20_us"] == 9.5 and row["p80_us"] == 10.5 and row["repeats"] == 50
    assert row["gpu_name"] == ENV["gpu"]["name"] and row["gpu_capability"] == "9.0" and row["mask"] == 6826
    assert frame.iloc[1]["status"] == "runtime_error" and frame["latency_us"].isna().iloc[1]
    assert len(records.load_frame(first, include_started=True)) == 2
    empty = records.load_frame([])
    assert list(empty.columns) == list(records.FRAME_COLUMNS) and len(empty) == 0


def test_environment_without_cuda_names_the_cpu():
    env = records.environment()
    import torch

    if not torch.cuda.is_available():
        assert env["gpu"]["name"] == "cpu"
    assert env["torch"] == torch.__version__ and len(env["template_hash"]) >= 4
