"""Encodings round-trip; decoding handles every mode, EXIF orientation and hostile inputs."""

import io

import numpy as np
import pytest
from builders import gradient, image_bytes
from PIL import Image

from label_pipeline.core.decode import DecodeError, decode_image
from label_pipeline.core.format import decode_png, encode_json, encode_label_members, encode_png, unique_keys
from label_pipeline.core.tario import read_tar_samples, write_tar


@pytest.mark.parametrize("mode,shape", [("L", (37, 53)), ("RGB", (37, 53, 3))])
def test_png_round_trip_is_exact_and_reproducible(mode, shape):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(array, mode)
    assert np.array_equal(decode_png(data), array)
    assert encode_png(array.copy(), mode) == data  # same map, same bytes


def test_every_prismer_encoding_round_trips():
    rng = np.random.default_rng(1)
    depth = rng.integers(0, 256, (20, 30), dtype=np.uint8)  # L8, 255 = near
    normal = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # RGB8 of (n+1)/2
    instances = np.full((20, 30), 255, np.uint8)
    instances[2:8, 3:9] = 0
    detections = [{"instance": 0, "class_id": 17, "score": 0.9, "box": [3.0, 2.0, 9.0, 8.0]}]
    for label, mode, data in [(depth, "L", None), (normal, "RGB", None), (instances, "L", detections)]:
        members = encode_label_members(label, data, mode)
        assert np.array_equal(decode_png(members["png"]), label)
        if data is not None:
            assert members["json"] == encode_json(data)
    empty = encode_label_members(np.full((5, 5), 255, np.uint8), [], "L")
    assert empty["json"] == b"[]" and (decode_png(empty["png"]) == 255).all()


def test_wrong_label_dtype_is_refused():
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), np.float32), "L")


def test_keys_are_made_webdataset_safe_and_unique():
    keys = unique_keys(["a/b.c", "a_b_c", "x y", "ok-1", "a/b.c"])
    assert all(
        set(k) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for k in keys
    )
    assert len(set(keys)) == 5
    assert keys == unique_keys(["a/b.c", "a_b_c", "x y", "ok-1", "a/b.c"])  # deterministic


def test_tar_is_byte_reproducible_and_groups_members():
    samples = [[("k1.txt", b"hello"), ("k1.edge.png", b"x")], [("k2.txt", b"there")]]
    first, second = io.BytesIO(), io.BytesIO()
    write_tar(first, samples)
    write_tar(second, samples)
    assert first.getvalue() == second.getvalue()
    first.seek(0)
    assert list(read_tar_samples(first)) == [
        ("k1", {"edge.png": b"x", "txt": b"hello"}),
        ("k2", {"txt": b"there"}),
    ]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "1", "F"])
def test_any_mode_decodes_to_rgb(mode):
    base = Image.fromarray(gradient(24, 32))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        assert image.mode == "I;16"
    elif mode == "F":
        image = base.convert("L").convert("F")
    else:
        image = base.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    decoded = decode_image(buffer.getvalue())
    assert decoded.array.shape == (24, 32, 3) and decoded.array.dtype == np.uint8
    assert decoded.mode == image.mode
    if mode in ("L", "I;16", "I", "F"):  # greyscale scaled to 8 bits, not clipped to white
        grey = np.asarray(base.convert("L"))
        assert np.abs(decoded.array[:, :, 0].astype(int) - grey).max() <= 1


def test_exif_orientation_is_applied():
    array = gradient(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = image_bytes(array, "JPEG", exif=exif.tobytes())
    decoded = decode_image(data)
    assert decoded.exif_transposed and decoded.orig_size == (20, 40) and decoded.size == (40, 20)


@pytest.mark.parametrize(
    "data,status",
    [
        (None, "no_image"),
        (b"", "empty_image"),
        (b"this is not an image", "undecodable"),
        (image_bytes(gradient(64, 64))[:200], "undecodable"),  # truncated JPEG
    ],
)
def test_bad_bytes_get_a_status(data, status):
    with pytest.raises(DecodeError) as info:
        decode_image(data)
    assert info.value.status == status


def test_pixel_guard_refuses_before_decoding():
    big = image_bytes(np.zeros((300, 400, 3), np.uint8), "PNG")
    with pytest.raises(DecodeError) as info:
        decode_image(big, max_pixels=100_000)
    assert info.value.status == "too_large"
    assert decode_image(big, max_pixels=120_000).size == (300, 400)


def test_one_pixel_image_decodes_and_min_side_guards():
    tiny = image_bytes(np.full((1, 1, 3), 9, np.uint8), "PNG")
    assert decode_image(tiny).size == (1, 1)
    with pytest.raises(DecodeError) as info:
        decode_image(tiny, min_side=2)
    assert info.value.status == "too_small"
