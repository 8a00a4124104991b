"""Diagnostic tools behind one contract (`Tool`), and their registry."""

from ophglm.tools.base import ImageInput, Tool, ToolError, ToolResult

__all__ = ["ImageInput", "Tool", "ToolError", "ToolResult"]
