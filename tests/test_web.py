"""The web page end to end: Debian's chromium, headless through Playwright, against a live server.

Skips only when chromium or playwright is missing (`apt-get install -y chromium`,
`pip install playwright`; Playwright's own browser downloads are never used).
"""

import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from ophglm.server import create_app
from server_support import real_tools, running_server, scripted_factory, server_settings

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium): web page test skipped", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright): web page test skipped")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path("/tmp/ophglm_web.png")


@pytest.fixture
def page(settings, knowledge_index, tmp_path):
    """A fresh chromium profile on a page of a live server; records console errors and any off-host request."""
    settings = server_settings(settings)
    app = create_app(settings, assistant_factory=scripted_factory(settings, real_tools(settings, knowledge_index), token_delay=0.03))
    with running_server(app) as url, sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(tmp_path / "profile", executable_path=CHROMIUM, headless=True, args=ARGS)
        page = context.pages[0] if context.pages else context.new_page()
        page.problems = []
        page.on("console", lambda message: message.type == "error" and page.problems.append(message.text))
        page.on("request", lambda request: urlparse(request.url).hostname not in ("127.0.0.1", None) and page.problems.append(f"off-host request {request.url}"))
        page.goto(url)
        try:
            yield page
        finally:
            context.close()


def test_photo_question_streams_into_the_page(page, demo_fundus_path, tmp_path):
    expect = sync_api.expect
    expect(page.locator("#disclaimer")).to_contain_text("not a diagnosis")
    page.set_input_files("#photo", str(demo_fundus_path))
    expect(page.locator("#preview")).to_be_visible()
    page.fill("#question", "Is something wrong with this eye?")
    page.click("#send")

    bot = page.locator(".msg.bot").last
    expect(bot.locator(".answer")).not_to_be_empty(timeout=30_000)
    assert bot.get_attribute("data-state") == "streaming", "the answer shows while it is still being written"
    expect(bot).to_have_attribute("data-state", "done", timeout=30_000)

    tools = bot.locator(".tools li")
    expect(tools).to_have_count(6)
    assert sorted(item.get_attribute("data-tool") for item in tools.all()) == [
        "assess_quality", "classify_fundus", "measure_optic_disc", "search_knowledge", "segment_lesions", "triage_findings"]
    assert {item.get_attribute("data-status") for item in tools.all()} == {"ok"}
    assert {item.get_attribute("data-by") for item in tools.all()} == {"pipeline"}  # the examination and the router
    expect(bot.locator(".answer")).to_contain_text("probability of")

    findings = page.locator("#findings tbody")
    expect(findings).to_contain_text("diabetic retinopathy")
    expect(findings).to_contain_text("probability")
    expect(findings).to_contain_text("haemorrhages: count")
    expect(findings).to_contain_text("% of field of view")
    expect(findings).to_contain_text("vertical cdr")

    expect(page.locator("#overlay")).to_be_visible()
    assert page.eval_on_selector("#overlay", "img => img.naturalWidth") > 0
    triage = page.locator("#triage")
    assert triage.get_attribute("data-level") in ("urgent", "soon", "routine", "none")
    assert len(triage.locator(".reason").inner_text()) > 10

    citation = bot.locator(".citations li").first
    expect(citation.locator("blockquote")).to_be_hidden()
    citation.locator("button").click()
    expect(citation.locator("blockquote")).to_be_visible()
    assert len(citation.locator("blockquote").inner_text()) > 100

    page.evaluate("window.scrollTo(0, 0)")  # the sticky header belongs at the top of a full-page picture
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    notes = tmp_path / "notes.png"
    notes.write_text("not a photograph")
    page.set_input_files("#photo", str(notes))
    page.fill("#question", "And this one?")
    page.click("#send")
    expect(page.locator(".msg.bot").last.locator(".error")).to_contain_text("415: the photograph is not an image file")

    expect(page.locator("#disclaimer")).to_be_in_viewport()
    assert [p for p in page.problems if "415" not in p] == [], "no console errors and nothing fetched from elsewhere"
