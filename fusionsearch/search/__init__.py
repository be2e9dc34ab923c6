"""Search for the fastest fusion plan: strategies (tuners) share one loop and a measurer (GPU or replay)."""
from .dp import k_best_plans
from .loop import Measurer, SearchError, SearchResult, SearchSpace, Trial, Tuner, run_search
from .measurers import (GpuMeasurer, ReplayMeasurer, config_from_records, load_records, shape_rows,
                        trials_from_records)
from .strategies import (STRATEGIES, ExhaustiveTuner, RandomTuner, SegmentDPTuner, XGBTuner, hand_fused_start,
                         make_tuner, trials_frame)

__all__ = ["k_best_plans", "Measurer", "SearchError", "SearchResult", "SearchSpace", "Trial", "Tuner", "run_search",
           "GpuMeasurer", "ReplayMeasurer", "config_from_records", "load_records", "shape_rows",
           "trials_from_records", "STRATEGIES", "ExhaustiveTuner", "RandomTuner", "SegmentDPTuner", "XGBTuner",
           "hand_fused_start", "make_tuner", "trials_frame"]
