"""cvarch.compress against Han et al. 2016 (Deep Compression, arXiv:1510.00149) and Iandola et al. 2016
(SqueezeNet, Table 2): exact sparsity, exactly 2^bits shared weights per layer, k-means as scikit-learn's
Lloyd, Huffman sizes that are the bits written, decoding bit for bit, stage sizes of the papers' presets,
SqueezeNet's 4,993,696 bytes, the checkpoint cvarch-eval takes, and errors that name their key."""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch import nn
from torch.nn.utils import prune

import cvarch
from cvarch.build import build_model, instantiate
from cvarch.compress import (
    CODE_LENGTH_BITS,
    FLOAT_BITS,
    STAGES,
    Compression,
    HuffmanCode,
    decode_layer,
    deep_compression,
    kmeans_1d,
    positions_from_relative,
    prune_layer,
    relative_indices,
    run,
)
from cvarch.config import CONFIG_DIR, ConfigError
from cvarch.eval import evaluate
from tests.conftest import report, run_cli, run_main, tmp_overrides

PRESETS = sorted(path.stem for path in (Path(CONFIG_DIR) / "compress").glob("*.yaml"))
IMAGENET = ("data.channels=3", "data.num_classes=1000")
# the model each preset was published for; AlexNet's 62M weights take half a minute on 2 cores, so a thin
# AlexNet (the same conv1–5 and fc6–8, the lecture's layout with fewer filters) stands in for it
PRESET_MODELS = {
    "squeezenet": ("model=squeezenet1_0", *IMAGENET),
    "squeezenet_8bit": ("model=squeezenet1_0", *IMAGENET),
    "alexnet": (
        "model=alexnet",
        *IMAGENET,
        "model.features=[[24,11,4,0],M,N,[64,5,1,2],M,N,[96,3,1,1],[96,3,1,1],[64,3,1,1],M]",
        "model.classifier=[256,D,256,D]",
    ),
}


def compress_cfg(*overrides: str):
    return cvarch.compose(*overrides, config_name="compress")


@functools.cache
def compressed(preset: str) -> tuple[Compression, list, nn.Module]:
    """``(compression, plans, model)`` of a preset on its model, initialized with seed 0; once per session."""
    cfg = compress_cfg(f"compress={preset}", *PRESET_MODELS[preset])
    settings = instantiate(cfg.compress)
    torch.manual_seed(0)
    model = build_model(cfg, initialize=False)  # as cvarch-compress builds it: the constructor's init
    plans = settings.plan(model)
    return deep_compression(model, settings), plans, model


# --- pruning ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.33, 0.5, 0.67, 0.91, 0.999])
def test_pruning_zeroes_exactly_round_sparsity_times_numel_as_torch_l1_unstructured(sparsity):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 7, 3)  # 189 weights, no two of the same magnitude
    reference = copy.deepcopy(conv)
    prune_layer(conv, sparsity)
    prune.l1_unstructured(reference, "weight", amount=sparsity)  # torch's own, on tie-free weights
    prune.remove(reference, "weight")
    zeros = conv.weight == 0
    assert int(zeros.sum()) == round(sparsity * 189)
    assert torch.equal(conv.weight, reference.weight)
    assert not torch.signbit(conv.weight[zeros]).any()  # +0.0, not the −0.0 a mask leaves on negative weights
    assert torch.equal(conv.bias, reference.bias) and int((conv.bias == 0).sum()) == 0  # biases stay dense
    assert {n for n, _ in conv.named_parameters()} == {"weight", "bias"} and not list(conv.buffers())


def test_pruning_breaks_ties_in_row_major_order():
    linear = nn.Linear(4, 3, bias=False)
    with torch.no_grad():  # eight weights of magnitude 1
        linear.weight.copy_(torch.tensor([[1.0, -1, 2, 1], [-2, 1, 3, -1], [1, 2, 2, -3]]))
    prune_layer(linear, 0.25)  # 3 of 12: the first three of magnitude 1
    assert torch.nonzero(linear.weight.flatten() == 0).flatten().tolist() == [0, 1, 3]


