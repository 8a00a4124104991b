"""Which tools exist: the built-ins plus any installed through the `ophglm.tools` entry points.

A tool author ships a package whose entry point (group `ophglm.tools`) names either a
`Tool` subclass or a factory `f(settings) -> Tool`; the agent discovers it here and shows
it to the LLM with its JSON schema, with no edit of the agent.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from ophglm.settings import Settings
from ophglm.tools.base import Tool

ENTRY_POINT_GROUP = "ophglm.tools"
log = logging.getLogger(__name__)


def builtin_tools(settings: Settings) -> list[Tool]:
    from ophglm.tools.anatomy import MeasureOpticDisc, MeasureVessels
    from ophglm.tools.assess_quality import AssessQuality
    from ophglm.tools.classify_fundus import ClassifyFundus
    from ophglm.tools.search_knowledge import SearchKnowledge
    from ophglm.tools.segment_lesions import SegmentLesions

    if settings.tools_url:
        # Not silently ignored: a user who points at a tool server must not get local tools unknowingly.
        raise ValueError(f"OPHGLM_TOOLS_URL={settings.tools_url}: the remote tool server is not implemented yet; unset it to run the tools in process")
    device = settings.torch_device()
    weights = settings.weights_dir
    return [AssessQuality(), ClassifyFundus(weights, device), SegmentLesions(weights, device), MeasureOpticDisc(weights, device),
            MeasureVessels(weights, device), SearchKnowledge(settings)]


def plugin_tools(settings: Settings) -> list[Tool]:
    tools = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        target = entry.load()
        tool = target() if isinstance(target, type) and issubclass(target, Tool) else target(settings)
        if not isinstance(tool, Tool):
            raise TypeError(f"entry point {entry.name} ({entry.value}) gave {type(tool).__name__}, not an ophglm Tool")
        tools.append(tool)
    return tools


def load_tools(settings: Settings, extra: list[Tool] | None = None) -> dict[str, Tool]:
    """All tools by name; a plug-in may not silently replace a built-in."""
    tools: dict[str, Tool] = {}
    for tool in [*builtin_tools(settings), *plugin_tools(settings), *(extra or [])]:
        if tool.name in tools:
            raise ValueError(f"two tools are named {tool.name!r}")
        tools[tool.name] = tool
    return tools
