"""Reliability benchmark: bad inputs and a concurrent load against a real `ophglm serve` on loopback.

    python benchmarks/reliability.py                          # 20 sessions, 200 turns
    python benchmarks/reliability.py --sessions 40 --turns 400 --json
    python benchmarks/reliability.py --llm-base-url http://127.0.0.1:8001/v1   # a served LLM instead of the stub

The server is the real command (`python -m ophglm.cli serve`) in its own process, with the
vision tools and the knowledge index as configured (OPHGLM_* variables), conversations in
a temporary SQLite file, and the LLM behind its OpenAI-compatible backend: by default a
stub in this process that answers at once, citing the first passage the knowledge search
returned, so the figures are the server's own cost (tools, retrieval, agent loop, storage),
not an LLM's.

1. Bad inputs: every case of tests/bad_input_cases.py (damaged, mislabelled, tiny, huge,
   non-fundus and unusually encoded images, malformed bodies), each in a new session and
   followed by a plain question there. A 5xx, an "internal error" event, a dropped
   connection or a dead server is a crash; a 4xx or a refused reply is a refusal, counted
   by its reason.
2. Load: --sessions concurrent sessions share --turns turns, text questions and every
   --photo-every'th turn a synthetic fundus photograph. Per turn: the latency to the `done`
   event. Afterwards the server is stopped and each session's stored history is compared
   with what it sent (lost sessions, lost questions, missing answers). The server's
   resident memory (VmRSS) is sampled as turns complete.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the bad-input cases live with their tests

import httpx  # noqa: E402

from bad_input_cases import CASES, MALFORMED_BODIES, USABLE  # noqa: E402
from ophglm.tools.synthetic_fundus import make_synthetic_fundus  # noqa: E402

START_TIMEOUT_S = 120
TURN_TIMEOUT_S = 300
TOPICS = ("glaucoma", "cataract", "diabetic retinopathy", "macular degeneration", "retinal detachment", "papilloedema",
          "hypertensive retinopathy", "retinal vein occlusion", "uveitis", "myopia")
CITATION = re.compile(r"\[([a-z0-9_]+#[a-z0-9-]+)\]")


class StubLLM(BaseHTTPRequestHandler):
    """/v1/chat/completions as vLLM answers it (streamed or not): one short sentence citing a retrieved passage."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        tool_text = " ".join(m.get("content") or "" for m in body["messages"] if m.get("role") == "tool")
        cited = CITATION.findall(tool_text)
        text = f"This is described in the knowledge base [{cited[-1]}]." if cited else "I do not know."
        head = {"id": "stub", "created": 0, "model": body["model"]}
        if body.get("stream"):
            chunks = [{**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]},
                      {**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
            data, kind = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n", "text/event-stream"
        else:
            data = json.dumps({**head, "object": "chat.completion", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}).encode()
            kind = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kib / 1024


def parse_events(body: str) -> list[tuple[str, object]]:
    events = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append((fields["event"], json.loads(fields.get("data", "null"))))
    return events


class Server:
    """`ophglm serve` in a child process on a free loopback port."""

    def __init__(self, llm_base_url: str, database: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OPHGLM_LLM_BACKEND": "openai", "OPHGLM_LLM_BASE_URL": llm_base_url, "OPHGLM_SESSIONS_DB": str(database)}
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "ophglm.cli", "serve", "--port", str(self.port)],
                                            env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ophglm serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.25)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def post_turn(http: httpx.Client, session_id: str, text: str, upload: tuple | None = None) -> tuple[int, list, str]:
    """(status, events, detail) of one message; status 0 when the connection failed."""
    try:
        response = http.post(f"/v1/sessions/{session_id}/messages", data={"text": text}, files={"image": upload} if upload else None)
    except httpx.HTTPError as err:
        return 0, [], f"{type(err).__name__}: {err}"
    if response.status_code != 200:
        try:
            return response.status_code, [], str(response.json().get("detail", response.text))
        except ValueError:
            return response.status_code, [], response.text[:200]
    return 200, parse_events(response.text), ""


def reason_of(message: str) -> str:
    """A refusal's reason without the parts that differ per case (sizes, names), for counting."""
    message = re.sub(r"\d[\d,]*", "N", message.removeprefix("I cannot assess this image: it is "))
    return message if len(message) <= 80 else message[:77] + "..."


