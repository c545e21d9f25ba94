"""The trainer's shard loader: joint transforms keep labels aligned, missing experts are masked, the stream
resumes at any batch, ranks split the shards, and batches stay small."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import image_bytes
from reference_data import reference_dir

from label_pipeline.core.format import encode_json, encode_png
from label_pipeline.core.tario import write_tar
from prismer_trainer.augment import AugmentConfig, GeometricOp, joint_transform, random_resized_crop_box
from prismer_trainer.batches import batch_nbytes, to_model_inputs
from prismer_trainer.embeddings import LabelEmbeddings
from prismer_trainer.model import embedding_map
from prismer_trainer.samples import SampleDecoder
from prismer_trainer.shards import read_shard
from prismer_trainer.stream import BatchStream, make_loader
from prismer_trainer.text import (
    HFTokenizer,
    TokenizerUnavailable,
    WordTokenizer,
    caption_tokens,
    pre_caption,
    training_text,
)

ALL_EXPERTS = ("depth", "normal", "seg_coco", "edge", "obj_detection", "ocr_detection")


# ------------------------------------------------------------------------------------------------
# Synthetic label shards in the documented member layout (docs/FORMAT.md)
# ------------------------------------------------------------------------------------------------
def square_sample(height: int, width: int, box: tuple[int, int, int, int], seed: int = 0) -> dict:
    """An image with a white square at ``box`` (top, left, bottom, right) on a dark background, and every
    expert's label marking the same pixels."""
    rng = np.random.default_rng(seed)
    top, left, bottom, right = box
    inside = np.zeros((height, width), bool)
    inside[top:bottom, left:right] = True
    rgb = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    rgb[inside] = 255
    depth = np.where(inside, 250, 10).astype(np.uint8)
    normal = np.zeros((height, width, 3), np.uint8)
    normal[..., 0] = 200  # n_x > 0 everywhere
    normal[..., 2] = np.where(inside, 255, 128)
    edge = np.where(inside, 40, 255).astype(np.uint8)  # (0, the fill value, would be ambiguous)
    seg = np.where(inside, 7, 255).astype(np.uint8)
    det = np.where(inside, 3, 255).astype(np.uint8)
    ocr = np.where(inside, 0, 255).astype(np.uint8)
    return {
        "rgb": rgb,
        "labels": {
            "depth": depth,
            "normal": normal,
            "edge": edge,
            "seg_coco": seg,
            "obj_detection": det,
            "ocr_detection": ocr,
        },
        "side": {
            "obj_detection": [
                {"instance": 3, "class_id": 17, "score": 0.9, "box": [left, top, right, bottom]}
            ],
            "ocr_detection": [{"instance": 0, "text": "Open", "score": 0.99, "polygon": [[left, top]]}],
        },
    }


def sample_members(
    key: str,
    caption: str | None,
    rgb: np.ndarray | None,
    labels: dict[str, np.ndarray],
    side: dict,
    status: str = "ok",
) -> list[tuple[str, bytes]]:
    members = []
    meta = {"key": key, "status": status, "experts": {name: {"status": "ok"} for name in labels}}
    if rgb is not None:
        members.append((f"{key}.png", image_bytes(rgb, "PNG")))
        meta["size"] = list(rgb.shape[:2])
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    members.append((f"{key}.json", encode_json(meta)))
    for name, label in labels.items():
        members.append((f"{key}.{name}.png", encode_png(label, "RGB" if label.ndim == 3 else "L")))
        if name in side:
            members.append((f"{key}.{name}.json", encode_json(side[name])))
    return members