def test_relative_indices_insert_a_filler_where_a_gap_is_too_long():
    # Han et al. 2016 Fig. 2, 3-bit indices: a symbol counts the zeros skipped; 7 skips 7 and holds no weight
    positions = np.array([1, 4, 15, 16, 40])
    stream = relative_indices(positions, 3)
    assert stream.tolist() == [1, 2, 7, 3, 0, 7, 7, 7, 2]
    assert positions_from_relative(stream, 3).tolist() == positions.tolist()
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        positions = np.flatnonzero(rng.random(3000) < 0.05)
        stream = relative_indices(positions, bits)
        assert stream.max() < 2**bits
        assert np.array_equal(positions_from_relative(stream, bits), positions)


# --- weight sharing -----------------------------------------------------------------------------------------


def test_kmeans_runs_scikit_learns_lloyd_iterations_from_the_linear_init():
    values = 0.05 * torch.randn(4000, generator=torch.Generator().manual_seed(0))
    centroids, labels = kmeans_1d(values, 16)
    init = np.linspace(float(values.min()), float(values.max()), 16)[:, None]  # Han et al. 2016 §3.1
    sk = KMeans(16, init=init, n_init=1, algorithm="lloyd", tol=0, max_iter=300)
    sk.fit(values.double().numpy()[:, None])
    order = np.argsort(sk.cluster_centers_.ravel())
    np.testing.assert_allclose(centroids.numpy(), sk.cluster_centers_.ravel()[order], rtol=1e-6)
    assert np.array_equal(np.argsort(order)[sk.labels_], labels.numpy())


def test_empty_clusters_are_reseeded_so_that_every_centroid_is_used():
    values = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    values = values[values.abs() > 1]  # pruned: no weight near zero
    linear_init = torch.linspace(float(values.min()), float(values.max()), 64)
    nearest = torch.argmin((values[:, None] - linear_init).abs(), dim=1)
    assert (torch.bincount(nearest, minlength=64) == 0).sum() > 5  # the gap leaves init centroids empty
    centroids, labels = kmeans_1d(values, 64)
    assert len(torch.unique(centroids)) == 64
    assert torch.bincount(labels, minlength=64).min() > 0
    assert torch.equal(torch.argmin((values[:, None] - centroids).abs(), dim=1), labels)  # nearest centroid


def test_a_layer_with_fewer_distinct_weights_than_clusters_gets_one_cluster_each():
    values = torch.tensor([0.5] * 50 + [-1.0] * 30 + [2.0] * 5)
    centroids, labels = kmeans_1d(values, 16)
    assert centroids.tolist() == [-1.0, 0.5, 2.0]
    assert torch.equal(centroids[labels], values)


# --- Huffman coding -----------------------------------------------------------------------------------------


def test_huffman_code_of_the_textbook_example():
    # Cormen et al., Introduction to Algorithms (3rd ed.) §16.3, Fig. 16.3: 224 bits for 100 characters
    counts = {0: 45, 1: 13, 2: 12, 3: 16, 4: 9, 5: 5}
    symbols = np.repeat(list(counts), list(counts.values()))
    code = HuffmanCode.fit(np.random.default_rng(0).permutation(symbols), 6)
    assert code.lengths.tolist() == [1, 3, 3, 3, 4, 4]
    stream = code.encode(symbols)
    assert stream.nbits == 224 and len(stream.data) == 28
    assert np.array_equal(code.decode(stream), symbols)
    assert code.table_bits == 6 * CODE_LENGTH_BITS
    lone = HuffmanCode.fit(np.zeros(5, dtype=np.int64), 4)  # one symbol: a 1-bit code
    assert lone.lengths.tolist() == [1, 0, 0, 0] and lone.encode(np.zeros(5, dtype=np.int64)).nbits == 5
    assert np.array_equal(lone.decode(lone.encode(np.zeros(5, dtype=np.int64))), np.zeros(5))


# --- the three stages on the papers' models -----------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_pruned_layers_keep_exactly_their_stated_sparsity(preset):
    compression, plans, _ = compressed(preset)
    assert [layer.name for layer in compression.layers] == [plan.name for plan in plans]
    for layer, plan in zip(compression.layers, plans, strict=True):
        pruned = compression.weights["pruned"][plan.name]
        assert int((pruned == 0).sum()) == layer.zeros == round(plan.sparsity * layer.weights), plan.name


