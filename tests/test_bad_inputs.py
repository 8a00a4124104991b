"""Bad input through the CLI and the HTTP API: a clear message, the right status, and the session goes on.

Every upload case is tried twice: `ophglm analyze FILE` (one line, exit status 2, or a
refusal) and a photo turn of the HTTP API (415 / 413 / 400 for files that are not usable
images; a 200 turn whose reply is a refusal for images that are not gradable colour fundus
photographs), each followed by a normal question in the same session.
"""

import pytest
from fastapi.testclient import TestClient

from bad_input_cases import CASES, MALFORMED_BODIES, USABLE
from ophglm.cli import main
from ophglm.server import create_app
from ophglm.session import Session, decode_image
from ophglm.tools.assess_quality import AssessQuality
from ophglm.tools.base import ToolError
from ophglm.tools.classify_fundus import ClassifyFundus
from server_support import parse_events, real_tools, scripted_factory, server_settings


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


@pytest.mark.parametrize("body, content_type, status", MALFORMED_BODIES)
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
