"""What a sentence claims, in the languages OphGLM's users write: its subject and its polarity.

The grounding check (grounding.py) must not judge a sentence by the presence of a word:
"glaucoma is unlikely" denies what "glaucoma is likely" asserts, "there is no doubt this is
glaucoma" asserts it with certainty, "the blood supply is diabetic retinopathy" puts a disease
where a measurement belongs, and "see a doctor within weeks" states the urgency "soon"
without the word. This module reads those claims in English, Chinese, Spanish, German and
Hindi; the check decides what the tools support.
"""

from __future__ import annotations

import re

ABBREVIATIONS = {"DR": "diabetic_retinopathy"}  # matched case-sensitively ("Dr" is a doctor)
HEALTHY = re.compile(r"\b(healthy|normal|no referable disease|no disease|nothing wrong|no problems?|sano|gesund|unauffällig)\b"
                     r"|健康|正常|没有任何问题|स्वस्थ|सामान्य")
ABOUT_THE_PHOTO = re.compile(
    r"\b(this|the|your|my) (eye|eyes|photo|photograph|picture|image|fundus|retina|scan)\b|\b(your|the|all) results\b|\b(here|shows?|showing|consistent with|"
    r"suggests?|appears?|looks?|there is|there are|there's|seen|visible|present|detected|found|likely|unlikely|possible|probable|"
    r"probably|suspected|definitely|certain|certainly|clearly|no doubt|ruled? out|signs? of|evidence of)\b"
    r"|这|您的|你的|照片|图片|眼睛|眼底|视网膜|可能|肯定|看起来|显示|发现|迹象|征象|"
    r"\b(esta|este|foto|imagen|ojo|retina|probable|improbable|seguro|sin duda|hay|señales?)\b|"
    r"\b(dieses?|das auge|bild|foto|hier|wahrscheinlich|unwahrscheinlich|sicher|zweifel|anzeichen)\b"
    r"|यह|इस|आंख|आँख|तस्वीर|फोटो|संभावना|निश्चित", re.I)
# Narrower: the sentence points at this photograph (a lesion or sign "seen", "here", "in this eye").
PHOTO_DEIXIS = re.compile(r"\b(this|the|your|my) (eye|eyes|photo|photograph|picture|image|fundus|retina|scan)\b|\b(here|there is|"
                          r"the (neuroretinal rim|rim|optic disc|disc|macula|fovea) (is|has|shows)|"
                          r"there are|there's|(is|are|was|were) seen|visible|present|detected|found|counted)\b|这|照片|图片|图像|发现|可见|"
                          r"\b(hay|imagen|foto)\b|\b(bild|foto|hier|gefunden|sichtbar)\b|तस्वीर|फोटो|दिखाई", re.I)
# Affirming with certainty; affirming a possibility though a negation word appears; denying.
CERTAIN = re.compile(r"\b(definitely|certainly|clearly|undoubtedly|no doubt|without (a )?doubt|is certain|for sure|sin duda|seguro|"
                     r"definitivamente|eindeutig|zweifellos|kein zweifel|sicher)\b|肯定|毫无疑问|一定|确定|确诊|निश्चित|बिना किसी संदेह", re.I)
POSSIBLE_DESPITE_NEGATION = re.compile(r"can ?not be (ruled out|excluded)|can't be (ruled out|excluded)|not (be )?ruled out|"
                                       r"不能排除|无法排除|no se puede descartar|nicht ausgeschlossen|खारिज नहीं", re.I)
DENIAL = re.compile(r"\b(no|not|cannot|can't|isn't|aren't|doesn't|don't|didn't|wasn't|weren't|hasn't|haven't|without|unlikely|absent|"
                    r"rules? out|ruled out|none|never|zero|poco probable|improbable|ningún|ninguna|sin|nicht|kein|keine|keinen|"
                    r"unwahrscheinlich|ausgeschlossen)\b|没有|不是|并非|未见|未发现|未检出|无明显|排除|可能性(很|较)?小|可能性不大|不太可能|不像|"
                    r"नहीं|कोई\s*संभावना\s*नहीं|कम है", re.I)
# Where a measurement's value belongs: "the <measurement> is/shows <disease>" puts a disease there.
MEASUREMENT_SUBJECT = re.compile(
    r"(blood supply|blood flow|circulation|vessel density|vessels?|vascular\w*|cup[- ]to[- ]disc( ratio)?|\bcdr\b|\bcup\b|lesion count|"
    r"haemorrhage count|hemorrhage count|\w+ count|triage( level)?|urgency|intraocular pressure|\biop\b|thickness|densidad vascular|"
    r"gefäßdichte|cup-to-disc-verhältnis|血管密度|血供|杯盘比|分诊|रक्त-?\s*वाहिका घनत्व|कप-टू-डिस्क अनुपात)"
    r"([^.;:]{0,40}?\b(is|are|was|shows?|indicates?|means|equals|reads|es|ist|beträgt|zeigt)\b|\s*:)|"
    r"(血管密度|血供|杯盘比|分诊级别|分诊)(是|显示|为)|(कप-टू-डिस्क अनुपात|घनत्व)\s", re.I)
