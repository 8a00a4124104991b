import pytest
from pydantic import BaseModel

from ophglm.session import Session
from ophglm.tools import ImageInput, Tool, ToolError, ToolResult
from ophglm.tools.registry import load_tools


class EchoInput(BaseModel):
    text: str
    times: int = 1


class EchoTool(Tool):
    name = "echo_text"
    description = "Repeat the given text a number of times; a test tool."
    inputs = EchoInput

    def __init__(self):
        super().__init__()
        self.setups = 0

    def setup(self):
        self.setups += 1

    def run(self, inputs, session):
        return ToolResult(summary=inputs.text * inputs.times, findings={"length": {"value": len(inputs.text) * inputs.times, "unit": "characters"}})


def test_tool_validates_arguments_and_sets_up_once():
    tool, session = EchoTool(), Session()
    assert tool(session, text="ab", times=2).summary == "abab"
    assert tool(session, text="c").summary == "c"
    assert tool.setups == 1
    with pytest.raises(ToolError, match="echo_text: invalid arguments.*times"):
        tool(session, text="x", times="many")


def test_schema_is_what_the_llm_sees():
    schema = EchoTool().schema()
    assert schema["name"] == "echo_text"
    assert set(schema["parameters"]["properties"]) == {"text", "times"}
    assert schema["parameters"]["required"] == ["text"]


@pytest.mark.parametrize("attrs, message", [
    ({"description": "long enough description here", "inputs": ImageInput}, "must define class attribute 'name'"),
    ({"name": "Bad Name", "description": "long enough description here", "inputs": ImageInput}, "snake_case"),
    ({"name": "short_desc", "description": "tiny", "inputs": ImageInput}, "write one"),
    ({"name": "no_model", "description": "long enough description here", "inputs": dict}, "pydantic"),
])
def test_malformed_tools_fail_at_definition(attrs, message):
    with pytest.raises(TypeError, match=message):
        type("Broken", (Tool,), attrs)


def test_image_tools_take_an_id_never_a_path():
    assert ImageInput.model_json_schema()["properties"] == {"image_id": {"title": "Image Id", "type": "string"}}
    with pytest.raises(Exception):
        ImageInput(image_id="img-1", path="../../etc/passwd")


def test_registry_has_the_builtins_and_accepts_extra_tools(settings):
    tools = load_tools(settings, extra=[EchoTool()])
    assert {"classify_fundus", "segment_lesions", "search_knowledge", "echo_text"} <= set(tools)
    with pytest.raises(ValueError, match="two tools are named 'echo_text'"):
        load_tools(settings, extra=[EchoTool(), EchoTool()])


def test_findings_are_plain_json_numpy_numbers_included():
    """The conversation store serialises plain JSON only: a numpy number in a finding once failed the whole turn."""
    import numpy as np

    result = ToolResult(summary="s", findings={"share": {"value": np.float64(0.25), "unit": "fraction"}, "count": np.int64(3), "xy": (np.float32(1.5), 2)})
    assert result.findings == {"share": {"value": 0.25, "unit": "fraction"}, "count": 3, "xy": [1.5, 2]}
    assert type(result.findings["share"]["value"]) is float and type(result.findings["count"]) is int
    with pytest.raises(TypeError, match=r"findings\.mask is a ndarray, not a JSON value"):
        ToolResult(summary="s", findings={"mask": np.zeros((2, 2))})