def test_the_alexnet_preset_prunes_each_layer_as_han_table_4():
    _, plans, _ = compressed("alexnet")
    kept = [round(100 * (1 - plan.sparsity)) for plan in plans]
    assert kept == [84, 38, 35, 37, 37, 9, 9, 25]  # Han et al. 2016 Table 4, "Weights%" (conv1–5, fc6–8)
    widths = [(plan.kind, plan.bits, plan.index_bits) for plan in plans]
    assert widths == [("conv", 8, 8)] * 5 + [("fc", 5, 5)] * 3


@pytest.mark.parametrize("preset", PRESETS)
def test_shared_layers_take_exactly_2_to_the_bits_values_and_keep_their_zeros(preset):
    compression, plans, _ = compressed(preset)
    for layer, plan in zip(compression.layers, plans, strict=True):
        shared = compression.weights["quantized"][plan.name]
        assert len(torch.unique(shared[shared != 0])) == layer.clusters == 2**plan.bits, plan.name
        assert torch.equal(shared == 0, compression.weights["pruned"][plan.name] == 0), plan.name
        assert not torch.signbit(shared[shared == 0]).any()


@pytest.mark.parametrize("preset", PRESETS)
def test_huffman_size_is_the_sum_of_code_lengths_plus_the_codebooks(preset):
    compression, plans, _ = compressed(preset)
    total = 0
    for layer, plan in zip(compression.layers, plans, strict=True):
        encoded = compression.encoded[plan.name]
        flat = compression.weights["quantized"][plan.name].flatten().numpy()
        positions = np.flatnonzero(flat)
        indices = np.searchsorted(encoded.codebook.numpy(), flat[positions])
        relative = relative_indices(positions, plan.index_bits)
        value_bits = int(encoded.value_code.lengths[indices].sum())  # the code lengths over the symbols
        position_bits = int(encoded.position_code.lengths[relative].sum())
        assert encoded.values.nbits == layer.value_code_bits == value_bits
        assert encoded.positions.nbits == layer.position_code_bits == position_bits
        assert len(encoded.values.data) == -(-value_bits // 8)
        codebook = layer.clusters * FLOAT_BITS
        tables = (layer.clusters + 2**plan.index_bits) * CODE_LENGTH_BITS
        assert layer.huffman_bits == value_bits + position_bits + codebook + tables
        for code, symbols in ((encoded.value_code, indices), (encoded.position_code, relative)):
            assert np.sum(2.0 ** -code.lengths[code.lengths > 0]) == 1  # a full prefix code (Kraft)
            p = np.bincount(symbols) / len(symbols)
            entropy = -np.sum(p[p > 0] * np.log2(p[p > 0]))
            assert entropy <= code.lengths[symbols].mean() < entropy + 1  # Huffman's bound
        total += layer.huffman_bits
    assert compression.bits("huffman") == total + compression.dense_values * FLOAT_BITS


@pytest.mark.parametrize("preset", PRESETS)
def test_decoding_gives_back_the_shared_weights_bit_for_bit(preset):
    compression, plans, model = compressed(preset)
    for plan in plans:
        decoded = decode_layer(compression.encoded[plan.name])
        shared = compression.weights["quantized"][plan.name]
        assert torch.equal(decoded.view(torch.int32), shared.view(torch.int32))  # +0.0 and −0.0 differ here
        assert torch.equal(model.get_submodule(plan.name).weight, shared)  # the model holds the decoded ones


@pytest.mark.parametrize("preset", PRESETS)
def test_each_stage_stores_less_than_the_one_before(preset):
    compression, _, _ = compressed(preset)
    bits = [compression.bits(stage) for stage in STAGES]
    assert bits == sorted(bits, reverse=True) and len(set(bits)) == 4
    sizes = compression.sizes()
    report(
        f"{preset} preset on {compression.model} (initialized, seed 0): "
        + ", ".join(f"{s} {sizes[s]['bytes']:,.0f} B ({sizes[s]['ratio']:.1f}×)" for s in STAGES)
    )


def test_squeezenet_1_0_is_4_993_696_bytes_dense_the_papers_4_8_mib():
    compression, _, _ = compressed("squeezenet")
    dense = compression.sizes()["dense"]
    assert compression.params == 1_248_424  # Iandola et al. 2016 Table 1
    assert dense["bytes"] == 1_248_424 * 4 == 4_993_696 and round(dense["mb"], 2) == 4.99
    assert round(dense["mib"], 1) == 4.8  # Iandola's "4.8MB" is MiB: in 10⁶ bytes it would be 5.0


# --- the tool -----------------------------------------------------------------------------------------------


def test_a_checkpoint_is_compressed_tested_per_stage_and_written_for_cvarch_eval(tiny_run, tmp_path):
    trained = json.loads((tiny_run / "metrics.json").read_text())
    proc = run_main("cvarch-compress", f"ckpt_path={trained['best_ckpt']}", f"paths.log_dir={tmp_path}/logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "huffman" in proc.stdout and "× smaller" in proc.stdout
    result = json.loads((Path(proc.stdout.strip().splitlines()[-1]) / "compress.json").read_text())
    stages = result["stages"]
    assert stages["dense"]["acc"] == pytest.approx(trained["test/acc"], abs=1e-6)  # as training measured it
    # one-hidden-layer MLP on digits: fc1 64×16 keeps 338 weights; fc2 16×10 keeps 53, fewer than 2^6 = 64
    assert [(r["kept"], r["clusters"]) for r in result["layers"]] == [(338, 64), (53, 53)]
    assert stages["huffman"]["acc"] == stages["quantized"]["acc"]  # the decoded weights are the shared ones
    ckpt = torch.load(result["compressed_ckpt"], weights_only=True)
    assert "optimizer_states" not in ckpt and ckpt["compression"]["bits"] == {"conv": 6, "fc": 6}
    for layer in result["layers"]:
        weight = ckpt["state_dict"][f"model.{layer['name']}.weight"]
        assert int(torch.count_nonzero(weight)) == layer["kept"]
        assert len(torch.unique(weight[weight != 0])) == layer["clusters"]
    eval_cfg = cvarch.compose(
        f"ckpt_path={result['compressed_ckpt']}", f"paths.log_dir={tmp_path}", config_name="eval"
    )
    metrics = evaluate(eval_cfg)
    assert metrics["test/acc"] == pytest.approx(stages["huffman"]["acc"], abs=1e-6)


SHARE = "the share of a layer's weights pruned, in [0, 1)"


@pytest.mark.parametrize(
    "override, message",
    [
        ("compress.conv_bits=0", "compress.conv_bits: a width in bits, 1 to 16, got 0"),
        ("compress.fc_bits=17", "compress.fc_bits: a width in bits, 1 to 16, got 17"),
        ("compress.conv_index_bits=0", "compress.conv_index_bits: a width in bits, 1 to 16, got 0"),
        ("compress.sparsity=1.0", f"compress.sparsity: {SHARE}, got 1.0"),
        ("compress.fc_sparsity=-0.1", f"compress.fc_sparsity: {SHARE}, got -0.1"),
        ("compress.layer_sparsity=[0.5,1.5]", f"compress.layer_sparsity[1]: {SHARE}, got 1.5"),
        ("compress.layer_sparsity=[0.5,0.5]", "compress.layer_sparsity: 2 shares for the 20 conv and linear"),
        ("compress.conv_bits=six", "compress.conv_bits: expected int, got 'six'"),
        ("split=valid", "split: one of ('test', 'val', 'train'), got 'valid'"),
    ],
)
def test_bad_input_names_its_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(compress_cfg(override, *tmp_overrides(tmp_path)))


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"ckpt_path: no checkpoint at {tmp_path}/none.ckpt"):
        run(compress_cfg(f"ckpt_path={tmp_path}/none.ckpt", *tmp_overrides(tmp_path)))


def test_cvarch_compress_sets_squeezenet_beside_alexnet(tmp_path):
    proc = run_cli(
        "cvarch-compress", "model=squeezenet1_0", *IMAGENET, "reference=alexnet", *tmp_overrides(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((Path(proc.stdout.strip().splitlines()[-1]) / "compress.json").read_text())
    reference, huffman = result["reference"], result["stages"]["huffman"]
    assert reference["params"] == 62_378_344 and reference["bits"] == 62_378_344 * 32  # the lecture's AlexNet
    assert reference["ratio"] == pytest.approx(reference["bits"] / huffman["bits"])
    assert "Iandola et al. 2016 Table 2: 240MB / 0.47MB = 510×" in " ".join(proc.stdout.split())
    report(
        f"AlexNet (lecture) dense {reference['mb']:.1f} MB / SqueezeNet 1.0 (initialized) after Deep "
        f"Compression {huffman['mb']:.3f} MB = {reference['ratio']:.0f}× (Iandola 2016: 510×)"
    )
