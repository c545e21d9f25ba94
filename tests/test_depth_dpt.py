"""depth:dpt_hybrid — the MiDaS checkpoint converter, fidelity against Prismer's reference, the L8 label.

The fidelity tests run the full 123 M-parameter DPT-Hybrid at 480² on CPU (a few seconds per forward), so
the models are module-scoped and each reference forward runs once. Everything else uses a tiny config.
tests/conftest.py sets HF_HUB_OFFLINE=1: nothing here may reach the hub.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from reference_data import assert_close_to_reference, load_npy, make_weights, reference_dir
from tiny_experts import tiny_dpt_model

from expert_zoo.convert_dpt import (
    UNUSED_ORIGINAL_KEYS,
    allow_input_size,
    build_model,
    convert_state_dict,
    hybrid_config,
    unwrap_checkpoint,
)
from expert_zoo.depth import DPTHybridDepth, depth_to_label
from expert_zoo.registry import build_expert

transformers = pytest.importorskip("transformers")

# Inverse depth per weight scheme: at most 3x the largest |port - reference| measured
# (reference_data.record_error) over two runs on this CPU (AMD EPYC, AVX2): native, 2 threads; and
# with ATen, MKL and oneDNN limited to SSE4 (which also perturbs torch.randn, hence the weights, at
# float32 rounding), 1 thread. Comments: native / SSE4.
TOLERANCE = {
    "A": 3.3e-8,  # 9.9e-9 / 1.1e-8 of max 2.85e-3
    "B": 6.2e-3,  # 1.2e-3 / 2.1e-3 of max 13.4 (float32 vs float64 is 3.4e-4 there)
}


def prismer_label(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Prismer's post-processing written literally (torch min-max + interpolate, then PIL F → L)."""
    d = torch.from_numpy(np.asarray(depth, dtype=np.float32))
    d = (d - d.min()) / (d.max() - d.min())
    d = torch.nn.functional.interpolate(d[None, None], size=size, mode="bilinear", align_corners=True)
    return np.asarray(Image.fromarray(255 * d[0, 0].numpy()).convert("L"))


def synthetic_images() -> list[np.ndarray]:
    """Two non-square RGB images (gradients plus noise) that need no reference data."""
    rng = np.random.default_rng(0)
    images = []
    for height, width in [(211, 300), (353, 97)]:
        ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
        images.append((ramp + rng.integers(0, 5, (height, width, 3))).astype(np.uint8))
    return images


def two_non_square_images() -> list[np.ndarray]:
    astronaut = load_npy("depth", "image_uint8.npy")
    wide = np.asarray(Image.fromarray(astronaut).resize((517, 389), Image.BILINEAR))
    tall = np.ascontiguousarray(astronaut[20:470, 100:401])  # 450×301
    return [wide, tall]


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def state_dict_json():
    return reference_dir("depth") / "state_dict.json"


@pytest.fixture(scope="module")
def weights_a(state_dict_json):
    return make_weights(state_dict_json, "A")


@pytest.fixture(scope="module")
def model_a(weights_a):
    model = build_model(weights_a)
    allow_input_size(model, (480, 480))
    return model


