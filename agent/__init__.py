"""The orchestrator: conversation -> LLM -> tool calls -> grounded answer."""
