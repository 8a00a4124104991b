"""The LLM side of the agent without a trained LLM: call formats, repair and retry, constrained names,
fusion-token insertion, and instruction data recorded from the real loop on synthetic photographs."""

from __future__ import annotations

import json

import pytest
import torch
from langchain_core.messages import HumanMessage, SystemMessage

from ophglm.agent.constrained import ToolNameConstraint
from ophglm.agent.fusion import fused_embeddings
from ophglm.agent.local_model import LocalChatModel
from ophglm.agent.toolcalls import parse_reply
from ophglm.tools.synthetic_fundus import make_synthetic_fundus

ALLOWED = {"classify_fundus", "search_knowledge", "measure_vessels"}
TOOLS = [{"type": "function", "function": {"name": n, "description": "d", "parameters": {}}} for n in sorted(ALLOWED)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ophglm.agent.llm_loader import model_folder
    from ophglm.settings import load_settings

    return AutoTokenizer.from_pretrained(model_folder(load_settings()))


def test_glm_formats_are_read():
    glm45 = parse_reply("<tool_call>search_knowledge\n<arg_key>query</arg_key>\n<arg_value>glaucoma drops</arg_value>\n</tool_call>", ALLOWED)
    assert [(c["name"], c["args"]) for c in glm45.tool_calls] == [("search_knowledge", {"query": "glaucoma drops"})]
    glm4 = parse_reply('measure_vessels\n{"image_id": "img-1"}', ALLOWED)
    assert [(c["name"], c["args"]) for c in glm4.tool_calls] == [("measure_vessels", {"image_id": "img-1"})] and glm4.content == ""
    assert parse_reply("glaucoma\nis a disease {of the nerve}", ALLOWED).tool_calls == []  # prose is not a call


def test_slips_are_repaired_and_said_so():
    reply = parse_reply("<tool_call>{'name': 'clasify_fundus', 'arguments': {'image_id': 'img-1',},}</tool_call>", ALLOWED)
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("classify_fundus", {"image_id": "img-1"})]
    assert reply.repairs == ["tool name 'clasify_fundus' read as 'classify_fundus'"] and not reply.errors
    far = parse_reply('<tool_call>{"name": "diagnose", "arguments": {}}</tool_call>', ALLOWED)
    assert far.tool_calls == [] and "unknown tool 'diagnose'" in far.errors[0]


def test_constrained_decoding_keeps_a_tool_name_on_a_declared_one(tokenizer):
    constraint = ToolNameConstraint(tokenizer, ALLOWED, prompt_length=0)
    allowed = constraint.allowed_tokens('<tool_call>{"name": "classify_f')
    assert allowed and all('undus"'.startswith(constraint.pieces[i]) for i in allowed)
    assert constraint.allowed_tokens("The classifier says") is None  # prose is free
    assert constraint.allowed_tokens('<tool_call>{"name": "zzz') is None  # off every name: the parser reports it
    ids = torch.tensor([tokenizer('<tool_call>{"name": "measure_', add_special_tokens=False)["input_ids"]])
    scores = constraint(ids, torch.zeros(1, len(tokenizer)))
    best = tokenizer.decode([int(scores[0].argmax())])
    assert 'vessels"'.startswith(best) and torch.isinf(scores[0]).sum() > len(tokenizer) - 100


def test_an_unusable_call_is_retried_once_then_reported(monkeypatch):
    outputs = iter(['<tool_call>{"name": "diagnose_all", "arguments": {}}</tool_call>',
                    '<tool_call>{"name": "classify_fundus", "arguments": {"image_id": "img-1"}}</tool_call>'])
    seen = []
    monkeypatch.setattr(LocalChatModel, "_complete", lambda self, messages, tools: seen.append(messages) or next(outputs))
    model = LocalChatModel(model=None, tokenizer=None)
    message = model.invoke([SystemMessage("s"), HumanMessage("q")], tools=TOOLS)
    assert [c["name"] for c in message.tool_calls] == ["classify_fundus"]
    assert "diagnose_all" in message.response_metadata["retried"] and "could not be used" in seen[1][-1].text
    outputs = iter(["<tool_call>{broken</tool_call>", "<tool_call>{still broken</tool_call>"])
    message = model.invoke([HumanMessage("q")], tools=TOOLS)
    assert message.tool_calls == [] and len(message.invalid_tool_calls) == 2  # reported, never silently dropped


