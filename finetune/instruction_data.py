"""`ophglm data build`: the instruction data the LLM and the fusion projector learn from.

Tool-use conversations are recorded from the real agent loop (teacher.py plays the LLM),
on training-split photographs only, so the model learns on exactly the prompts it will
meet: gate-made tool calls, our tools' real outputs, retrieved passages, follow-ups,
refusals after a rejected image, off-topic requests and prompt injections. Visual Q&A for
the fusion tokens pairs each labelled photograph with questions about its own label and
about other labels (OphGLM's dynamic label pairing), with label-consistent answers.
Output: `conversations.jsonl`, `visual_qa.jsonl` and `datasheet.json` (counts per kind and
split) in one folder; duplicates are dropped.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageFilter
from tqdm import tqdm

from ophglm.finetune.datasets import CLASSIFIER_CLASSES, Record, classification_records, split_of
from ophglm.finetune.questions import (AFTER_REFUSAL, DISEASE_QUESTIONS, FOLLOW_UPS, KNOWLEDGE_TEMPLATES, OUT_OF_SCOPE,
                                       PHOTO_QUESTIONS)
from ophglm.finetune.teacher import TeacherChatModel

CLASS_WORDS = {"normal": "normal", "diabetic_retinopathy": "diabetic retinopathy", "glaucoma": "glaucoma",
               "cataract": "cataract", "pathologic_myopia": "pathologic myopia"}
# (turn, kind of turn) plans: the first turn brings the photograph.
Turn = tuple[str, "Image.Image | None", str, "str | None"]


@dataclass
class DataConfig:
    data: Path
    out: Path
    photos: int = 240          # conversations about a fundus photograph
    rejected: int = 40         # conversations about an image the quality gate rejects
    text: int = 320            # text-only conversations
    visual_qa_per_photo: int = 3
    seed: int = 0


def _photo_turns(rng: random.Random, image: Image.Image, label: str) -> list[Turn]:
    kind = rng.choice(["overview"] * 4 + ["disease", "disease", "lesions", "disc", "vessels", "urgency", "injection"])
    if kind == "disease":
        subject = label if rng.random() < 0.5 else rng.choice(list(DISEASE_QUESTIONS))
        question, intent = rng.choice(DISEASE_QUESTIONS[subject]), ("disease", subject)
    else:
        question, intent = rng.choice(PHOTO_QUESTIONS[kind]), (kind, None)
    turns = [(question, image, *intent)]
    for follow in rng.sample(list(FOLLOW_UPS), k=rng.choice([0, 1, 1, 2])):
        turns.append((rng.choice(FOLLOW_UPS[follow]), None, follow, None))
    return turns


def _knowledge_questions(rng: random.Random) -> list[tuple[str, str]]:
    from ophglm.knowledge.corpus import load_corpus

    questions = []
    for chunk in load_corpus():
        # Mostly the title; sometimes the document's first alias (an abbreviation people use, like POAG).
        for template in KNOWLEDGE_TEMPLATES.get(chunk.section, []):
            name = chunk.aliases[0] if chunk.aliases and rng.random() < 0.25 else chunk.title.lower()
            questions.append((template.format(t=name), chunk.id))
    return questions


def _text_turns(rng: random.Random, knowledge: list[tuple[str, str]]) -> list[Turn]:
    roll = rng.random()
    if roll < 0.2:
        turns = [(rng.choice(OUT_OF_SCOPE), None, "out_of_scope", None)]
    elif roll < 0.25:
        turns = [(rng.choice(PHOTO_QUESTIONS["injection"]), None, "injection", None)]
    else:
        question, passage = rng.choice(knowledge)
        turns = [(question, None, "knowledge", passage)]
    if rng.random() < 0.3:
        question, passage = rng.choice(knowledge)
        turns.append((question, None, "knowledge", passage))
    return turns


def _unusable_image(rng: random.Random, photo: Image.Image, non_fundus) -> Image.Image:
    """Mostly other kinds of picture; some fundus photographs made ungradable (too dark, blurred)."""
    roll = rng.random()
    if roll < 0.15:
        return photo.point(lambda v: int(v * 0.12))
    if roll < 0.3:
        return photo.filter(ImageFilter.GaussianBlur(radius=max(photo.size) / 40))
    return next(non_fundus)[1]


def run_conversation(settings, tools: dict, turns: list[Turn]) -> tuple[dict | None, str]:
    """Play the turns through the real Assistant with the teacher: (the training example, '') or (None, why not)."""
    from ophglm.agent.assistant import Assistant

    teacher = TeacherChatModel(intents={q: (intent, subject) for q, _, intent, subject in turns})
    assistant = Assistant(settings, chat_model=teacher, tools=tools)
    replies = [assistant.ask(question, image=image) for question, image, _, _ in turns]
    # The teacher must be grounded (a failed tool is kept: the model must learn to say so).
    if problems := [n for r in replies for n in r.notes if "removed an unsupported statement" in n]:
        return None, problems[0].split(":")[0]
    if not teacher.records:
        return None, "every turn ended at a gate"
    last = teacher.records[-1]
    targets = {r["target"] for r in teacher.records}
    messages = [dict(m, train=m["role"] == "assistant" and m["content"] in targets) for m in last["chat"]]
    messages.append({"role": "assistant", "content": last["target"], "train": True})
    return {"messages": messages, "intents": [r["intent"] for r in teacher.records],
            "refused": [r.refused for r in replies]}, ""


def visual_qa(rng: random.Random, record: Record, root: Path, per_photo: int) -> list[dict]:
    """Dynamic label pairing: questions about the photograph's own label and other labels, with consistent answers."""
    word = CLASS_WORDS[record.label]
    asked = [c for c in CLASSIFIER_CLASSES if c != "normal"]
    pairs = [("Which condition does this fundus photograph show? Answer with one of: normal, diabetic retinopathy, glaucoma, cataract, pathologic myopia.", word),
             ("Is this eye normal? Answer yes or no.", "yes" if record.label == "normal" else "no")]
    for disease in rng.sample(asked, k=2):
        pairs.append((f"Does this photograph show {CLASS_WORDS[disease]}? Answer yes or no.", "yes" if record.label == disease else "no"))
    rel = str(record.path.relative_to(root))
    return [{"image": rel, "label": record.label, "question": q, "answer": a, "split": split_of(record.group)}
            for q, a in rng.sample(pairs, k=min(per_photo, len(pairs)))]


