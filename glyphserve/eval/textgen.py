"""Seeded generators of filler text and names; no corpus ships with glyphserve.

The English filler is grammatical nonsense built from small word lists. It never contains
digits, hyphens or the words the needle templates use ("magic", "special"), so a needle
inserted into it is the only place its key and value occur.
"""

from __future__ import annotations

import random

_ADJECTIVES = (
    "quiet bright narrow ancient gentle heavy patient restless silver golden hollow distant crooked "
    "careful humble sudden steady brittle curious faded weary eager plain rough smooth tall small "
    "broad late early mild warm cold damp dusty grey green pale dark lively modest proud shy strange"
).split()
_NOUNS = (
    "river lantern orchard valley engineer teacher merchant garden harbor bridge mountain village "
    "library window market tower forest meadow traveler painter baker sailor farmer candle letter "
    "journey winter morning evening kitchen workshop carriage station island cottage chapel field "
    "hill road path stone wheel basket blanket ladder barrel wagon mirror notebook compass map"
).split()
_VERBS = (
    "carried watched followed repaired painted described visited crossed noticed remembered opened "
    "gathered measured counted studied admired planted cleaned delivered borrowed returned explored "
    "finished mentioned ignored praised questioned covered reached welcomed"
).split()
_ADVERBS = (
    "slowly quickly quietly carefully often rarely gladly softly briefly patiently eagerly calmly "
    "suddenly gently proudly freely"
).split()
_PREPOSITIONS = "across beside behind near toward beyond under above along around through past".split()
_TIMES = (
    "before dawn,after the rain,during the long winter,at the end of the season,on a cold morning,"
    "late in the evening,after the harvest,before the market opened,in the early spring,"
    "when the bells rang,while the town slept,once the storm had passed"
).split(",")
_OPENERS = ("Everyone agreed that", "It was said that", "Nobody doubted that", "Some believed that",
            "The old story holds that", "Later it turned out that")

# Building blocks of made-up proper names and coded words.
_SYLLABLES = (
    "ka lo mi ren tor va sel dun bri hal qu or ane vel tis mar no dra fen gol ith cor pel sun wyn "
    "bel ros tam lin ver ash mon ric ul ham ber ton ley wick ford dale"
).split()
_FIRST_NAMES = (
    "Ada Bram Cora Dmitri Edith Felix Greta Hugo Ines Jonas Klara Leon Mira Nils Olga Pavel Rosa "
    "Silas Tessa Ulric Vera Walt Yara Zeno Alma Boris Clio Dario Elsa Frida"
).split()
_KEY_ADJECTIVES = (
    "amber azure brisk cobalt dapper ember fabled gilded hazel ivory jagged keen lucid mellow "
    "nimble opal plucky quaint russet sable tawny umber vivid wistful zesty"
).split()
_KEY_NOUNS = (
    "falcon otter heron badger lynx marten osprey plover raven stoat tapir vole wren yak zebu "
    "ibis kestrel lemur magpie newt"
).split()

_ZH_WORDS = (
    "我们 今天 时间 城市 河流 学生 老师 工厂 朋友 山谷 道路 春天 冬天 早晨 晚上 市场 图书馆 窗户 花园 村庄 "
    "工程师 商人 农民 画家 旅行者 故事 问题 方法 计划 消息 历史 文化 经济 社会 科学 技术 教育 生活 工作 "
    "发展 研究 认为 发现 记得 喜欢 希望 需要 准备 开始 继续 完成 讨论 介绍 参观 经过 看见 听说 决定 "
    "安静 明亮 古老 温暖 寒冷 遥远 美丽 重要 简单 复杂 普通 特别 仔细 慢慢 常常 终于 已经 仍然 非常 "
    "一些 许多 每天 所有 这个 那个 他们 大家 自己 中间 旁边 附近 上面 下面 里面 外面 一起 一直 后来"
).split()


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def filler_sentence(rng: random.Random) -> str:
    """One English-like sentence (no digits, no hyphens)."""
    a, n, v, n2 = rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.choice(_VERBS), rng.choice(_NOUNS)
    form = rng.randrange(6)
    if form == 0:
        where = f"{rng.choice(_PREPOSITIONS)} the {rng.choice(_NOUNS)}"
        sentence = f"The {a} {n} {v} the {rng.choice(_ADJECTIVES)} {n2} {where}"
    elif form == 1:
        sentence = f"{rng.choice(_TIMES).capitalize()}, {_a(a)} {n} {rng.choice(_ADVERBS)} {v} the {n2}"
    elif form == 2:
        sentence = f"{rng.choice(_OPENERS)} the {n} had {v} every {n2} in the {rng.choice(_NOUNS)}"
    elif form == 3:
        sentence = f"{_a(n)} {rng.choice(_PREPOSITIONS)} the {n2} is {a} and {rng.choice(_ADJECTIVES)}"
    elif form == 4:
        sentence = f"The {n} {v} the {n2}, and the {rng.choice(_NOUNS)} {rng.choice(_VERBS)} it {rng.choice(_ADVERBS)}"
    else:
        sentence = f"Few people had {rng.choice(_ADVERBS)} {v} {_a(a)} {n} {rng.choice(_TIMES)}"
    return sentence[0].upper() + sentence[1:] + "."


def filler_sentences(rng: random.Random, chars: int) -> list[str]:
    """Sentences whose total length (joined by spaces) reaches ``chars``."""
    sentences, total = [], 0
    while total < chars:
        sentence = filler_sentence(rng)
        sentences.append(sentence)
        total += len(sentence) + 1
    return sentences


def paragraph_groups(sentences: list[str], rng: random.Random, low: int = 4, high: int = 9) -> list[list[str]]:
    """Split sentences into paragraphs of ``low``..``high`` sentences."""
    groups, i = [], 0
    while i < len(sentences):
        n = rng.randint(low, high)
        groups.append(sentences[i : i + n])
        i += n
    return groups


def join_paragraphs(groups: list[list[str]]) -> str:
    """Sentences joined by spaces, paragraphs by a blank line."""
    return "\n\n".join(" ".join(group) for group in groups)


def zh_filler(rng: random.Random, chars: int) -> str:
    """Chinese-like filler: sentences of common words with commas, ``chars`` characters or more."""
    parts, total = [], 0
    while total < chars:
        clauses = ["".join(rng.choice(_ZH_WORDS) for _ in range(rng.randint(3, 6))) for _ in range(rng.randint(1, 3))]
        sentence = "，".join(clauses) + "。"
        parts.append(sentence)
        total += len(sentence)
    return "".join(parts)


def needle_key(rng: random.Random) -> str:
    """A RULER-style key such as ``amber-falcon``."""
    return f"{rng.choice(_KEY_ADJECTIVES)}-{rng.choice(_KEY_NOUNS)}"


def uuid_like(rng: random.Random) -> str:
    """A UUID-shaped string of seeded hex digits (8-4-4-4-12)."""
    digits = f"{rng.getrandbits(128):032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def number_value(rng: random.Random) -> str:
    """A seven-digit number without a leading zero."""
    return str(rng.randint(1_000_000, 9_999_999))


def coded_word(rng: random.Random, length: int = 6) -> str:
    """A random lower-case word of ``length`` letters (the coded words of the frequent-word task)."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))


def proper_name(rng: random.Random, syllables: int = 2) -> str:
    """A made-up capitalised name such as ``Velmar``."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def person_name(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST_NAMES)} {proper_name(rng)}"