@pytest.fixture(scope="module")
def expert_b(state_dict_json, tmp_path_factory):
    """Scheme-B weights saved as a MiDaS training checkpoint and loaded through config["weights"]."""
    path = tmp_path_factory.mktemp("dpt_original") / "dpt_hybrid-midas-schemeB.pt"
    torch.save({"model": make_weights(state_dict_json, "B"), "optimizer": {}}, path)
    return DPTHybridDepth({"weights": str(path)}, device="cpu")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny DPT-Hybrid (2 ViT layers, 3 one-block ResNet stages) saved with ``save_pretrained``."""
    path = tmp_path_factory.mktemp("tiny_dpt")
    tiny_dpt_model().save_pretrained(path)
    return path


# -- (a) converter ----------------------------------------------------------------------------
def test_converter_fills_every_transformers_key(weights_a, state_dict_json):
    entries = json.loads(state_dict_json.read_text())
    assert len(entries) == len(weights_a) == 368
    converted = convert_state_dict(weights_a)
    with torch.device("meta"):
        target = transformers.DPTForDepthEstimation(hybrid_config()).state_dict()
    assert sorted(converted) == sorted(target)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in target.items()}
    # 368 originals - 2 classifier entries + 12 blocks × (weight, bias) × (3 - 1) extra from the qkv split
    assert len(converted) == 368 - len(UNUSED_ORIGINAL_KEYS) + 12 * 2 * 2 == 414
    assert set(UNUSED_ORIGINAL_KEYS) <= set(weights_a)


def test_converter_values_and_qkv_split(weights_a):
    converted = convert_state_dict(weights_a)
    qkv = weights_a["pretrained.model.blocks.7.attn.qkv.weight"]
    for i, name in enumerate(("query", "key", "value")):
        part = converted[f"dpt.encoder.layer.7.attention.attention.{name}.weight"]
        assert torch.equal(part, qkv[768 * i : 768 * (i + 1)])
    assert (
        converted["neck.fusion_stage.layers.0.projection.weight"]
        is weights_a["scratch.refinenet4.out_conv.weight"]
    )
    assert converted["head.head.4.bias"] is weights_a["scratch.output_conv.4.bias"]
    assert converted["dpt.embeddings.position_embeddings"].shape == (1, 577, 768)  # 24×24 grid kept


def test_converter_rejects_unknown_and_missing_keys(weights_a):
    with pytest.raises(KeyError, match="no transformers counterpart"):
        convert_state_dict({**weights_a, "pretrained.model.extra.weight": torch.zeros(1)})
    incomplete = {k: v for k, v in weights_a.items() if k != "scratch.layer1_rn.weight"}
    with pytest.raises(RuntimeError, match="Missing key"):
        build_model(incomplete)


def test_unwrap_checkpoint_like_midas_base_model_load(weights_a):
    assert unwrap_checkpoint({"model": weights_a, "optimizer": {}}) is weights_a
    assert unwrap_checkpoint(weights_a) is weights_a


# -- (b) fidelity of the converted model ---------------------------------------------------------
def test_scheme_a_output_matches_reference(model_a):
    pixel_values = torch.from_numpy(load_npy("depth", "input.npy"))
    with torch.inference_mode():
        depth = model_a(pixel_values=pixel_values).predicted_depth
    assert_close_to_reference(
        depth.numpy(), load_npy("depth", "output_inverse_depth.npy"), TOLERANCE["A"], "A inverse depth"
    )


def test_scheme_b_through_expert_matches_reference(expert_b):
    image = load_npy("depth", "image_uint8.npy")
    pixel_values = expert_b.preprocess([image])
    # Prismer's Resize/ToTensor/Normalize(0.5, 0.5) on the 480² image, bit for bit
    assert torch.equal(pixel_values, torch.from_numpy(load_npy("depth", "input.npy")))
    depth = expert_b.inverse_depth(pixel_values)
    reference = load_npy("depth", "schemeB", "output_inverse_depth.npy")
    assert_close_to_reference(depth.numpy(), reference, TOLERANCE["B"], "B inverse depth")
    # The label from our forward vs the label from the reference forward, both at 480²: float32 noise
    # (summation order in transformers' kernels vs timm's) only tips values across an integer boundary,
    # so one grey level at a few pixels. Measured, all by 1: 675 of 230,400 pixels (0.29 %) with 2 torch
    # threads, 1,333 (0.58 %) with 1 thread or with vector ISAs limited to SSE4 (the order of the
    # float32 sums changes with both); the bound is 1.5x the larger.
    ours = depth_to_label(depth[0], (480, 480))
    theirs = prismer_label(reference[0], (480, 480))
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.009, ((diff > 0).sum(), diff.max())


# -- (c) label post-processing ------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["", "schemeB"])
def test_postprocessing_reproduces_prismer_label_png(scheme):
    parts = ("depth", scheme) if scheme else ("depth",)
    depth = load_npy(*parts, "output_inverse_depth.npy")[0]
    expected = np.asarray(Image.open(reference_dir(*parts) / "label.png"))
    label = depth_to_label(torch.from_numpy(depth), expected.shape)
    assert label.dtype == np.uint8 and label.shape == (512, 512)
    assert np.array_equal(label, expected)  # bit-exact (0 pixels differ, A and B)


def test_float_to_l_conversion_matches_pil():
    # clip to [0, 255] and truncate, like Image.fromarray(float32).convert("L")
    rng = np.random.default_rng(0)
    depth = rng.random((37, 53), dtype=np.float32) ** 3
    for size in [(37, 53), (100, 71), (12, 9)]:
        assert np.array_equal(depth_to_label(torch.from_numpy(depth), size), prismer_label(depth, size))


def test_constant_depth_gives_zero_label():
    assert not depth_to_label(torch.full((480, 480), 0.3), (7, 11)).any()


# -- (d) the expert end to end ----------------------------------------------------------------
def test_expert_from_transformers_directory(tiny_model_dir):
    expert = build_expert("depth:dpt_hybrid", options={"weights": str(tiny_model_dir)})
    assert isinstance(expert, DPTHybridDepth) and len(expert.weights_digest) == 64
    saved = transformers.DPTForDepthEstimation.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(v, expert.model.state_dict()[k]) for k, v in saved.items())
    images = synthetic_images()
    labels = expert(images)
    raw = expert.inverse_depth(expert.preprocess(images))
    for image, label, depth in zip(images, labels, raw):
        assert label.map.dtype == np.uint8 and label.map.shape == image.shape[:2]
        assert label.data is None
        assert label.map.max() - label.map.min() > 50
        assert np.array_equal(label.map, prismer_label(depth.numpy(), image.shape[:2]))
    assert set(expert.encode(labels[0])) == {"png"}


def test_expert_from_original_checkpoint(expert_b, tiny_model_dir):
    images = two_non_square_images()
    labels = expert_b(images)
    for image, label in zip(images, labels):
        assert label.map.dtype == np.uint8 and label.map.shape == image.shape[:2]
        assert label.map.max() - label.map.min() > 200  # per-image min-max spreads to nearly 0..255
    tiny = DPTHybridDepth({"weights": str(tiny_model_dir)})
    assert expert_b.weights_digest != tiny.weights_digest
    assert expert_b.fingerprint() != tiny.fingerprint()
