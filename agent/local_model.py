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
import uuid
from typing import Any, Iterator

import torch
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field

from ophglm.agent.prompt_cache import PromptCache
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


REPETITION_PENALTY = 1.1  # on the model's own words only (constrained.py): small models loop
RETRY_PROMPT = ("Your last reply had a tool call that could not be used ({errors}). "
                "Reply again: either valid calls to the listed tools, or your answer.")


def _last_human(messages: list[BaseMessage]) -> int:
    return max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=-1)


def _message_from_text(text: str, tools: list[dict] | None) -> AIMessage:
    allowed = {t["function"]["name"] for t in tools} if tools else set()
    parsed = parse_reply(text, allowed)
    # Invalid calls carry ids: the agent answers each with an error message the model can read.
    invalid = [{"name": None, "args": None, "id": f"call_{uuid.uuid4().hex[:12]}", "error": e, "type": "invalid_tool_call"} for e in parsed.errors]
    metadata = {"repairs": parsed.repairs} if parsed.repairs else {}
    return AIMessage(content=parsed.content, tool_calls=parsed.tool_calls, invalid_tool_calls=invalid, response_metadata=metadata)


class LocalChatModel(BaseChatModel):
    """Tool-calling chat model over a (model, tokenizer) pair from transformers."""

    model: Any
    tokenizer: Any
    max_new_tokens: int = 256
    # Fusion tokens (agent/fusion.py): the projector, and where to find a conversation's photographs
    # (the Assistant sets image_source to its session's gradable images; None = no image tokens).
    fusion: Any = None
    image_source: Any = None
    prompt_cache: PromptCache = Field(default_factory=PromptCache)
    model_config = ConfigDict(arbitrary_types_allowed=True)

    @property
    def _llm_type(self) -> str:
        return "ophglm-local"

    def bind_tools(self, tools, *, tool_choice=None, **kwargs):
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _inputs(self, messages: list[BaseMessage], tools: list[dict] | None):
        schemas = [t["function"] for t in tools] if tools else None
        chat = to_chat_dicts(messages, schemas)
        if self.fusion is not None and self.image_source is not None:
            from ophglm.agent.fusion import fused_embeddings

            text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            with torch.inference_mode():
                embeds = fused_embeddings(text, self.tokenizer, self.model.get_input_embeddings(), self._soft_tokens)
            return {"inputs_embeds": embeds, "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)}
        ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return {k: v.to(self.model.device) for k, v in ids.items()}

    def _soft_tokens(self, image_id: str):
        image = self.image_source(image_id)
        return None if image is None else self.fusion.tokens([image])[0]

    def _prompt_length(self, inputs) -> int:
        # generate() returns only new tokens when it was given embeddings instead of ids.
        return inputs["input_ids"].shape[1] if "input_ids" in inputs else 0

    def _generate_kwargs(self, inputs, tools: list[dict] | None, answer_only: bool = False) -> dict:
        from transformers import LogitsProcessorList

        from ophglm.agent.constrained import GeneratedRepetitionPenalty, NoToolCall, ToolNameConstraint

        processors = [GeneratedRepetitionPenalty(REPETITION_PENALTY, self._prompt_length(inputs))]
        if tools and not answer_only:
            processors.append(ToolNameConstraint(self.tokenizer, {t["function"]["name"] for t in tools}, self._prompt_length(inputs)))
        else:  # no tool is offered: a call could only be refused
            processors.append(NoToolCall(self.tokenizer))
        return dict(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, logits_processor=LogitsProcessorList(processors),
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)

    def _generate_tokens(self, inputs, tools: list[dict] | None, answer_only: bool = False, streamer=None):
        """`generate` over the prompt, reading only what the kept prompt cache does not already hold."""
        from transformers import DynamicCache

        prompt = inputs["input_ids"][0] if "input_ids" in inputs else inputs["inputs_embeds"][0]
        cache = self.prompt_cache.take(prompt, lambda: DynamicCache(config=self.model.config))
        with torch.inference_mode():
            output = self.model.generate(**self._generate_kwargs(inputs, tools, answer_only), past_key_values=cache, streamer=streamer)
        self.prompt_cache.keep(prompt, cache)
        return output

    def _complete(self, messages, tools, answer_only: bool = False) -> str:
        inputs = self._inputs(messages, tools)
        output = self._generate_tokens(inputs, tools, answer_only)
        return self.tokenizer.decode(output[0, self._prompt_length(inputs):], skip_special_tokens=True)

    def _checked(self, messages, tools, text: str) -> AIMessage:
        """The parsed reply; a reply whose only calls are unusable is retried once with the errors shown to the model."""
        message = _message_from_text(text, tools)
        # A small model imitates the gates' calls above it: a call to a tool that already ran this
        # turn means "I have what I need" — the step is taken again as an answer.
        ran = {m.name for m in messages[_last_human(messages) + 1:] if isinstance(m, ToolMessage)}
        if message.tool_calls and all(c["name"] in ran for c in message.tool_calls):
            answer = _message_from_text(self._complete(messages, tools, answer_only=True), None)
            answer.response_metadata["repeated_call_dropped"] = ", ".join(c["name"] for c in message.tool_calls)
            return answer
        if message.tool_calls or not message.invalid_tool_calls:
            return message
        errors = "; ".join(c["error"] for c in message.invalid_tool_calls)
        retry = [*messages, AIMessage(content=text), HumanMessage(content=RETRY_PROMPT.format(errors=errors))]
        second = _message_from_text(self._complete(retry, tools), tools)
        second.invalid_tool_calls = [*message.invalid_tool_calls, *second.invalid_tool_calls]
        second.response_metadata["retried"] = errors
        return second

    def _generate(self, messages, stop=None, run_manager=None, tools=None, **kwargs) -> ChatResult:
        message = self._checked(messages, tools, self._complete(messages, tools))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages, stop=None, run_manager=None, tools=None, **kwargs) -> Iterator[ChatGenerationChunk]:
        """Stream prose token by token; hold back tool-call text and emit the parsed calls at the end."""
        from transformers import TextIteratorStreamer

        inputs = self._inputs(messages, tools)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)

        def generate():
            self._generate_tokens(inputs, tools, streamer=streamer)

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
        final = self._checked(messages, tools, text)
        # What was held back, minus the call text (after a second try: its prose).
        tail = final.text if {"retried", "repeated_call_dropped"} & set(final.response_metadata) else TOOL_CALL.sub("", text)[shown:]
        chunks = [{"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i, "type": "tool_call_chunk"} for i, c in enumerate(final.tool_calls)]
        yield ChatGenerationChunk(message=AIMessageChunk(content=tail, tool_call_chunks=chunks, invalid_tool_calls=final.invalid_tool_calls,
                                                         response_metadata=final.response_metadata))
