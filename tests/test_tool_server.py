"""The tool server (`ophglm tools serve`, LitServe) on loopback, and the proxies the agent uses when OPHGLM_TOOLS_URL is set."""

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from ophglm.agent.assistant import Assistant
from ophglm.agent.scripted_model import ScriptedChatModel
from ophglm.session import Session
from ophglm.tools.base import ToolError
from ophglm.tools.registry import load_tools, vision_tools
from ophglm.tools.remote_tools import RemoteTool, ToolServer
from ophglm.tools.synthetic_fundus import make_synthetic_fundus
from ophglm.tools.tool_server import serve

START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tool_server():
    """`ophglm tools serve` in its own process group (LitServe starts worker processes), until /health says ready."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "ophglm.cli", "tools", "serve", "--port", str(port)],
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the tool server exited: {process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the tool server was not ready within {START_TIMEOUT_S} s")
            time.sleep(0.25)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.fixture(scope="module")
def remote(settings, tool_server):
    return load_tools(dataclasses.replace(settings, tools_url=tool_server))


def _close(remote_value, local_value, path="findings"):
    """Equal findings, numbers within 1e-3 (a batch on the server may round differently in the last digits)."""
    if isinstance(local_value, dict):
        assert remote_value.keys() == local_value.keys(), path
        for key in local_value:
            _close(remote_value[key], local_value[key], f"{path}.{key}")
    elif isinstance(local_value, float):
        assert remote_value == pytest.approx(local_value, abs=1e-3), path
    else:
        assert remote_value == local_value, path


def test_remote_tools_match_the_tools_in_process(settings, remote):
    local = {t.name: t for t in vision_tools(settings)}
    assert set(local) <= set(remote) and "search_knowledge" in remote
    for name in local:
        assert isinstance(remote[name], RemoteTool) and remote[name].schema() == local[name].schema()
    assert not isinstance(remote["search_knowledge"], RemoteTool)  # the knowledge search stays here

    session = Session()
    image_id = session.add_image(make_synthetic_fundus(512, seed=1).image)
    for name in ("assess_quality", "classify_fundus", "segment_lesions"):
        there, here = remote[name](session, image_id=image_id), local[name](session, image_id=image_id)
        _close(there.findings, here.findings)
        assert there.artifacts.keys() == here.artifacts.keys() and there.citations == here.citations
    probabilities = remote["classify_fundus"](session, image_id=image_id).findings["probabilities"]
    assert abs(sum(p["value"] for p in probabilities.values()) - 1) < 0.01
    overlay = remote["segment_lesions"](session, image_id=image_id).artifacts[f"overlay-{image_id}"]
    assert overlay.startswith(b"\x89PNG")


def test_the_agent_examines_a_photograph_on_the_tool_server(settings, remote):
    tools = {name: tool for name, tool in remote.items() if name != "search_knowledge"}  # no knowledge index needed
    model = ScriptedChatModel(steps=["The tools examined the photograph."])
    reply = Assistant(settings, chat_model=model, tools=tools).ask("Is something wrong?", image=make_synthetic_fundus(512, seed=2).image)
    assert [c.name for c in reply.tool_calls] == ["assess_quality", "classify_fundus", "segment_lesions", "measure_optic_disc", "triage_findings"]
    assert all(c.ok for c in reply.tool_calls) and reply.triage is not None
    assert reply.findings["classify_fundus"]["probabilities"]


def test_the_servers_refusals_are_tool_errors(settings, remote, tool_server):
    session = Session()
    dark = session.add_image(Image.fromarray(np.full((256, 256, 3), 3, np.uint8)))
    assert not remote["assess_quality"](session, image_id=dark).findings["is_fundus"]
    with pytest.raises(ToolError, match="classify_fundus did not analyse .* almost black"):
        remote["classify_fundus"](session, image_id=dark)
    with pytest.raises(ToolError, match="unknown tool 'measure_iop'"):
        ToolServer(tool_server).request("POST", "/tools/call", "measure_iop", json={"tool": "measure_iop"})


def test_a_server_that_is_down_is_a_clear_tool_error(settings, remote):
    down = dataclasses.replace(settings, tools_url=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(ToolError, match=r"tool server at http://127\.0\.0\.1:\d+ cannot be reached .*ophglm tools serve"):
        load_tools(down)
    proxy = type(remote["classify_fundus"])()
    proxy.server = ToolServer(down.tools_url)  # as if the server went away after the tools were listed
    session = Session()
    with pytest.raises(ToolError, match="classify_fundus: the tool server .* cannot be reached"):
        proxy(session, image_id=session.add_image(make_synthetic_fundus(256, seed=1).image))


def test_the_tool_server_listens_beyond_loopback_only_with_a_key(settings):
    with pytest.raises(ValueError, match="without an API key"):
        serve(dataclasses.replace(settings, api_key=""), host="0.0.0.0")