def _key(example: dict) -> str:
    return hashlib.sha1(json.dumps(example["messages"], sort_keys=True).encode()).hexdigest()


def build_instruction_data(cfg: DataConfig) -> dict:
    from ophglm.settings import load_settings
    from ophglm.tools.non_fundus import non_fundus_images
    from ophglm.tools.registry import builtin_tools

    rng = random.Random(cfg.seed)
    settings = load_settings(None)
    tools = {t.name: t for t in builtin_tools(settings)}
    records = classification_records(cfg.data)
    if not records:
        raise ValueError(f"{cfg.data} holds no labelled fundus photographs (expected the layout of ../shared/data)")
    cfg.out.mkdir(parents=True, exist_ok=True)
    by_label: dict[str, list[Record]] = {}
    for record in records:
        by_label.setdefault(record.label, []).append(record)
    train_photos = [r for r in records if split_of(r.group) == "train"]
    # Equal numbers per label, so the answers the LLM sees are not mostly "normal" or "DR".
    trainable = {label: [r for r in rs if split_of(r.group) == "train"] for label, rs in sorted(by_label.items())}
    trainable = {label: rs for label, rs in trainable.items() if rs}
    picked = [rng.choice(rs) for rs in trainable.values() for _ in range(cfg.photos // max(len(trainable), 1))]
    knowledge = _knowledge_questions(rng)
    non_fundus = non_fundus_images(cfg.rejected * 2, seed=cfg.seed + 7)
    plans: list[tuple[str, str, list[Turn]]] = []
    for record in picked:
        plans.append(("photo", "train", _photo_turns(rng, Image.open(record.path).convert("RGB"), record.label)))
    for _ in range(cfg.rejected):
        photo = Image.open(rng.choice(train_photos).path).convert("RGB")
        plans.append(("rejected_image", "train", [(rng.choice(PHOTO_QUESTIONS["overview"]), _unusable_image(rng, photo, non_fundus), "overview", None),
                                                  (rng.choice(AFTER_REFUSAL), None, "overview", None)]))
    for _ in range(cfg.text):
        turns = _text_turns(rng, knowledge)
        # Text questions split by wording, so no validation question was trained on verbatim.
        plans.append(("text", split_of(turns[0][0]), turns))
    seen, kinds = set(), Counter()
    with (cfg.out / "conversations.jsonl").open("w") as f:
        for kind, split, turns in tqdm(plans, desc="recording conversations", unit="conv"):
            example, why_not = run_conversation(settings, tools, turns)
            if example is None:
                kinds[f"{kind}/dropped: {why_not}"] += 1
                continue
            if (key := _key(example)) in seen:
                kinds[f"{kind}/duplicate"] += 1
                continue
            seen.add(key)
            kinds[f"{kind}/{split}"] += 1
            f.write(json.dumps({"kind": kind, "split": split, **example}) + "\n")
    intents = Counter()
    for line in (cfg.out / "conversations.jsonl").open():
        intents.update(json.loads(line)["intents"])
    qa = [row for record in records for row in visual_qa(rng, record, cfg.data, cfg.visual_qa_per_photo)]
    qa = list({(r["image"], r["question"]): r for r in qa}.values())
    with (cfg.out / "visual_qa.jsonl").open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in qa)
    sheet = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "conversations": dict(sorted(kinds.items())),
             "llm_steps_by_intent": dict(sorted(intents.items())),
             "visual_qa": dict(sorted(Counter(f"{r['label']}/{r['split']}" for r in qa).items())),
             "photographs_from": sorted({r.source for r in picked})}
    (cfg.out / "datasheet.json").write_text(json.dumps(sheet, indent=2) + "\n")
    return sheet


def cmd_data_build(args) -> None:
    sheet = build_instruction_data(DataConfig(data=Path(args.data), out=Path(args.out), photos=args.photos, rejected=args.rejected,
                                              text=args.text, seed=args.seed))
    print(json.dumps(sheet, indent=2))


def add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="build the instruction data the LLM and the fusion tokens learn from")
    sub = p.add_subparsers(dest="data_command", required=True)
    b = sub.add_parser("build", help="record tool-use conversations and visual Q&A from a data folder")
    b.add_argument("--data", required=True, help="a folder with the layout of ../shared/data")
    b.add_argument("--out", default="instructions", help="output folder (default ./instructions)")
    b.add_argument("--photos", type=int, default=240)
    b.add_argument("--rejected", type=int, default=40)
    b.add_argument("--text", type=int, default=320)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_data_build)
