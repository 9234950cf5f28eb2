#!/usr/bin/env python
"""ByteTransformer's benchmark on our padding-free BERT: BERT-base forward on variable-length batches.

The paper's protocol (Zhai et al. 2023; `benchmark/bert_bench.sh` of the official code): BERT-base (12 layers,
12 heads x 64), fp16 (and bf16 here), batch 1 / 8 / 16, maximum length 128 ... 1024, batch padded to the maximum
length, each sequence's length drawn uniformly from (2 avg - max, max] with avg = 0.6 max (fixed seed). Timed is
the whole forward from padded ids and mask to the padded last hidden state and the pooled output:

  hf_eager      transformers' BertModel (attn_implementation="sdpa"), eager: the padded PyTorch baseline
  hf_graph      the same replayed from a CUDA graph (the strongest padded model we can build; n/a if it cannot
                be captured)
  ours_torch    our packed model with PyTorch's varlen FlashAttention, CUDA graph per token bucket
  ours_triton   our packed model with our Triton varlen kernel, CUDA graph per token bucket
  ours_eager    our packed model (Triton attention), eager
All BERT variants share one set of random weights; errors are relative (norm) errors on the valid tokens against
transformers' model in fp32, for ours and for hf in the same dtype. The position table is enlarged to 1024 rows
so that length 1024 exists (it changes no compute). Last, LayerNorm(x + b + residual) alone: eager, compiled,
our Triton kernel.

Attention alone (one layer's attention core, q/k/v given): padded math (softmax(QK^T + mask) V materialised,
the paper's PyTorch MHA), padded SDPA with the padding mask (what hf runs), PyTorch varlen, our Triton kernel;
these and the LayerNorm kernels are timed replayed from a CUDA graph (no launch overhead, warm L2), as they run
inside the graphed model.

    python scripts/bench_bytetransformer.py                 # the grid above, fp16 and bf16 (H200: ~2 min)
    python scripts/bench_bytetransformer.py --quick         # CPU smoke run on a tiny BERT
Writes $OUT/bytetransformer.json when OUT is set. Needs torch, triton (GPU) and transformers; no hydra/lightning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from projects.bytetransformer.inference import CudaGraphs, GraphedBert  # noqa: E402
from projects.bytetransformer.model import BertConfig, BertModel, bert_base  # noqa: E402
from shared.kernels.varlen_attention import pack, pack_info, varlen_attention  # noqa: E402
from shared.kernels.varlen_attention.reference import varlen_attention_reference  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def paper_lengths(batch: int, max_len: int, seed: int, avg_ratio: float = 0.6) -> list[int]:
    """Lengths uniform in (2 avg - max, max] (the official bert_transformer_test.py's rule)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + batch * 1009 + max_len)
    low = int(2 * avg_ratio * max_len - max_len)
    return torch.randint(low + 1, max_len + 1, (batch,), generator=gen).tolist()


def timer(device: torch.device, graphed: bool = False):
    """Median milliseconds of a callable: triton's do_bench on CUDA (with `graphed`, do_bench_cudagraph: many
    calls replayed from one CUDA graph, so a single kernel is timed without its Python launch), a wall-clock
    loop on CPU."""
    if device.type == "cuda":
        import triton.testing

        if graphed:
            return lambda fn: triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")

    def cpu(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu


def hf_model(cfg: BertConfig, ours: BertModel, device: torch.device, dtype: torch.dtype):
    import transformers

    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="sdpa",
    )
    model = transformers.BertModel(hf_cfg).eval()
    model.load_state_dict(ours.state_dict())  # the same weights: ours saves Hugging Face's key layout
    return model.to(device=device, dtype=dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_attention(lengths: list[int], max_len: int, heads: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device, measure) -> dict[str, float | None]:
    """One layer's attention core on the same q, k, v: padded (math, SDPA) vs packed (torch varlen, Triton)."""
    batch = len(lengths)
    mask = (torch.arange(max_len, device=device)[None] < torch.tensor(lengths, device=device)[:, None])  # (B, L)
    info = pack_info(mask)
    q, k, v = (torch.randn(batch, max_len, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    qp, kp, vp = (pack(t, info) for t in (q, k, v))  # (T, H, D)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    key_mask = mask[:, None, None, :]  # (B, 1, 1, L)
    additive = torch.zeros(key_mask.shape, device=device, dtype=dtype).masked_fill(~key_mask, torch.finfo(dtype).min)
    scale = 1.0 / math.sqrt(head_dim)

    def padded_math():
        scores = (qh @ kh.transpose(-2, -1)) * scale + additive  # (B, H, L, L)
        return torch.softmax(scores.float(), dim=-1).to(dtype) @ vh

    def padded_sdpa():
        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=key_mask)

    results: dict[str, float | None] = {"padded_math": measure(padded_math), "padded_sdpa": measure(padded_sdpa)}
    reference = varlen_attention_reference(qp, kp, vp, info.cu_seqlens, info.max_seqlen)
    for backend in ("torch", "triton") if device.type == "cuda" else ():
        out = varlen_attention(qp, kp, vp, info.cu_seqlens, info.max_seqlen, backend=backend)
        results[f"{backend}_error"] = relative_error(out, reference)
        results[f"varlen_{backend}"] = measure(
            lambda b=backend: varlen_attention(qp, kp, vp, info.cu_seqlens, info.max_seqlen, backend=b))
    return results


def model_variants(cfg: BertConfig, ours: BertModel, hf, device: torch.device, dtype: torch.dtype,
                   args: argparse.Namespace) -> dict:
    """name -> callable(ids, mask) returning an object with `last_hidden_state` (see the module docstring)."""
    variants = {}
    if device.type == "cuda":
        packed = {}
        for backend in ("torch", "triton"):
            model = BertModel(cfg)
            model.load_state_dict(ours.state_dict())
            for layer in model.encoder.layer:
                layer.attention.self.backend = backend
            packed[backend] = model.to(device=device, dtype=dtype).eval()
            variants[f"ours_{backend}"] = GraphedBert(packed[backend], bucket=args.bucket)
        variants["ours_eager"] = packed["triton"]
    else:
        variants["ours_eager"] = ours.to(device=device, dtype=dtype)
    variants["hf_eager"] = lambda ids, mask: hf(input_ids=ids, attention_mask=mask)
    if device.type == "cuda" and args.hf_graph:  # last: a failed capture must not disturb the others
        hf_graphs = CudaGraphs(lambda key, ids, mask: hf(input_ids=ids, attention_mask=mask))
        variants["hf_graph"] = lambda ids, mask: hf_graphs(tuple(ids.shape), ids, mask)
    return variants


def bench_dtype(dtype_name: str, args: argparse.Namespace, device: torch.device, measure, measure_kernel,
                result: dict) -> None:
    """Every (batch, max length) of one dtype: the models end to end, then one layer's attention alone."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(args.seed)
    if args.quick:
        cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=max(args.lengths), hidden_dropout_prob=0.0)
    else:
        cfg = bert_base(max_position_embeddings=max(1024, max(args.lengths)), hidden_dropout_prob=0.0)
    ours = BertModel(cfg).eval()
    hf = hf_model(cfg, ours, device, dtype)
    hf32 = hf_model(cfg, ours, device, torch.float32)  # the reference every error is measured against
    variants = model_variants(cfg, ours, hf, device, dtype, args)
    for batch in args.batches:
        for max_len in args.lengths:
            lengths = paper_lengths(batch, max_len, args.seed)
            mask = (torch.arange(max_len)[None] < torch.tensor(lengths)[:, None]).long().to(device)  # (B, L)
            ids = torch.randint(1, cfg.vocab_size, (batch, max_len), device=device) * mask
            row = {"dtype": dtype_name, "batch": batch, "max_len": max_len, "tokens": sum(lengths)}
            valid = mask.bool()
            with torch.no_grad():
                expected = hf32(input_ids=ids, attention_mask=mask).last_hidden_state[valid]
                for name, fn in list(variants.items()):
                    try:
                        out = fn(ids, mask)
                    except Exception as err:  # hf's mask preparation may not be capturable in a CUDA graph
                        if name != "hf_graph":
                            raise
                        print(f"  hf_graph: n/a, the padded model cannot be captured ({str(err).splitlines()[0]})")
                        variants.pop(name)
                        continue
                    row[f"{name}_error"] = relative_error(out.last_hidden_state[valid], expected)
                    row[name] = measure(lambda fn=fn, ids=ids, mask=mask: fn(ids, mask))
                attention = bench_attention(lengths, max_len, cfg.num_attention_heads,
                                            cfg.hidden_size // cfg.num_attention_heads, dtype, device, measure_kernel)
            result["rows"].append(row)
            result["attention"].append({"dtype": dtype_name, "batch": batch, "max_len": max_len, **attention})
            print(f"{dtype_name} B={batch:2d} L={max_len:4d}: " + ", ".join(
                f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float) and not k.endswith("error")),
                flush=True)
    if device.type == "cuda":
        result["layernorm"].append(bench_layernorm(cfg.hidden_size, dtype, device, measure_kernel))


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    measure, measure_kernel = timer(device), timer(device, graphed=True)
    result = {"model": "tiny BERT (--quick)" if args.quick else "BERT-base",
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rows": [], "attention": [], "layernorm": []}
    for dtype_name in args.dtypes:
        bench_dtype(dtype_name, args, device, measure, measure_kernel, result)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the last dtype's models are gone with bench_dtype's frame
        save(result)
    return result


def bench_layernorm(hidden: int, dtype: torch.dtype, device: torch.device, measure, tokens: int = 3584) -> dict:
    """A post-LN sub-layer's end, LayerNorm(x + b + residual), on the token count of batch 16, length 512: eager
    PyTorch (add, add, layer_norm), torch.compile of the reference (one generated kernel), our Triton kernel."""
    from shared.kernels.fused_layernorm import add_layernorm_reference
    from shared.kernels.fused_layernorm.triton_layernorm import add_layernorm_triton

    x, residual = (torch.randn(tokens, hidden, device=device, dtype=dtype) for _ in range(2))
    weight, bias, x_bias = (torch.randn(hidden, device=device, dtype=dtype) for _ in range(3))
    compiled = torch.compile(add_layernorm_reference, dynamic=False)
    expected = add_layernorm_reference(x.double(), residual.double(), weight.double(), bias.double(), 1e-12,
                                       x_bias.double())
    row = {"dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
           "triton_error": relative_error(add_layernorm_triton(x, residual, weight, bias, 1e-12, x_bias), expected),
           "compiled_error": relative_error(compiled(x, residual, weight, bias, 1e-12, x_bias), expected)}
    row["eager"] = measure(lambda: torch.nn.functional.layer_norm(x + x_bias + residual, (hidden,), weight, bias,
                                                                  1e-12))
    row["compiled"] = measure(lambda: compiled(x, residual, weight, bias, 1e-12, x_bias))
    row["triton"] = measure(lambda: add_layernorm_triton(x, residual, weight, bias, 1e-12, x_bias))
    return row


def save(result: dict) -> None:
    """Written after every dtype, so a run cut short still leaves its numbers."""
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bytetransformer.json"
        path.write_text(json.dumps(result, indent=1))


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:5.2f}x" if a and b else "  n/a"


def fmt(x: float | None) -> str:
    return f"{x:7.3f}" if x is not None else "    n/a"


def print_tables(result: dict) -> None:
    print(f"\n{result['model']} forward, ms (median), {result['device']}, torch {result['torch']}")
    print("dtype  B     L  tokens  hf_eager hf_graph ours_torch ours_triton ours_eager | best vs hf_eager  "
          "vs hf_graph  triton/torch  err(ours)  err(hf)")
    for r in result["rows"]:
        ours = [r.get(k) for k in ("ours_torch", "ours_triton") if r.get(k)] or [r.get("ours_eager")]
        best = min(x for x in ours if x) if any(ours) else None
        print(f"{r['dtype']:5s} {r['batch']:2d} {r['max_len']:5d} {r['tokens']:7d} {fmt(r.get('hf_eager'))} "
              f"{fmt(r.get('hf_graph'))} {fmt(r.get('ours_torch'))}    {fmt(r.get('ours_triton'))}    "
              f"{fmt(r.get('ours_eager'))} |   {ratio(r.get('hf_eager'), best)}         "
              f"{ratio(r.get('hf_graph'), best)}      {ratio(r.get('ours_torch'), r.get('ours_triton'))}      "
              f"{r.get('ours_triton_error', r.get('ours_eager_error', float('nan'))):.1e}    "
              f"{r.get('hf_eager_error', float('nan')):.1e}")
    print("\nattention core of one layer, ms (median, CUDA-graph replay); ratios: padded / ours-triton, "
          "torch-varlen / triton")
    print("dtype  B     L  padded_math padded_sdpa varlen_torch varlen_triton | math/triton sdpa/triton "
          "torch/triton")
    for r in result["attention"]:
        print(f"{r['dtype']:5s} {r['batch']:2d} {r['max_len']:5d}   {fmt(r['padded_math'])}     "
              f"{fmt(r['padded_sdpa'])}      {fmt(r.get('varlen_torch'))}       {fmt(r.get('varlen_triton'))} |"
              f"    {ratio(r['padded_math'], r.get('varlen_triton'))}      "
              f"{ratio(r['padded_sdpa'], r.get('varlen_triton'))}     "
              f"{ratio(r.get('varlen_torch'), r.get('varlen_triton'))}")
    if result["layernorm"]:
        print("\nLayerNorm(x + b + residual), ms (median, CUDA-graph replay): eager / torch.compile / Triton")
        for r in result["layernorm"]:
            print(f"{r['dtype']:8s} {r['tokens']} tokens: eager {fmt(r['eager'])}  compiled {fmt(r['compiled'])}  "
                  f"triton {fmt(r['triton'])}  (errors: triton {r['triton_error']:.1e}, "
                  f"compiled {r['compiled_error']:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny BERT on the CPU, a smoke run")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--lengths", nargs="+", type=int, default=None)
    parser.add_argument("--bucket", type=int, default=128, help="token bucket of the CUDA graphs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-hf-graph", dest="hf_graph", action="store_false",
                        help="skip the CUDA-graph capture of the padded transformers model")
    args = parser.parse_args()
    if args.quick:
        args.dtypes = args.dtypes or ["fp32"]
        args.batches = args.batches or [1, 4]
        args.lengths = args.lengths or [16, 32]
    else:
        args.dtypes = args.dtypes or ["fp16", "bf16"]
        args.batches = args.batches or [1, 8, 16]
        args.lengths = args.lengths or [128, 256, 512, 1024]
    result = run(args)
    print_tables(result)
    if os.environ.get("OUT"):
        print(f"wrote {Path(os.environ['OUT']) / 'bytetransformer.json'}")


if __name__ == "__main__":
    main()
