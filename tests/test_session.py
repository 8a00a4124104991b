import io

import numpy as np
import pytest
from PIL import Image

from ophglm.session import ImageError, Session, decode_image, read_image_file


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is a text file, not a photograph", "not an image file"),
    (b"%PDF-1.4\n1 0 obj<<>>endobj", "not an image file"),
    (_encode(Image.new("RGB", (8, 8)), "PNG"), "at least 64 px"),
])
def test_unusable_bytes_are_named(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data, "upload.jpg")


def test_truncated_jpeg_is_reported():
    data = _encode(Image.new("RGB", (256, 256), (200, 80, 40)), "JPEG")
    with pytest.raises(ImageError, match="damaged or truncated"):
        decode_image(data[: len(data) // 2], "half.jpg")


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P"])
def test_every_mode_becomes_8bit_rgb(mode):
    image = Image.new(mode, (100, 80))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    decoded = decode_image(_encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (100, 80)


def test_sixteen_bit_range_is_rescaled_not_clipped():
    array = (np.linspace(0, 60000, 100 * 100).reshape(100, 100)).astype(np.uint16)
    decoded = np.asarray(decode_image(_encode(Image.fromarray(array), "PNG")))
    assert decoded.max() == 255 and decoded.min() == 0


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image_file(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        read_image_file(tmp_path)


def test_images_are_stored_by_content_hash(tmp_path):
    path = tmp_path / "eye.png"
    Image.new("RGB", (128, 128), (150, 60, 30)).save(path)
    session = Session()
    first, second = session.add_image_file(path), session.add_image_file(path)
    assert first == second and first.startswith("img-")
    with pytest.raises(KeyError, match="unknown image_id 'img-000'"):
        session.image("img-000")


def test_image_errors_say_which_kind_of_problem():
    with pytest.raises(ImageError) as not_image:
        decode_image(b"plain text")
    big = _encode(Image.new("RGB", (400, 300)), "PNG")
    with pytest.raises(ImageError, match="400x300 pixels, above the limit of 100,000") as too_large:
        decode_image(big, max_pixels=100_000)
    with pytest.raises(ImageError) as unusable:
        decode_image(_encode(Image.new("RGB", (8, 8)), "PNG"))
    assert (not_image.value.kind, too_large.value.kind, unusable.value.kind) == ("not_image", "too_large", "unusable")


def test_a_decompression_bomb_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own guard, scaled down to a test image
    with pytest.raises(ImageError, match="more pixels than the limit") as bomb:
        decode_image(_encode(Image.new("RGB", (100, 100)), "PNG"))
    assert bomb.value.kind == "too_large"
