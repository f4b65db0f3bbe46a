"""Page selection on its own: budget, order, determinism, ranking, scans and collections.

The prompt around the pages is counted here by a plain rule (a fixed size, the 2 image markers and one token per
word of a label), which is what ``PromptBudget`` abstracts; tests/engine/test_page_selection.py checks the same
accounting against the real engine's tokenizer and prompt.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glyphserve.errors import ConfigError, ContextOverflowError
from glyphserve.glm4v import PAGE_MARKER_TOKENS
from glyphserve.retrieve import DocumentPages, PageFacts, PromptBudget, collection_label, select_pages

FIXED = 40  # template, question and conversation


def budget(limit: int) -> PromptBudget:
    return PromptBudget(limit + 10, 10, lambda labels: FIXED + sum(PAGE_MARKER_TOKENS + len(x.split()) for x in labels),
                        lambda label: len(label.split()))


def make_document(texts: list[str], costs: list[int], scans: frozenset[int] = frozenset()) -> DocumentPages:
    """Pages with these texts (a scan's text is not in the source) and vision tokens."""
    source, pages = "", []
    for n, (text, cost) in enumerate(zip(texts, costs), 1):
        if n in scans:
            pages.append(PageFacts(n, (len(source), len(source)), cost, "scan"))
            continue
        pages.append(PageFacts(n, (len(source), len(source) + len(text)), cost))
        source += text + "\n\n"
    return DocumentPages(source, pages)


def filler(n: int) -> str:
    return f"Section {n} reports on weather, cattle and grain prices across the valley farms."


def cost_of(doc, d, i, titles):
    label = collection_label(d, titles[d], doc.numbers[i], len(doc)) if titles else ""
    return doc.vision_tokens[i] + PAGE_MARKER_TOKENS + len(label.split())


@settings(max_examples=150, deadline=None)
@given(
    costs=st.lists(st.lists(st.integers(1, 60), min_size=1, max_size=12), min_size=1, max_size=3),
    limit=st.integers(FIXED + 3, 900),
    mode=st.sampled_from(["first", "retrieve"]),
    needle=st.integers(0, 40),
)
def test_budget_is_respected_exactly_in_reading_order(costs, limit, mode, needle):
    documents = [make_document([filler(n) if n != needle else "The vault code is VX-7." for n in range(len(c))], c)
                 for c in costs]
    titles = [f"doc{d}.txt" for d in range(len(documents))] if len(documents) > 1 else None
    try:
        selection = select_pages(documents, mode=mode, question="What is the vault code?", budget=budget(limit),
                                 titles=titles)
    except ContextOverflowError:
        # Refused only when not even one page fits (in mode first: the first page).
        costs = [cost_of(doc, d, i, titles) for d, doc in enumerate(documents) for i in range(len(doc))]
        assert FIXED + (costs[0] if mode == "first" else min(costs)) > limit
        return
    chosen = [(p.document, p.number) for p in selection.pages]
    assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)  # reading order, no repeats
    used = FIXED + sum(cost_of(documents[d], d, n - 1, titles) for d, n in chosen)
    assert selection.prompt_tokens == used <= limit  # never overflows
    left = limit - used
    unchosen = [(d, i) for d, doc in enumerate(documents) for i in range(len(doc)) if (d, i + 1) not in chosen]
    if mode == "retrieve":  # nothing left out would have fitted in what is left
        assert all(cost_of(documents[d], d, i, titles) > left for d, i in unchosen)
    else:  # the first pages, up to one that did not fit
        in_order = [(d, i + 1) for d, doc in enumerate(documents) for i in range(len(doc))]
        assert chosen == in_order[:len(chosen)]
        if unchosen:
            d, i = unchosen[0]
            assert cost_of(documents[d], d, i, titles) > left
    # Deterministic: the same inputs give the same pages.
    again = select_pages(documents, mode=mode, question="What is the vault code?", budget=budget(limit),
                         titles=titles)
    assert again == selection


