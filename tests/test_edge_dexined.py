"""DexiNed edge expert: state-dict layout, forward fidelity, Prismer's pre/post-processing, the Expert.

The fidelity tests compare against Prismer's original code run on recipe weights (reference README,
``edge/``); they skip when the reference data is absent. The Expert test uses a reduced-width network.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from reference_data import assert_close_to_reference, load_npy, make_weights, reference_dir
from tiny_experts import tiny_dexined

from expert_zoo.edge import DexiNedEdge, edge_maps, load_dexined, preprocess, resize_to_image
from expert_zoo.nets.dexined import DexiNed
from expert_zoo.registry import expert_class

SCHEME_FOLDERS = {"A": ("edge",), "B": ("edge", "schemeB")}
EDGE_OUTPUTS = ("fused", *(f"side_{i}" for i in range(1, 7)))
# Per map: at most 3x the largest |port - reference| measured (reference_data.record_error) over two
# runs on this CPU (AMD EPYC, AVX2): native, 2 threads; and with ATen, MKL and oneDNN limited to
# SSE4 (which also perturbs torch.randn, hence the weights, at float32 rounding), 1 thread. A map
# matched bit for bit both times gets 2 float32 ulps of its largest value. Comments: native / SSE4.
TOLERANCE = {
    ("A", "fused"): 1.9e-9,  # 0 / 0 of max 0.0118
    ("A", "side_1"): 3.7e-9,  # 0 / 0 of max 0.0244
    ("A", "side_2"): 5.5e-9,  # 1.9e-9 / 1.9e-9 of max 0.0245
    ("A", "side_3"): 3.7e-9,  # 0 / 0 of max 0.0166
    ("A", "side_4"): 5.5e-9,  # 9.3e-10 / 1.9e-9 of max 0.0101
    ("A", "side_5"): 4.7e-10,  # 0 / 0 of max 0.00215
    ("A", "side_6"): 3.7e-9,  # 0 / 0 of max 0.0293
    ("B", "fused"): 3.2e-4,  # 6.3e-5 / 1.1e-4 of max 38.5
    ("B", "side_1"): 1.6e-5,  # 3.1e-6 / 5.5e-6 of max 4.43
    ("B", "side_2"): 3.2e-5,  # 6.0e-6 / 1.1e-5 of max 3.63
    ("B", "side_3"): 1.9e-5,  # 4.5e-6 / 6.4e-6 of max 3.22
    ("B", "side_4"): 1.5e-5,  # 5.1e-6 / 5.2e-6 of max 3.60
    ("B", "side_5"): 3.7e-6,  # 7.3e-7 / 1.3e-6 of max 0.383
    ("B", "side_6"): 1.0e-6,  # 2.4e-7 / 3.6e-7 of max 0.172
}


@functools.lru_cache(maxsize=1)  # scheme A is used twice in a row; one 140 MB copy at a time
def _reference_weights(scheme: str) -> dict[str, torch.Tensor]:
    return make_weights(reference_dir("edge") / "state_dict.json", scheme)


@pytest.fixture(scope="module", params=["A", "B"])
def reference_run(request: pytest.FixtureRequest) -> tuple[str, list[np.ndarray]]:
    """One full-size forward of ``edge/input.npy`` per weight scheme: (scheme, seven output maps)."""
    scheme = request.param
    model = DexiNed().eval()
    model.load_state_dict(_reference_weights(scheme), strict=True)
    x = torch.from_numpy(load_npy("edge", "input.npy"))
    with torch.inference_mode():
        outputs = [out.numpy() for out in model(x)]
    return scheme, outputs


def test_state_dict_matches_original_layout() -> None:
    expected = json.loads((reference_dir("edge") / "state_dict.json").read_text())
    model = DexiNed()
    actual = [
        [key, list(value.shape), str(value.dtype).removeprefix("torch.")]
        for key, value in model.state_dict().items()
    ]
    assert len(actual) == 319
    assert actual == expected
    model.load_state_dict(_reference_weights("A"), strict=True)


def test_forward_matches_reference(reference_run: tuple[str, list[np.ndarray]]) -> None:
    scheme, outputs = reference_run
    folder = SCHEME_FOLDERS[scheme]
    assert_close_to_reference(
        outputs[6], load_npy(*folder, "output_fused.npy"), TOLERANCE[scheme, "fused"], f"{scheme} fused"
    )
    for index in range(6):
        if scheme == "A":
            expected, actual = load_npy(*folder, f"output_side_{index + 1}.npy"), outputs[index]
        else:  # scheme B stores the side maps subsampled
            expected, actual = (
                load_npy(*folder, f"output_side_{index + 1}_sub2.npy"),
                outputs[index][..., ::2, ::2],
            )
        name = f"side_{index + 1}"
        assert_close_to_reference(actual, expected, TOLERANCE[scheme, name], f"{scheme} {name}")


def test_port_label_within_one_grey_level(reference_run: tuple[str, list[np.ndarray]]) -> None:
    """The port's own fused map gives Prismer's label up to float32 rounding (README §5: ±1, few pixels)."""
    scheme, outputs = reference_run
    label = resize_to_image(edge_maps(torch.from_numpy(outputs[6])).numpy()[0], (512, 512))
    expected = np.asarray(Image.open(reference_dir(*SCHEME_FOLDERS[scheme]) / "label.png"))
    diff = np.abs(label.astype(np.int16) - expected)
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= 50, np.count_nonzero(diff)


def test_preprocess_reproduces_network_input() -> None:
    image = load_npy("edge", "image_uint8.npy")
    x = preprocess([image], torch.device("cpu")).numpy()
    expected = load_npy("edge", "input.npy")
    assert x.shape == expected.shape and x.dtype == np.float32
    # Same ops in the same order: bit-identical here; allow one float32 ulp at 0-255 scale elsewhere.
    np.testing.assert_allclose(x, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("scheme", ["A", "B"])
def test_postprocess_reproduces_label(scheme: str) -> None:
    """Reference fused logits → our post-processing → exactly Prismer's ``label.png``.

    Scheme A is the harsh case: the min-max stretches a 6e-6 spread to 0..255, so any deviation from
    Prismer's float32 arithmetic order would show.
    """
    folder = SCHEME_FOLDERS[scheme]
    fused = torch.from_numpy(load_npy(*folder, "output_fused.npy"))
    label = resize_to_image(edge_maps(fused).numpy()[0], (512, 512))
    expected = np.asarray(Image.open(reference_dir(*folder) / "label.png"))
    assert label.dtype == np.uint8 and expected.shape == (512, 512)
    np.testing.assert_array_equal(label, expected)


def test_edge_maps_normalise_each_image_separately() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(1, 1, 32, 48, generator=generator)
    b = 5.0 * torch.randn(1, 1, 32, 48, generator=generator) + 3.0
    batched = edge_maps(torch.cat([a, b]))
    assert batched.dtype == torch.uint8 and batched.shape == (2, 32, 48)
    assert torch.equal(batched[0], edge_maps(a)[0]) and torch.equal(batched[1], edge_maps(b)[0])
    assert batched.amin() == 0 and batched.amax() == 255  # strongest edge is 0 after inversion


def test_expert_end_to_end(tmp_path) -> None:
    assert expert_class("edge:dexined") is DexiNedEdge
    model = tiny_dexined()
    weights = str(tmp_path / "tiny.pth")
    torch.save(model.state_dict(), weights)
    expert = DexiNedEdge({"weights": weights, "batch_size": 1})
    assert expert.model.width == 0.125 and expert.batch_size == 1
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (37, 61, 3), dtype=np.uint8),
        rng.integers(0, 256, (90, 44, 3), dtype=np.uint8),
    ]
    labels = expert(images)
    assert [label.map.shape for label in labels] == [(37, 61), (90, 44)]
    assert all(label.map.dtype == np.uint8 for label in labels)
    # Batching must not change the result: one batch of two equals two batches of one.
    together = DexiNedEdge({"weights": weights})(images)
    assert all(np.array_equal(x.map, y.map) for x, y in zip(labels, together))

    with torch.no_grad():
        model.block_cat.conv.bias.add_(1.0)
    torch.save(model.state_dict(), tmp_path / "other.pth")
    other = DexiNedEdge({"weights": str(tmp_path / "other.pth"), "batch_size": 1})
    assert other.weights_digest != expert.weights_digest
    assert other.fingerprint() != expert.fingerprint()


def test_expert_reports_missing_weights(tmp_path) -> None:
    from label_pipeline.core.weights import WeightsUnavailable

    with pytest.raises(WeightsUnavailable):
        DexiNedEdge({"weights": str(tmp_path / "absent.pth")})


def test_load_rejects_mismatched_checkpoint() -> None:
    state = DexiNed(width=0.125).state_dict()
    del state["side_5.bn.running_var"]
    with pytest.raises(RuntimeError, match="side_5.bn.running_var"):
        load_dexined(state)
