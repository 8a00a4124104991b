"""The `ophglm` command as a new user meets it: real subprocesses, real weights, real Chroma."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image


def ophglm(*args, env_extra=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "ophglm.cli", *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def chroma_env(settings):
    # A short answer is enough to test the whole path; every generated token costs CPU time.
    return {"OPHGLM_CHROMA_PATH": str(settings.chroma_folder), "OPHGLM_LLM_MAX_NEW_TOKENS": "48"}


def test_demo_image_then_analyze_json_with_overlay(tmp_path):
    image, overlay = tmp_path / "eye.png", tmp_path / "overlay.png"
    made = ophglm("demo-image", str(image), "--seed", "4")
    assert made.returncode == 0, made.stderr
    assert "planted lesions" in made.stdout and Image.open(image).size == (768, 768)
    run = ophglm("analyze", str(image), "--json", "--overlay", str(overlay))
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    probs = out["findings"]["classify_fundus"]["probabilities"]
    assert len(probs) >= 5 and all(p["unit"] == "probability" for p in probs.values())
    he = out["findings"]["segment_lesions"]["lesions"]["HE"]
    assert he["count"]["unit"] == "lesions" and he["area"]["unit"] == "% of field of view"
    assert out["triage"]["level"] in ("urgent", "soon", "routine", "none")
    assert "not a diagnosis" in out["disclaimer"]
    assert Image.open(overlay).format == "PNG"


@pytest.mark.parametrize("content, message", [
    (b"just some notes, not a photo", "is not an image file"),
    (b"", "is empty (0 bytes)"),
    (None, "no such file"),
])
def test_analyze_bad_input_is_one_line_and_nonzero(tmp_path, content, message):
    path = tmp_path / "photo.jpg"
    if content is not None:
        path.write_bytes(content)
    run = ophglm("analyze", str(path))
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and message in run.stderr and "Traceback" not in run.stderr
    assert run.stderr.startswith("ophglm: error:")


def test_bad_setting_is_one_line(tmp_path):
    run = ophglm("tools", "list", env_extra={"OPHGLM_LLM_BACKEND": "gpt5"})
    assert run.returncode == 2 and "llm_backend must be one of" in run.stderr and "Traceback" not in run.stderr


def test_tools_list_and_index_build(chroma_env):
    listed = ophglm("tools", "list")
    assert listed.returncode == 0
    for name in ("classify_fundus", "segment_lesions", "search_knowledge"):
        assert name in listed.stdout
    built = ophglm("index", "build", env_extra=chroma_env)
    assert built.returncode == 0, built.stderr
    assert "chunks from" in built.stdout


@pytest.mark.llm
def test_ask_text_question_with_the_packaged_llm(chroma_env):
    run = ophglm("ask", "What are the symptoms of glaucoma?", "--json", env_extra=chroma_env)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["answer"]
    assert out["citations"] and all("#" in c["id"] and c["section"] for c in out["citations"])
    assert any("glaucoma" in c["doc_id"] for c in out["citations"])
    assert [c["name"] for c in out["tool_calls"]] [:1] == ["search_knowledge"]
    assert "not a diagnosis" in out["disclaimer"]


@pytest.mark.llm
def test_ask_about_a_photograph_with_the_packaged_llm(chroma_env, demo_fundus_path):
    run = ophglm("ask", "Is something wrong with this eye?", "--image", str(demo_fundus_path), "--json", env_extra=chroma_env)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert [c["name"] for c in out["tool_calls"]][:4] == ["assess_quality", "classify_fundus", "segment_lesions", "measure_optic_disc"]
    assert all(c["by"] == "pipeline" for c in out["tool_calls"][:5])
    assert out["parts"] and {p["source"] for p in out["parts"]} <= {"model", "removed", "added"} and isinstance(out["fallback"], bool)
    assert {"classify_fundus", "segment_lesions", "measure_optic_disc"} <= set(out["findings"])
    assert out["refused"] is False and out["refusal_reason"] == ""
    assert out["triage"]["level"] in ("urgent", "soon", "routine", "none") and out["triage"]["reason"]
    assert out["answer"] and "not a diagnosis" in out["disclaimer"]
    # everything a caller needs to audit the turn: arguments, results, passages, timings
    assert all(c["args"].get("image_id", "").startswith("img-") for c in out["tool_calls"][:4])
    assert all(c["text"] for c in out["citations"])
    assert out["timings"]["turn_s"] >= out["timings"]["llm_s"] > 0 and out["timings"]["llm_calls"] >= 1
    assert all(c["seconds"] >= 0 for c in out["tool_calls"]) and sum(c["seconds"] for c in out["tool_calls"]) > 0


def test_ask_prints_the_checked_answer_and_a_refusal_too(chroma_env):
    from ophglm.agent.routers import OUT_OF_SCOPE

    run = ophglm("ask", "How do I bake sourdough bread?", env_extra=chroma_env)
    assert run.returncode == 0, run.stderr[-2000:]
    # what stays on screen is the reply's answer (here the off-topic gate's refusal), then who did what
    assert run.stdout.startswith(OUT_OF_SCOPE) and "[pipeline] search_knowledge(" in run.stdout
