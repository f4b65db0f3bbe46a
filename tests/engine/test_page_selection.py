"""Page selection against the real engine (tiny model, CPU): the token accounting is the engine's to the token,
labelled pages read as Hugging Face's processor lays them out, and a repeated selection hits the caches."""

from __future__ import annotations

import pytest
import torch

from glyphserve.engine import AnswerRequest, ChatMessage, GenerationSettings
from glyphserve.engine.prompt import page_budget
from glyphserve.glm4v import PAGE_MARKER_TOKENS, vision_tokens
from glyphserve.retrieve import DocumentPages, PageFacts, select_pages
from tests.engine.conftest import make_pages

SHAPES = [(112, 140), (168, 196), (140, 112), (196, 168), (112, 112), (168, 140), (140, 140), (112, 196)]
NEEDLE_PAGE = 6
QUESTION = "What is the harbour code of the lighthouse?"
MAX_TOKENS = 6


def page_texts() -> list[str]:
    texts = [f"Page {n} talks about weather, cattle and the price of grain in spring." for n in range(1, 9)]
    texts[NEEDLE_PAGE - 1] = "The harbour code of the lighthouse is LANTERN-42, said the keeper."
    return texts


def document(images, texts) -> DocumentPages:
    text, facts, offset = "", [], 0
    for n, (image, page_text) in enumerate(zip(images, texts), 1):
        text += page_text + "\n\n"
        facts.append(PageFacts(n, (offset, offset + len(page_text)), vision_tokens(*image.shape[:2])))
        offset = len(text)
    return DocumentPages(text, facts)


@pytest.fixture(scope="module")
def collection():
    """Two documents of eight small pages each; the needle is on page 6 of the second."""
    images = [make_pages(SHAPES, seed=3), make_pages(SHAPES, seed=4)]
    other = [f"Report {n}: rainfall and grain prices stayed level this season." for n in range(1, 9)]
    return images, [document(images[0], other), document(images[1], page_texts())]


def request(pages, question=QUESTION, history=(), **fields):
    return AnswerRequest(pages=pages, question=question, history=list(history),
                         settings=GenerationSettings(max_tokens=MAX_TOKENS, ignore_eos=True), **fields)


def shown_images(images, selection):
    return [images[p.document][p.number - 1] for p in selection.pages]


@pytest.mark.parametrize("max_context", [120, 160, 233, 300, 420])
def test_selected_pages_fill_the_context_exactly(load_engine, collection, max_context):
    images, documents = collection
    engine = load_engine(max_context=max_context)
    history = [ChatMessage("user", "Where is the lighthouse?"), ChatMessage("assistant", "On the point.")]
    for titles in (None, ["weather.txt", "harbour.txt"]):
        docs = documents if titles else documents[1:]
        budget = page_budget(engine, history, QUESTION, MAX_TOKENS)
        selection = select_pages(docs, mode="retrieve", question=QUESTION, history=[m.content for m in history],
                                 budget=budget, titles=titles)
        answer = engine.answer(request(shown_images(images[-len(docs):], selection), history=history,
                                       page_labels=selection.labels))
        # The selection's count is the engine's prompt, and within the context left after the answer.
        assert answer.prompt_tokens == selection.prompt_tokens <= max_context - MAX_TOKENS
        assert answer.pages_used == len(selection.pages)
        left = max_context - MAX_TOKENS - selection.prompt_tokens
        chosen = {(p.document, p.number) for p in selection.pages}
        for d, doc in enumerate(docs):
            for i, n in enumerate(doc.numbers):
                if (d, n) not in chosen:
                    label = budget.count_label(f"Passage {d + 1}:\n{titles[d]} (page {n} of 8)\n") if titles else 0
                    assert doc.vision_tokens[i] + PAGE_MARKER_TOKENS + label > left
        if max_context >= 233:
            assert (len(docs) - 1, NEEDLE_PAGE) in chosen


