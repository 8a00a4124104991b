"""A LangChain chat model over a local transformers LLM, with tool calling and streaming.

LangChain's HuggingFace wrappers cannot call tools with a local model (STACK.md), so this
is our own small `BaseChatModel`: render the conversation with the tokenizer's chat
template (tools described in the system prompt, see toolcalls.py), generate, and parse the
tool-call text into `AIMessage.tool_calls`. Tool calls that cannot be used are reported in
the message (`invalid_tool_calls`), not dropped.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Iterator

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict

from ophglm.agent.toolcalls import TOOL_CALL, parse_reply, render_call, tools_prompt


def to_chat_dicts(messages: list[BaseMessage], tools: list[dict] | None) -> list[dict[str, str]]:
    """LangChain messages -> role/content dicts in OphGLM's text format."""
    chat: list[dict[str, str]] = []
    tool_block = tools_prompt(tools) if tools else ""
    for message in messages:
        if isinstance(message, SystemMessage):
            chat.append({"role": "system", "content": f"{message.text}\n\n{tool_block}".strip()})
        elif isinstance(message, HumanMessage):
            chat.append({"role": "user", "content": message.text})
        elif isinstance(message, AIMessage):
            calls = "\n".join(render_call(c["name"], c["args"]) for c in message.tool_calls)
            chat.append({"role": "assistant", "content": "\n".join(p for p in (message.text, calls) if p)})
        elif isinstance(message, ToolMessage):
            # Tool results go back as a user turn: every chat template knows that role.
            chat.append({"role": "user", "content": f"<tool_response name=\"{message.name}\">\n{message.text}\n</tool_response>"})
    if tool_block and (not chat or chat[0]["role"] != "system"):
        chat.insert(0, {"role": "system", "content": tool_block})
    return chat


def _message_from_text(text: str, tools: list[dict] | None) -> AIMessage:
    allowed = {t["function"]["name"] for t in tools} if tools else set()
    parsed = parse_reply(text, allowed)
    invalid = [{"name": None, "args": None, "id": None, "error": e, "type": "invalid_tool_call"} for e in parsed.errors]
    return AIMessage(content=parsed.content, tool_calls=parsed.tool_calls, invalid_tool_calls=invalid)


class LocalChatModel(BaseChatModel):
    """Tool-calling chat model over a (model, tokenizer) pair from transformers."""

    model: Any
    tokenizer: Any
    max_new_tokens: int = 256
    model_config = ConfigDict(arbitrary_types_allowed=True)

    @property
    def _llm_type(self) -> str:
        return "ophglm-local"

    def bind_tools(self, tools, *, tool_choice=None, **kwargs):
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _inputs(self, messages: list[BaseMessage], tools: list[dict] | None):
        schemas = [t["function"] for t in tools] if tools else None
        ids = self.tokenizer.apply_chat_template(to_chat_dicts(messages, schemas), add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return {k: v.to(self.model.device) for k, v in ids.items()}

    def _generate_kwargs(self, inputs) -> dict:
        return dict(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, repetition_penalty=1.1,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)

    def _generate(self, messages, stop=None, run_manager=None, tools=None, **kwargs) -> ChatResult:
        import torch

        inputs = self._inputs(messages, tools)
        with torch.inference_mode():
            output = self.model.generate(**self._generate_kwargs(inputs))
        text = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return ChatResult(generations=[ChatGeneration(message=_message_from_text(text, tools))])

    def _stream(self, messages, stop=None, run_manager=None, tools=None, **kwargs) -> Iterator[ChatGenerationChunk]:
        """Stream prose token by token; hold back tool-call text and emit the parsed calls at the end."""
        import torch
        from transformers import TextIteratorStreamer

        inputs = self._inputs(messages, tools)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)

        def generate():
            with torch.inference_mode():
                self.model.generate(**self._generate_kwargs(inputs), streamer=streamer)

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        text, shown = "", 0
        for piece in streamer:
            text += piece
            visible = text.split("<tool_call>")[0]
            # Keep a possible partial "<tool_call" back until it is known not to be one.
            safe = len(visible) if "<tool_call>" in text else max(len(visible) - len("<tool_call>"), shown)
            if safe > shown:
                delta, shown = visible[shown:safe], safe
                if run_manager:
                    run_manager.on_llm_new_token(delta)
                yield ChatGenerationChunk(message=AIMessageChunk(content=delta))
        worker.join()
        final = _message_from_text(text, tools)
        tail = TOOL_CALL.sub("", text)[shown:]  # what was held back, minus the call text
        chunks = [{"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i, "type": "tool_call_chunk"} for i, c in enumerate(final.tool_calls)]
        yield ChatGenerationChunk(message=AIMessageChunk(content=tail, tool_call_chunks=chunks, invalid_tool_calls=final.invalid_tool_calls))
