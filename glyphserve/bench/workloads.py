"""Deterministic benchmark documents shared by the render, engine and serve benchmarks.

``make_workload_text(n_chars, seed, lang)`` builds prose-like text of exactly ``n_chars``
characters from a seeded generator (no files, no network): English-like words with a
Zipf-shaped vocabulary, sentences, and paragraphs separated by newlines; or Chinese-like
text from common Han characters with Chinese punctuation. Same arguments, same text.
"""

from __future__ import annotations

import itertools
import random

WORKLOADS = {"W50": 50_000, "W150": 150_000, "W200": 200_000}

_COMMON = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "not word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "has look more day could go come did number sound no most people my over know water than call first who "
    "may down side been now find any new work part take get place made live where after back little only "
    "round man year came show every good me give our under name very through just form sentence great think "
    "say help low line differ turn cause much mean before move right boy old too same tell does set three "
    "want air well also play small end put home read hand port large spell add even land here must big high "
    "such follow act why ask men change went light kind off need house picture try us again animal point "
    "mother world near build self earth father head stand own page should country found answer school grow "
    "study still learn plant cover food sun four between state keep eye never last let thought city tree "
    "cross farm hard start might story saw far sea draw left late run while press close night real life few "
    "north open seem together next white children begin got walk example ease paper group always music those "
    "both mark often letter until mile river car feet care second book carry took science eat room friend "
    "began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl "
    "usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song "
    "measure door product black short numeral class wind question happen complete ship area half rock order "
    "fire south problem piece told knew pass since top whole king space heard best hour better true during "
    "hundred five remember step early hold west ground interest reach fast verb sing listen six table travel "
    "less morning ten simple several vowel toward war lay against pattern slow center love person money serve "
    "appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry "
    "dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood "
    "contain front teach week final gave green oh quick develop ocean warm free minute strong special mind "
    "behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object "
    "decide surface deep moon island foot system busy test record boat common gold possible plane stead dry "
    "wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant "
    "fill east paint language among"
).split()
_SYLLABLES = ("ka", "lo", "ri", "ven", "tor", "mar", "is", "el", "an", "con", "pre", "sta", "tion", "ly", "er",
              "ing", "ous", "ment", "ab", "ex", "qu", "ph", "str", "or", "um", "ia", "ne", "ca", "di", "to")
_HAN = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而"
    "方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好"
    "应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向"
    "道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特"
    "件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队"
    "南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风"
)
_ZH_PUNCT = "，，，，、。"


def make_workload_text(n_chars: int, seed: int = 0, lang: str = "en") -> str:
    """Exactly ``n_chars`` characters of deterministic prose-like text (``lang``: en or zh)."""
    if n_chars < 0:
        raise ValueError("n_chars must not be negative")
    if lang not in ("en", "zh"):
        raise ValueError("lang must be 'en' or 'zh'")
    rng = random.Random(f"{lang}:{seed}")
    make = _english_paragraph if lang == "en" else _chinese_paragraph
    parts: list[str] = []
    size = 0
    while size < n_chars:
        para = make(rng)
        parts.append(para)
        size += len(para) + 1
    return "\n".join(parts)[:n_chars]


_ZIPF = list(itertools.accumulate(1.0 / (rank + 8) for rank in range(len(_COMMON))))


def _english_word(rng: random.Random) -> str:
    if rng.random() < 0.85:
        return rng.choices(_COMMON, cum_weights=_ZIPF)[0]  # Zipf-like word frequencies
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))


def _english_paragraph(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 9)):
        words = [_english_word(rng) for _ in range(rng.randint(5, 24))]
        words[0] = words[0].capitalize()
        if len(words) > 8 and rng.random() < 0.4:
            words[rng.randint(2, len(words) - 3)] += ","
        sentences.append(" ".join(words) + rng.choice(".....?!"))
    return " ".join(sentences)


def _chinese_paragraph(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 8)):
        for _ in range(rng.randint(2, 5)):
            out.append("".join(rng.choice(_HAN) for _ in range(rng.randint(4, 14))))
            out.append(rng.choice(_ZH_PUNCT))
        out[-1] = "。"
    return "".join(out)
