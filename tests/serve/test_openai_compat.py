"""Mapping OpenAI chat requests to jobs, as vLLM builds Glyph's prompt."""

from __future__ import annotations

import base64

import pytest

from glyphserve.errors import GlyphserveError
from glyphserve.engine.types import EncodedPage
from glyphserve.serve.openai_compat import ChatCompletionRequest, StopFilter, encoded_image, to_job
from tests.serve.conftest import make_png

PNG_URL = "data:image/png;base64," + base64.b64encode(make_png()).decode()


def request(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", **body})


def test_images_are_pages_and_earlier_turns_are_history():
    job = to_job(request(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URL}},
                                     {"type": "image_url", "image_url": {"url": PNG_URL}},
                                     {"type": "text", "text": "First question?"}]},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": [{"type": "text", "text": "Second"}, {"type": "text", "text": "question?"}]},
    ], max_completion_tokens=7, temperature=0.5, top_p=0.9), has_model=True)
    assert len(job.pages) == 2 and job.pages[0].shape == (64, 64, 3)
    assert job.question == "Second\nquestion?"
    assert [(t.role, t.content) for t in job.history] == [
        ("system", "Be brief."), ("user", "First question?"), ("assistant", "First answer.")]
    assert (job.settings.max_tokens, job.settings.temperature, job.settings.top_p) == (7, 0.5, 0.9)


def test_without_a_model_text_before_the_question_is_searched():
    job = to_job(request(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Some document."}, {"type": "text", "text": "What is it?"}]}]), has_model=False)
    assert job.question == "What is it?" and job.context == "Some document."
    with pytest.raises(GlyphserveError) as info:
        to_job(request(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": PNG_URL}}, {"type": "text", "text": "Q?"}]}]), has_model=False)
    assert info.value.http_status == 503


@pytest.mark.parametrize("url", ["http://example.invalid/a.png", "file:///etc/passwd", "/etc/passwd",
                                 "data:text/plain;base64,aGk=", "data:image/png;base64,!!!",
                                 "data:image/png;base64," + base64.b64encode(b"not a png").decode()])
def test_only_data_urls_of_images_are_read(url):
    with pytest.raises(GlyphserveError) as info:
        encoded_image(url)
    assert info.value.http_status == 422


def test_last_message_must_be_a_user_question():
    with pytest.raises(GlyphserveError):
        to_job(request(messages=[{"role": "assistant", "content": "Hi"}]), has_model=True)
    with pytest.raises(GlyphserveError):
        to_job(request(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": PNG_URL}}]}]), has_model=True)


def test_stop_filter_cuts_across_deltas():
    stop = StopFilter(["<|user|>", "END"])
    out = "".join(stop.feed(piece) for piece in ["Hello <|us", "er|> more"]) + stop.flush()
    assert out == "Hello " and stop.stopped
    plain = StopFilter(None)
    assert plain.feed("abc") == "abc" and plain.flush() == "" and not plain.stopped


def test_pages_stay_encoded_and_are_keyed_by_their_bytes():
    """A data-URL page is handed on as its file: not decoded here (the engine decodes it only on a vision-cache
    miss), its identity the hash of its bytes, so the same file sent again or stored hits the same caches."""
    job = to_job(request(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": PNG_URL}}, {"type": "text", "text": "Q?"}]}]), has_model=True)
    [page] = job.pages
    assert isinstance(page, EncodedPage) and page.data == base64.b64decode(PNG_URL.partition(",")[2])
    assert job.page_keys is None  # the engine keys it by its bytes
