"""experiments/kernel_ab.py and plan_ab.py without a GPU: the patched copy, the A/B table, and bad input."""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import pytest
from experiment_scripts import load_experiment

ROOT = Path(__file__).resolve().parents[1]


def test_variant_is_a_copy_of_the_code_with_the_patch_applied_and_this_tree_untouched(tmp_path):
    ab = load_experiment("kernel_ab")
    # A patch made against the tree as it is, so the test does not go stale when the kernels change.
    original = (ROOT / "kernels" / "fs_attention.cuh").read_text().splitlines(keepends=True)
    changed = ["// VARIANT_MARKER\n", *original]
    patch = tmp_path / "marker.patch"
    patch.write_text("".join(difflib.unified_diff(original, changed, "a/kernels/fs_attention.cuh",
                                                  "b/kernels/fs_attention.cuh")))
    variant = ab.patched_copy(patch, tmp_path / "variant")
    assert (variant / "kernels" / "fs_attention.cuh").read_text().splitlines(keepends=True) == changed
    assert "VARIANT_MARKER" not in (ROOT / "kernels" / "fs_attention.cuh").read_text()
    assert (variant / "fusionsearch" / "runtime.py").is_file() and (variant / "experiments" / "plan_ab.py").is_file()
    assert not (variant / "experiments" / "data").exists() and not (variant / ".git").exists()


def test_a_patch_that_does_not_apply_stops_with_its_name(tmp_path):
    ab = load_experiment("kernel_ab")
    bad = tmp_path / "stale.patch"
    bad.write_text("--- a/kernels/fs_attention.cuh\n+++ b/kernels/fs_attention.cuh\n@@ -1,1 +1,1 @@\n"
                   "-no such line in the file\n+replacement\n")
    with pytest.raises(SystemExit, match="stale.patch does not apply"):
        ab.patched_copy(bad, tmp_path / "variant")


def test_table_gives_each_trees_medians_by_round_and_each_variants_change_of_the_means():
    ab = load_experiment("kernel_ab")

    def row(plan: float, attention: float) -> dict:
        return {"dtype": "fp16", "shape": "64x512", "mask": 48932, "plan": {"median": plan},
                "segments": {"seg_01_06_fa": {"median": attention}}}

    runs = {"base": [[row(1000.0, 200.0)], [row(1010.0, 210.0)]],
            "tiles": [[row(990.0, 230.0)], [row(1000.0, 240.0)]],
            "ring": [[row(1005.0, 205.0)], [row(1005.0, 205.0)]]}
    lines = ab.table(runs)
    assert lines[0].count("µs by round") == 3 and lines[1].count("---") == 8
    assert lines[2] == ("| fp16 | 64x512 (48932) | plan | 1000.0 / 1010.0 | 990.0 / 1000.0 | -1.0 % | "
                        "1005.0 / 1005.0 | +0.0 % |")
    assert lines[3] == ("| fp16 | 64x512 (48932) | seg_01_06_fa | 200.0 / 210.0 | 230.0 / 240.0 | +14.6 % | "
                        "205.0 / 205.0 | +0.0 % |")


def test_a_disturbed_round_is_left_out_of_the_change_and_named_in_the_table():
    ab = load_experiment("kernel_ab")

    def row(median: float, p20: float, p80: float) -> dict:
        sample = {"median": median, "p20": p20, "p80": p80}
        return {"dtype": "fp16", "shape": "1x32", "mask": 32768, "plan": sample, "segments": {"seg_00_14_fa": sample}}

    # Round 2 of the variant read 58.8–93.4 µs while its rounds 1 and 3 read 23.9 (an H100, 2026-12-07).
    runs = {"base": [[row(26.8, 26.7, 26.8)], [row(26.7, 26.7, 26.8)], [row(26.8, 26.7, 26.9)]],
            "all": [[row(23.8, 23.8, 23.9)], [row(70.8, 58.8, 93.4)], [row(23.9, 23.9, 24.0)]]}
    assert ab.disturbed_rounds(runs, "all", 0, "plan") == [1]
    assert round(ab.change(runs, "all", 0, "plan"), 1) == -11.0
    assert "(round 2 disturbed, left out)" in ab.table(runs)[2]
    verdict = ab.verdicts(runs, "plan")["all"]
    assert verdict["keep"] and round(verdict["kernel_change_pct"], 1) == -11.0
    # Where every round is disturbed, all of them count.
    noisy = {"base": [[row(26.8, 20.0, 30.0)]], "all": [[row(23.8, 20.0, 30.0)]]}
    assert round(ab.change(noisy, "all", 0, "plan"), 1) == -11.2 and "(every round disturbed)" in ab.table(noisy)[2]


def test_a_case_must_be_shape_and_mask():
    plan_ab = load_experiment("plan_ab")
    assert plan_ab.parse_case("16x128:48996") == ("16x128", 48996)
    with pytest.raises(argparse.ArgumentTypeError, match="write e.g. 64x512:48932"):
        plan_ab.parse_case("16x128")


