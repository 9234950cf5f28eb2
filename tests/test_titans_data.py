"""Data and shared blocks of Titans: LM windows and nanoGPT token files, S-NIAH and MQAR generators, RMSNorm,
RoPE and SwiGLU against their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared.blocks.mlp import SwiGLU, llama_hidden_dim
from shared.blocks.norms import RMSNorm
from shared.blocks.rope import RotaryEmbedding
from shared.data.lm import (
    LMWindows,
    bigram_cross_entropy,
    split_bounds,
    text_splits,
    token_file_splits,
    unigram_entropy,
)
from shared.data.synthetic.mqar import mqar_batch
from shared.data.synthetic.niah import IGNORE, TASKS, niah_batch
from shared.lit.errors import ConfigError, DatasetError

TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "Ünïcödé text with numbers 1234567 and words. " * 20


def test_text_splits_are_contiguous_and_cover_the_text():
    splits, vocab, bpt = text_splits(TEXT, "byte", (0.8, 0.1, 0.1))
    raw = TEXT.encode("utf-8")
    assert vocab == 256 and bpt == 1.0
    assert bytes(np.concatenate([splits[s] for s in ("train", "val", "test")])) == raw
    chars, vocab, bpt = text_splits(TEXT, "char")
    assert vocab == len(set(TEXT)) and bpt == len(raw) / len(TEXT)
    with pytest.raises(ConfigError):
        split_bounds(100, (0.5, 0.1, 0.1))


def test_lm_windows_train_random_eval_tiling():
    tokens = np.arange(1000, dtype=np.uint16)
    train = LMWindows(tokens, 16, train=True, num_samples=7)
    x, y = train[(3, 12345)]
    assert len(train) == 7 and torch.equal(x[1:], y[:-1]) and torch.equal(y - x, torch.ones(16, dtype=torch.long))
    assert torch.equal(train[(3, 12345)][0], x)  # the sample seed fixes the window
    val = LMWindows(tokens, 16, train=False)
    assert len(val) == (1000 - 1) // 16 and val[2][0][0] == 32
    with pytest.raises(DatasetError, match="fewer than one window"):
        LMWindows(tokens[:10], 16, train=False)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_files_in_nanogpt_layout(tmp_path, dtype):
    big = 70_000 if dtype == "uint32" else 60_000  # uint32 holds ids beyond 65,535
    train = np.arange(0, 5000, dtype=dtype) * (big // 5000)
    train.tofile(tmp_path / "train.bin")
    np.arange(300, dtype=dtype).tofile(tmp_path / "val.bin")
    splits = token_file_splits(tmp_path, dtype)
    assert splits["train"][-1] == train[-1] and splits["test"] is splits["val"]  # no test.bin: val doubles
    x, y = LMWindows(splits["train"], 32, train=False)[1]
    assert x[0] == train[32] and y[-1] == train[64]


def test_token_file_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        token_file_splits(tmp_path / "nowhere")
    np.zeros(10, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(DatasetError, match=r"val\.bin"):
        token_file_splits(tmp_path)
    (tmp_path / "val.bin").write_bytes(b"abc")  # 3 bytes: not whole uint16 tokens
    with pytest.raises(DatasetError, match="not a whole number"):
        token_file_splits(tmp_path)
    with pytest.raises(ConfigError):
        token_file_splits(tmp_path, "int8")


def test_bigram_cross_entropy():
    """The held-out loss of the smoothed bigram counts: near 0 where the next token follows from the current one, the
    exact smoothed value by hand on a small case, and about log V on independent tokens."""
    cycle = np.tile(np.arange(5), 200)
    assert bigram_cross_entropy(cycle, cycle, 5) < 1e-3
    # train [0, 1, 0, 2]: pairs (0->1), (1->0), (0->2), contexts 0 twice and 1 once; held out [0, 1, 1], vocabulary 3:
    # p(1|0) = (1 + 0.5) / (2 + 1.5), p(1|1) = (0 + 0.5) / (1 + 1.5)
    assert bigram_cross_entropy(np.array([0, 1, 0, 2]), np.array([0, 1, 1]), 3, add=0.5) == pytest.approx(
        -(math.log(1.5 / 3.5) + math.log(0.5 / 2.5)) / 2)
    rng = np.random.default_rng(0)
    noise = bigram_cross_entropy(rng.integers(0, 4, 100_000), rng.integers(0, 4, 10_000), 4)
    assert math.log(4) <= noise < math.log(4) + 0.01
    with pytest.raises(ValueError, match="two tokens or more in each split; got 1 for training"):
        bigram_cross_entropy(np.array([3]), cycle, 5)


def test_unigram_entropy():
    assert unigram_entropy(np.array([0, 1, 0, 1]), 4) == pytest.approx(math.log(2))


@pytest.mark.parametrize("task", TASKS)
def test_niah_samples(task):
    words = ["apple", "river", "stone", "cloud", "maple"]
    haystack = "Some plain sentences make the haystack. " * 600
    x, y = niah_batch(task, 1024, 3, seed=5, text=haystack, words=words)
    x2, _ = niah_batch(task, 1024, 3, seed=5, text=haystack, words=words)
    assert x.shape == y.shape == (3, 1023) and np.array_equal(x, x2)
    for xi, yi in zip(x, y):
        text = bytes(xi.astype(np.uint8)).decode("ascii")
        answer = bytes(yi[yi != IGNORE].astype(np.uint8)).decode("ascii")
        key = text.rsplit("special magic ", 1)[1].split(" for ")[1].split(" ")[0]
        needle = f"for {key} is: {answer}."
        assert needle in text[: -len("mentioned in the provided text is ") - 80]  # the needle is in the haystack
        assert (yi != IGNORE).sum() == len(answer) and np.all(yi[:-len(answer)] == IGNORE)
        assert answer.isdigit() == (task != "word")
    assert not np.array_equal(niah_batch(task, 1024, 1, 6, haystack, words)[0], x[:1])


def test_niah_lengths_up_to_16k():
    x, y = niah_batch("passkey", 16384, 1, seed=0, words=["alpha", "omega"])
    assert x.shape == (1, 16383) and (y != IGNORE).sum() == 7


def test_mqar_targets_are_the_values_of_queried_keys():
    x, y = mqar_batch(256, 16, 128, 4, seed=0)
    for xi, yi in zip(x, y):
        table = dict(zip(xi[0:32:2], xi[1:32:2]))
        assert len(table) == 16
        queries = np.nonzero(yi != IGNORE)[0]
        assert len(queries) == 16 and all(queries >= 32)
        assert all(yi[p] == table[xi[p]] for p in queries)
    assert np.array_equal(x, mqar_batch(256, 16, 128, 4, seed=0)[0])


def test_rmsnorm_swiglu_rope_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    norm = RMSNorm(8)
    torch.testing.assert_close(norm(x), x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt())
    mlp = SwiGLU(8, 12)
    w1, w3, w2 = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    torch.testing.assert_close(mlp(x), (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T)
    assert llama_hidden_dim(4096) == 11008  # LLaMA-7B
    rope = RotaryEmbedding(8, max_seq_len=16)
    q, k = torch.randn(2, 1, 1, 20, 8).unbind(0)  # 20 > 16: the table is extended on the fly
    rq, rk = rope(q, k)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # a rotation
    # q_i . k_j depends on i - j only: shifting both positions by 3 keeps the score.
    sq, sk = rope(q, k, offset=3)
    torch.testing.assert_close((rq[..., 7, :] * rk[..., 2, :]).sum(), (sq[..., 7, :] * sk[..., 2, :]).sum())
    # Channel i and i + d/2 rotate together by position * base^(-2i/d).
    angle = 5 * 10_000 ** (-2 * 1 / 8)
    cos, sin = rope.at(torch.tensor([5]), 6)
    assert cos[0, 1].item() == pytest.approx(math.cos(angle), rel=1e-5) and sin[0, 5].item() == pytest.approx(
        math.sin(angle), rel=1e-5)


def test_datamodule_reads_token_files_and_names_missing_layout(tmp_path):
    from projects.titans.data import TitansDataModule

    with pytest.raises(ConfigError, match="data.root"):
        TitansDataModule(source="real")
    dm = TitansDataModule(source="real", root=str(tmp_path / "missing"), seq_len=16)
    with pytest.raises(DatasetError, match="train.bin"):
        dm.setup()
    for split, n in (("train", 4000), ("val", 400), ("test", 300)):
        (np.arange(n, dtype=np.uint32) % 50_000).tofile(tmp_path / f"{split}.bin")
    dm = TitansDataModule(source="real", root=str(tmp_path), dtype="uint32", seq_len=16, vocab_size=50_000)
    dm.setup()
    assert len(dm.val_set) == (400 - 1) // 16 and len(dm.test_set) == (300 - 1) // 16
    x, y = dm.val_set[0]
    assert torch.equal(x, torch.arange(16)) and torch.equal(y, torch.arange(1, 17))


def test_exact_match_accuracy_counts_whole_answers():
    """val/acc: a sample counts only when every answer token is right; token accuracy counts tokens."""
    from projects.titans.module import TitansLitModule

    module = TitansLitModule(net=dict(name="transformer_pp_tiny", depth=1), task="niah", seq_len=8)
    y = torch.full((4, 8), IGNORE)
    y[:, 5:8] = torch.tensor([7, 8, 9])
    x = torch.zeros(4, 8, dtype=torch.long)
    logits = torch.zeros(4, 8, 256)
    logits[torch.arange(4)[:, None], torch.arange(8), y.clamp(min=0)] = 10.0  # right everywhere...
    logits[0, 6, 8], logits[0, 6, 3] = 0.0, 10.0  # ...except one answer token of sample 0
    module.model.forward = lambda idx: logits  # the metric, not the network, is under test
    module._evaluate((x, y), "val")
    m = module.metrics
    assert m["val_correct"].compute() / m["val_answers"].compute() == 0.75
    assert m["val_token_acc"].compute().item() == pytest.approx(11 / 12)


def test_synthetic_tasks_test_at_each_of_test_lengths():
    """data.test_lengths: one test loader per length, each length's metrics logged under its own name."""
    import lightning.pytorch as pl

    from projects.titans.data import TitansDataModule
    from projects.titans.module import TitansLitModule

    with pytest.raises(ConfigError, match="data.test_lengths"):
        TitansDataModule(task="lm", test_lengths=[256, 512])
    dm = TitansDataModule(task="niah", seq_len=256, batch_size=2, val_samples=2, test_lengths=[256, 512])
    dm.setup("test")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    dm.trainer = trainer
    shapes = [tuple(next(iter(loader))[0].shape) for loader in dm.test_dataloader()]
    assert shapes == [(2, 255), (2, 511)]  # the model sees seq_len - 1 tokens

    module = TitansLitModule(net=dict(name="transformer_pp_tiny", depth=1), task="niah", seq_len=256,
                             test_lengths=[256, 512])
    results = trainer.test(module, datamodule=dm, verbose=False)
    merged = {k: v for result in results for k, v in result.items()}
    assert {f"test/{m}_{n}" for m in ("loss", "acc", "token_acc") for n in (256, 512)} <= set(merged)
    assert merged["test/loss_256"] != merged["test/loss_512"]  # different samples, not one loader twice

    swapped = TitansLitModule(net=dict(name="transformer_pp_tiny", depth=1), task="niah", seq_len=256,
                              test_lengths=[512, 256])
    with pytest.raises(ConfigError, match="model.test_lengths"):
        trainer.test(swapped, datamodule=dm, verbose=False)


