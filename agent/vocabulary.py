"""The words an answer names things with: diseases, measured quantities and clinical signs.

The grounding check (grounding.py) and the claim reader (claims.py) share this vocabulary:
what a number can be a figure of, which disease a sentence names in any user language, which
signs a tool result or a passage discusses. Lower case; CJK and Devanagari names match anywhere.
"""

from __future__ import annotations

import re

# How an answer may name each class the classifier knows (lower case).
DISEASE_NAMES = {
    "diabetic_retinopathy": ("diabetic retinopathy", "diabetic eye disease"),
    "glaucoma": ("glaucoma", "glaucomatous"),
    "cataract": ("cataract",),
    "pathologic_myopia": ("pathologic myopia", "pathological myopia", "myopic maculopathy"),
    "amd": ("macular degeneration", "amd"),
    "hypertensive_retinopathy": ("hypertensive retinopathy",),
    "normal": ("healthy", "normal eye", "is normal", "looks normal", "no disease", "nothing wrong"),
}
# Disease names beyond the English ones in DISEASE_NAMES (lower case; CJK and Devanagari match anywhere).
DISEASE_NAMES_OTHER = {
    "diabetic_retinopathy": ("diabetic eye damage", "npdr", "pdr", "糖尿病视网膜病变", "糖尿病性视网膜病变", "糖网", "retinopatía diabética",
                             "diabetische retinopathie", "डायबिटिक रेटिनोपैथी", "मधुमेह रेटिनोपैथी"),
    "glaucoma": ("poag", "ntg", "pacg", "青光眼", "glaukom", "ग्लूकोमा", "काला मोतिया"),
    "cataract": ("白内障", "catarata", "katarakt", "grauer star", "मोतियाबिंद"),
    "pathologic_myopia": ("病理性近视", "miopía patológica", "pathologische myopie", "पैथोलॉजिकल मायोपिया"),
    "amd": ("年龄相关性黄斑变性", "黄斑变性", "degeneración macular", "makuladegeneration", "मैकुलर डिजनरेशन"),
}


def disease_names(disease: str) -> tuple[str, ...]:
    return DISEASE_NAMES.get(disease, ()) + DISEASE_NAMES_OTHER.get(disease, ())


# The quantities a number can be a figure of, and how a clause (of a tool result or of an answer) names them.
QUANTITIES = {
    "microaneurysms": r"micro-?aneurysms?|微动脉瘤|microaneurisma|mikroaneurysm",
    "haemorrhages": r"ha?emorrhag\w*|bleed\w*|bleeding spots?|出血|hemorragia|blutung|रक्तस्राव",
    "hard exudates": r"hard exudates?|(?<!soft )exudates?|硬性渗出|exudados? duros?|harte exsudate",
    "soft exudates": r"soft exudates?|cotton[- ]wool|棉絮斑",
    "cup-to-disc ratio": r"cup[- ]to[- ]disc|\bcdr\b|杯盘比|cup-to-disc-verhältnis|कप-टू-डिस्क",
    "vessel density": r"\bvessels?\b|\bvascular|血管|densidad vascular|gefäß|वाहिका",
    "disc size": r"\bpixels?\b|\bpx\b|像素",
    "axial length": r"axial length|眼轴",
    "intraocular pressure": r"\biop\b|intraocular pressure|eye pressure|眼压",
    "normal": r"\bnormal\b|\bhealthy\b|no referable disease",
} | {disease: "|".join(rf"\b{re.escape(n)}\b" for n in names) for disease, names in DISEASE_NAMES.items() if disease != "normal"}
QUANTITIES["diabetic_retinopathy"] += r"|\bdr\b|\bnpdr\b|\bpdr\b"
QUANTITY_PATTERNS = {quantity: re.compile(pattern) for quantity, pattern in QUANTITIES.items()}
# Signs an answer may name, each with the ways it is written (lower case). A tool result or a passage
# naming the sign in any of these ways supports it.
SIGNS = {
    "microaneurysms": r"micro-?aneurysms?|微动脉瘤|microaneurisma|mikroaneurysm",
    "haemorrhages": r"ha?emorrhag\w*|\bblots?\b|flame[- ]shaped|出血|hemorragia|blutung|रक्तस्राव",
    "exudates": r"exudates?|渗出|exudado|exsudat",
    "cotton-wool spots": r"cotton[- ]wool",
    "drusen": r"\bdrusen\b|\bdrusas\b|玻璃膜疣|ड्रूसन",
    "neovascularisation": r"neovasculari[sz]\w*|new vessels|\bcnv\b",
    "macular oedema": r"macular o?edema|\bcsme\b|\bdme\b|\bdmo\b|黄斑水肿|edema macular|makulaödem",
    "cherry-red spot": r"cherry[- ]red",
    "papilloedema": r"papill?o?edema|swollen (optic )?disc|disc (swelling|o?edema)",
    "retinal detachment": r"detach\w*",
    "venous beading": r"venous beading|beaded veins?",
    "intraretinal microvascular abnormalities": r"\birma\b|intraretinal microvascular",
    "vessel tortuosity": r"tortuo\w+",
    "arteriovenous nicking": r"\bav nicking|arterio-?venous nicking|nipping",
    "peripapillary atrophy": r"peripapillary atrophy|\bppa\b",
    "tessellation": r"tessellat\w+|tigroid",
    "lacquer cracks": r"lacquer cracks?",
    "fuchs spot": r"fuchs'? spot",
    "staphyloma": r"staphyloma",
    "geographic atrophy": r"geographic atrophy",
    "disc pallor": r"pallor|pale (optic )?disc",
    "rim notching": r"notch\w*",
    "vessel occlusion": r"occlu\w+",
    "emboli": r"embol\w+",
    "laser scars": r"photocoagulation|laser scars?",
    "pigmentary changes": r"pigment\w*|bone[- ]spicule",
    "naevus": r"na?evus|na?evi\b",
    "tumour": r"melanoma|retinoblastoma|tumou?r",
    "macular hole": r"macular hole|retinal (hole|tear)",
    "epiretinal membrane": r"epiretinal",
    "copper or silver wiring": r"(copper|silver)[- ]wir\w+",
}
SIGN_PATTERNS = {sign: re.compile(pattern) for sign, pattern in SIGNS.items()}
