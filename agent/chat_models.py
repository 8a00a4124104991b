"""The chat-model factory: one setting picks the backend, no code changes.

- "local": our tool-calling wrapper over a transformers model (default: the packaged
  SmolLM2-135M-Instruct with OphGLM's LoRA adapter and fusion projector), on the CPU or a GPU;
- "openai": any OpenAI-compatible server (vLLM, llama.cpp server) through `ChatOpenAI`.
"""

from __future__ import annotations

from ophglm.settings import Settings


def make_chat_model(settings: Settings):
    if settings.llm_backend == "openai":
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(base_url=settings.llm_base_url, model=settings.llm_served_model, api_key=settings.llm_api_key,
                          max_tokens=settings.llm_max_new_tokens, temperature=0, max_retries=1, timeout=120)
    from ophglm.agent.llm_loader import load_local_llm, model_folder
    from ophglm.agent.local_model import LocalChatModel

    device = settings.torch_device()
    dtype = str(settings.torch_dtype(device)).removeprefix("torch.")
    model, tokenizer = load_local_llm(str(model_folder(settings)), settings.resolved_llm_adapter(), device, dtype)
    fusion = None
    if projector := settings.resolved_fusion():
        from pathlib import Path

        from ophglm.agent.fusion import load_fusion

        fusion = load_fusion(Path(projector), settings.weights_dir, device)
    return LocalChatModel(model=model, tokenizer=tokenizer, max_new_tokens=settings.llm_max_new_tokens, fusion=fusion)
