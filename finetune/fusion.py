"""`ophglm train fusion` and `ophglm eval fusion`: teach the projector, then prove the answer depends on the image.

Training: visual Q&A rows from `ophglm data build` (dynamic label pairing), the chat model
frozen (with its LoRA adapter merged, as the agent runs it), loss on the answer tokens;
only the projector learns. The photographs' features are computed once up front.
Evaluation on validation-split photographs, greedy answers, three ways: with the
photograph's fusion tokens, with no image tokens at all, and with the tokens of a noise
image. If fusion works, only the first is clearly above the always-the-commonest-answer
baseline.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ophglm.settings import cpu_has_native_bf16, packaged_llm_weights
from ophglm.agent.fusion import FUSION_FILE, FusionProjector, ImageEncoder, fused_embeddings, load_fusion, save_fusion

PLACEHOLDER_ID = "img-000000000000"
VQA_SYSTEM = "You are OphGLM. Answer the question about the attached colour fundus photograph in a few words."


@dataclass
class FusionConfig:
    data: str = "instructions"      # folder with visual_qa.jsonl
    images: str = "../shared/data"  # the folder its image paths are relative to
    out: str = ""                   # default agent/weights/fusion_projector.safetensors
    minutes: float = 10.0
    max_steps: int = 0              # 0 = as many as the minutes allow
    tokens: int = 4
    hidden: int = 1024
    lr: float = 1e-3
    batch: int = 16
    max_photos: int = 1500          # training photographs whose features are computed
    threads: int = 0
    seed: int = 0


def _frozen_llm():
    from ophglm.agent.llm_loader import load_local_llm, model_folder
    from ophglm.settings import load_settings

    settings = load_settings(None)
    model, tokenizer = load_local_llm(str(model_folder(settings)), settings.resolved_llm_adapter(), "cpu", "float32")
    for p in model.parameters():
        p.requires_grad_(False)
    return settings, model, tokenizer


def _chat_text(tokenizer, question: str, answer: str | None) -> str:
    messages = [{"role": "system", "content": VQA_SYSTEM},
                {"role": "user", "content": f"{question}\n[Fundus photograph attached: image_id={PLACEHOLDER_ID}]"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if answer is None:
        return prompt
    return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)


def _rows(cfg: FusionConfig, split: str) -> list[dict]:
    path = Path(cfg.data) / "visual_qa.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `ophglm data build --data {cfg.images} --out {cfg.data}` first")
    return [row for row in map(json.loads, path.open()) if row["split"] == split]


def _features(encoder: ImageEncoder, root: Path, paths: list[str]) -> dict[str, torch.Tensor]:
    features = {}
    for start in tqdm(range(0, len(paths), 32), desc="image features", unit="batch"):
        chunk = paths[start:start + 32]
        for path, vector in zip(chunk, encoder([Image.open(root / p).convert("RGB") for p in chunk])):
            features[path] = vector
    return features


def _noise_images(n: int, seed: int) -> list[Image.Image]:
    rng = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(384, 384, 3, generator=rng) * 255).byte().numpy()) for _ in range(n)]


def _batch(rows, tokens: torch.Tensor, model, tokenizer):
    """Right-padded embeddings, attention mask and labels (answer tokens only) for a batch."""
    embed = model.get_input_embeddings()
    sequences, labels = [], []
    for row, soft in zip(rows, tokens):
        prompt_text = _chat_text(tokenizer, row["question"], None)
        prompt = fused_embeddings(prompt_text, tokenizer, embed, lambda _: soft)[0]
        answer_text = _chat_text(tokenizer, row["question"], row["answer"])[len(prompt_text):]
        answer_ids = tokenizer(answer_text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        sequences.append(torch.cat([prompt, embed(answer_ids)]))
        labels.append(torch.cat([torch.full((len(prompt),), -100), answer_ids]))
    width = max(len(s) for s in sequences)
    embeds = torch.stack([torch.cat([s, s.new_zeros(width - len(s), s.shape[1])]) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    target = torch.stack([torch.cat([t, torch.full((width - len(t),), -100)]) for t in labels])
    return embeds, mask, target


def train_fusion(cfg: FusionConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    settings, model, tokenizer = _frozen_llm()
    encoder = ImageEncoder(settings.weights_dir)
    rows = _rows(cfg, "train")
    photos = sorted({r["image"] for r in rows})
    photos = set(random.sample(photos, min(cfg.max_photos, len(photos))))
    rows = [r for r in rows if r["image"] in photos]
    features = _features(encoder, Path(cfg.images), sorted(photos))
    embed_dim = model.get_input_embeddings().weight.shape[1]
    projector = FusionProjector(encoder.feature_dim, embed_dim, cfg.tokens, cfg.hidden)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=cfg.lr, weight_decay=0.01)
    start, step, losses = time.time(), 0, []
    bar = tqdm(desc="fusion steps", unit="step")
    while time.time() - start < 60 * cfg.minutes and not (cfg.max_steps and step >= cfg.max_steps):
        batch = random.sample(rows, min(cfg.batch, len(rows)))
        soft = projector(torch.stack([features[r["image"]] for r in batch]))
        embeds, mask, labels = _batch(batch, soft, model, tokenizer)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16()):
            loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    out = Path(cfg.out) if cfg.out else packaged_llm_weights() / FUSION_FILE
    config = {"feature_dim": encoder.feature_dim, "embed_dim": embed_dim, "tokens": cfg.tokens, "hidden": cfg.hidden,
              "llm_model": settings.llm_model, "llm_adapter": Path(settings.resolved_llm_adapter()).name if settings.resolved_llm_adapter() else "",
              "image_encoder": encoder.tool.config["backbone"], "image_encoder_sha256": encoder.fingerprint}
    save_fusion(projector, out, config)
    report = {"steps": step, "minutes": round((time.time() - start) / 60, 1), "train_rows": len(rows), "train_photos": len(photos),
              "final_loss": round(sum(losses[-20:]) / max(len(losses[-20:]), 1), 4), **config}
    out.with_suffix(".json").write_text(json.dumps({"config": asdict(cfg), "report": report}, indent=2) + "\n")
    return report


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z ]", " ", text.lower()).split(".")[0].strip()


@torch.inference_mode()
def _answer(model, tokenizer, question: str, soft: torch.Tensor | None) -> str:
    embeds = fused_embeddings(_chat_text(tokenizer, question, None), tokenizer, model.get_input_embeddings(), lambda _: soft)
    output = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), max_new_tokens=8,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def evaluate_fusion(images: str, limit: int = 300, projector_path: str = "", seed: int = 0) -> dict:
    from ophglm.finetune.datasets import classification_records, split_of
    from ophglm.finetune.instruction_data import visual_qa

    settings, model, tokenizer = _frozen_llm()
    fusion = load_fusion(Path(projector_path) if projector_path else packaged_llm_weights() / FUSION_FILE, settings.weights_dir)
    rng = random.Random(seed)
    # Validation-split photographs only: neither the classifier nor the projector saw them.
    rows = [row for r in classification_records(Path(images)) if split_of(r.group) == "val" for row in visual_qa(rng, r, Path(images), 4)]
    if not rows:
        raise ValueError(f"{images} holds no labelled validation photographs (expected the layout of ../shared/data)")
    rows = rng.sample(rows, min(limit, len(rows)))
    features = _features(fusion.encoder, Path(images), sorted({r["image"] for r in rows}))
    noise = fusion.encoder(_noise_images(len(rows), seed))
    correct: Counter = Counter()
    by_kind: Counter = Counter()
    with torch.inference_mode():
        for row, noise_features in tqdm(list(zip(rows, noise)), desc="visual Q&A", unit="question"):
            kind = "which" if row["question"].startswith("Which") else "yes/no"
            by_kind[kind] += 1
            expected = _normalise(row["answer"])
            for condition, soft in (("with_image", fusion.projector(features[row["image"]][None])[0]), ("no_image", None),
                                    ("noise_image", fusion.projector(noise_features[None])[0])):
                hit = _normalise(_answer(model, tokenizer, row["question"], soft)).startswith(expected)
                correct[condition] += hit
                correct[f"{condition}/{kind}"] += hit
    commonest = Counter(r["answer"] for r in rows).most_common(1)[0][1] / len(rows)
    report = {"questions": len(rows), "photos": len(features), "commonest_answer_baseline": round(commonest, 3)}
    for condition in ("with_image", "no_image", "noise_image"):
        report[condition] = round(correct[condition] / len(rows), 3)
        report[f"{condition}_by_question"] = {k: round(correct[f"{condition}/{k}"] / n, 3) for k, n in by_kind.items()}
    return report


def cmd_train_fusion(args) -> None:
    from dataclasses import fields

    names = {f.name for f in fields(FusionConfig)}
    print(json.dumps(train_fusion(FusionConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})), indent=2))


def cmd_eval_fusion(args) -> None:
    report = evaluate_fusion(args.data, args.limit, args.projector or "")
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))


def add_fusion_parsers(train_subparsers, eval_subparsers) -> None:
    p = train_subparsers.add_parser("fusion", help="train the fusion projector (image -> soft tokens) with the LLM frozen")
    p.add_argument("--data", help="instruction data folder with visual_qa.jsonl (default ./instructions)")
    p.add_argument("--images", help="the data folder the image paths are relative to (default ../shared/data)")
    p.add_argument("--out", help=f"projector file (default agent/weights/{FUSION_FILE})")
    p.add_argument("--minutes", type=float)
    p.add_argument("--tokens", type=int, help="soft tokens per photograph (default 4)")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_train_fusion)
    e = eval_subparsers.add_parser("fusion", help="visual Q&A accuracy with the fusion tokens, without, and with a noise image")
    e.add_argument("--data", required=True, help="the data folder (layout of ../shared/data)")
    e.add_argument("--limit", type=int, default=300, help="validation questions to ask")
    e.add_argument("--projector", help="projector file (default: the packaged one)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval_fusion)