# ----------------------------------------------------------------------------------------------------------------
# scripts/titans_niah_reach.py: which needles a model finds beyond the reach of its attention


def test_attention_reach_of_each_architecture(load_script):
    """MAG / MAL: L windows of w keys reach L (w - 1) tokens back; MAC: never across a segment boundary; LMM: no
    attention; Transformer++: everything earlier."""
    from projects.titans.model import MODELS

    reach = load_script("titans_niah_reach")
    with torch.device("meta"):
        mag, mal, mac = (MODELS[f"titans_{v}_tiny"]() for v in ("mag", "mal", "mac"))
        lmm, transformer = MODELS["titans_lmm_tiny"](), MODELS["transformer_pp_tiny"]()
    for model in (mag, mal):  # tiny: 2 blocks, window 128
        assert reach.attention_sees(model, 0, 254) and not reach.attention_sees(model, 0, 255)
    assert reach.attention_sees(mac, 0, 127) and not reach.attention_sees(mac, 127, 128)  # segments of 128
    assert reach.attention_sees(mac, 128, 255) and not reach.attention_sees(mac, 100, 300)
    assert reach.attention_sees(lmm, 7, 7) and not reach.attention_sees(lmm, 6, 7)
    assert reach.attention_sees(transformer, 0, 4000)


