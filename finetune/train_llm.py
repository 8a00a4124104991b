"""`ophglm train llm`: LoRA fine-tuning of the chat model on the recorded conversations.

STACK.md measured the recipe on a CPU with native bf16: LoRA on every linear projection, bf16 autocast
(2.2x faster than fp32 there; CPUs without it stay fp32), loss on the assistant's own steps only, including the end-of-turn
token (or it never learns to stop), at least an epoch. The gate-made tool calls are in the
prompt but not in the loss: the model never has to produce them. The same code trains a
larger model from a local folder on CUDA (GLM-4, Qwen) in bf16 with gradient
checkpointing; a tiny random GLM exercises that route in the tests. Where the tokenizer has
the tool-call tags as single tokens (Qwen's `<tool_call>`), their embedding rows train too:
STACK.md found them near-identical and under-trained in the GGUF-converted Qwen, and LoRA on
the projections alone could not teach the model to emit them. Training stops at a
time budget, checkpoints every few minutes and resumes, and ships the adapter (bf16
safetensors, a few MB) with a model card.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ophglm.finetune.model_card import write_model_card
from ophglm.settings import cpu_has_native_bf16, packaged_llm_weights

CHECKPOINT_EVERY_S = 300


@dataclass
class LlmTrainConfig:
    data: str = "instructions"   # the folder `ophglm data build` wrote
    model: str = "smollm2"       # a packaged model name or a local transformers folder
    out: str = ""                # adapter folder; default agent/weights/<model>-lora
    init: str = ""               # continue from this adapter folder (e.g. the shipped one) instead of a fresh LoRA
    minutes: float = 40.0
    epochs: float = 1.0
    max_steps: int = 0           # optimizer steps; 0 = as many as epochs/minutes allow
    lr: float = 2e-4
    rank: int = 8
    alpha: int = 16
    accumulate: int = 8
    max_tokens: int = 3072       # longer conversations are skipped (and counted)
    threads: int = 0
    seed: int = 0
    device: str = ""             # "" = cuda if available, else cpu


def default_adapter_dir(model: str) -> Path:
    return packaged_llm_weights() / f"{Path(model).name}-lora"


def encode(tokenizer, messages: list[dict], max_tokens: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels (-100 outside the trained assistant steps), via the model's own chat template."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(upto: int, prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(plain[:upto], tokenize=False, add_generation_prompt=prompt)

    pieces, done = [], ""
    for i, message in enumerate(messages):
        if not message.get("train"):
            continue
        prompt, full = render(i, prompt=True), render(i + 1)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not render conversations incrementally; cannot find the assistant turns")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return (ids, labels) if len(ids) <= max_tokens else None


def call_tag_tokens(tokenizer) -> list[int]:
    """Ids of `<tool_call>` and `</tool_call>` where each is one token of the vocabulary (else none)."""
    pieces = [tokenizer(tag, add_special_tokens=False)["input_ids"] for tag in ("<tool_call>", "</tool_call>")]
    return [piece[0] for piece in pieces if len(piece) == 1]


def _load(cfg: LlmTrainConfig, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ophglm.agent.llm_loader import model_folder
    from ophglm.settings import Settings

    folder = model_folder(Settings(llm_model=cfg.model))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # CPU: fp32 weights, bf16 autocast
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    if device.startswith("cuda"):
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return folder, model, tokenizer


def _examples(cfg: LlmTrainConfig, tokenizer, split: str) -> tuple[list, int]:
    path = Path(cfg.data) / "conversations.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `ophglm data build --data DIR --out {cfg.data}` first")
    examples, skipped = [], 0
    for line in path.open():
        row = json.loads(line)
        if row["split"] != split:
            continue
        encoded = encode(tokenizer, row["messages"], cfg.max_tokens)
        skipped += encoded is None
        if encoded:
            examples.append(encoded)
    return examples, skipped


def _loss(model, example, device: str) -> torch.Tensor:
    """Next-token loss on the trained positions only: the vocabulary projection runs just there (49k x 576 per token)."""
    ids, labels = (torch.tensor(x, device=device) for x in example)
    base = model.get_base_model()
    kind = device.split(":")[0]
    with torch.autocast(kind, dtype=torch.bfloat16, enabled=kind == "cuda" or cpu_has_native_bf16()):
        hidden = base.get_decoder()(input_ids=ids[None]).last_hidden_state[0, :-1]
        keep = labels[1:] != -100
        logits = base.get_output_embeddings()(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[1:][keep])


@torch.no_grad()
def _mean_loss(model, examples, device: str) -> float:
    model.eval()
    losses = [float(_loss(model, ex, device)) for ex in examples]
    model.train()
    return sum(losses) / max(len(losses), 1)


def save_adapter(model, out: Path) -> Path:
    """The LoRA weights in bf16 safetensors (half the fp32 size) plus peft's adapter_config.json."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(str(out))
    weights = out / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(weights)).items()}, str(weights))
    return weights


