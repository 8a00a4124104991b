"""A third-party tool installed as a package is discovered through the `ophglm.tools` entry points and called by the agent."""

import sys
import textwrap

import pytest
from langchain_core.messages import AIMessage

from ophglm.agent.assistant import Assistant
from ophglm.agent.scripted_model import ScriptedChatModel
from ophglm.tools.registry import load_tools

PLUGIN = '''
from PIL import ImageStat
from ophglm.tools import ImageInput, Tool, ToolResult


class MeasureBrightness(Tool):
    name = "measure_brightness"
    description = "Mean brightness of one photograph of this session, from 0 (black) to 255 (white)."
    inputs = ImageInput

    def run(self, inputs, session):
        mean = ImageStat.Stat(session.image(inputs.image_id).convert("L")).mean[0]
        return ToolResult(summary=f"Mean brightness: {mean:.1f} (0-255)", findings={"brightness": {"value": round(mean, 1), "unit": "grey level 0-255"}})
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """What `pip install my-plugin` leaves on disk: the module and its entry-point metadata."""
    (tmp_path / "brightness_plugin.py").write_text(PLUGIN)
    info = tmp_path / "brightness_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brightness-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [ophglm.tools]
        measure_brightness = brightness_plugin:MeasureBrightness
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("brightness_plugin", None)


def test_the_agent_discovers_and_calls_an_installed_tool(installed_plugin, settings, knowledge_index, demo_fundus_path):
    tools = load_tools(settings)
    assert "measure_brightness" in tools
    def call_plugin(messages):
        image_id = next(m.additional_kwargs["image_id"] for m in messages if "image_id" in m.additional_kwargs)
        return AIMessage("", tool_calls=[{"name": "measure_brightness", "args": {"image_id": image_id}, "id": "b1", "type": "tool_call"}])

    steps = [call_plugin, "The photograph's mean brightness was measured."]
    model = ScriptedChatModel(steps=steps)
    reply = Assistant(settings, chat_model=model, tools=tools).ask("How bright is this photo?", image=demo_fundus_path)
    assert "measure_brightness" in model.bound_tools
    call = next(c for c in reply.tool_calls if c.name == "measure_brightness")
    assert call.ok and call.summary.startswith("Mean brightness:")
    assert reply.findings["measure_brightness"]["brightness"]["unit"] == "grey level 0-255"


def test_a_plugin_fundus_model_gets_the_gate_and_the_shared_photograph():
    """What the README tells a tool author with a fundus model: gradable_photo refuses what the gate rejects, else gives the Photo."""
    import numpy as np
    from PIL import Image

    from ophglm.session import Session
    from ophglm.tools import ToolError
    from ophglm.tools.assess_quality import gradable_photo
    from ophglm.tools.synthetic_fundus import make_synthetic_fundus
    from ophglm.tools.vision import fundus_box

    session = Session()
    fundus = make_synthetic_fundus(900, seed=5).image
    photo = gradable_photo(session, session.add_image(fundus), "my_model")
    assert photo.box == fundus_box(fundus) and photo.tensor(224).shape == (3, 224, 224) and photo.square(224).size == (224, 224)
    assert gradable_photo(session, session.add_image(fundus), "another_tool") is photo, "made once per photograph"
    document = Image.fromarray(np.full((400, 600, 3), 245, np.uint8))
    with pytest.raises(ToolError, match="my_model did not analyse .* not a colour fundus photograph"):
        gradable_photo(session, session.add_image(document), "my_model")
