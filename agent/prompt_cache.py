"""Reuse the key/value cache of the prompt the local LLM read last.

Every call starts with the same system prompt and tool block, and each step of a turn
repeats the whole conversation so far with one more tool result (or, when the model
imitates a gate's call, the very same prompt again). On a CPU without native bf16 the
prefill of those ~1,600 tokens is most of a turn's time. The cache of the last prompt is
kept; the next call drops what follows the part the two prompts share and reads only the
rest. Greedy decoding picks the same tokens either way up to float rounding: reading a
prompt in two pieces rounds differently from reading it whole, which in bf16 can now and
then change a word of a long answer (the grounding check applies to either).
"""

from __future__ import annotations

import threading
from typing import Callable

import torch


def shared_prefix(previous: torch.Tensor, prompt: torch.Tensor) -> int:
    """How many leading positions two prompts share: token ids [T] or input embeddings [T, D]."""
    if previous.dim() != prompt.dim() or previous.shape[1:] != prompt.shape[1:]:
        return 0
    n = min(len(previous), len(prompt))
    same = previous[:n] == prompt[:n]
    if same.dim() > 1:
        same = same.all(dim=-1)
    differing = torch.nonzero(~same)
    return int(differing[0, 0]) if len(differing) else n


class PromptCache:
    """One kept (prompt, cache) pair; a caller takes it, so concurrent generations never share one."""

    def __init__(self):
        self._lock = threading.Lock()
        self._kept: tuple[torch.Tensor, object] | None = None
        self.reused_tokens = 0  # over this object's life: how much prefill it saved

    def take(self, prompt: torch.Tensor, new_cache: Callable[[], object]):
        """A cache holding the longest prefix of `prompt` the kept one covers (never all of it: the model must read one token)."""
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is None:
            return new_cache()
        previous, cache = kept
        reuse = min(shared_prefix(previous, prompt), len(prompt) - 1, cache.get_seq_length())
        if reuse <= 0:
            return new_cache()
        cache.crop(reuse - cache.get_seq_length())  # a negative count removes that many positions from the end
        self.reused_tokens += reuse
        return cache

    def keep(self, prompt: torch.Tensor, cache) -> None:
        """Keep the cache of a generation that completed (one that failed midway is dropped with its cache)."""
        with self._lock:
            self._kept = (prompt.detach(), cache)
