"""Inference with the whole padding-free forward replayed from CUDA graphs.

A BERT-base layer on a few thousand packed tokens is a dozen kernels of tens of microseconds; launched one by one
from Python the host is as slow as the GPU. ByteTransformer avoids that with a C++ runtime; we capture the
forward once per shape in a CUDA graph and replay it (one launch). A graph needs fixed shapes, and the number of
valid tokens changes with every batch, so `GraphedBert` rounds it up to a bucket (`capacity`, a multiple of
`bucket` tokens) and keys graphs by (B, L, capacity): the spare rows cost at most `bucket - 1` tokens of work, and
batches of one padded shape share a few graphs. One host read per call (the token count) picks the graph.

This is inference only (no autograd). Warm-up runs before each capture compile and autotune the Triton kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from projects.bytetransformer.model import BertModel, BertOutputs


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]
    outputs: Any


class CudaGraphs:
    """`fn(key, *tensors)` replayed from one CUDA graph per key; the tensors are copied into static buffers.

    The returned outputs are the graph's static tensors: the next call for the same key overwrites them.
    All graphs share one memory pool.
    """

    def __init__(self, fn: Callable[..., Any], warmup: int = 2) -> None:
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[Hashable, _Graph] = {}
        self._pool: Any = None

    def __call__(self, key: Hashable, *inputs: Tensor) -> Any:
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(key, inputs)
        for static, x in zip(entry.inputs, inputs):
            static.copy_(x)
        entry.graph.replay()
        return entry.outputs

    def _capture(self, key: Hashable, inputs: tuple[Tensor, ...]) -> _Graph:
        static = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles, autotunes and allocates outside the capture
            for _ in range(self.warmup):
                self.fn(key, *static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.fn(key, *static)
        self._pool = graph.pool()
        return _Graph(graph, static, outputs)


class GraphedBert:
    """Calls a `BertModel` like `model(input_ids, attention_mask, token_type_ids)`, through CUDA graphs.

    Returns fresh tensors (copies of the graph's outputs). `bucket` trades spare rows for fewer graphs.
    """

    def __init__(self, model: BertModel, bucket: int = 128) -> None:
        self.model, self.bucket = model, bucket
        self.graphs = CudaGraphs(self._forward)

    def _forward(self, key: tuple[int, int, int], input_ids: Tensor, attention_mask: Tensor,
                 token_type_ids: Tensor) -> BertOutputs:
        _, seqlen, capacity = key
        return self.model(input_ids, attention_mask, token_type_ids, capacity=capacity, max_seqlen=seqlen)

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> BertOutputs:
        batch, seqlen = input_ids.shape
        tokens = int(attention_mask.count_nonzero())
        capacity = max(1, -(-tokens // self.bucket)) * self.bucket
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        out = self.graphs((batch, seqlen, capacity), input_ids, attention_mask, token_type_ids)
        pooled = out.pooler_output.clone() if out.pooler_output is not None else None
        return BertOutputs(out.last_hidden_state.clone(), pooled)
