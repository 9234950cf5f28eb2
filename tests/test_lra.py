"""Long Range Arena: fingerprints, the ListOps and Pathfinder generators, the readers of the official layouts,
the DataModule, the config group, the results table and a short training run."""

from __future__ import annotations

import json
import math
import pickle
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from projects.lra import model as lra_model
from projects.lra import tasks
from projects.lra.data import LRADataModule
from shared.data.synthetic import listops, pathfinder
from shared.lit.errors import ConfigError, DatasetError
from tests.test_attention import record_sdpa_calls

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------------------
# Fingerprints: parameter counts of the official Flax configs (research notes §13.4), built on the meta device.

FINGERPRINTS = {
    "listops_transformer": 8_948_746,
    "text_transformer": 3_486_722,
    "retrieval_transformer": 1_087_746,
    "image_transformer": 248_458,
    "pathfinder32_transformer": 26_530,
}
# Not a paper config: the softmax baseline of the Nystromformer LRA code (lra_config.py), counted by hand from its
# shapes less its q/k/v biases (384) and the 256 unused ids of its 512-id vocabulary (16,384): 173,826 there.
NYSTROMFORMER_PATHFINDER = 173_826 - 384 - 256 * 64


def count(name: str, **kwargs) -> int:
    with torch.device("meta"):
        model = lra_model.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", FINGERPRINTS)
def test_paper_configs_have_the_official_parameter_counts(name):
    assert count(name) == FINGERPRINTS[name]


def test_variants_keep_the_count_except_linformer_projection():
    for variant in ("local", "linear", "performer"):
        assert count("listops_transformer", attention={"name": variant}) == FINGERPRINTS["listops_transformer"]
    # one (max_len + CLS) x k projection per layer
    assert count("listops_transformer", attention={"name": "linformer", "k": 16}) == 8_948_746 + 4 * 2001 * 16


def test_nystromformer_pathfinder_config_counts_and_initialises_as_its_code():
    assert count("pathfinder32_transformer_nystromformer") == NYSTROMFORMER_PATHFINDER == 157_058
    torch.manual_seed(0)
    model = lra_model.create_model("pathfinder32_transformer_nystromformer")
    assert model.encoder.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert lra_model.create_model("pathfinder32_transformer").encoder.embed.weight.std().item() == pytest.approx(
        1.0, rel=0.05)


def test_zero_padding_outputs_pools_the_unmasked_tokens_only():
    """With `zero_padding_outputs` the encodings at padding (black-pixel) positions are zero, so MEAN pooling is the
    sum over the unmasked tokens divided by the full length; without it they count like any other position."""
    torch.manual_seed(0)
    kwargs = dict(vocab_size=17, emb_dim=16, num_heads=2, num_layers=1, qkv_dim=16, mlp_dim=32, max_len=12,
                  dropout=0.0, attn_dropout=0.0)
    tokens = torch.tensor([[3, 0, 5, 0, 0, 7, 1, 0, 2, 9, 0, 4]])
    zeroed = lra_model.TransformerEncoder(**kwargs, zero_padding_outputs=True).eval()
    plain = lra_model.TransformerEncoder(**kwargs).eval()
    plain.load_state_dict(zeroed.state_dict())
    z, p = zeroed(tokens)[0], plain(tokens)[0]  # (12, 16)
    pad = tokens[0] == 0
    assert z[pad].abs().max() == 0 and p[pad].abs().min() > 0
    torch.testing.assert_close(z[~pad], p[~pad])
    torch.testing.assert_close(z.mean(0), p[~pad].sum(0) / 12)


def test_retrieval_nli_head_is_wider():
    assert count("retrieval_transformer", interaction="NLI") == 1_087_746 + 2 * 128 * 512


