"""A chat model that plays a script: the agent loop's tests run real tools without an LLM.

Each step is an AIMessage, a string (a final answer), or a function of the messages the
model was shown (so a test can answer from what the tools returned). It records every
prompt it was given and the tools it was bound to, for assertions.
"""

from __future__ import annotations

from typing import Any, Callable

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import PrivateAttr

Step = AIMessage | str | Callable[[list[BaseMessage]], AIMessage | str]


class ScriptedChatModel(BaseChatModel):
    steps: list[Any]
    _position: int = PrivateAttr(default=0)
    _seen: list[list[BaseMessage]] = PrivateAttr(default_factory=list)
    _bound_tools: list[str] = PrivateAttr(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "ophglm-scripted"

    @property
    def prompts(self) -> list[list[BaseMessage]]:
        return self._seen

    @property
    def bound_tools(self) -> list[str]:
        return self._bound_tools

    def bind_tools(self, tools, *, tool_choice=None, **kwargs):
        schemas = [convert_to_openai_tool(t) for t in tools]
        self._bound_tools = [s["function"]["name"] for s in schemas]
        return self.bind(tools=schemas, **kwargs)

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        if self._position >= len(self.steps):
            raise RuntimeError(f"scripted model ran out of steps after {len(self.steps)} calls")
        step = self.steps[self._position]
        self._position += 1
        self._seen.append(list(messages))
        if callable(step) and not isinstance(step, AIMessage):
            step = step(messages)
        message = AIMessage(content=step) if isinstance(step, str) else step
        return ChatResult(generations=[ChatGeneration(message=message)])
