"""The `ophglm` command: chat, ask, analyze, demo-image, index, train, tools, serve.

Every failure a user can cause (a missing file, a text file named .jpg, a bad setting)
ends in one line naming the problem and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ophglm import DISCLAIMER, USER_ERRORS



def _settings(args):
    from ophglm.settings import load_settings

    settings = load_settings(args.config)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    return settings


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o)))


def cmd_analyze(args) -> None:
    from ophglm.agent.examination import examine
    from ophglm.session import Session
    from ophglm.tools.base import ToolError
    from ophglm.tools.registry import builtin_tools

    settings = _settings(args)
    session = Session()
    image_id = session.add_image_file(args.path)
    tools = {t.name: t for t in builtin_tools(settings)}
    examination = examine(session, image_id, tools)
    if examination.refusal:
        raise ValueError(f"{args.path} was not analysed: it is {examination.quality.verdict}")
    if not examination.accepted:  # a tool failed (the tool server down, say): say which, with its reason
        raise ValueError(f"{args.path} was not analysed: {next(s.summary for s in examination.steps if not s.ok)}")
    findings = {s.name: (s.findings if s.ok else {"error": s.summary}) for s in examination.steps}
    summaries = [s.summary for s in examination.steps]
    try:  # a finer measurement beyond the examination; its failure must not hide the others
        vessels = tools["measure_vessels"](session, image_id=image_id)
        findings["measure_vessels"], summaries = vessels.findings, summaries + [vessels.summary]
    except ToolError as err:
        findings["measure_vessels"], summaries = {"error": str(err)}, summaries + [str(err)]
    level = examination.triage
    overlay = None
    if args.overlay and "overlay" in findings.get("segment_lesions", {}):
        Path(args.overlay).write_bytes(bytes(session.artifacts[findings["segment_lesions"]["overlay"]]))
        overlay = str(args.overlay)
    if args.json:
        _print_json({"image": str(args.path), "image_id": image_id, "pipeline": [s.name for s in examination.steps],
                     "findings": findings, "triage": level, "overlay": overlay, "disclaimer": DISCLAIMER})
        return
    print(examination.statement())
    print("\n".join(summaries))
    if level:
        print(f"Triage: {level.level} ({level.reason})")
    if overlay:
        print(f"Overlay written to {overlay}")
    print(DISCLAIMER)


def _print_reply(reply) -> None:
    """The checked answer (what the reply holds, refusals included), then who did what."""
    print(reply.answer)
    for call in reply.tool_calls:
        print(f"  [{call.by}] {call.name}({', '.join(f'{k}={v!r}' for k, v in call.args.items())}){'' if call.ok else ' FAILED'}")
    if reply.triage:
        print(f"  [triage] {reply.triage.level}: {reply.triage.reason}")
    for citation in reply.citations:
        print(f"  [source] {citation['id']}: {citation['title']} - {citation['section']}")
    for part in reply.parts:
        if part.source == "removed":
            print(f"  [removed] {part.text} ({part.why})")
    if reply.fallback:
        print("  [note] none of the language model's sentences held: the answer is the tools' own words")
    for note in reply.notes:
        if not note.startswith("removed an unsupported statement"):
            print(f"  [note] {note}")
    print(f"  {reply.disclaimer}")


class _Progress:
    """While the model writes, a one-line token counter on stderr (a terminal only); it is erased before the answer."""

    def __init__(self):
        self.tokens = 0
        self.live = sys.stderr.isatty()

    def __call__(self, token: str) -> None:
        self.tokens += 1
        if self.live:
            print(f"\r(writing the answer: {self.tokens} tokens)", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.live and self.tokens:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def cmd_ask(args) -> None:
    from ophglm.agent.assistant import Assistant
    from ophglm.session import read_image_file

    # Decode first: a bad image fails fast, before the LLM loads, and is decoded only once.
    image = read_image_file(args.image)[0] if args.image else None
    assistant = Assistant(_settings(args))
    progress = _Progress()
    reply = assistant.ask(args.question, image=image, on_token=None if args.json else progress)
    progress.done()
    if args.json:
        _print_json(reply.to_dict())
    else:
        _print_reply(reply)


def cmd_chat(args) -> None:
    from ophglm.agent.assistant import Assistant

    assistant = Assistant(_settings(args))
    image = args.image
    print("OphGLM chat. Type a question; '/image PATH' attaches a photograph; '/quit' ends.")
    print(DISCLAIMER)
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line.startswith("/image "):
            image = line.removeprefix("/image ").strip()
            print(f"(the next question will attach {image})")
            continue
        if not line:
            continue
        progress = _Progress()
        try:
            reply = assistant.ask(line, image=image, on_token=progress)
        except USER_ERRORS as err:
            progress.done()
            print(f"error: {err}")
            continue
        finally:
            image = None
        progress.done()
        print("ophglm> ", end="")
        _print_reply(reply)


def cmd_demo_image(args) -> None:
    from ophglm.tools.synthetic_fundus import make_synthetic_fundus

    fundus = make_synthetic_fundus(size=args.size, seed=args.seed, lesions=not args.healthy)
    fundus.image.save(args.out)
    counts = {k: int(sum(1 for l in fundus.lesions if l["kind"] == k)) for k in ("MA", "HE", "EX", "SE")}
    print(f"wrote {args.out}: synthetic fundus, seed {args.seed}, planted lesions {counts}")


def cmd_index_build(args) -> None:
    from ophglm.knowledge.index import KnowledgeIndex

    settings = _settings(args)
    index = KnowledgeIndex(settings)
    count = index.build(force=args.force)
    where = settings.chroma_url or settings.chroma_folder
    print(f"knowledge index {index.name}: {count} chunks from {len({c.doc_id for c in index.chunks})} documents at {where}")


def cmd_tools_list(args) -> None:
    from ophglm.tools.registry import load_tools

    for tool in load_tools(_settings(args)).values():
        print(f"{tool.name}: {tool.description}\n  inputs: {json.dumps(tool.inputs.model_json_schema().get('properties', {}))}")


def cmd_train(args) -> None:
    from dataclasses import fields

    if args.model == "classifier":
        from ophglm.finetune.train_classifier import ClassifierConfig as Config, train_classifier as train
    else:
        from ophglm.finetune.train_segmenter import SegmenterConfig as Config, train_segmenter as train
    names = {f.name for f in fields(Config)}
    config = Config(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    if not Path(config.data).is_dir():
        raise FileNotFoundError(f"data folder not found: {config.data}")
    _print_json(train(config))


def cmd_tools_serve(args) -> None:
    from ophglm.tools.tool_server import serve

    serve(_settings(args), host=args.host, port=args.port, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)


def cmd_mcp(args) -> None:
    from ophglm.tools.mcp_server import serve
    from ophglm.tools.registry import load_tools

    settings = _settings(args)
    serve(load_tools(settings), settings, http_port=args.http)


def cmd_serve(args) -> None:
    from ophglm.server import serve

    serve(_settings(args), host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ophglm", description="Ophthalmic language-and-vision assistant (offline, CPU by default).")
    parser.add_argument("--config", help="settings TOML file (else $OPHGLM_CONFIG); OPHGLM_* variables override it")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="run the vision tools on one photograph (no LLM)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--overlay", metavar="OUT.png", help="write the lesion overlay here")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("ask", help="one question (optionally about a photograph), one checked answer")
    p.add_argument("question")
    p.add_argument("--image", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", help="multi-turn conversation in the terminal")
    p.add_argument("--image", metavar="PATH")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo-image", help="write a synthetic fundus photograph with planted lesions")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=768)
    p.add_argument("--healthy", action="store_true", help="no lesions")
    p.set_defaults(func=cmd_demo_image)

    p = sub.add_parser("index", help="the knowledge index")
    index_sub = p.add_subparsers(dest="action", required=True)
    b = index_sub.add_parser("build", help="embed the corpus into Chroma (skipped when up to date)")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.set_defaults(func=cmd_index_build)

    from ophglm.knowledge.evaluate import add_eval_retrieval_parser

    p = sub.add_parser("eval", help="measure OphGLM's parts")
    from ophglm.finetune.evaluate_vision import add_eval_vision_parser

    eval_sub = p.add_subparsers(dest="action", required=True)
    add_eval_retrieval_parser(eval_sub)
    add_eval_vision_parser(eval_sub)
    from ophglm.finetune.evaluate_agent import add_eval_agent_parser

    add_eval_agent_parser(eval_sub)
    from ophglm.finetune.evaluate_grounding import add_eval_grounding_parser

    add_eval_grounding_parser(eval_sub)

    p = sub.add_parser("tools", help="the tool registry")
    tools_sub = p.add_subparsers(dest="action", required=True)
    tools_sub.add_parser("list", help="list every tool the agent can call").set_defaults(func=cmd_tools_list)
    t = tools_sub.add_parser("serve", help="host the vision tools over HTTP with dynamic batching (agents use it through OPHGLM_TOOLS_URL)")
    t.add_argument("--host", default="127.0.0.1", help="beyond loopback only with OPHGLM_API_KEY set")
    t.add_argument("--port", type=int, default=8100)
    t.add_argument("--max-batch-size", type=int, default=8, help="most concurrent calls run together")
    t.add_argument("--batch-timeout", type=float, default=0.01, help="seconds a call waits for others to batch with")
    t.set_defaults(func=cmd_tools_serve)

    p = sub.add_parser("mcp", help="serve OphGLM's tools to MCP clients (stdio; --http PORT for streamable HTTP on loopback)")
    p.add_argument("--http", type=int, metavar="PORT", help="streamable HTTP at http://127.0.0.1:PORT/mcp instead of stdio")
    p.set_defaults(func=cmd_mcp)

    p = sub.add_parser("serve", help="HTTP API (OpenAPI docs at /docs) and the web page at /")
    p.add_argument("--host", default="127.0.0.1", help="beyond loopback only with OPHGLM_API_KEY set")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="train a model (vision tools, the LLM's LoRA adapter, the fusion projector)")
    train_sub = p.add_subparsers(dest="model", required=True)
    for model in ("classifier", "segmenter"):
        t = train_sub.add_parser(model, help=f"train the {model} on a data folder laid out like ../shared/data")
        t.add_argument("--data", default="../shared/data")
        t.add_argument("--out", help="weights file (default: the packaged weights under tools/weights/)")
        t.add_argument("--minutes", type=float, help="training time budget")
        t.add_argument("--threads", type=int)
        t.add_argument("--lr", type=float, help="peak learning rate")
        if model == "classifier":
            t.add_argument("--backbone", help="efficientnet_lite0 | convnext_atto | convnext_nano | convnext_tiny")
            t.add_argument("--pretrained", help="imagenet (packaged Lite0), '' (scratch) or a checkpoint path")
            t.add_argument("--image-size", type=int, help="input side in pixels (default 224; larger helps glaucoma, costs time)")
        else:
            t.add_argument("--encoder", help="tu-efficientnet_lite0 | tu-convnext_atto")
            t.add_argument("--init", help="continue training from this weights file")
            t.add_argument("--task", choices=["lesions", "disc_cup", "vessels"], help="which Unet (default lesions)")
            t.add_argument("--negative-share", type=float, help="share of each batch cropped from normal photographs (lesions; default 0.25, 0 for none)")
            t.add_argument("--image-size", type=int, help="fundus-square side the tool segments at (default: lesions and vessels 512, disc_cup 256; above 1024 the tool tiles)")
            t.add_argument("--crop", type=int, help="training crop side at that size (default 256); scale it with --image-size to keep the context")
            t.add_argument("--batch-size", type=int, help="crops per step (default 8)")
            t.add_argument("--zoom", type=float, help="scale jitter: crops span crop/(1+zoom) to crop*(1+zoom) px, resized (default 0)")
        t.set_defaults(func=cmd_train)
    from ophglm.finetune.fusion import add_fusion_parsers
    from ophglm.finetune.train_llm import add_train_llm_parser

    add_train_llm_parser(train_sub)
    add_fusion_parsers(train_sub, eval_sub)

    from ophglm.finetune.instruction_data import add_data_parser

    add_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub lookup
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"ophglm: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
