"""Mapping OpenAI chat requests to jobs, as vLLM builds Glyph's prompt."""

from __future__ import annotations

import base64
import json

import pytest

from glyphserve.errors import GlyphserveError
from glyphserve.engine.types import EncodedPage
from glyphserve.serve.images import read_image
from glyphserve.serve.openai_compat import ChatCompletionRequest, to_job
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
    ], max_completion_tokens=7, temperature=0.5, top_p=0.9), has_model=True).request
    assert len(job.pages) == 2 and job.pages[0].shape == (64, 64, 3)
    assert job.question == "Second\nquestion?"
    assert [(t.role, t.content) for t in job.history] == [
        ("system", "Be brief."), ("user", "First question?"), ("assistant", "First answer.")]
    assert (job.settings.max_tokens, job.settings.temperature, job.settings.top_p) == (7, 0.5, 0.9)


def test_text_just_before_a_page_is_its_label_when_the_question_follows_the_pages():
    image = {"type": "image_url", "image_url": {"url": PNG_URL}}
    job = to_job(request(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Passage 1:\na.txt\n"}, image, image,
        {"type": "text", "text": "Passage 2:\n"}, {"type": "text", "text": "b.txt\n"}, image,
        {"type": "text", "text": "Which one?"}]}]), has_model=True).request
    assert job.page_labels == ["Passage 1:\na.txt\n", "", "Passage 2:\nb.txt\n"] and job.question == "Which one?"
    # OpenAI's usual layout, the question before the image: it stays the question, no page is labelled.
    job = to_job(request(messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]),
                 has_model=True).request
    assert job.page_labels is None and job.question == "What is it?" and len(job.pages) == 1


