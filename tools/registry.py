"""Which tools exist: the built-ins, any installed through the `ophglm.tools` entry points, and those of MCP servers.

A tool author ships a package whose entry point (group `ophglm.tools`) names either a
`Tool` subclass or a factory `f(settings) -> Tool`, or runs an MCP server named in the
`mcp_servers` setting, or an HTTP server (GET /tools, POST /tools/call, the protocol of
`ophglm tools serve`) named in the `http_tools` setting; the agent discovers it here and shows it to the LLM with its JSON
schema, with no edit of the agent.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from ophglm.settings import Settings
from ophglm.tools.base import Tool

ENTRY_POINT_GROUP = "ophglm.tools"
log = logging.getLogger(__name__)


def vision_tools(settings: Settings, device: str | None = None) -> list[Tool]:
    """The tools that look at photographs, in this process (what `ophglm tools serve` hosts)."""
    from ophglm.tools.anatomy import MeasureOpticDisc, MeasureVessels
    from ophglm.tools.assess_quality import AssessQuality
    from ophglm.tools.classify_fundus import ClassifyFundus
    from ophglm.tools.segment_lesions import SegmentLesions

    device = device or settings.torch_device()
    weights = settings.weights_dir
    views = settings.lesion_views
    return [AssessQuality(), ClassifyFundus(weights, device), SegmentLesions(weights, device, views), MeasureOpticDisc(weights, device, views),
            MeasureVessels(weights, device)]


def builtin_tools(settings: Settings) -> list[Tool]:
    """The vision tools (on the tool server when `tools_url` is set) and the knowledge search (always here)."""
    from ophglm.tools.remote_tools import remote_tools
    from ophglm.tools.search_knowledge import SearchKnowledge

    vision = remote_tools(settings) if settings.tools_url else vision_tools(settings)
    return [*vision, SearchKnowledge(settings)]


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
    from ophglm.tools.mcp_tools import mcp_tools
    from ophglm.tools.remote_tools import http_plugin_tools

    tools: dict[str, Tool] = {}
    remote = (mcp_tools(settings.mcp_servers) if settings.mcp_servers else []) + (http_plugin_tools(settings) if settings.http_tools else [])
    for tool in [*builtin_tools(settings), *plugin_tools(settings), *remote, *(extra or [])]:
        if tool.name in tools:
            raise ValueError(f"two tools are named {tool.name!r}: {_origin(tools[tool.name])} and {_origin(tool)}")
        tools[tool.name] = tool
    return tools


def _origin(tool: Tool) -> str:
    """Where a tool comes from, so a name clash says which two to rename or remove."""
    return getattr(tool, "origin", None) or f"{type(tool).__module__}.{type(tool).__qualname__}"