URGENCY_PHRASES = {
    "urgent": r"\burgent(ly)?\b|\bimmediately\b|\btoday\b|same[- ]day|\bemergency\b|\bcasualty\b|\ba&e\b|right away|straight away|"
              r"紧急|立即|马上|当天|今天|急诊|\burgente|\burgencias\b|\bhoy\b|inmediat\w+|\bdringend\b|\bsofort\b|\bheute\b|notaufnahme|"
              r"notfall|तुरंत|आज|आपातकाल\w*",
    "soon": r"\bsoon\b|within (a |the )?(few |two |2 |several |next few |coming )?weeks|几周内|数周内|\bpronto\b|semanas|\bbald\b|"
            r"(innerhalb|in) (von |der nächsten |weniger |einigen )?wochen|(कुछ|दो|अगले)\s*(\S+\s*)?(हफ़्त|हफ्त|सप्ताह)\w*",
    "routine": r"\broutine\b|next (regular |routine |planned |usual )?(screening|eye test|check|review|visit|appointment)|常规|例行|下次检查|"
               r"\brutina\w*|próxima revisión|routinemäßig|nächste\w* (vorsorge|kontrolle|untersuchung)|नियमित",
    "none": r"no (further )?(follow-up|referral|treatment|action|checks?|tests?|visits?)( is| are)? (needed|required|necessary)|"
            r"nothing (needs|to do)|"
            r"no need to (see|be seen|refer)|不需要转诊|无需转诊|无需就诊|不需要就诊|no hace falta\w*( ninguna)? derivación|no es necesari\w+ (derivar|una derivación)|"
            r"keine überweisung|कोई आवश्यकता नहीं",
}
URGENCY_PATTERNS = {level: re.compile(pattern, re.I) for level, pattern in URGENCY_PHRASES.items()}
NOT_URGENT = re.compile(r"\b(not|no|non)[- ](an? )?(urgent|emergency)\b|不紧急|no es urgente|nicht dringend|कोई जल्दी नहीं", re.I)
# A claim about the person or their photograph, not a general statement ("CRVO needs urgent referral").
ABOUT_THE_PERSON = re.compile(r"\b(you|your|this|these|the eye|the photo|please|go|see|arrange|needs? (to be )?(seen|assessed))\b"
                              r"|您|你|这|请|需要|必须|usted|tu|esta|este|hay que|sie|ihr|dieses?|आप|इस|यह|जाएं", re.I)
# A rule stated for anyone ("a sudden curtain over the vision needs urgent referral"), not this person's urgency.
GENERAL_RULE = re.compile(r"\b(if|when|whenever|anyone|someone|people|patients|sudden)\b|如果|出现|si |wenn|अगर", re.I)
NON_LATIN = re.compile(r"[\u4e00-\u9fff\u0900-\u097f]")
EXPANSIONS = {"ga": "geographic atrophy", "brvo": "branch retinal vein occlusion", "crvo": "central retinal vein occlusion",
              "prp": "panretinal photocoagulation", "ntg": "normal tension glaucoma", "cnv": "choroidal neovascularisation",
              "dme": "diabetic macular oedema", "oht": "ocular hypertension", "iop": "intraocular pressure",
              "poag": "primary open angle glaucoma", "amd": "age-related macular degeneration", "dr": "diabetic retinopathy",
              "oct": "optical coherence tomography", "rvo": "retinal vein occlusion", "npdr": "non-proliferative diabetic retinopathy",
              "pdr": "proliferative diabetic retinopathy", "vegf": "vascular endothelial growth factor"}
STOPWORDS = set("the a an is are was were be been of in on at to for with and or but by as this that these those it its from can may "
                "might will would should could do does did has have had not no your you their there here which who what when how than "
                "then so very more most less also about into over under only often usually some any each other such "
                # words too general to show a passage holds a claim
                "means mean disease diseases condition conditions eye eyes people patients person".split())


def content_words(text: str) -> list[str]:
    """The words that carry a statement's content, abbreviations spelt out ("GA" -> geographic atrophy)."""
    words = []
    for word in re.findall(r"[a-z][a-z-]+", text.lower()):
        words += EXPANSIONS[word].split() if word in EXPANSIONS else [word]
    return [w for w in words if w not in STOPWORDS and len(w) > 2]


def name_matches(name: str, text: str) -> bool:
    """A name in lower-cased text: on word boundaries, or anywhere for scripts without spaces between words."""
    if NON_LATIN.search(name):
        return name in text
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


def abbreviated_diseases(sentence: str) -> set[str]:
    return {d for abbreviation, d in ABBREVIATIONS.items() if re.search(rf"(?<![\w.]){abbreviation}(?!\w)", sentence)}


def is_about_the_photo(text: str) -> bool:
    return bool(ABOUT_THE_PHOTO.search(text))


def stance(text: str) -> str:
    """'certain', 'affirm' or 'deny': how the sentence holds the disease it names."""
    if CERTAIN.search(text):
        return "certain"
    if POSSIBLE_DESPITE_NEGATION.search(text):
        return "affirm"
    return "deny" if DENIAL.search(text) else "affirm"


def stated_urgency(text: str) -> set[str]:
    """The urgency levels a sentence states, by name or by time frame ('not urgent' states none of 'urgent')."""
    cleaned = NOT_URGENT.sub(" ", text)
    return {level for level, pattern in URGENCY_PATTERNS.items() if pattern.search(cleaned)}


def about_the_person(text: str) -> bool:
    return bool(ABOUT_THE_PERSON.search(text))


def measurement_complement(text: str) -> str:
    """What a sentence gives as a measurement's value ('The blood supply is <diabetic retinopathy>'), else ''."""
    match = MEASUREMENT_SUBJECT.search(text)
    if not match or re.search(r"\d", match.group(0)):  # "IOP above 21 mmHg is a risk factor for POAG": a threshold, not a value
        return ""
    complement = re.split(r"[.,;:(。，]", text[match.end():].lstrip(" :"))[0].lower()
    if re.search(r"\d", complement):
        return ""
    # The value stands right after the verb: "is glaucoma", not "is the most important risk factor for POAG".
    return complement if NON_LATIN.search(complement) else " ".join(complement.split()[:4])
