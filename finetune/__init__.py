"""Dataset builders and trainers for OphGLM's vision models (and later its LLM)."""
