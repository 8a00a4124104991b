"""Logits processors for the local LLM: declared tool names only, and no penalty for quoting the tools.

Inside a tool call, only declared tool names can be written.
STACK.md: a fine-tuned 135M model still invents tool names now and then. While the text
generated so far ends inside `<tool_call>{"name": "...`, this logits processor allows only
tokens that continue one of the declared names (then the closing quote); everywhere else it
leaves the model alone. Argument values are free text and are checked against the tool's
schema when the call runs.

A repetition penalty keeps a small model from looping, but transformers applies it to the
prompt's tokens too, and the prompt holds the tool results the answer must quote exactly
("0.66" is a repetition): `GeneratedRepetitionPenalty` penalises only what the model wrote.
"""

from __future__ import annotations

import re

import torch

OPEN_NAME = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"([^"]*)$')


class ToolNameConstraint:
    """A `transformers` logits processor; `prompt_length` is how many input ids precede the generated ones."""

    def __init__(self, tokenizer, names: set[str], prompt_length: int):
        self.tokenizer, self.names, self.prompt_length = tokenizer, sorted(names), prompt_length
        self.pieces = _vocabulary_pieces(tokenizer)

    def allowed_tokens(self, generated: str) -> list[int] | None:
        """Token ids that keep the open name on course; None when not inside a name."""
        match = OPEN_NAME.search(generated)
        if not match:
            return None
        partial = match.group(1)
        rests = [name[len(partial):] + '"' for name in self.names if name.startswith(partial)]
        if not rests:
            return None  # already off every name: let the parser report it
        return [i for i, piece in enumerate(self.pieces) if piece and any(rest.startswith(piece) for rest in rests)] or None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            tail = input_ids[row, self.prompt_length:][-48:]
            allowed = self.allowed_tokens(self.tokenizer.decode(tail, skip_special_tokens=False))
            if allowed is not None:
                mask = torch.full_like(scores[row], float("-inf"))
                mask[allowed] = 0.0
                scores[row] = scores[row] + mask
        return scores


class NoToolCall:
    """Forbid starting a tool call: for an answer-only step (no tools offered, or the call was a repeat)."""

    def __init__(self, tokenizer):
        pieces = _vocabulary_pieces(tokenizer)
        self.banned = [i for i, piece in enumerate(pieces) if piece.strip() and "<tool_call>".startswith(piece.strip())]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.banned] = float("-inf")
        return scores


class GeneratedRepetitionPenalty:
    """transformers' repetition penalty, over the generated tokens only."""

    def __init__(self, penalty: float, prompt_length: int):
        self.penalty, self.prompt_length = penalty, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] == 0:
            return scores
        picked = scores.gather(1, generated)
        return scores.scatter(1, generated, torch.where(picked < 0, picked * self.penalty, picked / self.penalty))


_PIECES: dict[int, list[str]] = {}


def _vocabulary_pieces(tokenizer) -> list[str]:
    """Each token id's text, computed once per tokenizer (about a second for 50k tokens)."""
    key = id(tokenizer)
    if key not in _PIECES:
        _PIECES[key] = [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    return _PIECES[key]
