"""Diagnostic tools behind one contract (`Tool`), and their registry."""

from ophglm.tools.base import Artifact, ImageInput, Tool, ToolError, ToolResult

__all__ = ["Artifact", "ImageInput", "Tool", "ToolError", "ToolResult"]