def write_label_shard(path: Path, samples: list[list[tuple[str, bytes]]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        write_tar(handle, samples)
    return str(path)


def small_dataset(
    root: Path, shards: int = 3, per_shard: int = 7, size: tuple[int, int] = (36, 44)
) -> list[str]:
    """``shards`` label shards of small square samples, every expert present, distinct captions."""
    paths = []
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            n = s * per_shard + i
            top, left = 2 + n % 9, 3 + (n * 5) % 13
            sample = square_sample(*size, (top, left, top + 15, left + 18), seed=n)
            caption = f"square number {n} on a dark field"
            samples.append(
                sample_members(f"s{s}_{i:03d}", caption, sample["rgb"], sample["labels"], sample["side"])
            )
        paths.append(write_label_shard(root / "shards" / f"{s:05d}.tar", samples))
    return paths


def make_decoder(augment: AugmentConfig | None, resolution: int = 32, experts=ALL_EXPERTS) -> SampleDecoder:
    tokenizer = WordTokenizer.build([f"Square number {n} on a dark field" for n in range(40)])
    return SampleDecoder(experts, tokenizer, resolution, augment, label_resolution=16)


# ------------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------------
def test_pre_caption_cleans_like_prismer():
    assert pre_caption('A dog (brown) sits: on "the" bench!!  ') == "A dog brown sits on the bench"
    assert pre_caption("one two three four", max_words=2) == "One two"
    assert training_text("A Dog on a bench.", prefix="A picture of") == "A picture of a dog on a bench"
    tokenizer = WordTokenizer.build(["A picture of a dog"])
    ids, targets = caption_tokens(tokenizer, "A picture of a dog", "A picture of", max_length=30)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id and len(ids) == 7
    assert targets[:4] == [-100] * 4 and targets[4:] == ids[4:]  # <s> A picture of: not supervised


def test_roberta_tokenizer_offline_error_says_what_to_do():
    with pytest.raises(TokenizerUnavailable, match="huggingface-cli download FacebookAI/roberta-base"):
        HFTokenizer("roberta-base")  # HF_HUB_OFFLINE=1 (conftest) and nothing cached


def test_word_tokenizer_round_trips_through_its_file(tmp_path):
    tokenizer = WordTokenizer.build(["A dog on a bench", "A cat"])
    tokenizer.save(tmp_path)
    again = WordTokenizer.load(tmp_path)
    ids = again.encode_text("A cat on a bench")
    assert again.itos == tokenizer.itos and again.decode([0, *ids, 2, 1]) == "A cat on a bench"
    assert again.encode_text("A zebra")[1] == again.unk_id


# ------------------------------------------------------------------------------------------------
# Joint geometry
# ------------------------------------------------------------------------------------------------
def _square_mask_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """The white square of an augmented RGB, brought to the label grid by block averaging."""
    white = (rgb.min(axis=2) > 200).astype(np.float32)
    factor = rgb.shape[0] // size
    return white.reshape(size, factor, size, factor).mean(axis=(1, 3)) > 0.5


@pytest.mark.parametrize("seed", range(12))
def test_joint_transform_keeps_labels_on_the_square(seed):
    # RGB at 2x the label resolution: a translation computed from the RGB size (Prismer's bug) would
    # move the labels twice as far as the image.
    sample = square_sample(120, 150, (30, 50, 80, 110), seed=seed)
    augment = AugmentConfig(crop_scale=(0.5, 1.5), randaug_n=3)
    rgb, labels = joint_transform(
        sample["rgb"], sample["labels"], 128, np.random.default_rng(seed), augment, 64
    )
    assert (
        rgb.shape == (128, 128, 3)
        and labels["normal"].shape == (64, 64, 3)
        and labels["seg_coco"].shape == (64, 64)
    )
    image_square = _square_mask_rgb(rgb, 64)
    for name, inside in {
        "seg_coco": labels["seg_coco"] == 7,
        "obj_detection": labels["obj_detection"] == 3,
        "edge": labels["edge"] == 40,
        "depth": labels["depth"] == 250,
    }.items():
        union = (inside | image_square).sum()
        if union == 0:
            continue  # the crop missed the square
        disagree = (inside ^ image_square).sum()
        assert disagree / union < 0.12, f"{name}: label square off the image square ({disagree}/{union})"
    # Fill values from outside the image: 255 (background) for ids, 0 for dense labels, never anything else.
    assert set(np.unique(labels["seg_coco"])) <= {7, 255}
    assert set(np.unique(labels["depth"])) <= {0, 10, 250}


def test_translation_moves_each_tensor_by_its_own_pixels():
    op = GeometricOp(((1, 0, -0.25), (0, 1, 0)))  # output(u) = input(u - 0.25): content moves right
    for size in (224, 448):
        image = np.zeros((size, size), np.uint8)
        image[:, size // 8 : size // 4] = 255
        moved = op.apply(image, nearest=True, fill=0)
        columns = np.flatnonzero(moved[0])
        assert columns[0] == size // 8 + size // 4 and columns[-1] == size // 4 + size // 4 - 1


def test_flip_mirrors_labels_and_negates_normal_x():
    sample = square_sample(64, 64, (10, 4, 30, 20))
    augment = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0, randaug_n=0)
    rgb, labels = joint_transform(sample["rgb"], sample["labels"], 64, np.random.default_rng(0), augment, 64)
    assert (labels["seg_coco"][10:30, 44:60] == 7).all() and (labels["seg_coco"][:, :40] == 255).all()
    assert (rgb[10:30, 44:60] == 255).all()
    assert (labels["normal"][..., 0] == 55).all()  # 200 -> 255 - 200: x points the other way
    assert (labels["normal"][..., 2] == np.fliplr(sample["labels"]["normal"][..., 2])).all()


def test_crop_box_follows_torchvision_rules():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(300, 400, (0.5, 1.5), (3 / 4, 4 / 3), rng)
        assert 0 <= top and 0 <= left and top + h <= 300 and left + w <= 400
        assert 0.5 * 120000 * 0.98 <= h * w <= 120000
    assert random_resized_crop_box(100, 400, (2.0, 2.0), (3 / 4, 4 / 3), rng) == (
        0,
        133,
        100,
        133,
    )  # centre crop clipped to 4:3


# ------------------------------------------------------------------------------------------------
# Decoding: missing experts are masked
# ------------------------------------------------------------------------------------------------
def test_missing_or_broken_expert_members_are_masked(tmp_path):
    full = square_sample(40, 48, (5, 6, 25, 30), seed=1)
    partial = square_sample(40, 48, (10, 10, 30, 40), seed=2)
    del partial["labels"]["depth"], partial["labels"]["obj_detection"]
    broken = square_sample(40, 48, (1, 1, 20, 20), seed=3)
    broken_members = sample_members("d", "broken", broken["rgb"], broken["labels"], broken["side"])
    damaged = {"d.seg_coco.png": b"not a png", "d.edge.png": encode_png(np.zeros((7, 7), np.uint8), "L")}
    shard = write_label_shard(
        tmp_path / "shards" / "00000.tar",
        [
            sample_members("a", "a full sample", full["rgb"], full["labels"], full["side"]),
            sample_members("b", "a partial sample", partial["rgb"], partial["labels"], partial["side"]),
            sample_members("c", "undecodable", None, {}, {}, status="undecodable"),  # no image: skipped
            [(name, damaged.get(name, data)) for name, data in broken_members],
        ],
    )
    stream = BatchStream([shard], make_decoder(None), LabelEmbeddings.hashed(), 8, train=False)
    batch = next(iter(stream))
    assert batch["keys"] == ["a", "b", "d"]
    present = {name: flags.tolist() for name, flags in batch["present"].items()}
    assert present["depth"] == [True, False, True] and present["obj_detection"] == [True, False, True]
    assert present["seg_coco"] == [True, True, False] and present["edge"] == [True, True, False]
    assert (batch["ids"]["obj_detection"][1] == 255).all() and (batch["ids"]["seg_coco"][2] == 255).all()

    experts = to_model_inputs(batch, "cpu")
    assert (
        (experts["depth"][1] == 0).all()
        and experts["depth"][0].min() == -1
        and experts["depth"][0].max() > 0.99
    )
    background = torch.from_numpy(LabelEmbeddings.hashed().background)
    det = embedding_map(**experts["obj_detection"])  # the model's device-side lookup
    assert det.shape == (3, 64, 16, 16) and torch.equal(det[1, :, 0, 0], background)


def test_device_embedding_maps_equal_prismer_cpu_maps(tmp_path):
    shards = small_dataset(tmp_path, shards=1, per_shard=4)
    embeddings = LabelEmbeddings.hashed()
    batch = next(iter(BatchStream(shards, make_decoder(None), embeddings, 4, train=False)))
    experts = to_model_inputs(batch, "cpu")
    for name, vectors in {
        "seg_coco": {7: embeddings.class_vector("seg_coco", 7)},
        "obj_detection": {3: embeddings.class_vector("obj_detection", 17)},
        "ocr_detection": {0: embeddings.vector(("word", "open"))},
    }.items():
        ids = batch["ids"][name].numpy()
        prismer = np.empty((*ids.shape, 64), np.float32)  # Prismer: a float vector per pixel, on the CPU
        for value in np.unique(ids):
            prismer[ids == value] = vectors.get(int(value), embeddings.background)
        ours = embedding_map(**experts[name]).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(ours, prismer)


def test_loader_rebuilds_prismers_golden_model_inputs(tmp_path):
    """Shards holding the golden batch's pictures and label ids (reference README §4) give, through
    decode → (eval) resize → device-side embedding with Prismer's own tables, exactly the original inputs."""
    inputs, tables = reference_dir("prismer_model", "inputs"), reference_dir("labelmaps")
    golden = json.loads((inputs.parent / "golden.json").read_text())["inputs_meta"]["det_info"]
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    rgb = np.load(inputs / "rgb.npy")
    pictures = np.round((rgb * std[:, None, None] + mean[:, None, None]) * 255).astype(np.uint8)
    samples = []
    for b in range(2):
        labels = {
            "seg_coco": np.load(inputs / "seg_coco_ids.npy")[b],
            "obj_detection": np.load(inputs / "obj_detection_ids.npy")[b],
        }
        side = {"obj_detection": [{"instance": int(i), "class_id": c} for i, c in golden[b].items()]}
        samples.append(sample_members(f"g{b}", "a caption", pictures[b].transpose(1, 2, 0), labels, side))
    shard = write_label_shard(tmp_path / "shards" / "00000.tar", samples)
    decoder = SampleDecoder(("seg_coco", "obj_detection"), make_decoder(None).tokenizer, 224, None)
    embeddings = LabelEmbeddings.from_dir(tables)  # Prismer's CLIP-PCA class tables
    batch = next(iter(BatchStream([shard], decoder, embeddings, 2, train=False)))
    experts = to_model_inputs(batch, "cpu")
    np.testing.assert_allclose(experts["rgb"].numpy(), rgb, atol=1e-5)
    for name in ("seg_coco", "obj_detection"):
        ids = np.load(inputs / f"{name}_ids.npy")
        palette = np.load(inputs / f"{name}_palette.npy")
        expected = np.stack([palette[b][ids[b]] for b in range(2)]).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(embedding_map(**experts[name]).numpy(), expected)
    assert torch.equal(
        experts["obj_detection"]["ids"], torch.from_numpy(np.load(inputs / "obj_detection_ids.npy"))
    )


# ------------------------------------------------------------------------------------------------
# The stream: resumable, split by rank and worker, small batches
# ------------------------------------------------------------------------------------------------
def _batches(shards, start, count, workers, rank=0, world=1, buffer=5):
    augment = AugmentConfig(crop_scale=(0.5, 1.5))
    stream = BatchStream(
        shards,
        make_decoder(augment),
        LabelEmbeddings.hashed(),
        3,
        train=True,
        seed=5,
        rank=rank,
        world_size=world,
        shuffle_buffer=buffer,
        start_batch=start,
    )
    out = []
    for batch in make_loader(stream, num_workers=workers):
        out.append(batch)
        if len(out) == count:
            return out
    return out


def test_stream_resumes_exactly_at_any_batch(tmp_path):
    shards = small_dataset(tmp_path)  # 3 shards x 7 samples; 2 workers: passes go round several times
    reference = _batches(shards, 0, 12, workers=2)
    keys = [k for b in reference for k in b["keys"]]
    assert len(set(keys[:21])) >= 18  # the first pass sees (nearly) every sample once
    for start in (5, 10):
        resumed = _batches(shards, start, 2, workers=2)
        for expected, got in zip(reference[start:], resumed):
            assert got["keys"] == expected["keys"]
            assert torch.equal(got["rgb"], expected["rgb"]) and torch.equal(
                got["input_ids"], expected["input_ids"]
            )
            assert torch.equal(got["ids"]["seg_coco"], expected["ids"]["seg_coco"])


class _CountingFile(io.RawIOBase):
    """A seekable local file that counts the bytes read through it."""

    def __init__(self, path: str) -> None:
        self.raw = open(path, "rb", buffering=0)  # noqa: SIM115 (closed with this wrapper)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer) -> int:
        count = self.raw.readinto(buffer)
        self.bytes_read += count
        return count

    def close(self) -> None:
        self.raw.close()
        super().close()


def test_fast_forward_lists_samples_without_reading_their_bytes(tmp_path, monkeypatch):
    # Resuming replays every sample a stream already gave on names only: for a run far into its data
    # that must cost tar headers, not the shards' bytes.
    shard = small_dataset(tmp_path, shards=1, per_shard=5, size=(240, 320))[0]
    decoder = make_decoder(None)
    opened: list[_CountingFile] = []

    def counting_open(url: str, mode: str = "rb"):
        opened.append(_CountingFile(url))
        return contextlib.closing(opened[-1])

    monkeypatch.setattr("prismer_trainer.shards.fsspec.open", counting_open)
    with_data = list(read_shard(shard, decoder.wants, decoder.members_to_read))
    names_only = list(read_shard(shard, decoder.wants, decoder.members_to_read, with_data=False))
    assert [k for k, _ in names_only] == [k for k, _ in with_data] == [f"s0_{i:03d}" for i in range(5)]
    assert all(set(data) <= set(names) for (_, data), (_, names) in zip(with_data, names_only))
    assert all(value == b"" for _, names in names_only for value in names.values())
    size = Path(shard).stat().st_size
    assert opened[0].bytes_read >= size * 0.9  # (a full read, for comparison)
    assert opened[1].bytes_read < size * 0.1, (opened[1].bytes_read, size)


def test_ranks_and_workers_read_disjoint_shards(tmp_path):
    shards = small_dataset(tmp_path, shards=4, per_shard=3)
    seen = []
    for rank in range(2):
        stream = BatchStream(
            shards, make_decoder(None), LabelEmbeddings.hashed(), 2, train=False, rank=rank, world_size=2
        )
        seen.append({k for batch in make_loader(stream, num_workers=2) for k in batch["keys"]})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 12
    # Training: in each pass a rank reads its own half of the shards (2 x 3 samples here).
    first = [
        {k for b in _batches(shards, 0, 2, workers=0, rank=r, world=2, buffer=1) for k in b["keys"]}
        for r in (0, 1)
    ]
    assert not first[0] & first[1] and len(first[0] | first[1]) == 12


def test_batches_are_fifty_times_smaller_than_prismer_maps(tmp_path):
    shards = small_dataset(tmp_path, shards=1, per_shard=4, size=(240, 320))
    decoder = SampleDecoder(ALL_EXPERTS, make_decoder(None).tokenizer, 224, None)
    batch = next(iter(BatchStream(shards, decoder, LabelEmbeddings.hashed(), 4, train=False)))
    ours = batch_nbytes(batch)
    pixels = 224 * 224
    # Prismer per sample: float RGB, depth, normal, edge; 64-channel float maps for seg, det, OCR; int64 ids.
    prismer = 4 * (3 * pixels + pixels + 3 * pixels + pixels + 3 * 64 * pixels) + 8 * pixels
    assert ours * 50 <= prismer * 4, (ours, prismer * 4)
    json.dumps(batch["keys"])  # keys and texts stay plain Python