def test_variants_need_distinct_patch_names(tmp_path, capsys, monkeypatch):
    ab = load_experiment("kernel_ab")
    patch = ROOT / "experiments" / "patches" / "attention-128-key-tiles.patch"
    monkeypatch.setattr(sys, "argv", ["kernel_ab.py", "--patch", str(patch), str(patch), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        ab.main()
    assert stop.value.code == 2 and "distinct name" in capsys.readouterr().err


def test_verdict_keeps_a_variant_only_if_its_kernel_gains_and_no_plan_loses():
    ab = load_experiment("kernel_ab")

    def rounds(*cases: tuple[float, float]) -> list[list[dict]]:
        rows = [{"dtype": "fp16", "shape": shape, "mask": 48932, "plan": {"median": plan},
                 "segments": {"seg_00_00": {"median": 50.0}, "seg_01_06_fa": {"median": attention}}}
                for shape, (plan, attention) in zip(("64x512", "16x512"), cases)]
        return [rows, rows]

    runs = {"base": rounds((1000.0, 100.0), (250.0, 40.0)),
            "faster": rounds((990.0, 96.0), (249.0, 39.0)),        # attention −3.25 % on average, plans faster
            "plan_slower": rounds((990.0, 96.0), (253.0, 39.0)),   # the 16x512 plan +1.2 %
            "too_little": rounds((999.0, 99.5), (250.0, 39.8)),    # attention −0.5 %
            "plans_faster": rounds((980.0, 96.0), (246.0, 39.0))}  # plans −2.0 % and −1.6 %
    verdict = ab.verdicts(runs, "_fa")
    assert verdict["faster"] == {"kernel": "_fa", "kernel_change_pct": -3.25, "worst_plan_change_pct": -0.4,
                                 "keep": True}
    assert not verdict["plan_slower"]["keep"] and verdict["plan_slower"]["worst_plan_change_pct"] == 1.2
    assert not verdict["too_little"]["keep"] and verdict["too_little"]["kernel_change_pct"] == -0.5
    with pytest.raises(SystemExit, match="ends in '_gelu'"):
        ab.verdicts(runs, "_gelu")
    # "plan" judges the whole plans: faster's are −1.0 % and −0.4 %, −0.7 % on average, too little to keep
    plans = ab.verdicts(runs, "plan")
    assert plans["faster"]["kernel_change_pct"] == -0.7 and not plans["faster"]["keep"]
    assert plans["plan_slower"]["kernel_change_pct"] == 0.1 and not plans["plan_slower"]["keep"]
    assert plans["plans_faster"] == {"kernel": "plan", "kernel_change_pct": -1.8, "worst_plan_change_pct": -1.6,
                                     "keep": True}


def test_decide_names_the_kernels_of_the_cases_before_any_build(tmp_path, capsys, monkeypatch):
    ab = load_experiment("kernel_ab")
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))  # as when the script runs from its folder
    patch = ROOT / "experiments" / "patches" / "attention-128-key-tiles.patch"
    monkeypatch.setattr(sys, "argv", ["kernel_ab.py", "--patch", str(patch), "--out", str(tmp_path / "out"),
                                      "--cases", "16x128:48996", "--decide", "_gelu"])
    with pytest.raises(SystemExit) as stop:
        ab.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "ends in '_gelu'" in err and "seg_01_06_fa" in err
    assert not (tmp_path / "out").exists()


def test_a_prepared_plan_builds_checks_and_launches_the_plan_it_names(monkeypatch):
    # The GPU parts stand in as fakes: what is checked is that the plan, shape and inputs reach the library.
    import fusionsearch.runtime as runtime
    import fusionsearch.verify as verify
    import fusionsearch.weights as weights

    launched = []

    class FakeLibrary:
        @classmethod
        def get(cls, cfg, segments):
            library = cls()
            library.cfg, library.segments = cfg, segments
            return library

        def run(self, kernel_ids, tensors, batch, seq, eps, scale):
            launched.append((kernel_ids, tensors["x"].shape, batch, seq, eps, scale))

    class FakeLayer:
        def __init__(self, plan, layer_weights, cfg, library):
            self.kernel_ids = list(range(len(plan.segments)))

        def tensors_for(self, x, bias, out):
            return {"x": x, "key_bias": bias, "out": out}

    monkeypatch.setattr(runtime, "KernelLibrary", FakeLibrary)
    monkeypatch.setattr(runtime, "FusedEncoderLayer", FakeLayer)
    monkeypatch.setattr(weights.LayerWeights, "random", classmethod(lambda cls, cfg, seed, device: "weights"))
    monkeypatch.setattr(verify, "verify_plan", lambda layer, layer_weights, cfg: "budget")
    real_inputs = verify.random_inputs
    monkeypatch.setattr(verify, "random_inputs", lambda cfg, seed: real_inputs(cfg, seed, device="cpu"))
    case = load_experiment("plan_ab").PreparedPlan("2x32", 48996, "bf16")
    assert case.budget == "budget" and case.plan.mask == 48996
    assert (case.cfg.batch, case.cfg.seq_len, case.cfg.dtype) == (2, 32, "bf16")
    assert case.library.segments == case.plan.segments and case.tensors["key_bias"].shape == (2, 32)
    case.run(case.layer.kernel_ids)
    assert launched == [(list(range(7)), (2, 32, 768), 2, 32, case.cfg.eps, 0.125)]