def bad_inputs(server: Server) -> dict:
    crashes, refusals, examined, broken_sessions, unexpected = [], Counter(), 0, [], []
    with httpx.Client(base_url=server.url, timeout=TURN_TIMEOUT_S) as http:
        def new_session() -> str:
            return http.post("/v1/sessions").json()["session_id"]

        uploads = [(name, data, expected) for name, (data, expected, _) in sorted(CASES.items())]
        uploads += [(name, data, 200) for name, data in sorted(USABLE.items())]
        for name, data, expected in uploads:
            session_id = new_session()
            status, events, detail = post_turn(http, session_id, "Is this eye healthy?", (name, data, "application/octet-stream"))
            done = dict(events).get("done")
            error = dict(events).get("error")
            if status == 0 or status >= 500 or not server.alive() or (error and "internal error" in error["message"]):
                crashes.append(f"{name}: {detail or error or status}")
                if not server.alive():
                    break
                continue
            if status != 200:
                refusals[f"{status} {reason_of(detail)}"] += 1
            elif error:
                refusals[f"error event: {reason_of(error['message'])}"] += 1
            elif done and done["refused"]:
                refusals[f"200 refused: {reason_of(done['refusal_reason'])}"] += 1
            else:
                examined += 1
            if expected is not None and status != expected:
                unexpected.append(f"{name}: {status}, expected {expected}")
            status, events, _ = post_turn(http, session_id, "What is glaucoma?")
            if status != 200 or not events or events[-1][0] != "done":
                broken_sessions.append(name)
        for body, content_type, expected in MALFORMED_BODIES if server.alive() else []:
            session_id = new_session()
            try:
                response = http.post(f"/v1/sessions/{session_id}/messages", content=body, headers={"content-type": content_type})
                status, detail = response.status_code, response.json().get("detail", "")
            except (httpx.HTTPError, ValueError) as err:
                status, detail = 0, str(err)
            if status == 0 or status >= 500:
                crashes.append(f"malformed {content_type}: {detail or status}")
                continue
            refusals[f"{status} {reason_of(str(detail))}"] += 1
            if status != expected:
                unexpected.append(f"malformed {content_type}: {status}, expected {expected}")
    tried = len(CASES) + len(USABLE) + len(MALFORMED_BODIES)
    return {"cases": tried, "crashes": len(crashes), "crash_cases": crashes, "refused": sum(refusals.values()), "examined": examined,
            "refusal_reasons": dict(refusals.most_common()), "follow_up_failed": broken_sessions, "unexpected_status": unexpected,
            "server_alive": server.alive()}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(server: Server, sessions: int, turns: int, photo_every: int) -> dict:
    photos = [make_synthetic_fundus(512, seed=seed).image for seed in range(8)]
    encoded = []
    for image in photos:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    per_session = [turns // sessions + (i < turns % sessions) for i in range(sessions)]
    lock = threading.Lock()
    done_turns = [0]
    samples: list[tuple[int, float]] = [(0, rss_mib(server.process.pid))]
    sample_every = max(1, turns // 40)

    def converse(number: int) -> dict:
        record = {"session_id": None, "sent": [], "latencies": [], "photo_latencies": [], "errors": []}
        with httpx.Client(base_url=server.url, timeout=TURN_TIMEOUT_S) as http:
            try:
                record["session_id"] = http.post("/v1/sessions").json()["session_id"]
            except (httpx.HTTPError, ValueError) as err:
                record["errors"].append(f"create: {err}")
                return record
            for turn in range(per_session[number]):
                # Sessions advance in step, so number the turns round by round, and shift by the round,
                # so that each round a different session sends the photograph: photographs spread out in time.
                global_turn = turn * sessions + number
                photo = (global_turn + turn) % photo_every == photo_every - 1
                text = f"Session {number}, turn {turn}: what are the signs of {TOPICS[(number + turn) % len(TOPICS)]}?"
                upload = ("eye.png", encoded[global_turn % len(encoded)], "image/png") if photo else None
                start = time.perf_counter()
                status, events, detail = post_turn(http, record["session_id"], text, upload)
                elapsed = time.perf_counter() - start
                record["sent"].append(text)
                kinds = [e for e, _ in events]
                if status != 200 or "error" in kinds or not kinds or kinds[-1] != "done":
                    record["errors"].append(f"turn {turn}: {status} {detail or dict(events).get('error')}")
                else:
                    (record["photo_latencies"] if photo else record["latencies"]).append(elapsed)
                with lock:
                    done_turns[0] += 1
                    if done_turns[0] % sample_every == 0 and server.alive():
                        samples.append((done_turns[0], rss_mib(server.process.pid)))
        return record

    start = time.perf_counter()
    with ThreadPoolExecutor(sessions) as pool:
        records = list(pool.map(converse, range(sessions)))
    wall = time.perf_counter() - start
    if server.alive() and samples[-1][0] != done_turns[0]:
        samples.append((done_turns[0], rss_mib(server.process.pid)))
    return {"records": records, "wall_s": wall, "rss_samples": samples}


def stored_histories(database: Path, session_ids: list[str]) -> dict[str, tuple[list[str], int]]:
    """Each session's questions and number of final answers, as the server's SQLite file holds them."""
    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.checkpoint.sqlite import SqliteSaver

    saver = SqliteSaver(sqlite3.connect(database))
    found = {}
    for session_id in session_ids:
        saved = saver.get_tuple({"configurable": {"thread_id": session_id}})
        messages = saved.checkpoint["channel_values"].get("messages", []) if saved else []
        found[session_id] = ([m.additional_kwargs.get("question") for m in messages if isinstance(m, HumanMessage)],
                             sum(isinstance(m, AIMessage) and not m.tool_calls for m in messages))
    return found


def summarise_load(run: dict, database: Path) -> dict:
    records = run["records"]
    stored = stored_histories(database, [r["session_id"] for r in records if r["session_id"]])
    lost_sessions = sum(1 for r in records if not r["session_id"] or (r["sent"] and not stored[r["session_id"]][0]))
    lost_messages = missing_answers = out_of_order = 0
    for r in records:
        if not r["session_id"]:
            continue
        questions, answers = stored[r["session_id"]]
        lost_messages += sum(1 for text in r["sent"] if text not in questions)
        out_of_order += questions != r["sent"] and set(questions) == set(r["sent"])
        missing_answers += max(0, len(r["sent"]) - answers)
    text = [x for r in records for x in r["latencies"]]
    photo = [x for r in records for x in r["photo_latencies"]]
    every = text + photo
    samples = run["rss_samples"]
    def growth(part: list) -> float:  # least-squares MiB per 100 turns
        return round(100 * statistics.linear_regression(*zip(*part)).slope, 2) if len({t for t, _ in part}) > 1 else 0.0

    return {
        "sessions": len(records), "turns": sum(len(r["sent"]) for r in records), "photo_turns": len(photo), "wall_s": round(run["wall_s"], 1),
        "turns_per_s": round(len(every) / run["wall_s"], 2) if run["wall_s"] else 0.0,
        "errors": sum(len(r["errors"]) for r in records), "error_examples": [e for r in records for e in r["errors"]][:5],
        "lost_sessions": lost_sessions, "lost_messages": lost_messages, "missing_answers": missing_answers, "out_of_order_sessions": out_of_order,
        "latency_s": {kind: {"p50": round(percentile(values, 0.5), 3), "p95": round(percentile(values, 0.95), 3), "n": len(values)}
                      for kind, values in (("all", every), ("text", text), ("photo", photo))},
        "rss_mib": {"first": round(samples[0][1], 1), "last": round(samples[-1][1], 1), "max": round(max(m for _, m in samples), 1),
                    "growth_per_100_turns": growth(samples), "growth_per_100_turns_second_half": growth(samples[len(samples) // 2:]),
                    "samples": len(samples),
                    "by_turn": [[t, round(m, 1)] for t, m in samples]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20, help="concurrent sessions in the load run")
    parser.add_argument("--turns", type=int, default=200, help="turns in all, shared by the sessions")
    parser.add_argument("--photo-every", type=int, default=20, help="every Nth turn sends a photograph")
    parser.add_argument("--llm-base-url", help="an OpenAI-compatible server to use instead of the built-in stub")
    parser.add_argument("--skip-bad-inputs", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.sessions < 1 or args.turns < args.sessions or args.photo_every < 1:
        parser.error("need --sessions >= 1, --turns >= --sessions and --photo-every >= 1")

    stub = None
    if not args.llm_base_url:
        stub = ThreadingHTTPServer(("127.0.0.1", 0), StubLLM)
        threading.Thread(target=stub.serve_forever, daemon=True).start()
    llm_url = args.llm_base_url or f"http://127.0.0.1:{stub.server_address[1]}/v1"
    with tempfile.TemporaryDirectory(prefix="ophglm-reliability-") as folder:
        database, log = Path(folder) / "sessions.sqlite", Path(folder) / "server.log"
        started = time.perf_counter()
        server = Server(llm_url, database, log)
        try:
            # Warm-up, not timed: the first session loads the tools, the first turns build or open the index.
            with httpx.Client(base_url=server.url, timeout=TURN_TIMEOUT_S) as http:
                warm = http.post("/v1/sessions").json()["session_id"]
                post_turn(http, warm, "What is glaucoma?")
                post_turn(http, warm, "Is something wrong with this eye?", ("eye.jpg", USABLE["progressive.jpg"], "image/jpeg"))
            ready_s = time.perf_counter() - started
            report = {"llm": "stub (answers at once)" if stub else args.llm_base_url, "cpus": os.cpu_count(), "ready_s": round(ready_s, 1)}
            report["bad_inputs"] = None if args.skip_bad_inputs else bad_inputs(server)
            run = load(server, args.sessions, args.turns, args.photo_every) if server.alive() else None
        finally:
            server.stop()
            if stub:
                stub.shutdown()
        report["server_exit"] = server.process.returncode
        report["load"] = summarise_load(run, database) if run else None
        if not run:
            report["server_log_tail"] = log.read_text()[-2000:]

    bad, loaded = report["bad_inputs"], report["load"]
    failed = (bad and (bad["crashes"] or bad["follow_up_failed"])) or not loaded or loaded["errors"] or loaded["lost_sessions"] or loaded["lost_messages"] or loaded["missing_answers"] or loaded["out_of_order_sessions"]
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if failed else 0
    print(f"ophglm serve on loopback, LLM: {report['llm']}, {report['cpus']} CPUs, ready (tools, index, first photo) in {report['ready_s']} s")
    if bad:
        print(f"\nbad inputs: {bad['cases']} cases, {bad['crashes']} crashes, {bad['refused']} refused, {bad['examined']} examined, "
              f"{len(bad['follow_up_failed'])} sessions broken afterwards, {len(bad['unexpected_status'])} unexpected statuses")
        for line in bad["crash_cases"] + bad["unexpected_status"]:
            print(f"  ! {line}")
        print(f"  {'refusals':>8}  reason")
        for reason, count in bad["refusal_reasons"].items():
            print(f"  {count:>8}  {reason}")
    if loaded:
        lat, rss = loaded["latency_s"], loaded["rss_mib"]
        print(f"\nload: {loaded['sessions']} concurrent sessions, {loaded['turns']} turns ({loaded['photo_turns']} with a photograph) "
              f"in {loaded['wall_s']} s, {loaded['turns_per_s']} turns/s")
        print(f"  errors {loaded['errors']}, lost sessions {loaded['lost_sessions']}, lost messages {loaded['lost_messages']}, "
              f"missing answers {loaded['missing_answers']}, sessions out of order {loaded['out_of_order_sessions']}")
        for line in loaded["error_examples"]:
            print(f"  ! {line}")
        print(f"  {'latency':<8} {'p50 s':>7} {'p95 s':>7} {'n':>5}")
        for kind, row in lat.items():
            print(f"  {kind:<8} {row['p50']:>7.3f} {row['p95']:>7.3f} {row['n']:>5}")
        print(f"  server RSS MiB: first {rss['first']}, last {rss['last']}, max {rss['max']}, "
              f"growth per 100 turns {rss['growth_per_100_turns']} ({rss['growth_per_100_turns_second_half']} over the second half; {rss['samples']} samples)")
    else:
        print(f"\nload: not run, the server died (exit {report['server_exit']}):\n{report.get('server_log_tail', '')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