def test_fusion_tokens_go_right_after_each_gradable_photographs_attachment_line(tokenizer):
    embed = torch.nn.Embedding(len(tokenizer), 8)
    text = ("Look.\n[Fundus photograph attached: image_id=img-aaaaaaaaaaaa] and "
            "[Fundus photograph attached: image_id=img-bbbbbbbbbbbb] done")
    soft = {"img-aaaaaaaaaaaa": torch.full((3, 8), 7.0), "img-bbbbbbbbbbbb": None}  # b: rejected by the gate
    with torch.no_grad():
        fused = fused_embeddings(text, tokenizer, embed, soft.get)[0]
        plain = fused_embeddings(text, tokenizer, embed, lambda _: None)[0]
    head = len(tokenizer("Look.\n[Fundus photograph attached: image_id=img-aaaaaaaaaaaa]", add_special_tokens=False)["input_ids"])
    assert len(fused) == len(plain) + 3
    assert torch.equal(fused[head:head + 3], torch.full((3, 8), 7.0)) and torch.equal(fused[:head], plain[:head])


def test_data_build_records_grounded_conversations_from_the_real_loop(tmp_path, settings, knowledge_index, monkeypatch):
    from ophglm.finetune.instruction_data import DataConfig, build_instruction_data

    monkeypatch.setenv("OPHGLM_CHROMA_PATH", str(settings.chroma_folder))
    root = tmp_path / "data"
    for label in ("normal", "diabetic_retinopathy"):
        (root / "classify_4class" / label).mkdir(parents=True)
        for i in range(6):
            make_synthetic_fundus(320, seed=i, lesions=label != "normal").image.save(root / "classify_4class" / label / f"{i}{label[0]}_left.jpg")
    sheet = build_instruction_data(DataConfig(data=root, out=tmp_path / "out", photos=4, rejected=2, text=6, seed=3))
    rows = [json.loads(line) for line in (tmp_path / "out" / "conversations.jsonl").open()]
    assert rows and sum(n for k, n in sheet["conversations"].items() if "/train" in k or "/val" in k) == len(rows)
    for row in rows:
        trained = [m for m in row["messages"] if m["train"]]
        assert trained and all(m["role"] == "assistant" for m in trained)
        assert row["messages"][0]["role"] == "system" and "<tool_call>" in row["messages"][0]["content"]
    photo = next(r for r in rows if r["kind"] == "photo")
    assert any("triage_findings" in m["content"] for m in photo["messages"] if m["role"] == "assistant")
    qa = [json.loads(line) for line in (tmp_path / "out" / "visual_qa.jsonl").open()]
    assert {q["label"] for q in qa} == {"normal", "diabetic_retinopathy"}
    assert all(q["answer"] in ("yes", "no", "normal", "diabetic retinopathy") for q in qa)


