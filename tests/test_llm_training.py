"""The LLM's training route on the CPU: chat encoding, LoRA on a tiny random GLM, resume-free save/load.

A tiny randomly initialised `GlmForCausalLM` (the design's model family) with the packaged
SmolLM2 tokenizer stands in for GLM-4: the same code path a GPU run takes, in seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

from ophglm.finetune.train_llm import LlmTrainConfig, encode, train_llm

CONVERSATION = [
    {"role": "system", "content": "You are OphGLM.", "train": False},
    {"role": "user", "content": "Is this glaucoma?\n[Fundus photograph attached: image_id=img-0123456789ab]", "train": False},
    {"role": "assistant", "content": '<tool_call>{"name": "classify_fundus", "arguments": {"image_id": "img-0123456789ab"}}</tool_call>', "train": False},
    {"role": "user", "content": '<tool_response name="classify_fundus">\nglaucoma 0.81\n</tool_response>', "train": False},
    {"role": "assistant", "content": "The classifier gives glaucoma 0.81. This is not a diagnosis.", "train": True},
    {"role": "user", "content": "How urgent is it?", "train": False},
    {"role": "assistant", "content": "Soon: within weeks.", "train": True},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ophglm.agent.llm_loader import model_folder
    from ophglm.settings import load_settings

    return AutoTokenizer.from_pretrained(model_folder(load_settings()))


def test_only_the_models_own_steps_and_their_end_token_are_trained(tokenizer):
    ids, labels = encode(tokenizer, CONVERSATION, 4096)
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    assert "The classifier gives glaucoma 0.81. This is not a diagnosis." in trained and "Soon: within weeks." in trained
    assert trained.count("<|im_end|>") == 2  # it learns to stop after each answer
    assert "classify_fundus" not in trained and "How urgent" not in trained  # gate calls and the person's words are context
    assert ids == tokenizer(tokenizer.apply_chat_template([{k: m[k] for k in ("role", "content")} for m in CONVERSATION], tokenize=False),
                            add_special_tokens=False)["input_ids"]
    assert encode(tokenizer, CONVERSATION, 20) is None  # too long: skipped, never cut


def test_lora_trains_a_tiny_glm_and_the_adapter_loads(tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GlmConfig, GlmForCausalLM

    config = GlmConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id or 0)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-glm"
    GlmForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "instructions"
    data.mkdir()
    rows = [{"kind": "photo", "split": split, "messages": CONVERSATION} for split in ("train", "train", "val")]
    (data / "conversations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "adapter"
    report = train_llm(LlmTrainConfig(data=str(data), model=str(folder), out=str(out), max_steps=6, accumulate=1, lr=1e-2, minutes=5, device="cpu"))
    assert report["steps"] == 6 and report["train_conversations"] == 2 and report["val_conversations"] == 1
    assert report["val_loss_after"] < report["val_loss_before"] - 0.05  # it learned the answers (a gap the --init check below needs)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_model.md").is_file()
    assert not out.with_name("adapter.checkpoint").exists()
    # --init continues the trained adapter: with a negligible learning rate its loss is where the first run ended
    more = train_llm(LlmTrainConfig(data=str(data), model=str(folder), out=str(tmp_path / "more"), init=str(out), max_steps=1,
                                    accumulate=1, lr=1e-12, minutes=5, device="cpu"))
    assert more["val_loss_after"] == pytest.approx(report["val_loss_after"], abs=1e-2)
    base = AutoModelForCausalLM.from_pretrained(folder)
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    assert isinstance(merged, GlmForCausalLM)


def test_single_token_call_tags_train_their_embedding_rows(tmp_path, tokenizer):
    # Qwen's vocabulary has <tool_call> as one token whose row LoRA alone cannot move (STACK.md): a tiny
    # random Qwen2 with tied embeddings and the tags added to the tokenizer stands in for it.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from ophglm.finetune.train_llm import call_tag_tokens

    assert call_tag_tokens(tokenizer) == []  # SmolLM2 spells the tags in ordinary tokens: nothing extra trains
    folder = tmp_path / "tiny-qwen"
    tokenizer.save_pretrained(folder)
    tagged = AutoTokenizer.from_pretrained(folder)
    tagged.add_tokens(["<tool_call>", "</tool_call>"])
    tagged.save_pretrained(folder)
    tags = call_tag_tokens(tagged)
    assert len(tags) == 2
    config = Qwen2Config(vocab_size=len(tagged), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=tagged.pad_token_id or 0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    calling = [*CONVERSATION[:2], {**CONVERSATION[2], "train": True}, *CONVERSATION[3:]]  # the model writes the call itself
    data = tmp_path / "instructions"
    data.mkdir()
    (data / "conversations.jsonl").write_text("".join(json.dumps({"kind": "photo", "split": s, "messages": calling}) + "\n" for s in ("train", "val")))
    out = tmp_path / "adapter"
    report = train_llm(LlmTrainConfig(data=str(data), model=str(folder), out=str(out), max_steps=3, accumulate=1, lr=1e-2, minutes=5, device="cpu"))
    assert report["trained_tag_tokens"] == tags
    base = AutoModelForCausalLM.from_pretrained(folder)
    rows_before = base.get_input_embeddings().weight.detach().clone()
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    changed = (merged.get_input_embeddings().weight.detach() - rows_before).abs().sum(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(tags)  # only the tags' rows moved, and the tied output rows with them
    assert torch.equal(merged.lm_head.weight, merged.get_input_embeddings().weight)
