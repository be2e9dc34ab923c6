"""fusionsearch.timing without a GPU: statistics of samples, and clear errors where CUDA is needed."""
from __future__ import annotations

import pytest
import torch

from fusionsearch.timing import (TimingError, capture_graph, launched_kernels, run_and_list_kernels, summarize,
                                 time_cuda_graph, time_eager)

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")


@needs_no_cuda
@pytest.mark.parametrize("measure", [time_cuda_graph, capture_graph, launched_kernels, run_and_list_kernels],
                         ids=["graph timing", "graph capture", "kernel names", "kernel names in order"])
def test_gpu_only_measurements_name_what_is_missing_without_cuda(measure):
    with pytest.raises(TimingError, match="needs a CUDA GPU"):
        measure(lambda: None)


def test_eager_timing_runs_on_the_cpu_and_reports_median_and_spread():
    stats = time_eager(lambda: sum(range(100)), warmup=1, min_repeats=5, max_repeats=5)
    assert stats["repeats"] >= 5 and stats["p20"] <= stats["median"] <= stats["p80"]


def test_summary_of_samples_orders_its_percentiles():
    stats = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stats["median"] == 3.0 and stats["p20"] <= stats["median"] <= stats["p80"]
