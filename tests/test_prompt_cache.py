"""The local chat model reuses the cache of the prompt it read last, and writes what it would have written without it."""

from __future__ import annotations

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from ophglm.agent.local_model import LocalChatModel
from ophglm.agent.prompt_cache import PromptCache, shared_prefix

TOOLS = [{"type": "function", "function": {"name": "measure_vessels", "description": "vessel density", "parameters": {}}}]


@pytest.fixture(scope="module")
def tiny_llm():
    """SmolLM2's tokenizer on a tiny randomly initialised model of its architecture (Llama)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ophglm.agent.llm_loader import model_folder
    from ophglm.settings import load_settings

    tokenizer = AutoTokenizer.from_pretrained(model_folder(load_settings()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id or 0)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_shared_prefix_of_ids_and_of_embeddings():
    assert shared_prefix(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 9, 4, 5])) == 2
    assert shared_prefix(torch.tensor([1, 2]), torch.tensor([1, 2, 3])) == 2
    embeds = torch.randn(5, 8)
    changed = embeds.clone()
    changed[3, 0] += 1
    assert shared_prefix(embeds, changed) == 3 and shared_prefix(embeds, embeds[:4]) == 4
    assert shared_prefix(torch.tensor([1, 2]), embeds) == 0  # ids against embeddings: nothing shared


def test_the_next_turn_reads_only_what_the_kept_cache_lacks_and_answers_the_same(tiny_llm):
    model, tokenizer = tiny_llm
    cached = LocalChatModel(model=model, tokenizer=tokenizer, max_new_tokens=12)
    first = [SystemMessage("You are OphGLM."), HumanMessage("What does the optic disc look like?")]
    answer = cached._complete(first, TOOLS)
    assert cached.prompt_cache.reused_tokens == 0
    follow_up = [*first, AIMessage(answer), HumanMessage("And the vessels?")]
    again = cached._complete(follow_up, TOOLS)
    assert cached.prompt_cache.reused_tokens > 0
    fresh = LocalChatModel(model=model, tokenizer=tokenizer, max_new_tokens=12)
    assert fresh._complete(follow_up, TOOLS) == again and fresh.prompt_cache.reused_tokens == 0
    # The very same prompt (the answer-only regeneration) reads one token and writes what it wrote before.
    before = cached.prompt_cache.reused_tokens
    assert cached._complete(follow_up, TOOLS) == again
    assert cached.prompt_cache.reused_tokens - before == len(cached._inputs(follow_up, TOOLS)["input_ids"][0]) - 1


def test_prompt_embeddings_reuse_the_cache_too(tiny_llm):
    """The path fusion tokens take: generation from input embeddings."""
    model, tokenizer = tiny_llm
    embed = model.get_input_embeddings()
    ids = tokenizer("The optic disc and the fovea of this eye", return_tensors="pt")["input_ids"]
    longer = tokenizer("The optic disc and the fovea of this eye, and its vessels", return_tensors="pt")["input_ids"]

    def generate(chat_model, token_ids):
        with torch.inference_mode():
            embeds = embed(token_ids)
        inputs = {"inputs_embeds": embeds, "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long)}
        return chat_model._generate_tokens(inputs, TOOLS)[0].tolist()

    cached = LocalChatModel(model=model, tokenizer=tokenizer, max_new_tokens=8)
    generate(cached, ids)
    reused = generate(cached, longer)
    assert cached.prompt_cache.reused_tokens > 0
    assert reused == generate(LocalChatModel(model=model, tokenizer=tokenizer, max_new_tokens=8), longer)


def test_a_cache_is_handed_to_one_caller_at_a_time():
    kept = PromptCache()
    made = []

    def new_cache():
        made.append(object())
        return made[-1]

    assert kept.take(torch.tensor([1, 2, 3]), new_cache) is made[0]
    # nothing was kept back: a concurrent caller gets a fresh cache rather than one in use
    assert kept.take(torch.tensor([1, 2, 3]), new_cache) is made[1]