def test_fusion_trains_saves_and_reaches_the_local_chat_model(tmp_path, monkeypatch):
    """A few projector steps on synthetic photographs; the saved projector puts image tokens into the prompt."""
    from langchain_core.messages import HumanMessage

    from ophglm.agent.chat_models import make_chat_model
    from ophglm.agent.fusion import load_fusion
    from ophglm.finetune.fusion import FusionConfig, train_fusion
    from ophglm.settings import load_settings

    (tmp_path / "images").mkdir()
    rows = []
    for i, label in enumerate(["normal", "glaucoma"] * 2):
        make_synthetic_fundus(256, seed=i, lesions=False).image.save(tmp_path / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "label": label, "question": "Is this eye normal? Answer yes or no.",
                     "answer": "yes" if label == "normal" else "no", "split": "train"})
    (tmp_path / "visual_qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "projector.safetensors"
    report = train_fusion(FusionConfig(data=str(tmp_path), images=str(tmp_path), out=str(out), max_steps=2, batch=2, tokens=2, hidden=32))
    assert report["steps"] == 2 and report["train_photos"] == 4 and out.is_file()
    fusion = load_fusion(out)
    assert fusion.tokens([make_synthetic_fundus(256, seed=9).image]).shape == (1, 2, report["embed_dim"])
    monkeypatch.setenv("OPHGLM_FUSION", str(out))
    model = make_chat_model(load_settings(llm_max_new_tokens=2))
    photo = make_synthetic_fundus(256, seed=1).image
    chat = model.model_copy(update={"image_source": lambda image_id: photo})
    message = [HumanMessage("Look.\n[Fundus photograph attached: image_id=img-0123456789ab]")]
    with_image, without = chat._inputs(message, None), model._inputs(message, None)
    assert with_image["inputs_embeds"].shape[1] == without["input_ids"].shape[1] + 2
    assert chat.invoke(message).content is not None  # generation from embeddings runs


def test_a_projector_trained_on_other_classifier_weights_is_not_used(tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ophglm.agent.fusion import FusionProjector, load_fusion, save_fusion
    from ophglm.settings import load_settings

    shipped = load_settings().resolved_fusion()
    if not shipped:
        pytest.skip("no shipped fusion projector fits the default model")
    with safe_open(shipped, "pt") as f:
        config = json.loads(f.metadata()["config"])
    projector = FusionProjector(config["feature_dim"], config["embed_dim"], config["tokens"], config["hidden"])
    projector.load_state_dict(load_file(shipped))
    stale = tmp_path / "not-yet-made" / "stale.safetensors"  # saving makes the folder
    save_fusion(projector, stale, {**config, "image_encoder_sha256": "0" * 16})
    with pytest.raises(ValueError, match="other classifier weights"):
        load_fusion(stale)
    # "auto" passes over a shipped projector whose classifier fingerprint does not match, and takes a matching one
    import ophglm.settings

    adapter = load_settings().resolved_llm_adapter()
    (tmp_path / "shipped").mkdir()
    monkeypatch.setattr(ophglm.settings, "packaged_llm_weights", lambda: tmp_path / "shipped")
    stale.rename(tmp_path / "shipped" / "fusion_projector.safetensors")
    assert load_settings(llm_adapter=adapter).resolved_fusion() == ""
    save_fusion(projector, tmp_path / "shipped" / "fusion_projector.safetensors", config)
    assert load_settings(llm_adapter=adapter).resolved_fusion().endswith("fusion_projector.safetensors")


def test_the_repetition_penalty_spares_the_prompt_the_answer_must_quote():
    from ophglm.agent.constrained import GeneratedRepetitionPenalty

    penalty = GeneratedRepetitionPenalty(2.0, prompt_length=3)
    scores = torch.tensor([[4.0, 4.0, -4.0, 4.0, 1.0]])
    out = penalty(torch.tensor([[0, 1, 2, 3, 2]]), scores.clone())  # prompt: 0 1 2; generated: 3 2
    assert out.tolist() == [[4.0, 4.0, -8.0, 2.0, 1.0]]  # 0 and 1 (prompt only) untouched; 3 and 2 (generated) penalised


def test_a_call_to_a_tool_that_already_ran_is_taken_again_as_an_answer(monkeypatch):
    from langchain_core.messages import AIMessage, ToolMessage

    asked = []

    def complete(self, messages, tools, answer_only=False):
        asked.append(answer_only)
        return "The classifier gives glaucoma 0.81." if answer_only else '<tool_call>{"name": "classify_fundus", "arguments": {}}</tool_call>'

    monkeypatch.setattr(LocalChatModel, "_complete", complete)
    call = {"name": "classify_fundus", "args": {"image_id": "img-1"}, "id": "gate_1", "type": "tool_call"}
    history = [HumanMessage("Is this glaucoma?"), AIMessage("", tool_calls=[call]),
               ToolMessage("glaucoma 0.81", tool_call_id="gate_1", name="classify_fundus")]
    message = LocalChatModel(model=None, tokenizer=None).invoke(history, tools=TOOLS)
    assert asked == [False, True] and message.tool_calls == [] and message.text == "The classifier gives glaucoma 0.81."
    assert message.response_metadata["repeated_call_dropped"] == "classify_fundus"
    asked.clear()
    fresh = LocalChatModel(model=None, tokenizer=None).invoke([HumanMessage("Is this glaucoma?")], tools=TOOLS)
    assert asked == [False] and [c["name"] for c in fresh.tool_calls] == ["classify_fundus"]  # a first call stands


def test_no_tool_call_bans_only_the_start_of_a_tool_call(tokenizer):
    from ophglm.agent.constrained import NoToolCall

    banned = NoToolCall(tokenizer).banned
    assert tokenizer("<", add_special_tokens=False)["input_ids"][0] in banned
    assert tokenizer("The", add_special_tokens=False)["input_ids"][0] not in banned


def test_a_model_shipped_in_chunks_is_assembled_and_verified(tmp_path):
    import hashlib

    from ophglm.agent.llm_loader import assemble_chunks

    chunks = []
    for i, data in enumerate([b"GGUF" + b"a" * 5000, b"b" * 7000, b"c" * 10]):
        chunks.append(tmp_path / f"part0{i + 1}.bin")
        chunks[-1].write_bytes(data)
    whole = b"".join(c.read_bytes() for c in chunks)
    out = assemble_chunks(chunks, tmp_path / "model.gguf", hashlib.sha256(whole).hexdigest())
    assert out.read_bytes() == whole
    with pytest.raises(RuntimeError, match="reordered or altered"):  # two chunks swapped
        assemble_chunks([chunks[1], chunks[0], chunks[2]], tmp_path / "swapped.gguf", hashlib.sha256(whole).hexdigest())
    assert sorted(p.name for p in tmp_path.iterdir() if "gguf" in p.name) == ["model.gguf"]  # nothing half-made is left


def test_a_packaged_model_whose_package_is_missing_says_how_to_install_it(tmp_path, monkeypatch):
    from ophglm.agent import llm_loader

    monkeypatch.setitem(llm_loader.PACKAGED_MODELS, "absent", llm_loader.PackagedModel(("no_such_package_xyz",), "pip install no-such-package"))
    with pytest.raises(RuntimeError, match="no_such_package_xyz is not installed: pip install no-such-package"):
        llm_loader.packaged_gguf("absent", tmp_path)