def test_without_a_model_text_before_the_question_is_searched():
    job = to_job(request(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Some document."}, {"type": "text", "text": "What is it?"}]}]), has_model=False)
    assert job.request.question == "What is it?" and job.context == "Some document."
    with pytest.raises(GlyphserveError) as info:
        to_job(request(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": PNG_URL}}, {"type": "text", "text": "Q?"}]}]), has_model=False)
    assert info.value.http_status == 400 and info.value.code == "model_not_loaded"


@pytest.mark.parametrize("url", ["http://example.invalid/a.png", "file:///etc/passwd", "/etc/passwd",
                                 "data:text/plain;base64,aGk=", "data:image/png;base64,!!!",
                                 "data:image/png;base64," + base64.b64encode(b"not a png").decode()])
def test_only_data_urls_of_images_are_read(url):
    with pytest.raises(GlyphserveError) as info:
        read_image(url)
    assert info.value.http_status == 400


def test_last_message_must_be_a_user_question():
    with pytest.raises(GlyphserveError):
        to_job(request(messages=[{"role": "assistant", "content": "Hi"}]), has_model=True)
    with pytest.raises(GlyphserveError):
        to_job(request(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": PNG_URL}}]}]), has_model=True)


def test_pages_stay_encoded_and_are_keyed_by_their_bytes():
    """A data-URL page is handed on as its file: not decoded here (the engine decodes it only on a vision-cache
    miss), its identity the hash of its bytes, so the same file sent again or stored hits the same caches."""
    job = to_job(request(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": PNG_URL}}, {"type": "text", "text": "Q?"}]}]), has_model=True)
    [page] = job.request.pages
    assert isinstance(page, EncodedPage) and page.data == base64.b64decode(PNG_URL.partition(",")[2])
    assert job.request.page_keys is None  # the engine keys it by its bytes


def test_every_sampling_parameter_reaches_the_engine_under_its_own_name():
    settings = to_job(request(messages=[{"role": "user", "content": "Q?"}], max_tokens=8192, top_p=1.0, top_k=1,
                              temperature=0.0001, repetition_penalty=1.1, skip_special_tokens=False,
                              stop_token_ids=[151329, 151348, 151336], include_stop_str_in_output=True,
                              min_p=0.05, presence_penalty=0.5, frequency_penalty=-0.5, stop="END", seed=7,
                              logprobs=True, top_logprobs=3), has_model=True).request.settings
    # 0.0001 is below vLLM's temperature floor: raised to 0.01, as vLLM does.
    assert (settings.max_tokens, settings.top_p, settings.top_k, settings.temperature) == (8192, 1.0, 1, 0.01)
    assert (settings.repetition_penalty, settings.min_p, settings.presence_penalty, settings.frequency_penalty) == \
        (1.1, 0.05, 0.5, -0.5)
    assert settings.stop == ("END",) and settings.stop_token_ids == (151329, 151348, 151336)
    assert settings.include_stop_str_in_output and not settings.skip_special_tokens
    assert settings.seed == 7 and settings.logprobs == 3
    # vLLM's "all tokens" is -1; OpenAI's logprobs false means none.
    plain = to_job(request(messages=[{"role": "user", "content": "Q?"}], top_k=-1, logprobs=False,
                           max_completion_tokens=5, max_tokens=9), has_model=True).request.settings
    assert plain.top_k == 0 and plain.logprobs is None and plain.max_tokens == 5
    assert to_job(request(messages=[{"role": "user", "content": "Q?"}], logprobs=True),
                  has_model=True).request.settings.logprobs == 0


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"), ({"best_of": 3}, "best_of"), ({"use_beam_search": True}, "use_beam_search"),
    ({"min_tokens": 4}, "min_tokens"), ({"logit_bias": {"5": 10}}, "logit_bias"), ({"echo": True}, "echo"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"page_selection": "first"}, "page_selection"),  # it chooses among a stored document's pages only
    # vLLM's and OpenAI's that would change the answer (a new user's trial found them answered as if absent)
    ({"allowed_token_ids": [5, 6]}, "allowed_token_ids"), ({"bad_words": ["on"]}, "bad_words"),
    ({"guided_choice": ["yes", "no"]}, "guided_choice"), ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"structured_outputs": {"choice": ["a"]}}, "structured_outputs"),
    ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"function_call": {"name": "f"}}, "function_call"),
    ({"modalities": ["text", "audio"]}, "modalities"), ({"audio": {"voice": "alloy"}}, "audio"),
    ({"add_generation_prompt": False}, "add_generation_prompt"),
    ({"continue_final_message": True}, "continue_final_message"),
    ({"truncate_prompt_tokens": 100}, "truncate_prompt_tokens"),
    ({"return_tokens_as_token_ids": True}, "return_tokens_as_token_ids"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}, "stream_options"),
])
def test_values_that_cannot_be_honoured_are_refused_not_ignored(body, param):
    with pytest.raises(GlyphserveError) as info:
        to_job(request(messages=[{"role": "user", "content": "Q?"}], **body), has_model=True)
    assert info.value.http_status == 400 and info.value.param == param


def test_harmless_unknown_parameters_are_accepted():
    job = to_job(request(messages=[{"role": "user", "content": "Q?"}], user="me", metadata={"a": "b"},
                         response_format={"type": "text"}, n=1, modalities=["text"], add_generation_prompt=True,
                         function_call="none", chat_template_kwargs={}), has_model=True)
    assert job.request.question == "Q?"
    # explicit nulls, as some clients send every field (OpenAI and vLLM take them as unset)
    job = to_job(request(messages=[{"role": "user", "content": "Q?"}], n=None, stream=None, max_tokens=None,
                         stream_options=None), has_model=True)
    assert job.request.settings.max_tokens is None  # as vLLM: up to the end of the context


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def test_image_limits_are_checked_from_headers_before_decoding():
    from glyphserve.bench.hostile_files import bomb_png
    from glyphserve.serve.errors import ImageLimitError
    from glyphserve.serve.images import ImageLimits, read_images

    bombs = [data_url(bomb_png(8000, 8000, salt)) for salt in range(25)]  # 64 Mpx each, ~11 KB each
    with pytest.raises(ImageLimitError, match=r"image 1 is 8000x8000 px.*25 megapixels.*--max-image-mpx") as info:
        read_images(bombs, ImageLimits())
    assert info.value.http_status == 413
    with pytest.raises(ImageLimitError, match="26 images.*--max-images"):
        read_images([PNG_URL] * 26, ImageLimits(max_images=25))
    with pytest.raises(ImageLimitError, match="more than 10 MiB of pixels.*--max-image-mb"):
        read_images([data_url(bomb_png(2000, 1000, salt)) for salt in range(2)],
                    ImageLimits(max_decoded_bytes=10 * 2**20))
    # Past PIL's own bomb ceiling (PIL refuses to open it at all).
    with pytest.raises(ImageLimitError, match="image 1 is over this server.s limit of 25 megapixels"):
        read_images([data_url(bomb_png(20000, 20000))], ImageLimits())
    eps = "data:image/eps;base64," + base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n").decode()
    with pytest.raises(GlyphserveError, match="not a readable image"):
        read_images([eps], ImageLimits())


