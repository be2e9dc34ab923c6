"""A 12-layer BERT-base encoder (random weights, fixed seed), padded inputs and one timing rule, shared by the
device experiments that run whole models (export_proof.py, perf_report.py)."""
from __future__ import annotations

import torch


def bert_inputs(batch: int, seq: int, seed: int = 0):
    """Token ids and a [B, S] attention mask whose rows end in different amounts of padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):
        pad = (b * 29) % (seq // 2)
        if pad:
            mask[b, seq - pad:] = 0
    return ids.cuda(), mask.cuda()


def make_bert(dtype, attn="sdpa"):
    """BERT-base without the pooler on the GPU; the same weights for every dtype and attention implementation."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(attn_implementation=attn), add_pooling_layer=False).eval()
    return model.to(device="cuda", dtype=dtype)


def time_model(fn, graph: bool) -> dict:
    """Latency statistics of a whole-model call: graph replays when asked and capturable, else eager calls."""
    from fusionsearch.timing import time_cuda_graph, time_eager
    try:
        return {"graph": graph, **(time_cuda_graph(fn) if graph else time_eager(fn))}
    except Exception as error:  # capture can fail on host syncs inside a model; fall back and say so
        return {"graph": False, "note": f"graph capture failed: {type(error).__name__}: {str(error)[:120]}",
                **time_eager(fn)}