def test_labelled_pages_answer_like_the_processor_lays_them_out(load_engine, reference, collection):
    images, documents = collection
    engine = load_engine(max_context=300)
    selection = select_pages(documents, mode="retrieve", question=QUESTION,
                             budget=page_budget(engine, [], QUESTION, MAX_TOKENS), titles=["a.txt", "b.txt"])
    pages = shown_images(images, selection)
    assert selection.labels[0].startswith("Passage ") and len(selection.labels) == len(pages) >= 2
    answer = engine.answer(request(pages, page_labels=selection.labels))

    from PIL import Image

    content = []
    for label, page in zip(selection.labels, pages):
        content += [{"type": "text", "text": label}, {"type": "image", "image": Image.fromarray(page)}]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}]
    inputs = reference.processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                     return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        out = reference.model.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                       do_sample=False)
    assert answer.prompt_tokens == inputs["input_ids"].shape[1]
    assert answer.token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()


def test_answer_on_a_selection_equals_those_pages_passed_directly(load_engine, collection):
    images, documents = collection
    engine = load_engine(max_context=233)
    selection = select_pages(documents[1:], mode="retrieve", question=QUESTION,
                             budget=page_budget(engine, [], QUESTION, MAX_TOKENS))
    assert selection.shown() != list(range(1, 9))  # a real choice, not every page
    keys = [f"harbour:{n}" for n in selection.shown()]
    selected = engine.answer(request(shown_images(images[1:], selection), page_keys=keys))
    direct = load_engine(max_context=233).answer(request([images[1][n - 1] for n in selection.shown()]))
    assert selected.token_ids == direct.token_ids and selected.prompt_tokens == direct.prompt_tokens


def test_a_repeated_selection_hits_the_vision_and_prefix_caches(load_engine, collection):
    images, documents = collection
    engine = load_engine(max_context=233)

    def ask(question, history=()):
        budget = page_budget(engine, list(history), question, MAX_TOKENS)
        selection = select_pages(documents[1:], mode="retrieve", question=question,
                                 history=[m.content for m in history], budget=budget)
        keys = [f"harbour:{n}" for n in selection.shown()]
        return selection, engine.answer(request(shown_images(images[1:], selection), question, history,
                                                 page_keys=keys))

    first, cold = ask(QUESTION)
    assert cold.cache.vision_misses == len(first.pages) and cold.cache.prefix_reused_tokens == 0
    # Another wording that selects the same pages: no page is encoded again, and the pages' prefix is reused (to
    # the last whole block of the KV cache).
    again, warm = ask("The lighthouse harbour code: what is it?")
    assert again.shown() == first.shown()
    assert warm.cache.vision_misses == 0
    pages = sum(documents[1].vision_tokens[n - 1] + PAGE_MARKER_TOKENS for n in again.shown())
    assert warm.cache.prefix_reused_tokens >= pages - engine.config.kv_block_size
    # A follow-up turn leaves fewer tokens for pages: it shows pages already seen, none encoded again.
    history = [ChatMessage("user", QUESTION), ChatMessage("assistant", "LANTERN-42.")]
    follow, later = ask("Who said so?", history)
    assert set(follow.shown()) <= set(first.shown()) and later.cache.vision_misses == 0
    # Another selection: only the pages not seen before are encoded (pages inside a reused prefix are not even
    # looked up).
    other, moved = ask("What does page 8 say?")
    new = set(other.shown()) - set(first.shown())
    assert other.shown() != first.shown() and new
    assert moved.cache.vision_misses == len(new) and moved.cache.vision_hits + len(new) <= len(other.pages)


def test_a_prompt_is_tokenized_once_for_its_count_and_its_build(load_engine, monkeypatch):
    import glyphserve.engine.prompt as prompt

    prompts = load_engine().prompts
    calls = []

    class Counting:  # the tokenizer, its calls (tokenizations) counted
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, *args, **kwargs):
            calls.append(args)
            return self.tokenizer(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

    monkeypatch.setattr(prompts, "tokenizer", Counting(prompts.tokenizer))
    messages = prompt.conversation([], "A question?", 2)
    counted = prompts.count(messages)
    built = prompts.build(messages, [(1, 4, 4), (1, 4, 4)])
    assert len(calls) == 1 and counted == len(built.ids) - 2 * 4  # each page's <|image|>: its 4 vision tokens
    monkeypatch.setattr(prompt, "ENCODED_TOKENS", 16)  # a text of more than one token is not kept now
    for _ in range(2):
        prompts.count(prompt.conversation([], "Another question?", 2))
    assert len(calls) == 3