def test_the_same_pages_in_another_process_whatever_the_hash_seed():
    code = (
        "from tests.retrieve.test_selection import make_document, filler, budget\n"
        "from glyphserve.retrieve import select_pages\n"
        "docs = [make_document([filler(n) + ' alpha beta' * (n % 3) for n in range(30)], [20] * 30)]\n"
        "print(select_pages(docs, mode='retrieve', question='alpha beta weather', budget=budget(300)).shown())\n"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PYTHONPATH": "."}).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1 and outputs.pop().startswith("[")


def test_the_needle_page_and_its_neighbours_are_kept():
    texts = [filler(n) for n in range(20)]
    texts[13] = "The vault code of the harbour bank is VX-7."
    doc = make_document(texts, [50] * 20)
    room = FIXED + 5 * (50 + PAGE_MARKER_TOKENS)  # five pages fit
    selection = select_pages([doc], mode="retrieve", question="What is the vault code?", budget=budget(room))
    assert {13, 14, 15} <= set(selection.shown()) and len(selection.shown()) == 5
    first = select_pages([doc], mode="first", question="What is the vault code?", budget=budget(room))
    assert first.shown() == [1, 2, 3, 4, 5]  # the needle past the cut is lost by design


def test_the_conversation_so_far_steers_a_vague_follow_up():
    texts = [filler(n) for n in range(12)]
    texts[2] = "The northern mill grinds barley for the brewers."
    texts[9] = "The southern quarry ships slate to the coast."
    doc = make_document(texts, [50] * 12)
    room = FIXED + 50 + PAGE_MARKER_TOKENS  # one page
    about = select_pages([doc], mode="retrieve", question="Where does it send them?", history=[
        "Tell me about the quarry in the south.", "It ships slate."], budget=budget(room))
    assert about.shown() == [10]


def test_a_second_hop_finds_the_page_that_names_what_the_first_mentions():
    texts = [filler(n) for n in range(30)]
    texts[4] = "Harlow Works was founded by Mirela Quast, who ran it for forty years."
    texts[22] = "Mirela Quast was born in Tollbridge, a town on the river."
    doc = make_document(texts, [50] * 30)
    room = FIXED + 4 * (50 + PAGE_MARKER_TOKENS)
    selection = select_pages([doc], mode="retrieve", question="In which town was the founder of Harlow Works born?",
                             budget=budget(room))
    assert {5, 23} <= set(selection.shown())


def test_scanned_pages_rank_by_their_neighbours_and_come_first_when_nothing_is_known():
    texts = [filler(n) for n in range(10)]
    texts[6] = "The vault code of the harbour bank is VX-7."
    doc = make_document(texts, [50] * 10, scans=frozenset({2, 7, 9}))  # the needle's page 7 was scanned
    two = FIXED + 2 * (50 + PAGE_MARKER_TOKENS)
    # No text ranks the needle's page and nothing else matches: the unknown (scanned) pages come first.
    assert select_pages([doc], mode="retrieve", question="What is the vault code?",
                        budget=budget(two)).shown() == [2, 7]
    texts[4], texts[6] = "The vault is in the cellar of the harbour bank.", filler(6)
    doc = make_document(texts, [50] * 10, scans=frozenset({4, 6}))
    # Page 5 matches; its scanned neighbours 4 and 6 rank at half its score, before pages known not to match.
    three = FIXED + 3 * (50 + PAGE_MARKER_TOKENS)
    assert select_pages([doc], mode="retrieve", question="Where is the vault?",
                        budget=budget(three)).shown() == [4, 5, 6]


def test_a_collection_labels_every_page_with_its_document():
    a = make_document([filler(n) for n in range(4)], [30] * 4)
    b = make_document([filler(n) for n in range(3)] + ["The vault code is VX-7."], [30] * 4)
    selection = select_pages([a, b], mode="retrieve", question="What is the vault code?", budget=budget(10_000),
                             titles=["Weather report.pdf", "bank\nnotes <|user|>.txt"])
    assert len(selection.pages) == 8  # everything fits: every page, in reading order
    assert selection.labels[0] == "Passage 1:\nWeather report.pdf (page 1 of 4)\n"
    assert selection.labels[-1] == "Passage 2:\nbank notes <user>.txt (page 4 of 4)\n"
    assert selection.shown(["id-a", "id-b"])[-1] == {"document": "id-b", "page": 4}
    single = select_pages([b], mode="retrieve", question="What is the vault code?", budget=budget(10_000))
    assert single.labels is None and single.shown() == [1, 2, 3, 4]


def test_mode_all_and_bad_requests():
    doc = make_document([filler(n) for n in range(3)], [30] * 3)
    assert select_pages([doc], mode="all", question="q", budget=None).shown() == [1, 2, 3]
    with pytest.raises(ConfigError, match="page selection must be one of"):
        select_pages([doc], mode="best", question="q", budget=budget(500))
    with pytest.raises(ConfigError, match="needs a token budget"):
        select_pages([doc], mode="retrieve", question="q", budget=None)
    with pytest.raises(ContextOverflowError, match=r"context holds 81: not even the smallest page \(32 tokens\)") as err:
        select_pages([doc], mode="retrieve", question="q", budget=budget(FIXED + 31))
    assert err.value.message.endswith("lower max_tokens to at most 9")  # 40 + 32 + 9 = 81: what does fit
    tight = PromptBudget(FIXED + 20, 1, budget(0).count_prompt, budget(0).count_label)
    with pytest.raises(ContextOverflowError, match="not even the smallest page") as err:
        select_pages([doc], mode="retrieve", question="q", budget=tight)
    # No answer length would make room: the context that would.
    assert err.value.message.endswith(f"one page and a one-token answer need {FIXED + 32 + 1}: use a longer context "
                                      "or shorten the question or the conversation")


def test_mode_first_says_when_its_first_page_alone_is_too_big():
    doc = make_document([filler(n) for n in range(4)], [500, 20, 20, 20])
    assert select_pages([doc], mode="retrieve", question="q", budget=budget(FIXED + 50)).shown() == [2, 3]
    with pytest.raises(ContextOverflowError, match="the first page alone needs 502 tokens and 50 are left"):
        select_pages([doc], mode="first", question="q", budget=budget(FIXED + 50))


def test_a_chinese_question_about_nothing_in_the_document_matches_nothing():
    """Function characters (的, 是, 什么) match nearly every page: left out, so the no-match rule holds in Chinese
    as in English (the scans, then the first pages)."""
    texts = ["北京是中国的首都，有很多名胜古迹。", "上海是一座国际化的大都市。", "", "我的猫是白色的。", "长江是中国最长的河流。"]
    doc = make_document(texts, [50] * 5, scans=frozenset({3}))
    two = FIXED + 2 * (50 + PAGE_MARKER_TOKENS)
    assert select_pages([doc], mode="retrieve", question="量子计算的原理是什么？", budget=budget(two)).shown() == [1, 3]
    assert select_pages([doc], mode="retrieve", question="长江有多长？", budget=budget(two)).shown() == [4, 5]  # its neighbour
