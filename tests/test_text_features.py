"""CLIP-PCA text features (issue 12): word features at label time, class tables in the output root,
Prismer's own tables imported without running pickled code, and the trainer reading all of them.

Every model here is a tiny CLIP text tower built in code (a byte-level BPE tokenizer written by the test,
2 layers, the real 768-d projection) and saved where the expert loads it from; nothing is downloaded.
Expected values are computed independently in the test: tokens with explicit start/end ids, the text
tower's final state at the end token, its projection, then ``(x - mean) @ components.T`` in numpy.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import gradient, image_bytes, write_manifest, write_wds
from experts_for_tests import register_test_experts
from reference_data import REFERENCE_ROOT, reference_dir

from expert_zoo.base import ConfigError, Expert, ExpertSpec, Label
from expert_zoo.registry import build_expert, register
from expert_zoo.text_features import ClipPcaWordFeatures, ClipTextEncoder, PcaProjection, TextFeatures
from label_pipeline.cli import main
from label_pipeline.core.embedding_tables import read_tables, table_texts
from label_pipeline.core.expert_request import ExpertRequest
from label_pipeline.core.format import decode_npy, encode_json, encode_npy, encode_png
from label_pipeline.table_stage import updated_tables
from label_pipeline.verify import _verify_sample
from prismer_trainer.batches import to_model_inputs
from prismer_trainer.embeddings import LabelEmbeddings, default_embeddings, require_word_features
from prismer_trainer.model import embedding_map
from prismer_trainer.samples import SampleDecoder
from prismer_trainer.stream import BatchStream
from prismer_trainer.text import WordTokenizer

register_test_experts()
CONTEXT = 16  # the tiny tower's context length (CLIP's is 77): long texts get truncated
LONG_TEXT = "the quick brown fox jumps over the lazy dog again and again and again"
WORDS = ["Open", "cat", "open", LONG_TEXT]


# ------------------------------------------------------------------------------------------------
# A tiny CLIP text tower and PCAs
# ------------------------------------------------------------------------------------------------
def byte_level_tokenizer():
    """CLIP's BPE layout: every byte symbol alone and with ``</w>``, a few merges, start/end last."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = [("o", "p"), ("op", "e"), ("ope", "n</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_text_config(tokenizer, **overrides):
    from transformers import CLIPTextConfig

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CONTEXT,
        projection_dim=768,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A saved tiny ``CLIPTextModelWithProjection`` + tokenizer, and the in-memory originals."""
    from transformers import CLIPTextModelWithProjection

    directory = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = byte_level_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPTextModelWithProjection(tiny_text_config(tokenizer)).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return types.SimpleNamespace(dir=directory, model=model, tokenizer=tokenizer)


def random_pca(seed: int, dim: int = 768) -> PcaProjection:
    rng = np.random.default_rng(seed)
    components = np.linalg.qr(rng.standard_normal((dim, 64)))[0].T
    return PcaProjection(components, rng.standard_normal(dim) * 0.1)


@pytest.fixture(scope="module")
def pca_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pca")
    paths = []
    for seed in (1, 2):
        path = directory / f"pca{seed}.npz"
        random_pca(seed).save(path)
        paths.append(path)
    return paths


def independent_features(clip, texts, components, mean) -> np.ndarray:
    """``pca(clip_text(texts))``: explicit start/end ids, truncation by hand, no padding (texts of one
    token count go through together), the final state at the end token times the projection."""
    tok, model = clip.tokenizer, clip.model
    ids = [
        [
            tok.bos_token_id,
            *tok(t.lower(), add_special_tokens=False)["input_ids"][: CONTEXT - 2],
            tok.eos_token_id,
        ]
        for t in texts
    ]
    rows = np.zeros((len(texts), components.shape[1]))
    for length in sorted({len(i) for i in ids}):
        group = [k for k, i in enumerate(ids) if len(i) == length]
        with torch.no_grad():
            states = model.text_model(input_ids=torch.tensor([ids[k] for k in group])).last_hidden_state[
                :, -1
            ]
            rows[group] = model.text_projection(states).double().numpy()
    return (rows - mean) @ components.T


def expert_options(clip, pca_path) -> dict:
    return {"weights": str(clip.dir), "pca": str(pca_path)}


def reference_labelmaps() -> Path:
    """../shared/reference/labelmaps: skipped locally when absent, a failure under CI."""
    path = REFERENCE_ROOT / "labelmaps"
    if os.environ.get("CI") and not path.is_dir():
        pytest.fail(
            f"Prismer reference data missing at {path}: put shared/reference there, "
            "or point PRISMER_REFERENCE_DIR at it"
        )
    return reference_dir("labelmaps")


# ------------------------------------------------------------------------------------------------
# The expert
# ------------------------------------------------------------------------------------------------
def ocr_label(words: list[str], size=(20, 24)) -> Label:
    entries = [{"instance": i, "text": w, "score": 0.9, "polygon": [[0, 0]]} for i, w in enumerate(words)]
    return Label(np.full(size, 255, np.uint8), entries)


def test_word_features_match_pca_of_clip_text_computed_independently(clip, pca_files):
    expert = ClipPcaWordFeatures(expert_options(clip, pca_files[0]))
    pca = PcaProjection.load(pca_files[0])
    images = [np.zeros((20, 24, 3), np.uint8)] * 3
    deps = {"ocr_detection": [ocr_label(WORDS), ocr_label([]), ocr_label(["cat"])]}
    labels = expert(images, deps)

    assert [label.map for label in labels] == [None, None, None]
    expected = independent_features(clip, WORDS, pca.components, pca.mean)
    assert labels[0].array.dtype == np.float16 and labels[0].array.shape == (4, 64)
    np.testing.assert_allclose(labels[0].array.astype(np.float64), expected, rtol=2e-3, atol=2e-3)
    assert np.array_equal(labels[0].array[0], labels[0].array[2])  # "Open" is "open" to CLIP
    assert labels[1].array.shape == (0, 64)  # an image without words
    assert np.array_equal(labels[2].array[0], labels[0].array[1])
    # the long text is cut to the context length, keeping its end token, as clip.tokenize(truncate=True)
    assert len(clip.tokenizer(LONG_TEXT)["input_ids"]) > CONTEXT
    member = expert.encode(labels[0])
    assert list(member) == ["npy"] and np.array_equal(decode_npy(member["npy"]), labels[0].array)


def test_the_encoder_loads_the_text_tower_of_a_whole_clip_checkpoint(clip, tmp_path):
    """The default source (openai/clip-vit-large-patch14) is a whole CLIP model; only its text half loads."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    text = tiny_text_config(clip.tokenizer).to_dict()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        whole = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=768))
    whole.eval().save_pretrained(tmp_path)
    clip.tokenizer.save_pretrained(tmp_path)
    encoder = ClipTextEncoder(tmp_path, torch.device("cpu"))
    ids = torch.tensor(
        [
            [
                clip.tokenizer.bos_token_id,
                *clip.tokenizer("cat", add_special_tokens=False)["input_ids"],
                clip.tokenizer.eos_token_id,
            ]
        ]
    )
    with torch.no_grad():
        expected = whole.text_projection(whole.text_model(input_ids=ids).last_hidden_state[0, -1])
    np.testing.assert_allclose(encoder(["cat"])[0], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_the_expert_needs_a_pca_and_says_how_to_make_one(clip):
    with pytest.raises(ConfigError, match="import-prismer-tables .*fit-pca"):
        build_expert(ExpertRequest.parse({"name": "ocr_features", "options": {"weights": str(clip.dir)}}))


def test_fingerprint_covers_the_pca_and_the_encoder_not_the_batch_size(clip, pca_files, tmp_path):
    first = ClipPcaWordFeatures(expert_options(clip, pca_files[0]))
    assert ClipPcaWordFeatures({**expert_options(clip, pca_files[0]), "batch_size": 3}).fingerprint() == (
        first.fingerprint()
    )
    assert ClipPcaWordFeatures(expert_options(clip, pca_files[1])).weights_digest != first.weights_digest
    other = tmp_path / "other_clip"
    clip.tokenizer.save_pretrained(other)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        type(clip.model)(clip.model.config).save_pretrained(other)
    assert ClipPcaWordFeatures(
        expert_options(types.SimpleNamespace(dir=other), pca_files[0])
    ).weights_digest != (first.weights_digest)


# ------------------------------------------------------------------------------------------------
# A labelling run: word features next to the word map, class tables in the output root
# ------------------------------------------------------------------------------------------------
class FixedWordsOCR(Expert):
    """An OCR stand-in: image k has the first ``red(0, 0) // 50`` of ``WORDS``, word i filling band i."""

    spec = ExpertSpec(task="ocr_detection", backend="fixedwords", version="1", mode="L", has_json=True)

    def predict(self, images, deps):
        labels = []
        for image in images:
            count = int(image[0, 0, 0]) // 50
            height = image.shape[0]
            label = np.full(image.shape[:2], 255, np.uint8)
            entries = []
            for i, text in enumerate(WORDS[:count]):
                top, bottom = i * height // 4, (i + 1) * height // 4
                label[top:bottom] = i
                entries.append(
                    {"instance": i, "text": text, "score": 1.0, "polygon": [[0, top], [1, bottom]]}
                )
            labels.append(Label(label, entries))
        return labels


register("ocr_detection:fixedwords", "test_text_features:FixedWordsOCR")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two shards of PNG pictures whose top-left red value sets their word count (0-4)."""
    root = tmp_path_factory.mktemp("inputs")
    for shard, counts in enumerate([(0, 1, 3, 4), (2, 4)]):
        samples = []
        for n, count in enumerate(counts):
            array = gradient(32, 40)
            array[0, 0, 0] = count * 50 + 10
            samples.append({"png": image_bytes(array, "PNG"), "txt": f"picture {shard} {n}".encode()})
        write_wds(root / f"{shard:05d}.tar", samples, keys=[f"s{shard}_{n}" for n in range(len(counts))])
    return {"format": "webdataset", "path": str(root / "{00000..00001}.tar")}


def label(tmp_path, source, out, experts, *extra) -> int:
    manifest = write_manifest(tmp_path / f"m{len(list(tmp_path.glob('m*.yaml')))}.yaml", source, out, experts)
    return main(["run", str(manifest), "--no-progress", "--device", "cpu", *extra])


def samples_of(tar_path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, _, suffix = member.name.partition(".")
            out.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return out


def text_stage(clip, pca_path) -> dict:
    return {"name": "ocr_features:clip_pca", "options": expert_options(clip, pca_path)}


BASE = ["ocr_detection:fixedwords", "depth:brightness", "obj_detection:depthboxes"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, inputs, clip, pca_files):
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    assert label(tmp, inputs, out, [*BASE, text_stage(clip, pca_files[0])]) == 0
    return out


def test_a_run_stores_each_words_features_next_to_the_word_map(labelled, clip, pca_files):
    pca = PcaProjection.load(pca_files[0])
    counts = []
    for shard in ("00000", "00001"):
        for sample in samples_of(labelled / "shards" / f"{shard}.tar").values():
            words = json.loads(sample["ocr_detection.json"])
            features = decode_npy(sample["ocr_features.npy"])
            assert features.dtype == np.float16 and features.shape == (len(words), 64)
            expected = independent_features(clip, [w["text"] for w in words], pca.components, pca.mean)
            np.testing.assert_allclose(features.astype(np.float64), expected, rtol=2e-3, atol=2e-3)
            assert (
                "ocr_features.png" not in sample
                and json.loads(sample["json"])["experts"]["ocr_features"]["status"] == "ok"
            )
            counts.append(len(words))
    assert sorted(counts) == [0, 1, 2, 3, 4, 4]
    assert main(["verify", str(labelled)]) == 0  # no complaint that ocr_features has no png


def test_a_run_writes_the_class_tables_its_experts_imply(labelled, clip, pca_files):
    pca = PcaProjection.load(pca_files[0])
    tables = read_tables(str(labelled / "embeddings"))
    assert sorted(tables.arrays) == ["background", "obj_detection"]  # no seg_coco in this run
    assert tables.pca_digest == pca.digest
    names = json.loads(
        (Path(__file__).parent.parent / "label_pipeline/core/labelmaps/unidet_722_names.json").read_text()
    )
    assert tables.index["tables"]["obj_detection"]["texts"] == names
    expected = independent_features(clip, names, pca.components, pca.mean)
    np.testing.assert_allclose(tables.arrays["obj_detection"], expected, rtol=1e-4, atol=1e-4)
    background = independent_features(clip, ["background"], pca.components, pca.mean)[0]
    np.testing.assert_allclose(tables.arrays["background"], background, rtol=1e-4, atol=1e-4)
    assert tables.arrays["obj_detection"].dtype == np.float32


def test_adding_the_text_stage_or_changing_its_pca_relabels_only_its_member(
    tmp_path, inputs, labelled, clip, pca_files, caplog
):
    out = tmp_path / "out"
    assert label(tmp_path, inputs, out, BASE) == 0
    assert not (out / "embeddings" / "index.json").exists()  # no text stage: no encoder for the tables
    assert "import-prismer-tables" in caplog.text
    assert label(tmp_path, inputs, out, [text_stage(clip, pca_files[0])]) == 0  # reads the stored OCR labels
    for shard in ("00000", "00001"):
        assert (out / "shards" / f"{shard}.tar").read_bytes() == (
            labelled / "shards" / f"{shard}.tar"
        ).read_bytes()

    before = samples_of(out / "shards" / "00000.tar")
    assert label(tmp_path, inputs, out, [text_stage(clip, pca_files[1])]) == 2  # a changed PCA is refused...
    assert label(tmp_path, inputs, out, [text_stage(clip, pca_files[1])], "--relabel", "ocr_features") == 0
    after = samples_of(out / "shards" / "00000.tar")
    for key, sample in before.items():
        changed = {s for s in sample if s != "json" and after[key][s] != sample[s]}
        assert changed <= {"ocr_features.npy"}  # every other member is carried over byte for byte
        if json.loads(sample["ocr_detection.json"]):
            assert changed == {"ocr_features.npy"}
    assert read_tables(str(out / "embeddings")).pca_digest == PcaProjection.load(pca_files[1]).digest


def test_verify_flags_word_features_that_do_not_follow_the_words():
    words = [{"instance": 0, "text": "cat"}, {"instance": 1, "text": "dog"}]
    meta = {"status": "ok", "size": [4, 4], "experts": {"ocr_features": {"status": "ok"}}}
    members = {
        "json": encode_json(meta),
        "png": b"",
        "ocr_detection.json": encode_json(words),
        "ocr_features.npy": encode_npy(np.zeros((1, 64), np.float16)),
    }
    assert any("lists 2 entries" in p for p in _verify_sample("s", "k", members, {}))
    members["ocr_features.npy"] = encode_npy(np.zeros((2, 64), np.float16))
    assert _verify_sample("s", "k", members, {}) == []
    members["ocr_features.npy"] = b"\x93NUMPY garbage"
    assert any("does not load" in p for p in _verify_sample("s", "k", members, {}))


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
def ocr_decoder(hashed_words: bool) -> SampleDecoder:
    tokenizer = WordTokenizer.build(["picture 0 1"])
    return SampleDecoder(
        ("ocr_detection",), tokenizer, 32, None, label_resolution=16, hashed_words=hashed_words
    )


def test_the_trainer_embeds_an_ocr_pixel_with_that_words_stored_feature(labelled):
    shards = sorted(str(p) for p in (labelled / "shards").glob("*.tar"))
    embeddings = LabelEmbeddings.from_dir(labelled)  # the label root's own tables
    batches = list(BatchStream(shards, ocr_decoder(False), embeddings, 8, train=False))
    checked = 0
    for batch in batches:
        maps = embedding_map(**to_model_inputs(batch, "cpu")["ocr_detection"])  # [b, 64, 16, 16]
        for b, key in enumerate(batch["keys"]):
            shard = next(s for s in shards if key in samples_of(Path(s)))
            features = decode_npy(samples_of(Path(shard))[key]["ocr_features.npy"])
            ids = batch["ids"]["ocr_detection"][b]
            for instance in range(len(features)):
                row, col = (ids == instance).nonzero()[0].tolist()  # a pixel of word ``instance``
                assert torch.equal(
                    maps[b, :, row, col], torch.from_numpy(features[instance].astype(np.float32))
                )
                checked += 1
            background = (ids == 255).nonzero()
            if len(background):
                row, col = background[0].tolist()
                assert torch.equal(maps[b, :, row, col], torch.from_numpy(embeddings.background))
    assert checked == 14  # every word of every sample


def test_words_without_stored_features_are_masked_except_in_the_tiny_demo(tmp_path):
    array = gradient(32, 40)
    word_map = np.full((32, 40), 255, np.uint8)
    word_map[:8] = 0
    members = [
        ("a.json", encode_json({"status": "ok", "size": [32, 40]})),
        ("a.ocr_detection.json", encode_json([{"instance": 0, "text": "cat"}])),
        ("a.ocr_detection.png", encode_png(word_map, "L")),
        ("a.png", image_bytes(array, "PNG")),
        ("a.txt", b"picture 0 1"),
    ]
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    from label_pipeline.core.tario import write_tar

    with open(shard, "wb") as handle:
        write_tar(handle, [members])
    hashed = LabelEmbeddings.hashed()
    real = next(iter(BatchStream([str(shard)], ocr_decoder(False), hashed, 1, train=False)))
    assert real["present"]["ocr_detection"].tolist() == [False]
    demo = next(iter(BatchStream([str(shard)], ocr_decoder(True), hashed, 1, train=False)))
    assert demo["present"]["ocr_detection"].tolist() == [True]
    word = embedding_map(**to_model_inputs(demo, "cpu")["ocr_detection"])[0, :, 0, 0]
    assert torch.equal(word, torch.from_numpy(hashed.vector(("word", "cat"))))


def test_real_configs_need_tables_and_word_features_the_tiny_demo_does_not(tmp_path, labelled, caplog):
    experts = ("depth", "obj_detection", "ocr_detection")
    with pytest.raises(FileNotFoundError, match="import-prismer-tables PRISMER_CHECKOUT .*embeddings"):
        default_embeddings(str(tmp_path), experts, "prismer_base")
    with caplog.at_level(logging.INFO):
        assert default_embeddings(str(tmp_path), experts, "tiny").source == "hashed"
    assert "hashed stand-ins" in caplog.text
    assert default_embeddings(str(labelled), experts, "prismer_large").source.endswith("embeddings")

    (tmp_path / "_run.json").write_text(json.dumps({"experts": {"ocr_detection": {}, "depth": {}}}))
    with pytest.raises(FileNotFoundError, match="no word features .*ocr_features"):
        require_word_features(str(tmp_path), experts, "prismer_base")
    require_word_features(str(tmp_path), experts, "tiny")
    require_word_features(str(labelled), experts, "prismer_base")  # labelled with the text stage


def test_prismer_base_training_without_tables_stops_with_the_command_that_makes_them(
    tmp_path, inputs, caplog
):
    from prismer_trainer.__main__ import main as trainer_main

    out = tmp_path / "labels"
    assert label(tmp_path, inputs, out, ["depth:brightness", "obj_detection:depthboxes"]) == 0
    code = trainer_main(
        [
            "train",
            "--dataset",
            str(out),
            "--config",
            "prismer_base",
            "--tokenizer",
            "word",
            "--experts",
            "depth,obj_detection",
            "--no-pretrained",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    assert "label-pipeline import-prismer-tables" in caplog.text and "Traceback" not in caplog.text


# ------------------------------------------------------------------------------------------------
# Prismer's tables: computed from its PCA, imported from its files, a new PCA fitted
# ------------------------------------------------------------------------------------------------
def test_class_tables_computed_with_the_reference_pca(clip):
    labelmaps = reference_labelmaps()
    with np.load(labelmaps / "pca.npz") as data:
        components, mean = data["components_"], data["mean_"]
    options = ClipPcaWordFeatures.check_options(expert_options(clip, labelmaps / "pca.npz"), "options")
    features = TextFeatures.from_options(options, torch.device("cpu"), "ocr_features:clip_pca")
    tables = updated_tables(None, features, ["seg_coco", "obj_detection", "background"])
    for name, names_file in (
        ("seg_coco", "coco_panoptic_133_names.json"),
        ("obj_detection", "unidet_722_names.json"),
    ):
        names = json.loads((labelmaps / names_file).read_text())
        assert table_texts(name) == names
        expected = independent_features(clip, names, components, mean)
        np.testing.assert_allclose(tables.arrays[name], expected, rtol=1e-4, atol=1e-4)
    assert tables.pca_digest == PcaProjection(components, mean).digest


SKLEARN_MODULES = ("sklearn", "sklearn.decomposition", "sklearn.decomposition._pca")


def prismer_checkout(root: Path, labelmaps: Path, monkeypatch) -> Path:
    """``dataset/clip_pca.pkl`` and ``dataset/*_features.pt`` rebuilt in Prismer's structure from the
    converted reference arrays (the pickle names ``sklearn.decomposition._pca.PCA``, as the real one)."""
    dataset = root / "dataset"
    dataset.mkdir(parents=True)
    for name in SKLEARN_MODULES:  # stand-ins, only while the pickle is written
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    stand_in = type("PCA", (), {"__module__": SKLEARN_MODULES[-1]})
    sys.modules[SKLEARN_MODULES[-1]].PCA = stand_in
    pca = stand_in()
    with np.load(labelmaps / "pca.npz") as data:
        pca.__dict__.update({name: data[name] for name in data.files})
    pca.__dict__.update(n_components=64, whiten=False, svd_solver="auto", _sklearn_version="0.24.2")
    (dataset / "clip_pca.pkl").write_bytes(pickle.dumps(pca, protocol=2))
    for filename, names_file in (
        ("coco_features", "coco_panoptic_133_names.json"),
        ("ade_features", "ade20k_150_names.json"),
        ("detection_features", "unidet_722_names.json"),
    ):
        names = json.loads((labelmaps / names_file).read_text())
        features = torch.from_numpy(np.load(labelmaps / f"{filename}.npy"))
        torch.save({"labels": names, "features": features}, dataset / f"{filename}.pt")
    torch.save(
        torch.from_numpy(np.load(labelmaps / "background_features.npy")), dataset / "background_features.pt"
    )
    return root


def test_importing_prismers_tables_reproduces_the_reference_arrays(tmp_path, monkeypatch, capsys):
    labelmaps = reference_labelmaps()
    checkout = prismer_checkout(tmp_path / "prismer", labelmaps, monkeypatch)
    for name in SKLEARN_MODULES:  # the import must not need scikit-learn
        monkeypatch.delitem(sys.modules, name)
    out = tmp_path / "tables"
    assert main(["import-prismer-tables", str(checkout), str(out)]) == 0
    assert "non-commercial" in capsys.readouterr().out
    for ours, theirs in (
        ("seg_coco", "coco_features"),
        ("seg_ade", "ade_features"),
        ("obj_detection", "detection_features"),
        ("background", "background_features"),
    ):
        reference = np.load(labelmaps / f"{theirs}.npy")
        imported = np.load(out / f"{ours}.npy")
        assert imported.dtype == reference.dtype and np.array_equal(imported, reference), ours
    with np.load(labelmaps / "pca.npz") as ref, np.load(out / "pca.npz") as got:
        assert np.array_equal(got["components"], ref["components_"]) and np.array_equal(
            got["mean"], ref["mean_"]
        )
        assert np.array_equal(got["explained_variance"], ref["explained_variance_"])
    index = json.loads((out / "index.json").read_text())
    assert index["tables"]["obj_detection"]["texts"] == json.loads(
        (labelmaps / "unidet_722_names.json").read_text()
    )
    embeddings = LabelEmbeddings.from_dir(out)
    assert np.array_equal(
        embeddings.class_vector("obj_detection", 17), np.load(labelmaps / "detection_features.npy")[17]
    )
    # the same arrays through numpy 1's module names (how scikit-learn 0.24 wrote the real file)
    pkl = checkout / "dataset" / "clip_pca.pkl"
    pkl.write_bytes(pkl.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert main(["import-prismer-tables", str(checkout), str(tmp_path / "again")]) == 0
    assert np.array_equal(
        np.load(tmp_path / "again" / "seg_coco.npy"), np.load(labelmaps / "coco_features.npy")
    )


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, caplog):
    dataset = tmp_path / "prismer" / "dataset"
    dataset.mkdir(parents=True)
    payload = _Payload()
    payload.marker = tmp_path / "ran"
    (dataset / "clip_pca.pkl").write_bytes(pickle.dumps(payload))
    assert main(["import-prismer-tables", str(tmp_path / "prismer"), str(tmp_path / "out")]) == 2
    assert not payload.marker.exists() and "refusing to load" in caplog.text
    assert not (tmp_path / "out" / "index.json").exists()


def test_fit_pca_from_a_vocabulary(tmp_path, clip, capsys):
    words = [f"{a}{b}{c}" for a in "abcdefg" for b in "hijklmn" for c in "opq"]  # 147 texts
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("\n".join(words + ["", words[0]]) + "\n")
    out = tmp_path / "pca.npz"
    assert main(["fit-pca", str(vocabulary), str(out), "--encoder", str(clip.dir), "--device", "cpu"]) == 0
    assert "PCA-64 of 147 texts" in capsys.readouterr().out
    pca = PcaProjection.load(out)
    encoder = ClipTextEncoder(clip.dir, torch.device("cpu"))
    x = encoder(words).astype(np.float64)
    np.testing.assert_allclose(pca.mean, x.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(64), atol=1e-9)
    top = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1][:64]  # independent: the covariance
    captured = np.var(pca.transform(x).astype(np.float64), axis=0, ddof=1)
    np.testing.assert_allclose(captured, top, rtol=1e-3, atol=1e-6)
    pivots = np.abs(pca.components).argmax(axis=1)
    assert (pca.components[np.arange(64), pivots] > 0).all()  # deterministic signs
