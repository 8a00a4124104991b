"""Routers: pipeline steps that make a call in the model's stead, switched by `settings.routers`.

The small shipped model never learnt two decisions well: to call `measure_vessels` when a
question is about the vessels, and to look knowledge up. A router makes such a call by
rule, before the model speaks; it is reported as a pipeline step (never as the model's
call), and `ophglm eval agent --routers ""` measures what the model does without it.
- "vessels": a question naming the vessels (in any of the user languages below) measures
  them on the conversation's latest examined photograph.
- "knowledge": every question is looked up; a text question the knowledge base has nothing
  on, in a conversation without photographs, is refused without the model (the off-topic gate).
"""

from __future__ import annotations

import re

from ophglm.tools.classify_fundus import LABELS

VESSEL_WORDS = re.compile(
    r"\b(blood vessels?|vessels?|vascular\w*|vasculature|arter(y|ies|ial|ioles?)|veins?|venous|venules?|"
    r"blood supply|blood flow|circulation|perfusion|vasos?|arterias?|venas?|vascular|arterien|venen|"
    r"durchblutung|blutversorgung)\b|\w*gef(ä|ae)(ss|ß)\w*"
    r"|血管|动脉|静脉|血供|供血|血流|循环|रक्त\s*वाहिका\w*|वाहिका\w*|धमनी\w*|नस(ें|ों)?|शिरा\w*|रक्त\s*प्रवाह|रक्त\s*संचार",
    re.I)
OUT_OF_SCOPE = ("I can only help with questions about the eyes and with colour fundus photographs, "
                "and the knowledge base has nothing on this question.")


def asks_about_vessels(question: str) -> bool:
    return bool(VESSEL_WORDS.search(question))


def knowledge_query(question: str, most_likely: str | None) -> str:
    """The router's search: the question, led by the examined photograph's most likely class."""
    if most_likely:
        return f"{LABELS.get(most_likely, most_likely)}: signs and referral urgency. {question}"[:500]
    return question[:500]