def test_padding_tokens_do_not_change_the_logits():
    torch.manual_seed(0)
    model = lra_model.create_model("listops_tiny", num_layers=1).eval()
    tokens = torch.randint(1, 17, (2, 30))
    padded = torch.cat([tokens, torch.zeros(2, 9, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(tokens), model(padded), rtol=1e-5, atol=1e-5)


def test_model_compiles_to_one_graph_with_and_without_padding():
    """torch.compile traces the whole forward (no graph break at the "anything to mask?" check), and the compiled
    model gives the eager logits for a padded batch and for one without padding."""
    torch.manual_seed(0)
    model = lra_model.create_model("listops_tiny", num_layers=1).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    full = torch.randint(1, 17, (2, 30))
    padded = torch.cat([full, torch.zeros(2, 9, dtype=torch.long)], dim=1)
    for tokens in (full, padded):
        torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_sinusoidal_table_interleaves_sin_and_cos():
    table = lra_model.sinusoidal_table(5, 4)
    assert table[3, 0] == pytest.approx(math.sin(3)) and table[3, 1] == pytest.approx(math.cos(3))
    assert table[3, 2] == pytest.approx(math.sin(3 / 100)) and table[3, 3] == pytest.approx(math.cos(3 / 100))


# ----------------------------------------------------------------------------------------------------------------
# ListOps


def evaluate_listops(source: str) -> tuple[int, str, int]:
    """An independent evaluator: parse the prefix expression, compute its value, and re-serialise it in the
    official tuple format. Returns (value, official string, length in tokens)."""
    tokens = source.replace("(", " ").replace(")", " ").split()
    position = 0

    def node() -> tuple[int, str, int]:
        nonlocal position
        token = tokens[position]
        position += 1
        if token.isdigit():
            return int(token), token, 1
        args, texts, length = [], [], 2
        while tokens[position] != "]":
            value, text, sub = node()
            args.append(value)
            texts.append(text)
            length += sub
        position += 1
        value = {"[MIN": min(args), "[MAX": max(args), "[MED": int(statistics.median(args)),
                 "[SM": sum(args) % 10}[token]
        # official to_string of ((...((op, a0), a1)...), "]")
        text = token
        for t in texts:
            text = f"( {text} {t} )"
        return value, f"( {text} ] )", length

    result = node()
    assert position == len(tokens)
    return result


def test_listops_labels_strings_and_lengths_follow_the_official_generator():
    rows = listops.generate(40, seed=3)
    assert len({source for source, _ in rows}) == 40
    for source, label in rows:
        value, official, length = evaluate_listops(source)
        assert label == value
        assert source == official
        assert 500 < length < 2000 and length == len(listops.tokenize(source))


def test_listops_draws_children_before_the_operator():
    class Scripted:  # the official order: random(), randint(2, max_args), children..., choice(OPERATORS)
        def __init__(self):
            self.randoms, self.values = [0.1, 0.9, 0.9], [3, 7]

        def random(self):
            return self.randoms.pop(0)

        def randint(self, low, high):
            assert (low, high) == (2, 10)
            return 2

        def choice(self, options):
            return self.values.pop(0) if options == listops.VALUES else listops.SUM_MOD

    assert listops.generate_tree(Scripted()) == ("( ( ( [SM 3 ) 7 ) ] )", 0, 4)


def test_listops_splits_tokens_and_vocabulary():
    splits = listops.generate_splits(30, 5, 5, seed=1, min_length=10, max_length=60)
    sources = [s for rows in splits.values() for s, _ in rows]
    assert len(set(sources)) == 40
    assert listops.generate_splits(30, 5, 5, seed=1, min_length=10, max_length=60) == splits
    assert listops.tokenize("( ( ( [MAX 2 ) 9 ) ] )") == ["[MAX", "2", "9", "X"]
    assert listops.VOCAB_SIZE == 17 and listops.PAD_ID == 0 and listops.OOV_ID == 16
    assert listops.encode("( ( ( [MAX 2 ) 9 ) ] )") == [12, 3, 10, 15]
    assert listops.encode("[FIRST 1 ]") == [16, 2, 15]
    ids = {i for s in sources for i in listops.encode(s)}
    assert ids <= set(range(1, 16))


def test_listops_tsv_round_trip_and_errors(tmp_path):
    rows = listops.generate(5, seed=0, min_length=5, max_length=40)
    listops.write_tsv(tmp_path / "basic_train.tsv", rows)
    assert (tmp_path / "basic_train.tsv").read_text().splitlines()[0] == "Source\tTarget"
    assert listops.read_tsv(tmp_path / "basic_train.tsv") == rows
    (tmp_path / "bad.tsv").write_text("Source\tTarget\n( [MAX 1 ] )\tnine\n")
    with pytest.raises(ValueError, match="bad.tsv:2"):
        listops.read_tsv(tmp_path / "bad.tsv")


# ----------------------------------------------------------------------------------------------------------------
# Pathfinder


def test_pathfinder32_parameters_are_lra_docstring_values():
    p = pathfinder.pathfinder_params(32, "hard")
    assert (p.window_size, p.padding, p.paddle_length, p.marker_radius, p.contour_length, p.paddle_thickness,
            p.antialias_scale, p.seed_distance, p.continuity) == (32, 1, 2, 1.5, 14, 0.5, 2, 7, 1.0)
    assert (p.paddle_margin_list, p.snake_contrast_list, p.paddle_contrast_list) == ((1,), (2.0,), (0.75,))
    assert (p.distractor_length, p.num_distractor_snakes) == (14 // 3, 20 // (14 // 3))
    assert pathfinder.pathfinder_params(32, "curv_baseline").contour_length == 6
    assert pathfinder.pathfinder_params(128).paddle_margin_list == (2, 3)


def test_pathfinder_images_are_deterministic_and_both_labels_occur():
    p = pathfinder.pathfinder_params(32)
    images, labels = pathfinder.generate(16, seed=0, params=p)
    assert images.shape == (16, 32, 32) and images.dtype == np.uint8
    assert (images.max(axis=(1, 2)) == 255).all() and (images.min(axis=(1, 2)) == 0).all()
    assert set(labels.tolist()) == {0, 1}
    again, labels_again = pathfinder.generate(16, seed=0, params=p)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)


def test_pathfinder_markers_sit_on_the_same_snake_iff_label_is_one(monkeypatch):
    p = pathfinder.pathfinder_params(32)
    seen: dict = {}
    original_two_snakes, original_circle = pathfinder._Canvas.two_snakes, pathfinder.circle

    def two_snakes(self):
        seen["snakes"] = result = original_two_snakes(self)
        return result

    def circle(size, coord, radius, aa):
        seen.setdefault("markers", []).append(tuple(coord))
        return original_circle(size, coord, radius, aa)

    monkeypatch.setattr(pathfinder._Canvas, "two_snakes", two_snakes)
    monkeypatch.setattr(pathfinder, "circle", circle)
    rng = np.random.default_rng(5)
    for _ in range(8):
        seen.clear()
        _, label, _ = pathfinder.generate_image(rng, p)
        _, _, origins, terminals = seen["snakes"]
        origin, terminal = seen["markers"]
        snake_of_origin = origins.index(origin)
        assert terminals.index(terminal) == (snake_of_origin if label == 1 else 1 - snake_of_origin)
        # the two snakes start seed_distance apart
        assert abs(math.dist(origins[0], origins[1]) - p.seed_distance) <= 1


def test_dilation_matches_scipy_grey_dilation():
    ndimage = pytest.importorskip("scipy.ndimage")
    image = np.random.default_rng(0).random((12, 12)).astype(np.float32)
    footprint = pathfinder.disk(2).astype(bool)
    expected = ndimage.grey_dilation(image, footprint=footprint, mode="constant", cval=0.0)
    np.testing.assert_array_equal(pathfinder.dilate(image, pathfinder.kernel_offsets(footprint)), expected)


def test_bytescale_is_scipys():
    data = np.array([[0.0, 0.5], [1.0, 1.5]])
    np.testing.assert_array_equal(pathfinder.bytescale(data), [[0, 85], [170, 255]])


def write_pathfinder_release(folder: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    p = pathfinder.pathfinder_params(32)
    images, labels = pathfinder.generate(n, seed=1, params=p)
    pathfinder.write_release(folder / "curv_contour_length_14", images[: n // 2], labels[: n // 2], p, batch=0)
    pathfinder.write_release(folder / "curv_contour_length_14", images[n // 2:], labels[n // 2:], p, batch=1)
    return images, labels


def test_pathfinder_release_reader(tmp_path):
    images, labels = write_pathfinder_release(tmp_path / "pathfinder32", 20)
    first = (tmp_path / "pathfinder32/curv_contour_length_14/metadata/0.npy").read_text().splitlines()[0].split()
    assert first[:4] == ["imgs/0", "sample_0.png", "0", str(labels[0])] and len(first) == 11
    data = tasks.read_pathfinder(tmp_path, 32, "hard")  # root may hold pathfinder32/
    assert [len(data[s]) for s in tasks.SPLITS] == [16, 2, 2]
    read = np.concatenate([np.stack(data[s].sequences) for s in tasks.SPLITS])
    np.testing.assert_array_equal(read, images.reshape(20, -1))
    np.testing.assert_array_equal(np.concatenate([data[s].labels for s in tasks.SPLITS]), labels)


def test_pathfinder_reader_skips_empty_images_and_reads_binary_metadata(tmp_path):
    folder = tmp_path / "curv_baseline"
    write_pathfinder_release(tmp_path, 10)
    (tmp_path / "curv_contour_length_14").rename(folder)
    (folder / "imgs/0/sample_2.png").write_bytes(b"")
    rows = [line.split() for line in (folder / "metadata/1.npy").read_text().splitlines()]
    np.save(folder / "metadata/1.npy", np.array(rows))  # a real NumPy table (the original np.save)
    data = tasks.read_pathfinder(tmp_path, 32, "easy")
    assert sum(len(data[s]) for s in tasks.SPLITS) == 9


# ----------------------------------------------------------------------------------------------------------------
# Readers of the official layouts


def test_listops_release_reader(tmp_path):
    splits = listops.generate_splits(6, 2, 2, seed=0, min_length=5, max_length=30)
    for split, rows in splits.items():
        listops.write_tsv(tmp_path / listops.SPLIT_FILES[split], rows)
    data = tasks.read_real("listops", tmp_path)
    assert len(data["train"]) == 6 and data["val"].labels.tolist() == [y for _, y in splits["val"]]
    assert data["test"][0]["inputs"].tolist() == listops.encode(splits["test"][0][0])


def test_imdb_reader_uses_bytes_and_the_test_split_twice(tmp_path):
    for split in ("train", "test"):
        for polarity in ("neg", "pos"):
            folder = tmp_path / "aclImdb" / split / polarity
            folder.mkdir(parents=True)
            (folder / "0_1.txt").write_bytes(f"{split} {polarity} caf\u00e9".encode())
    data = tasks.read_real("text", tmp_path, max_length=12)
    assert data["train"].labels.tolist() == [0, 1]
    item = data["train"][1]
    assert item["inputs"].tolist() == [b + 1 for b in b"train pos ca"]
    assert data["val"] is data["test"]


def test_aan_reader(tmp_path):
    for name in ("train", "eval", "test"):
        (tmp_path / f"new_aan_pairs.{name}.tsv").write_text("1.0\tid1\tid2\tab\"c\tde\n0\tid3\tid4\tx\ty\n")
    data = tasks.read_real("retrieval", tmp_path)
    item = data["test"][0]
    assert item["inputs1"].tolist() == [98, 99, 35, 100] and item["inputs2"].tolist() == [101, 102]
    assert data["train"].labels.tolist() == [1, 0]
    batch = tasks.collate([data["train"][0], data["train"][1]])
    assert batch["inputs1"].shape == (2, 4) and batch["inputs1"][1, 1:].eq(0).all()
    (tmp_path / "new_aan_pairs.eval.tsv").write_text("1\tonly three\tfields\n")
    with pytest.raises(DatasetError, match="eval.tsv:1"):
        tasks.read_real("retrieval", tmp_path)


def test_cifar10_reader_and_tensorflow_grayscale(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        data[0, :3] = [255, 0, 10]  # pixel (0, 0..2) red plane
        data[0, 1024:1027] = [255, 0, 20]
        data[0, 2048:2051] = [255, 0, 30]
        with open(base / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [1, 2, 3, 4], b"batch_label": b"x"}, f)
    data = tasks.read_real("image", tmp_path)
    assert [len(data[s]) for s in tasks.SPLITS] == [18, 2, 4]
    pixels = data["test"][0]["inputs"][:3].tolist()
    # tf: floor(255.5 * (0.2989 r + 0.587 g + 0.114 b) / 255)
    expected = [int(255.5 * (0.2989 * r + 0.587 * g + 0.114 * b) / 255) for r, g, b in [(255, 255, 255), (0, 0, 0),
                                                                                         (10, 20, 30)]]
    assert pixels == expected == [255, 0, 18]


def test_cifar10_reader_refuses_foreign_pickles(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    with open(base / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Path("x"), b"labels": []}, f)
    with pytest.raises(DatasetError, match="data_batch_1"):
        tasks.read_real("image", tmp_path)


@pytest.mark.parametrize("task, names", [("listops", "listops-1000"), ("text", "aclImdb"),
                                         ("retrieval", "tsv_data"), ("image", "cifar-10"),
                                         ("pathfinder32", "pathfinder")])
def test_missing_data_names_the_download(tmp_path, task, names):
    with pytest.raises(DatasetError, match=names):
        tasks.read_real(task, tmp_path / "nothing")


def test_offline_tasks_without_a_generator_say_so():
    with pytest.raises(DatasetError, match="no offline data.*aclImdb"):
        LRADataModule(task="text")


def test_datamodule_generates_caches_and_batches(tmp_path):
    dm = LRADataModule(task="listops", batch_size=4, num_train=12, num_val=4, num_test=4, cache_dir=str(tmp_path),
                       listops_generator={"min_length": 5, "max_length": 40})
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].dtype == torch.int64 and batch["inputs"].shape[0] == 4 and batch["targets"].shape == (4,)
    cached = list((tmp_path / "lra").glob("listops-*/basic_train.tsv"))
    assert len(cached) == 1 and len(listops.read_tsv(cached[0])) == 12


def test_dihedral_orders_are_the_eight_symmetries_and_keep_every_path_a_path():
    """The eight pixel orders are numpy's rotations and transposes of the image, all different, closed under
    composition, and each maps 8-neighbouring pixels to 8-neighbours (so two markers joined by a path stay joined
    and unjoined ones stay apart: the Pathfinder label does not change)."""
    side = 5
    orders = tasks.dihedral_orders(side)
    image = np.arange(side * side).reshape(side, side) * 7 % 23
    expected = [np.rot90(image, k) for k in range(4)] + [np.rot90(image.T, k) for k in range(4)]
    assert all(np.array_equal(image.reshape(-1)[order], e.reshape(-1)) for order, e in zip(orders, expected))
    assert np.array_equal(orders[0], np.arange(side * side))
    as_tuples = {tuple(order) for order in orders}
    assert len(as_tuples) == 8 and all(tuple(a[b]) in as_tuples for a in orders for b in orders)
    y, x = np.divmod(np.arange(side * side), side)
    chebyshev = np.maximum(abs(y[:, None] - y[None]), abs(x[:, None] - x[None]))  # between raster positions
    for order in orders:  # pixel j of the transformed image is pixel order[j] of the original
        assert np.array_equal(chebyshev[order][:, order], chebyshev)
    swapped = np.arange(side * side)
    swapped[[0, 1]] = 1, 0  # not a symmetry: the check can fail
    assert not np.array_equal(chebyshev[swapped][:, swapped], chebyshev)


def test_dihedral_augmentation_draws_from_the_sample_seed_on_training_images_only(tmp_path):
    images = np.arange(2 * 16, dtype=np.uint8).reshape(2, 16)
    dataset = tasks.SequenceDataset(images, [0, 1], augment_side=4)
    draws = [dataset[(1, seed)] for seed in range(40)]
    seen = {tuple(d["inputs"].tolist()) for d in draws}
    assert seen == {tuple(images[1][order]) for order in tasks.dihedral_orders(4)}
    assert all(int(d["targets"]) == 1 for d in draws)
    assert dataset[(1, 5)]["inputs"].tolist() == dataset[(1, 5)]["inputs"].tolist()  # a function of the key
    with pytest.raises(ValueError, match="example 0 has 9 tokens, not the 16 pixels"):
        tasks.SequenceDataset([np.zeros(9)], [0], augment_side=4)[(0, 1)]

    dm = LRADataModule(task="pathfinder32", batch_size=4, num_train=8, num_val=4, num_test=4,
                       difficulty="curv_baseline", cache_dir=str(tmp_path), augment="dihedral")
    dm.setup("fit")
    assert dm.datasets["train"].orders is not None and dm.datasets["val"].orders is None
    assert dm.datasets["test"].orders is None
    with pytest.raises(ConfigError, match="data.augment=dihedral is for the Pathfinder images, not the listops"):
        LRADataModule(task="listops", augment="dihedral")
    with pytest.raises(ConfigError, match="data.augment='flip' is not null or 'dihedral'"):
        LRADataModule(task="pathfinder32", augment="flip")


# ----------------------------------------------------------------------------------------------------------------
# Configs, the results table and training


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides), return_hydra_config=False)


def test_attention_group_swaps_the_attention_of_any_task():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose("project=lra", "lra.task=pathfinder32", "attention=performer", "attention.nb_features=8")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    assert model_cfg["arch"] == "pathfinder32_transformer" and model_cfg["attention"]["nb_features"] == 8
    module = instantiate(model_cfg, _convert_="all")
    assert type(module.model.encoder.blocks[0].attn).__name__ == "PerformerAttention"
    assert cfg.data.task == "pathfinder32"


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf/experiment/lra").glob("*.yaml")))
def test_experiment_configs_compose_and_build(experiment):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose(f"experiment=lra/{experiment}")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    with torch.device("meta"):
        module = instantiate(model_cfg, _convert_="all")
    assert module.task == cfg.lra.task == cfg.data.task
    assert module.attention_name == cfg.attention.name


def test_listops_recipe_trains_its_padded_batches_without_cudnn_attention(monkeypatch):
    # The NaN of the first H200 ListOps run (README, "GPU reproduction"): cuDNN's masked SDPA backward. The
    # module the lra/listops experiment builds (the bench builds the same model) must keep every masked attention
    # call off that backend; here a bf16 step on a batch whose attention length (63 tokens + CLS) is 64 mod 128.
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    calls = record_sdpa_calls(monkeypatch)
    model_cfg = OmegaConf.to_container(compose("experiment=lra/listops").model, resolve=True)
    model_cfg["model_kwargs"] = {"num_layers": 2, "emb_dim": 64, "qkv_dim": 64, "mlp_dim": 128}
    module = instantiate(model_cfg, _convert_="all").train()
    torch.manual_seed(0)
    inputs = torch.randint(1, 16, (4, 63))
    inputs[1:, 40:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(module({"inputs": inputs}).float(), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert len(calls) == 2 and all(masked and not cudnn for masked, cudnn in calls)
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_lra_table_collects_runs(tmp_path):
    """Paper-config runs fill the paper's rows; a run of another model (here the Nystromformer-code Pathfinder
    model) is its own row, never a cell of the Transformer row."""
    runs = [("listops", "softmax", "listops_transformer", 0.3712), ("pathfinder32", "performer", None, 0.7),
            ("pathfinder32", "softmax", "pathfinder32_transformer_nystromformer", 0.6)]
    for i, (task, attention, arch, accuracy) in enumerate(runs):
        run = tmp_path / "lra" / f"run{i}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"task": task, "attention": attention, "arch": arch,
                                                      "test/accuracy": accuracy}))
    out = subprocess.run([sys.executable, str(REPO / "scripts/lra_table.py"), str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    transformer = next(line for line in out.splitlines() if line.startswith("| Transformer"))
    assert "37.12" in transformer and "36.37" in transformer and "60.00" not in transformer
    other = next(line for line in out.splitlines() if line.startswith("| softmax [pathfinder32_transformer_nys"))
    assert "60.00" in other and "71.40" not in other
    performer = next(line for line in out.splitlines() if line.startswith("| Performer"))
    assert "70.00" in performer and "77.05" in performer


@pytest.mark.slow
def test_short_listops_training_beats_the_majority_class(tmp_path):
    import lightning.pytorch as pl

    from projects.lra.module import LRAModule

    torch.manual_seed(0)
    dm = LRADataModule(task="listops", batch_size=32, num_train=3200, num_val=100, num_test=400, seed=0,
                       cache_dir=str(tmp_path), listops_generator={"min_length": 10, "max_length": 60})
    module = LRAModule(task="listops", arch="listops_tiny", optimizer={"name": "adamw", "lr": 1e-3},
                       scheduler={"name": "cosine", "warmup_steps": 20})
    trainer = pl.Trainer(max_steps=100, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    result = trainer.test(module, datamodule=dm, verbose=False)[0]
    majority = np.bincount(dm.datasets["test"].labels).max() / len(dm.datasets["test"])
    assert result["test/accuracy"] > majority + 0.05
    assert json.loads((tmp_path / "results.json").read_text())["test/accuracy"] == pytest.approx(
        result["test/accuracy"])


def test_bench_resume_continues_a_stopped_run_exactly(tmp_path, monkeypatch, capsys, load_script):
    """A GPU reproduction runs in budget-stopped parts: part 1 stops after one step and saves its state, part 2
    resumes it; the loss windows of steps 3-4 and 5-6 equal those of an uninterrupted run (weights, Adam, schedule,
    dropout RNG and data order all restored)."""
    import re

    bench = load_script("bench_lra")
    monkeypatch.setenv("FORMERLAB_CACHE", str(tmp_path / "cache"))
    common = ["bench", "--train", "listops", "--quick", "--steps", "6", "--workers", "1"]

    def run(out: str, *extra: str) -> dict[int, str]:
        monkeypatch.setenv("OUT", str(tmp_path / out))  # not created: the bench makes it
        monkeypatch.setattr("sys.argv", common + list(extra))
        bench.main()
        return dict((int(s), loss) for s, loss in re.findall(r"step (\d+)/6 loss (\S+)", capsys.readouterr().out))

    whole = run("whole", "--minutes", "5")
    first = run("first", "--minutes", "1e-9")
    assert not first and (tmp_path / "first" / "listops_state.pt").is_file()
    rest = run("rest", "--minutes", "5", "--resume", str(tmp_path / "first" / "listops_state.pt"))
    assert set(whole) == {2, 4, 6} and rest[4] == whole[4] and rest[6] == whole[6], (whole, rest)


def test_bench_warm_start_loads_the_saved_weights_of_the_same_model_only(tmp_path, monkeypatch, capsys, load_script):
    """`--init-from` (the easy-to-hard warm start of the Pathfinder runs) starts from a saved run's weights with a
    fresh optimiser: its losses are those of the saved weights, not of a new initialisation of the same seed;
    weights of another model are refused by name."""
    import re

    bench = load_script("bench_lra")
    monkeypatch.setenv("FORMERLAB_CACHE", str(tmp_path / "cache"))

    def run(out: str, *extra: str) -> list[str]:
        monkeypatch.setenv("OUT", str(tmp_path / out))
        monkeypatch.setattr("sys.argv", ["bench", "--train", "pathfinder32", "--recipe", "nystromformer", "--quick",
                                         "--workers", "1", *extra])  # --quick logs the mean loss every 2 steps
        bench.main()
        return re.findall(r"step \d+/\d+ loss (\S+)", capsys.readouterr().out)

    run("easy", "--difficulty", "curv_baseline", "--steps", "3", "--minutes", "1e-9")  # stops after step 1
    saved = torch.load(tmp_path / "easy" / "pathfinder32_state.pt", weights_only=True)
    assert saved["model"] == "pathfinder32_transformer_nystromformer" and saved["step"] == 1
    fresh = run("fresh", "--steps", "2", "--minutes", "5", "--seed", "1")
    warm = run("warm", "--steps", "2", "--minutes", "5", "--seed", "1",
               "--init-from", str(tmp_path / "easy" / "pathfinder32_state.pt"))
    assert len(fresh) == len(warm) == 1 and fresh != warm
    finished = torch.load(tmp_path / "fresh" / "pathfinder32_state.pt", weights_only=True)  # the next level's start
    assert finished["step"] == finished["total_steps"] == 2
    monkeypatch.setattr("sys.argv", ["bench", "--train", "pathfinder32", "--quick", "--workers", "1",
                                     "--init-from", str(tmp_path / "easy" / "pathfinder32_state.pt")])
    with pytest.raises(SystemExit, match="weights of pathfinder32_transformer_nystromformer, this run trains "
                                         "pathfinder32_transformer"):
        bench.main()


def test_bench_augmentation_is_part_of_the_saved_state(tmp_path, monkeypatch, capsys, load_script):
    """`--augment dihedral` trains (the symmetries drawn per step), is recorded in the state, and a resume without
    it is refused by name, as is the augmentation of ListOps."""
    bench = load_script("bench_lra")
    monkeypatch.setenv("FORMERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OUT", str(tmp_path / "aug"))
    common = ["bench", "--train", "pathfinder32", "--recipe", "nystromformer", "--quick", "--workers", "1",
              "--steps", "3"]
    monkeypatch.setattr("sys.argv", common + ["--augment", "dihedral", "--minutes", "1e-9"])
    bench.main()
    saved = torch.load(tmp_path / "aug" / "pathfinder32_state.pt", weights_only=True)
    assert saved["augment"] == "dihedral" and saved["step"] == 1
    assert json.loads((tmp_path / "aug" / "bench_lra.json").read_text())["pathfinder32"]["augment"] == "dihedral"
    monkeypatch.setattr("sys.argv", common + ["--resume", str(tmp_path / "aug" / "pathfinder32_state.pt")])
    with pytest.raises(SystemExit, match="augment dihedral; this run is .* augment none"):
        bench.main()
    monkeypatch.setattr("sys.argv", ["bench", "--train", "listops", "--quick", "--augment", "dihedral"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--augment dihedral is for --train pathfinder32" in capsys.readouterr().err


@pytest.mark.slow
def test_pathfinder_cnn_probe_learns_a_learnable_labelling(load_script):
    """The probe that checks generated Pathfinder data is learnable must itself learn: 16x16 images with one
    horizontal or one vertical dashed stroke among noise pixels, labelled by the stroke's direction."""
    bench = load_script("bench_lra")
    rng = np.random.default_rng(0)

    def split(n: int) -> tasks.SequenceDataset:
        labels = rng.integers(0, 2, n)
        images = (rng.random((n, 16, 16)) < 0.05).astype(np.uint8) * 120
        for image, label, (row, start) in zip(images, labels, rng.integers(2, 14, (n, 2)) // [1, 2]):
            stroke = image[row, start:start + 8:2] if label else image[start:start + 8:2, row]
            stroke[:] = 255
        return tasks.SequenceDataset(list(images.reshape(n, -1)), labels)

    # a number of epochs, not a time budget: the outcome must not depend on the machine's speed
    result = bench.probe_cnn({"train": split(256), "val": split(64), "test": split(128)}, budget_s=math.inf,
                             device=torch.device("cpu"), seed=0, batch_size=64, max_epochs=16)
    assert len(result["epochs"]) == 16
    assert result["params"] == 592_706
    assert result["test_accuracy"] >= 90.0, result["epochs"]