def test_needle_is_located_once_in_the_context(load_script):
    from shared.data.synthetic.niah import NOISE, niah_sample, word_list

    reach = load_script("titans_niah_reach")
    tokens, answer_start, n = niah_sample("passkey", 512, np.random.default_rng(3), "", word_list(NOISE, min_count=1))
    value = tokens[answer_start:answer_start + n].tobytes()
    start = reach.needle_value_start(tokens, answer_start, value)
    assert tokens[start:start + n].tobytes() == value and start < answer_start - 100
    with pytest.raises(ValueError, match="occurs 0 times"):
        reach.needle_value_start(tokens, answer_start, b"0000000")


def test_reach_table_splits_the_run_samples_and_counts_an_oracle_right(tmp_path, load_script):
    """End to end on a run directory (config.yaml + checkpoint) of a random tiny MAG: every 256-byte needle is within
    the reach (254 tokens), most 1,024-byte ones are beyond it; with the model's outputs replaced by the answers the
    accuracy is 1 on both sides, and the run's own test samples are the ones analysed."""
    import yaml

    from projects.titans.module import TitansLitModule

    reach = load_script("titans_niah_reach")
    torch.manual_seed(0)
    module = TitansLitModule(net={"name": "titans_mag_tiny"}, task="niah", test_lengths=[256, 1024])
    model = module.model
    (tmp_path / "checkpoints").mkdir()
    torch.save({"pytorch-lightning_version": "2", "hyper_parameters": dict(module.hparams),
                "state_dict": module.state_dict()}, tmp_path / "checkpoints" / "last.ckpt")
    data = {"_target_": "projects.titans.data.TitansDataModule", "task": "niah", "niah_task": "passkey",
            "seq_len": 256, "batch_size": 2, "val_samples": 6, "test_lengths": [256, 1024], "seed": 5}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model": {"_target_": "projects.titans.module.TitansLitModule", "net": {"name": "titans_mag_tiny"}},
        "data": data}))
    rows = reach.main([str(tmp_path), "--samples", "4"])
    assert [(r["length"], r["samples"]) for r in rows] == [(256, 4), (1024, 4)]
    assert rows[0]["within_reach"] == 4 and rows[0]["beyond_reach"] == 0
    assert rows[1]["beyond_reach"] >= 3 and rows[1]["median_distance"] > 254

    loaded, dm, _ = reach.load_run(tmp_path, None)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    answers = {}
    for dataset in dm.test_sets:
        for i in range(len(dataset)):
            x, y = dataset[i]
            answers[tuple(x.tolist())] = y

    def oracle(x: torch.Tensor) -> torch.Tensor:  # logits whose argmax is the target wherever there is one
        y = torch.stack([answers[tuple(row.tolist())] for row in x])
        return torch.nn.functional.one_hot(y.clamp(min=0), 256).float()

    loaded.forward = oracle
    for row in reach.reach_table(loaded, dm, [256, 1024], samples=6):
        assert row["accuracy"] == 1.0 and row["samples"] == 6
        assert row["accuracy_beyond"] in (None, 1.0) and row["accuracy_within"] in (None, 1.0)
    with pytest.raises(SystemExit, match="config.yaml: not found"):
        reach.main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match=r"the run tested \[256, 1024\].*\[2048\] are not among them"):
        reach.main([str(tmp_path), "--lengths", "256,2048"])
