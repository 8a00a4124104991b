"""Bad input through the CLI and the HTTP API: a clear message, the right status, and the session goes on.

Every upload case is tried twice: `ophglm analyze FILE` (one line, exit status 2, or a
refusal) and a photo turn of the HTTP API (415 / 413 / 400 for files that are not usable
images; a 200 turn whose reply is a refusal for images that are not gradable colour fundus
photographs), each followed by a normal question in the same session.
"""

import io
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFilter

from ophglm.cli import main
from ophglm.server import create_app
from ophglm.session import Session, decode_image
from ophglm.tools.assess_quality import AssessQuality
from ophglm.tools.base import ToolError
from ophglm.tools.classify_fundus import ClassifyFundus
from ophglm.tools.non_fundus import non_fundus_images
from ophglm.tools.synthetic_fundus import make_synthetic_fundus
from server_support import parse_events, real_tools, scripted_factory, server_settings


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: a decompression bomb is refused from its header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


FUNDUS = make_synthetic_fundus(512, seed=11).image
FUNDUS_JPEG = _encode(FUNDUS, "JPEG", quality=90)
NON_FUNDUS = {f"{kind}-{i}": image for i, (kind, image) in enumerate(non_fundus_images(21, seed=5))}

# name -> (bytes, HTTP status, words in the message). Status 200: decodable, refused by the quality gate.
UNUSABLE = {
    "zero-bytes.jpg": (b"", 400, "is empty"),
    "text-named.jpg": (b"Patient notes: left eye blurry since Monday.", 415, "not an image file"),
    "pdf-named.jpg": (b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415, "not an image file"),
    "html-named.png": (b"<html><body>not a photo</body></html>", 415, "not an image file"),
    "truncated.jpg": (FUNDUS_JPEG[: len(FUNDUS_JPEG) // 3], 400, "damaged or truncated"),
    "corrupt-middle.jpg": (FUNDUS_JPEG[:600] + bytes(len(FUNDUS_JPEG) - 1200) + FUNDUS_JPEG[-600:], None, ""),
    "header-only.png": (_encode(FUNDUS, "PNG")[:40], None, ""),
    "eight-by-eight.png": (_encode(Image.new("RGB", (8, 8), (200, 80, 30)), "PNG"), 400, "at least 64 px"),
    "one-row.png": (_encode(Image.new("RGB", (900, 1), (200, 80, 30)), "PNG"), 400, "at least 64 px"),
    "bomb.png": (_png_header(60_000, 60_000), 413, "than the limit"),
    "random-bytes.jpg": (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), 415, "not an image file"),
    "jpeg-magic-then-junk.jpg": (b"\xff\xd8\xff\xe0" + bytes(2000), None, ""),
}
DECODABLE_NON_FUNDUS = {
    **{f"{name}.png": (_encode(image, "PNG"), 200, "not a colour fundus photograph") for name, image in NON_FUNDUS.items()},
    "greyscale-fundus.png": (_encode(FUNDUS.convert("L"), "PNG"), 200, "not a colour fundus photograph"),
    "sixteen-bit-grey.png": (_encode(Image.fromarray((np.asarray(FUNDUS.convert("L"), np.uint16) * 257)), "PNG"), 200, "not a colour fundus photograph"),
    "dark-fundus.jpg": (_encode(Image.fromarray((np.asarray(FUNDUS) * 0.08).astype(np.uint8)), "JPEG"), 200, "almost black"),
    "blurred-fundus.png": (_encode(FUNDUS.filter(ImageFilter.GaussianBlur(8)), "PNG"), 200, "ungradable"),
}
# Unusual encodings of a real-looking fundus: accepted and examined.
USABLE = {
    "cmyk.jpg": _encode(FUNDUS.convert("CMYK"), "JPEG"),
    "alpha.png": _encode(FUNDUS.convert("RGBA"), "PNG"),
    "palette.png": _encode(FUNDUS.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    "progressive.jpg": _encode(FUNDUS, "JPEG", progressive=True),
    "webp.webp": _encode(FUNDUS, "WEBP"),
}
CASES = {**UNUSABLE, **DECODABLE_NON_FUNDUS}


def test_there_are_at_least_fifty_cases():
    assert len(CASES) + len(USABLE) >= 40 and 2 * len(CASES) + len(USABLE) >= 50


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_analyze_gives_one_line_and_exit_2(name, tmp_path, capsys):
    data, _, words = CASES[name]
    path = tmp_path / name
    path.write_bytes(data)
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ophglm: error:") and "\n" not in err and "Traceback" not in err
    assert words in err


@pytest.fixture(scope="module")
def client(settings, knowledge_index):
    tools = real_tools(settings, knowledge_index)
    settings = server_settings(settings, max_upload_pixels=40_000_000)
    return TestClient(create_app(settings, assistant_factory=scripted_factory(settings, tools)))


def _session(client) -> str:
    return client.post("/v1/sessions").json()["session_id"]


def _turn(client, session_id, text, upload=None):
    response = client.post(f"/v1/sessions/{session_id}/messages", data={"text": text}, files={"image": upload} if upload else None)
    return response, (parse_events(response.text) if response.status_code == 200 else None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_http_upload_is_refused_with_a_reason_and_the_session_goes_on(client, name):
    data, status, words = CASES[name]
    session_id = _session(client)
    response, events = _turn(client, session_id, "Is this eye healthy?", (name, data, "application/octet-stream"))
    if status is None:  # damaged in a way Pillow may or may not notice: either refused or examined, never a crash
        assert response.status_code in (200, 400, 415)
    else:
        assert response.status_code == status, response.text
    if response.status_code == 200:
        done = dict(events)["done"]
        if status == 200:
            assert done["refused"] and words in done["refusal_reason"]
            assert "classify_fundus" not in done["findings"] and done["triage"] is None
    else:
        assert words in response.json()["detail"]
    response, events = _turn(client, session_id, "What is glaucoma?")
    assert response.status_code == 200 and events[-1][0] == "done" and not events[-1][1]["refused"]


@pytest.mark.parametrize("name", sorted(USABLE))
def test_unusual_encodings_of_a_fundus_are_examined(name):
    session = Session()
    image_id = session.add_image(decode_image(USABLE[name], name))
    assert AssessQuality()(session, image_id=image_id).findings["is_fundus"]


@pytest.mark.parametrize("body, content_type, status", [
    (b'{"text": "hello"', "application/json", 415),
    (b"message=hello", "application/x-www-form-urlencoded", 400),
    (b"--x\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n", "multipart/form-data; boundary=x", 400),
])
def test_malformed_bodies_get_a_reason(client, body, content_type, status):
    session_id = _session(client)
    response = client.post(f"/v1/sessions/{session_id}/messages", content=body, headers={"content-type": content_type})
    assert response.status_code == status and response.json()["detail"]


@pytest.mark.parametrize("image_id", ["../../etc/passwd", "/etc/passwd", "http://example.com/eye.jpg", "img-000000000000", "", "x" * 5000])
def test_paths_urls_and_unknown_ids_never_reach_a_file(image_id):
    session = Session()
    with pytest.raises((ToolError, KeyError)) as err:
        ClassifyFundus()(session, image_id=image_id)
    assert "unknown image_id" in str(err.value) or "invalid arguments" in str(err.value)


def test_wrong_argument_types_are_named():
    with pytest.raises(ToolError, match="invalid arguments"):
        ClassifyFundus()(Session(), image_id=["a", "b"])
    with pytest.raises(ToolError, match="invalid arguments"):
        ClassifyFundus()(Session(), image="x")
