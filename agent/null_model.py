"""The null model: answers nothing and calls nothing.

`ophglm eval agent` plays every scenario with it beside the real LLM, so each figure shows
what the code around the LLM scores alone, and the difference is what the LLM adds.
"""

from __future__ import annotations

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, ChatResult


class NullChatModel(BaseChatModel):
    @property
    def _llm_type(self) -> str:
        return "ophglm-null"

    def bind_tools(self, tools, *, tool_choice=None, **kwargs):
        return self

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=""))])