def train_llm(cfg: LlmTrainConfig) -> dict:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    folder, base, tokenizer = _load(cfg, device)
    train, skipped = _examples(cfg, tokenizer, "train")
    val, _ = _examples(cfg, tokenizer, "val")
    if not train:
        raise ValueError(f"no training conversations in {cfg.data}")
    out = Path(cfg.out) if cfg.out else default_adapter_dir(cfg.model)
    checkpoint = out.with_name(out.name + ".checkpoint")
    tags = call_tag_tokens(tokenizer)
    model = get_peft_model(base, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.05, target_modules="all-linear",
                                            trainable_token_indices=tags or None, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / cfg.accumulate))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    order = [i for _ in range(math.ceil(cfg.epochs) + 1) for i in random.sample(range(len(train)), len(train))]
    step, seen, spent = 0, 0, 0.0
    if cfg.init:  # more epochs for a finished adapter: its weights, a fresh optimizer and schedule
        set_peft_model_state_dict(model, {k: v.float() for k, v in load_file(str(Path(cfg.init) / "adapter_model.safetensors")).items()})
    if (checkpoint / "state.pt").is_file():  # resume where an interrupted run stopped
        state = torch.load(checkpoint / "state.pt", weights_only=False)
        set_peft_model_state_dict(model, {k: v.float() for k, v in load_file(str(checkpoint / "adapter_model.safetensors")).items()})
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, seen, spent, order = state["step"], state["seen"], state["spent"], state["order"]
    model.train()
    start, last_save, running = time.time() - spent, time.time(), []
    bar = tqdm(total=total, initial=step, desc="LoRA steps", unit="step")
    while step < total and time.time() - start < 60 * cfg.minutes:
        for _ in range(cfg.accumulate):
            loss = _loss(model, train[order[seen % len(order)]], device) / cfg.accumulate
            loss.backward()
            running.append(float(loss.detach()) * cfg.accumulate)
            seen += 1
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{sum(running[-64:]) / len(running[-64:]):.3f}", epoch=f"{seen / len(train):.2f}")
        if time.time() - last_save > CHECKPOINT_EVERY_S:
            save_adapter(model, checkpoint)
            torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "step": step, "seen": seen,
                        "spent": time.time() - start, "order": order}, checkpoint / "state.pt")
            last_save = time.time()
    bar.close()
    with model.disable_adapter():  # the base model's loss on the same conversations, whether or not this run resumed
        before = _mean_loss(model, val[:40], device) if val else None
    report = {"model": str(cfg.model), "base_folder": str(folder), "device": device, "steps": step, "epochs": round(seen / len(train), 3),
              "minutes": round((time.time() - start) / 60, 1), "train_conversations": len(train), "val_conversations": len(val),
              "skipped_too_long": skipped, "final_train_loss": round(sum(running[-64:]) / max(len(running[-64:]), 1), 4),
              "val_loss_before": round(before, 4) if before is not None else None, "val_loss_after": round(_mean_loss(model, val[:40], device), 4) if val else None,
              "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad), "trained_tag_tokens": tags}
    weights = save_adapter(model, out)
    write_model_card(weights, title=f"OphGLM LoRA adapter for {Path(str(cfg.model)).name}",
                     what="Teaches the chat model OphGLM's tool-call format and to answer only from the tools' results "
                          "(the policy of finetune/teacher.py). Weights: bf16 safetensors, "
                          f"{weights.stat().st_size / 1e6:.1f} MB; load with peft on top of the base model.",
                     data="Conversations recorded from the real agent loop (`ophglm data build`) on training-split photographs "
                          "of ../shared/data and on the knowledge corpus; see the datasheet the build wrote. Loss on the model's "
                          "own steps only; gate-made tool calls are context.",
                     recipe={k: v for k, v in asdict(cfg).items() if k not in ("data", "out")}, report=report,
                     command=f"ophglm data build --data ../shared/data --out {cfg.data}\nophglm train llm --data {cfg.data} --model {cfg.model} --minutes {cfg.minutes:g}")
    shutil.rmtree(checkpoint, ignore_errors=True)
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def cmd_train_llm(args) -> None:
    from dataclasses import fields

    names = {f.name for f in fields(LlmTrainConfig)}
    report = train_llm(LlmTrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None}))
    print(json.dumps(report, indent=2))


def add_train_llm_parser(train_subparsers) -> None:
    p = train_subparsers.add_parser("llm", help="LoRA-fine-tune the chat model on `ophglm data build` conversations")
    p.add_argument("--data", help="instruction data folder (default ./instructions)")
    p.add_argument("--model", help="smollm2 or qwen2.5-coder-0.5b (packaged) or a local transformers folder (GLM-4, Qwen, ... on CUDA)")
    p.add_argument("--out", help="adapter folder (default agent/weights/<model>-lora)")
    p.add_argument("--init", help="continue training this adapter folder (same rank)")
    p.add_argument("--minutes", type=float)
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--rank", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.set_defaults(func=cmd_train_llm)