@pytest.mark.parametrize("field, sent, used", [
    ("temperature", 1e-300, 0.0), ("temperature", 9e-6, 0.0), ("temperature", 0.001, 0.01), ("temperature", 0.7, 0.7),
    ("top_p", 1e-300, 1e-6), ("top_p", 0.5, 0.5), ("seed", 2**64 - 1, 2**64 - 1), ("seed", 0, 0),
])
def test_sampling_values_follow_vllms_rules(field, sent, used):
    body = request(messages=[{"role": "user", "content": "Q?"}], **{field: sent})
    assert getattr(body, field) == used


@pytest.mark.parametrize("field, sent", [
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_p", float("inf")), ("seed", 2**64), ("seed", -1), ("max_tokens", 0), ("stop", ["s"] * 17),
    ("stop", "x" * 1001), ("repetition_penalty", 1e-46), ("repetition_penalty", 1e4),
])
def test_sampling_values_the_engine_cannot_use_are_refused(field, sent):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        request(messages=[{"role": "user", "content": "Q?"}], **{field: sent})


def test_an_image_whose_pixels_do_not_decode_is_refused_here():
    from glyphserve.serve.images import ImageLimits, read_images

    png = bytearray(make_png(color=(200, 10, 10)))
    start = png.index(b"IDAT") + 8
    png[start:start + 12] = b"\xff" * 12  # the header still reads
    with pytest.raises(GlyphserveError, match="image 1 is damaged") as info:
        read_images([data_url(bytes(png))], ImageLimits())
    assert info.value.http_status == 400 and info.value.param == "messages"  # the images are the messages' parts


@pytest.mark.parametrize(("body", "message"), [
    # A field of several types reports the type the value came closest to, under the field's own name (pydantic
    # names each member: 'stop.constrained-str: ...; stop.list[constrained-str]: ...').
    ({"stop": ["x"] * 17}, "stop: List should have at most 16 items after validation, not 17"),
    ({"stop": "x" * 1001}, "stop: String should have at most 1000 characters"),
    ({"stop": ["x" * 1001]}, "stop.0: String should have at most 1000 characters"),
    ({"stop": 5}, "stop: Input should be a valid string or a valid array"),
    ({"messages": [{"role": "user", "content": 5}]},
     "messages.0.content: Input should be a valid string or a valid array"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "messages.0.content.0.image_url: Input should be an object"),
    ({"messages": [{"role": "robot", "content": "hi"}], "temperature": "hot"},
     "temperature: Input should be a valid number, unable to parse string as a number; "
     "messages.0.role: Input should be 'system', 'user', 'assistant' or 'developer'"),
])
def test_invalid_requests_name_each_field_once(body, message):
    from pydantic import ValidationError

    from glyphserve.serve.api import invalid_request

    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate_json(json.dumps({"model": "m", "messages": [
            {"role": "user", "content": "hi"}], **body}))
    error = invalid_request(err.value)
    assert error.message == "invalid request: " + message
    assert error.param == message.split(":", 1)[0]


def test_an_unknown_field_is_named_whatever_its_spelling():
    from pydantic import ValidationError

    from glyphserve.serve.api import DocumentChat, invalid_request

    with pytest.raises(ValidationError) as err:
        DocumentChat.model_validate({"question": "q", "Max-Tokens": 5})
    assert invalid_request(err.value).message == "invalid request: Max-Tokens: Extra inputs are not permitted"
