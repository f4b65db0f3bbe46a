"""The web UI (Gradio Blocks), mounted at ``/`` of the API's FastAPI app.

It calls the same :class:`GlyphService` as the HTTP API (no loopback HTTP), so uploads,
answers, limits and metrics are shared (uploads take their turns in the same upload queues as the API's, each
user counted by its address as an API client is). Errors appear in a status box and as a toast, never as a
traceback; the user's next action takes the toasts off the page.

What users supplied (document names, the document's text in passages and answers, questions) is shown as
text, never as HTML or Markdown: an uploader's ``<img src=...>`` or ``![](...)`` would otherwise make every
viewer's browser fetch a URL of the uploader's choosing. The UI framework keeps copies of files (the upload,
every page a gallery shows): the upload's is removed ``UPLOAD_COPY_GRACE_S`` after the upload is stored or refused,
the pages' when the document is deleted.
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import logging
import secrets
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from glyphserve.errors import FileTooLargeError, GlyphserveError, NotFoundError
from glyphserve.engine.prompt import answer_room
from glyphserve.engine.types import AnswerRequest, ChatMessage, GenerationSettings, MAX_TEMPERATURE, StreamEvent
from glyphserve.glm4v import MESSAGE_TOKENS, PAGE_MARKER_TOKENS, PROMPT_TOKENS
from glyphserve.serve.backends import ChatJob, Reply
from glyphserve.serve.upload_queue import client_of
from glyphserve.serve.scheduler import Cancelled
from glyphserve.serve.config import ServeConfig
from glyphserve.serve.intake import DPIS, NEWLINES, PRESETS, RenderOptions, check_upload_size
from glyphserve.serve.page_scripts import (DISMISS_TOASTS, PAGE_HEAD, REFUSED_FILE, UPLOAD_ENDED, ask_after_uploads,
                                           watch_uploads)
from glyphserve.serve.service import GlyphService
from glyphserve.serve.store import DocumentRecord

log = logging.getLogger("glyphserve.serve")

EXAMPLE = Path(__file__).with_name("example_report.txt")
THINKING_TITLE = "Thinking"
# System fonts only: the default theme would link web fonts, and the UI must work offline.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])
ERROR_TOAST_S = 10
# An upload's copy stays this long after its last reader is done, for another upload of the same file whose handler
# has not started yet (``_UploadCopies``).
UPLOAD_COPY_GRACE_S = 30
_MARKDOWN_SPECIALS = {ord(c): "\\" + c for c in "\\`*_[]()!|~#"}


def _literal(text: str) -> str:
    """``text`` as it reads, inside Markdown: no HTML, no Markdown syntax (images, links, emphasis)."""
    return html.escape(text, quote=False).translate(_MARKDOWN_SPECIALS)


def _plain(text: str) -> str:
    """``text`` for the chat, which shows plain text (``render_markdown=False``) but still renders HTML."""
    return html.escape(text, quote=False)


# The engine's and the API's errors name request fields; here they are the answer settings' names. The upload
# queues' speak of clients: a UI user is counted by its address.
_UI_WORDS = (("(truncate_pages)", "(page selection: first)"),
             ("(page_selection retrieve)", "(page selection: retrieve)"),
             ("lower max_tokens to", "lower the maximum answer tokens to"),
             ("plus max_tokens", "plus the maximum answer tokens"),
             ("this client has", "your address has"),
             ("from one client at once", "from one address at once"),
             ("this client's other uploads held its", "other uploads from your address held the"),
             ("other clients' uploads held them all", "other users' uploads held them all"))


def _fail(exc: Exception) -> str:
    """Show ``exc`` as a toast headed Error and return the status-box text (messages may quote names users chose)."""
    if isinstance(exc, GlyphserveError):
        message = _in_ui_words(exc.message)
    else:
        log.error("UI action failed", exc_info=exc)
        message = "internal error; the server log has the details"
    _error_toast(html.escape(message, quote=False))
    return f"**Error:** {_literal(message)}"


def _in_ui_words(message: str) -> str:
    for api, ui in _UI_WORDS:
        message = message.replace(api, ui)
    return message


def _error_toast(message: str) -> None:
    """A toast headed Error. The UI framework heads a toast with its level, not its title (``gr.Warning``'s read
    Warning whatever its title), and only its exceptions (``gr.Error``) have the error level, which would drop the
    event's outputs, the status box's text with them. So ``gr.Warning``'s own call, ``log_message``, at the error
    level, which the framework's messages take (``LogMessage``) though the call's type does not list it."""
    from gradio.helpers import log_message

    log_message(message, title="Error", level="error", duration=ERROR_TOAST_S)  # type: ignore[arg-type]


def _document_label(record: DocumentRecord) -> str:
    return f"{record.title} · {record.pages} page{'s' if record.pages != 1 else ''} · {record.id[:8]}"


def _stats_markdown(record: DocumentRecord) -> str:
    s = record.summary
    ratio = f"{s['compression_ratio']:.2f}×" if s.get("compression_ratio") else "n/a"
    render = s.get("render", {})
    figures = (("characters", f"{s['characters']:,}"), ("text tokens", f"{s['text_tokens']:,}"),
               ("vision tokens", f"{s['vision_tokens']:,}"), ("compression", ratio))
    # One figure a row: four columns in the narrow column broke their words ("charac/ters"). In HTML, as Markdown
    # has no table without a header row (its header was an empty row above the figures); each figure's name heads
    # its row. The figures align right by style, which the UI framework's table style overrides in an attribute.
    # (On one line: a blank line would end the HTML block.)
    rows = "".join(f'<tr><th scope="row">{label}</th><td style="text-align:right">{value}</td></tr>'
                   for label, value in figures)
    return (
        f"<table><tbody>{rows}</tbody></table>\n\n"
        f"{record.pages} page(s) · {render.get('dpi', '?')} dpi · newline {render.get('newline', '?')} · "
        f"font {render.get('font', '?')} · id `{record.id}` (the API's)"
        + (f"\n\n⚠️ {s['warning']}" if s.get("warning") else "")
    )


def _evidence(service: GlyphService, reply: Reply) -> str:
    """The page rows of each cited passage, inline (wide strips do not suit a gallery's square tiles)."""
    figures = []
    for c in reply.citations:
        if c.page is None or not c.rows or c.document is None:
            continue
        try:
            png = service.page_png(c.document, c.page, c.rows)
        except (NotFoundError, OSError):  # its document was deleted while the answer ran
            continue
        figures.append(
            f'<figure style="margin:0 0 12px 0"><figcaption><b>page {c.page}</b></figcaption>'
            f'<img alt="page {c.page}, rows {c.rows[0]}-{c.rows[1]}" style="max-width:100%;border:1px solid #ddd" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
        )
    return "<h4>Where the answer sits</h4>" + "".join(figures) if figures else ""


def _reply_markdown(reply: Reply, names: dict[str, str]) -> str:
    answer = reply.answer
    timings = " · ".join(f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in asdict(answer.timings).items()
                         if seconds)
    lines = [f"**Timings:** {timings or 'n/a'}"]
    if reply.pages_shown:
        what = "Pages cited" if reply.backend == "extractive" else "Pages shown to the model"
        lines.append(f"**{what}:** " + ", ".join(
            str(p) if isinstance(p, int) else f"{_literal(names.get(p['document'], 'document'))} p. {p['page']}"
            for p in reply.pages_shown))
    if reply.backend != "extractive":
        c = answer.cache
        lines.append(
            f"**Cache:** vision {c.vision_hits} hit(s) / {c.vision_misses} miss(es) · "
            f"prefix reused {c.prefix_reused_tokens} tokens · "
            f"**Tokens:** {answer.prompt_tokens} prompt ({answer.vision_tokens} vision), "
            f"{answer.new_tokens} generated ({answer.finish_reason})"
        )
    else:
        lines.append(f"**Extractive:** {len(reply.citations)} passage(s) found")
    return "\n\n".join(lines)


def _stored_record(service: GlyphService, document_id: str) -> DocumentRecord | None:
    """The document's record; None once it is deleted (in another tab, through the API)."""
    try:
        return service.store.get(document_id)
    except NotFoundError:
        return None


def _names(service: GlyphService, document_ids: list[str]) -> dict[str, str]:
    records = {d: _stored_record(service, d) for d in document_ids}
    return {d: r.title if r is not None else "a deleted document" for d, r in records.items()}


def _gallery_items(service: GlyphService, document_ids: list[str], shown_pages: list | None = None):
    """Every page of the chosen documents; the pages the last answer showed (or cited) are marked."""
    marked = {(p["document"], p["page"]) if isinstance(p, dict) else (document_ids[0], p)
              for p in shown_pages or []}
    items = []
    for document_id in document_ids:
        record = _stored_record(service, document_id)
        if record is None:  # deleted meanwhile (another tab, the API): its pages are gone
            continue
        name = record.title
        for n, path in enumerate(service.store.pages(document_id), 1):
            caption = f"page {n}" if len(document_ids) == 1 else f"{name} · page {n}"
            items.append((str(path), f"● {caption} · shown" if (document_id, n) in marked else caption))
    return items


def _tokens_needed(record: DocumentRecord, context: int | None) -> int:
    """Tokens a question about all of ``record``'s pages needs at the least: its pages, their markers, the
    template's own tokens and the room kept for an answer of unset length (the planner's count for an empty
    question)."""
    return (record.summary.get("vision_tokens", 0) + record.pages * PAGE_MARKER_TOKENS + PROMPT_TOKENS
            + MESSAGE_TOKENS + answer_room(context))


def _warmth_note(service: GlyphService, document_id: str, context: int | None) -> str:
    """What the model has read of the document ahead of its first question (a sentence for the status box)."""
    warmth = service.warmth(document_id) if service.has_model else None
    record = _stored_record(service, document_id)
    if record is not None and context and _tokens_needed(record, context) > context:
        # Longer than the context: warming reads the pages an empty question would be shown, and each question
        # is shown the pages that match it.
        return {"warming": " The model is reading its first pages in the background (the document is longer "
                           "than its context: questions shown other pages start cold).",
                "warm": " The model has read its first pages (the document is longer than its context)."
                }.get(warmth, "")
    return {"warming": " The model is reading its pages in the background; the first answer will come as "
                       "fast as a follow-up's.",
            "warm": " The model has read its pages: answers start at once."}.get(warmth, "")


def _status_only(status: str) -> tuple:
    """``shown``'s outputs that change the status box alone."""
    return (gr.skip(),) * 6 + (status,) + (gr.skip(),) * 2


def _confirming(document_id: str | None) -> tuple:
    """The delete step's outputs: (the document awaiting confirmation, Delete, Confirm delete, Cancel). Awaiting
    one, Delete gives way to Confirm delete and Cancel; None, Delete is back."""
    asking = document_id is not None
    return document_id, gr.update(visible=not asking), gr.update(visible=asking), gr.update(visible=asking)


def _delete_question(name: str) -> str:
    """The status-box text that asks to confirm deleting the document named ``name``."""
    # The store is one for all users: the list shows every user's documents, and an identical upload is stored
    # once, whoever sent it. So one user's delete takes the document from everyone, which a user must know first.
    return (f"Delete **{_literal(name)}** for every user of this server? Documents are shared: every user's list "
            "shows them, and the same file uploaded by several users is stored once, so deleting it removes it and "
            "its pages for all of them. Press **Confirm delete** to delete it, or **Cancel** to keep it.")


def _refused_upload(report: str | None, config: ServeConfig):
    """The status-box text for a file the page did not send (JSON of its name and more): one larger than the upload
    limit, refused in the page (``page_scripts.watch_uploads``: its size; with a toast headed Error), or one whose
    request the server refused (``page_scripts.REPORT_FAILED_UPLOADS``: the server's message, which the UI
    framework's own toast shows); anything else changes nothing."""
    try:
        refused = json.loads(report or "")
        name = str(refused["name"])
        if "message" in refused:
            message = _in_ui_words(str(refused["message"])[:2000])
            said = f"'{name}' was not sent: {message}" if name else message
            return f"**Error:** {_literal(said)}"
        size = int(refused["size"])
        check_upload_size(size, config)
    except FileTooLargeError as exc:
        return _fail(FileTooLargeError(f"'{name}' was not sent: {exc.message}"))
    except (ValueError, TypeError, KeyError, IndexError, OverflowError):
        pass
    return gr.skip()


class _DocumentNames:
    """Documents' names by id, as the UI's lists showed them: a page may still show a document as chosen after it was
    deleted (in another tab, through the API), when the store no longer has its name. Each listing of the store is
    remembered, with the names of the latest ``KEPT_DELETED`` documents gone from it."""

    KEPT_DELETED = 1024

    def __init__(self, service: GlyphService):
        self._service = service
        self._names: dict[str, str] = {}

    def listed(self) -> list[DocumentRecord]:
        """The stored documents, their names remembered."""
        records = self._service.store.list()
        now = {r.id: r.title for r in records}
        gone = [(d, name) for d, name in self._names.items() if d not in now]
        self._names = dict(gone[-self.KEPT_DELETED:]) | now  # (replaced whole: handlers on threads read it)
        return records

    def deleted(self, document_ids: list[str]) -> list[str | None]:
        """The names of those of ``document_ids`` no longer stored; None for one no listing here showed."""
        return [self._names.get(d) for d in document_ids if _stored_record(self._service, d) is None]


def _deleted_documents(names: list[str | None]) -> str:
    """Deleted documents as a message names them: 'a.txt', or 'a.txt' and 'b.txt' (one never listed here: a chosen
    document)."""
    named = [f"'{name}'" if name is not None else "a chosen document" for name in names]
    return named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"


def _deleted_status(names: _DocumentNames, document_ids: list[str], exc: NotFoundError) -> str:
    """The status-box text, with a toast headed Error, for an action on chosen documents that were deleted elsewhere
    (in another tab, through the API): they are named as the lists showed them (the store's error has an id)."""
    gone = names.deleted(document_ids)
    if not gone:  # (not one of them)
        return _fail(exc)
    return _fail(GlyphserveError(f"{_deleted_documents(gone)} {'were' if len(gone) > 1 else 'was'} deleted (in "
                                 "another tab or through the API): choose another document"))


def _already_deleted(names: _DocumentNames, document_id: str) -> str:
    """The status-box text when the document that Delete or Confirm delete acts on was deleted elsewhere (in another
    tab, through the API). What the user asked for is done: no error, and no toast (a delete of its own has none)."""
    gone = names.deleted([document_id]) or [None]
    return _literal(f"{_deleted_documents(gone)} was already deleted (in another tab or through the API).")


def build_ui(service: GlyphService) -> gr.Blocks:
    info = service.describe()
    if info["notice"]:
        banner = f"⚠️ **{info['notice']}**"
    else:
        banner = f"Model: **{info['model']}** — answers come from the vision-language model, streamed."

    names = _DocumentNames(service)

    def choices():
        return [(_document_label(r), r.id) for r in names.listed()]

    context = getattr(service.engine, "max_context", None) if service.has_model else None

    def nothing_chosen(status: str, chat=gr.skip()):
        """The page with no document chosen (``shown``'s outputs): what it acts on is cleared with what it shows,
        so Delete, Rename and Send never act on a document the list no longer shows as chosen (the chat as it was,
        unless ``chat`` is given)."""
        return [], [], "", gr.update(choices=choices(), value=[]), "", chat, status, "", ""

    def shown(records: list[DocumentRecord], status: str):
        """What the page shows for the chosen documents (one, or a collection): (documents, gallery, stats,
        dropdown, name box, chat, status, answer stats, evidence)."""
        ids = [r.id for r in records]
        stats_text = "\n\n".join((f"**{_literal(r.title)}**\n\n" if len(records) > 1 else "")
                                  + _stats_markdown(r) for r in records)
        return (ids, _gallery_items(service, ids), stats_text, gr.update(choices=choices(), value=ids),
                records[0].name or "" if len(records) == 1 else "", [], status, "", "")

    async def add(options: RenderOptions, request: gr.Request, **source):
        try:
            record, duplicate = await service.add_document(options=options, client=client_of(request), **source)
        except Exception as exc:
            return _status_only(_fail(exc))
        name = record.title
        status = (f"**{_literal(name)}** was already stored with these settings: showing it." if duplicate
                  else f"Rendered **{_literal(name)}** into {record.pages} page(s).")
        return shown([record], status + _warmth_note(service, record.id, context) + leave(request, [record.id]))

    copies = _UploadCopies()

    async def upload_file(file_path, preset, dpi, newline, request: gr.Request):
        if not file_path:
            return (gr.skip(),) * 10
        path = Path(file_path)
        if not path.is_file():  # (the framework's copy gone: a cache cleared under the server)
            return (*_status_only(_fail(GlyphserveError(f"'{path.name}' was not found on the server after its "
                                                        "upload: upload it again"))), None)
        with copies.held(path, Path(demo.GRADIO_CACHE)):  # (read from it when its turn comes)
            shown_now = await add(RenderOptions(preset, int(dpi), newline), request, path=path, filename=path.name,
                                  name=path.name)
        return (*shown_now, None)  # and the upload box empties

    async def render_text(pasted, preset, dpi, newline, request: gr.Request):
        if not pasted or not pasted.strip():
            return _status_only(_fail(GlyphserveError("paste some text first")))
        return await add(RenderOptions(preset, int(dpi), newline), request, text=pasted)

    async def load_example(preset, dpi, newline, request: gr.Request):
        return await add(RenderOptions(preset, int(dpi), newline), request, data=EXAMPLE.read_bytes(),
                         filename=EXAMPLE.name, name=EXAMPLE.name)

    async def select(document_ids, request: gr.Request):
        if not document_ids:
            return await asyncio.to_thread(nothing_chosen, "No document chosen: choose one from the list, or upload "
                                                           "one.")
        return await asyncio.to_thread(selected, document_ids, leave(request, document_ids))

    def selected(document_ids, stopped: str):
        """The page for the chosen documents; ``stopped``: what ``leave`` said (the store is read off the loop)."""
        try:
            records = [service.store.get(d) for d in document_ids]
        except NotFoundError as exc:
            return nothing_chosen(_deleted_status(names, document_ids, exc))
        except Exception as exc:
            return _status_only(_fail(exc))
        what = ", ".join(f"**{_literal(r.title)}**" for r in records)
        together = (" Questions go to all of them together." if len(records) > 1
                    else _warmth_note(service, records[0].id, context))
        return shown(records, f"Selected {what}." + together + stopped)

    def cleared(document_ids):
        """The list emptied by its clear-all button, which the UI framework reports as a change but not as input:
        nothing stays chosen behind it (the status as it was)."""
        if document_ids:
            return (gr.skip(),) * 9
        return [], [], "", gr.skip(), "", gr.skip(), gr.skip(), "", ""

    def one(document_ids, action: str) -> str:
        if not document_ids or len(document_ids) != 1:
            raise GlyphserveError(f"choose one document to {action}")
        return document_ids[0]

    def rename(document_ids, name):
        try:
            record = service.rename_document(one(document_ids, "rename"), name or "")
        except NotFoundError as exc:
            return gr.update(choices=choices(), value=[]), _deleted_status(names, document_ids, exc)
        except Exception as exc:
            return gr.skip(), _fail(exc)
        return gr.update(choices=choices(), value=[record.id]), f"Renamed to **{_literal(record.name)}**."

    def ask_delete(document_ids):
        """Delete's first step: the status says what deleting the chosen document does, and Delete gives way to
        Confirm delete and Cancel. (``shown``'s outputs, then ``_confirming``'s.)"""
        try:
            record = service.store.get(one(document_ids, "delete"))
        except NotFoundError:
            return *nothing_chosen(_already_deleted(names, document_ids[0])), *_confirming(None)
        except Exception as exc:
            return *_status_only(_fail(exc)), *_confirming(None)
        return *_status_only(_delete_question(record.title)), *_confirming(record.id)

    def delete(document_ids, awaiting):
        """Confirm delete: deletes the document Delete asked about, if it is still the one chosen."""
        try:
            document_id = one(document_ids, "delete")
            if document_id != awaiting:  # (the choice changed while Confirm delete showed)
                raise GlyphserveError("the chosen document changed: press Delete document again")
            name = service.store.get(document_id).title
            service.delete_document(document_id)
        except NotFoundError:
            return *nothing_chosen(_already_deleted(names, document_id)), *_confirming(None)
        except Exception as exc:
            return *_status_only(_fail(exc)), *_confirming(None)
        return *nothing_chosen(f"Deleted **{_literal(name)}** for every user of this server.", chat=[]), \
            *_confirming(None)

    # The questions each browser session has in flight (Send and Enter are two events: both can run), so that its
    # Stop ends exactly those.
    asked: dict[str, list[_Asked]] = {}

    async def chat(question, history, document_ids, use_cache, max_tokens, temperature, page_selection, listed,
                   request: gr.Request):
        """Yields (chat, question box, answer stats, status, evidence, gallery, chosen documents, document list).
        A question that fails before any answer leaves the chat and goes back to the question box (a failed turn
        is no conversation to send with the next question); Stop ends it with what was answered kept."""
        history = list(history or [])
        keep = (gr.skip(),) * 2  # the chosen documents and the list, as they are
        if any(not a.stop for a in asked.get(_session(request), [])):
            # One answer at a time in a page (the framework ignores Send during Send's answer, not Enter): two
            # answers came into one chat, each writing its conversation over the other's. Refused in a toast (the
            # answer's status stays) with the question back in its box, to send again.
            _fail(GlyphserveError("an answer is still coming: send the next question once it has ended, or press "
                                  "Stop first"))
            yield gr.skip(), question, *(gr.skip(),) * 6
            return
        if not document_ids and listed:  # the session's state was lost (a server restart), the page still shows them
            try:
                document_ids = [d for d in listed if _stored_record(service, d) is not None]
            except Exception as exc:  # the store failing (its message is the user's to read)
                yield history, question, gr.skip(), _fail(exc), gr.skip(), gr.skip(), *keep
                return
            keep = (document_ids, gr.skip())
        if not document_ids:
            yield (history, question, gr.skip(), _fail(GlyphserveError("upload or select a document first")),
                   gr.skip(), gr.skip(), *keep)
            return
        if not question or not question.strip():
            yield (history, gr.skip(), gr.skip(), _fail(GlyphserveError("type a question first")), gr.skip(),
                   gr.skip(), *keep)
            return
        turns = [ChatMessage(m["role"], html.unescape(_text(m["content"]))) for m in history
                 if not (m.get("metadata") or {}).get("title") and m["role"] in ("user", "assistant")]
        settings = GenerationSettings(max_tokens=int(max_tokens), temperature=float(temperature),
                                      use_cache=bool(use_cache))
        job = ChatJob(AnswerRequest(pages=[], question=question, history=turns, settings=settings),
                      document_id=document_ids[0] if len(document_ids) == 1 else None,
                      documents=list(document_ids) if len(document_ids) > 1 else None, page_selection=page_selection)
        before = list(history)
        history.append({"role": "user", "content": _plain(question)})
        session = _session(request)
        mine = _Asked(job)
        asked.setdefault(session, []).append(mine)
        thinking = answer = None

        def stopped():
            if mine.left:  # the page shows other documents now, with a chat of their own (``leave``)
                return (gr.skip(),) * 8
            if thinking is not None:
                thinking["metadata"]["status"] = "done"
            if thinking is None and answer is None:  # nothing came: the question goes back to its box
                return before, question, gr.skip(), "Stopped before any answer came.", gr.skip(), gr.skip(), *keep
            return history, gr.skip(), gr.skip(), "Stopped: what came of the answer stays in the chat.", \
                gr.skip(), gr.skip(), *keep

        try:
            # (the question box was emptied in the page as it was sent: ``ask_after_uploads``)
            yield history, gr.skip(), "", "Answering…", "", gr.skip(), *keep  # (inside: a close still unregisters)
            prepared = await service.prepare(job)  # (pages chosen and read: Stop may come meanwhile)
            if mine.stop:
                yield stopped()
                return
            items = await service.scheduler.stream(prepared)
            try:
                async for item in items:
                    if mine.stop:
                        yield stopped()
                        return
                    if isinstance(item, StreamEvent) and item.channel == "thinking":
                        if thinking is None:
                            thinking = {"role": "assistant", "content": "",
                                        "metadata": {"title": THINKING_TITLE, "status": "pending"}}
                            history.append(thinking)
                        thinking["content"] += _plain(item.text)
                    elif isinstance(item, StreamEvent):
                        if answer is None:
                            answer = {"role": "assistant", "content": ""}
                            history.append(answer)
                        answer["content"] += _plain(item.text)
                    else:
                        if thinking is not None:
                            thinking["metadata"]["status"] = "done"
                        left = [d for d in document_ids if _stored_record(service, d) is not None]
                        done, chosen = "Done.", keep
                        if len(left) < len(document_ids):  # deleted while it was answered (another tab, the API)
                            done = ("Done. A document it was about was deleted meanwhile: the answer is kept here, "
                                    "the document's pages are gone.")
                            chosen = (left, gr.update(choices=choices(), value=left))
                        yield (history, gr.skip(), _reply_markdown(item, _names(service, document_ids)), done,
                               _evidence(service, item), _gallery_items(service, document_ids, item.pages_shown),
                               *chosen)
                        return
                    # (the question box as the user left it: the next question may be typed meanwhile)
                    yield history, gr.skip(), "", "Answering…", "", gr.skip(), *keep
            finally:
                await items.aclose()
        except Cancelled:  # Stop took it out of the queue, or ended it at a token; or the server is closing
            yield stopped() if mine.stop else (
                before, question, gr.skip(), _fail(GlyphserveError("the server cancelled the question")), gr.skip(),
                gr.skip(), *keep)
        except NotFoundError as exc:  # a chosen document was deleted before the question could be asked
            yield (before, question, gr.skip(), _deleted_status(names, document_ids, exc), gr.skip(), [], [],
                   gr.update(choices=choices(), value=[]))
        except Exception as exc:
            if mine.stop:
                yield stopped()
            elif thinking is None and answer is None:
                yield before, question, gr.skip(), _fail(exc), gr.skip(), gr.skip(), *keep
            else:
                yield history, gr.skip(), gr.skip(), _fail(exc), gr.skip(), gr.skip(), *keep
        finally:
            questions = asked.get(session, [])
            if mine in questions:
                questions.remove(mine)
            if not questions:
                asked.pop(session, None)

    def leave(request: gr.Request, document_ids: list[str]) -> str:
        """Stop this session's questions about other documents than ``document_ids``, now shown in their place with
        a chat of their own: an answer that went on wrote its conversation and its documents' pages over theirs (a
        file uploaded while an answer came). The status's sentence on it. On the event loop, as ``stop_asked``."""
        left = False
        for mine in asked.get(_session(request), []):
            job = mine.job
            if set(job.documents or [job.document_id]) != set(document_ids) and not mine.stop:
                mine.stop = mine.left = True
                service.scheduler.cancel(job)
                left = True
        return " The answer in progress, about the document shown before, was stopped." if left else ""

    async def stop_asked(request: gr.Request):
        """Stop this session's questions: a waiting one leaves the queue, a running one ends at its next token, one
        still being prepared is not asked; each question's own handler then shows what came (nothing here: a
        question may have just ended). On the event loop: Ray Serve's scheduler cancels on it."""
        for mine in asked.get(_session(request), []):
            mine.stop = True
            service.scheduler.cancel(mine.job)

    with gr.Blocks(title="glyphserve", analytics_enabled=False) as demo:
        gr.Markdown("# glyphserve\nRender a long document into compact pages, then ask questions about it. "
                    "[API docs](/docs) · OpenAI-compatible API at `/v1`", elem_id="header")
        gr.Markdown(banner, elem_id="backend-notice")
        document = gr.State([])  # the chosen documents' ids: one, or a collection
        awaiting = gr.State(None)  # the document Delete asked to confirm deleting
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                with gr.Tab("Upload"):
                    # Any file name: the server tells the type from the content, as the API does (the framework's
                    # file_types refused NOTES and app.log by their names, in the page).
                    upload = gr.File(label=f"PDF, DOCX, plain text or Markdown (told by its content, whatever its "
                                           f"name), up to {service.config.max_upload_mb:g} MiB: rendered as soon as "
                                           "it arrives", type="filepath", elem_id="upload")
                    upload_refused = gr.Button("File refused", visible="hidden", elem_id="upload-refused")
                with gr.Tab("Paste text"):
                    pasted = gr.Textbox(label="Text to render", lines=8, elem_id="pasted")
                    render_button = gr.Button("Render text", variant="primary", elem_id="render")
                with gr.Tab("Example"):
                    gr.Markdown("A short company report with figures to ask about.")
                    example_button = gr.Button("Load the example document", elem_id="example")
                with gr.Accordion("Rendering", open=False):
                    preset = gr.Radio(list(PRESETS), value="auto", label="Preset", elem_id="preset",
                                      info="Glyph's released page settings: English, Chinese, or chosen from the text")
                    dpi = gr.Radio([str(d) for d in DPIS], value=str(DPIS[0]), label="DPI", elem_id="dpi",
                                   info="72: Glyph's default, fewest vision tokens; 96: sharper, more tokens")
                    newline = gr.Radio(list(NEWLINES), value=NEWLINES[0], label="Newlines", elem_id="newline",
                                       info="br: real line breaks; marker: Glyph's inline red \\n, denser pages")
                stored = gr.Dropdown(choices=choices(), value=[], multiselect=True, elem_id="stored",
                                     label="Stored documents (choose several to ask about them together)")
                with gr.Row():
                    name = gr.Textbox(label="Document name", scale=3, elem_id="name")
                    rename_button = gr.Button("Rename", scale=1, elem_id="rename")
                with gr.Row():
                    delete_button = gr.Button("Delete document", variant="stop", elem_id="delete")
                    confirm_delete = gr.Button("Confirm delete", variant="stop", visible=False,
                                               elem_id="confirm-delete")
                    cancel_delete = gr.Button("Cancel", visible=False, elem_id="cancel-delete")
                stats = gr.Markdown("", elem_id="stats")
            with gr.Column(scale=2, min_width=420):
                chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chat", buttons=["copy"], render_markdown=False)
                # The question on a row of its own: beside three buttons it kept ~150 px of a 1400 px page.
                # Its label is not shown, but it is the box's accessible name (unset, the framework's was "Textbox").
                question = gr.Textbox(label="Question", placeholder="Ask a question about the document",
                                      show_label=False, elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", scale=2, min_width=80, elem_id="send")
                    stop = gr.Button("Stop", scale=1, min_width=80, elem_id="stop")
                    clear = gr.Button("Clear", scale=1, min_width=80, elem_id="clear")
                with gr.Accordion("Answer settings", open=False, elem_id="settings"):
                    use_cache = gr.Checkbox(value=True, label="Use caches", elem_id="use-cache",
                                            info="Reuse the pages' vision features and the document's prefix: "
                                                 "follow-up questions start at once")
                    longest = _longest_answer(context)
                    max_tokens = gr.Slider(16, longest, value=min(GenerationSettings.max_tokens, longest),
                                           step=16, label="Maximum answer tokens (max_tokens)", elem_id="max-tokens",
                                           info="Glyph thinks before it answers: long answers need room, and "
                                                "the pages shown get less")
                    temperature = gr.Slider(0.0, MAX_TEMPERATURE, value=0.0, step=0.05, label="Temperature",
                                            elem_id="temperature", info="0 answers greedily (the same every time)")
                    page_selection = gr.Radio(
                        ["retrieve", "first", "all"], value=service.config.page_selection, label="Page selection",
                        elem_id="page-selection",
                        info="When the pages do not all fit: those that match the question (retrieve), the first "
                             "ones (first), or refuse (all)")
            with gr.Column(scale=1, min_width=280):
                status = gr.Markdown("", elem_id="status")
                answer_stats = gr.Markdown("", elem_id="answer-stats")
                evidence_html = gr.HTML("", visible=not service.has_model, elem_id="evidence")
        # scale-down: a page smaller than its tile keeps its own size (contain enlarged it, blurred)
        gallery = gr.Gallery(label="Rendered pages (click one to read it full size)", columns=3, height=900,
                             object_fit="scale-down", elem_id="pages")

        shown_outputs = [document, gallery, stats, stored, name, chatbot, status, answer_stats, evidence_html]
        render_inputs = [preset, dpi, newline]
        # Each action first takes earlier toasts off the page (DISMISS_TOASTS, in the page, before its handler runs).
        # The uploads have no limit of the UI framework's own: it let 2 run at once for all users together, first
        # come first served (one user's 2 slow PDFs held every other user's upload back for their whole budget). The
        # upload queues share their threads fairly among users, told apart as the API's clients are (client_of), and
        # bound what each may have waiting; a file waits on disk, read when its turn comes.
        fair = {"js": DISMISS_TOASTS, "concurrency_limit": None}
        upload.upload(upload_file, [upload, *render_inputs], [*shown_outputs, upload], api_name="upload", **fair
                      ).then(None, js=UPLOAD_ENDED, api_name=False)  # (questions sent meanwhile wait for it)
        upload_refused.click(lambda report: _refused_upload(report, service.config), upload_refused, status,
                             js=REFUSED_FILE, api_name=False, concurrency_limit=None)
        render_button.click(render_text, [pasted, *render_inputs], shown_outputs, api_name="render_text", **fair)
        example_button.click(load_example, render_inputs, shown_outputs, api_name="load_example", **fair)
        stored.input(select, [stored], shown_outputs, api_name="select_document", js=DISMISS_TOASTS)
        stored.change(cleared, [stored], shown_outputs, api_name=False)
        rename_button.click(rename, [document, name], [stored, status], api_name="rename_document", js=DISMISS_TOASTS)
        # Delete asks first (the document goes for every user); any change of the chosen documents withdraws it.
        confirm_outputs = [awaiting, delete_button, confirm_delete, cancel_delete]
        delete_button.click(ask_delete, [document], [*shown_outputs, *confirm_outputs], api_name=False,
                            js=DISMISS_TOASTS)
        confirm_delete.click(delete, [document, awaiting], [*shown_outputs, *confirm_outputs],
                             api_name="delete_document", js=DISMISS_TOASTS)
        cancel_delete.click(lambda: (*_confirming(None), "Not deleted."), None, [*confirm_outputs, status],
                            api_name=False, js=DISMISS_TOASTS)
        document.change(lambda: _confirming(None), None, confirm_outputs, api_name=False)
        # (the document list last: the named endpoint's earlier parameters keep their places)
        chat_inputs = [question, chatbot, document, use_cache, max_tokens, temperature, page_selection, stored]
        chat_outputs = [chatbot, question, answer_stats, status, evidence_html, gallery, document, stored]
        asking = {"js": ask_after_uploads(chat_inputs.index(question), chat_inputs.index(chatbot)),
                  "concurrency_limit": service.config.queue_size}
        send.click(chat, chat_inputs, chat_outputs, api_name="chat", **asking)
        question.submit(chat, chat_inputs, chat_outputs, api_name=False, **asking)
        # Stop withdraws the session's question from the scheduler (a queued question leaves the queue, a running
        # one ends at its next token), and the question's handler shows the outcome: the UI framework's own
        # cancelling (cancels=) sometimes left the answer running, or the status at "Answering…" for good.
        stop.click(stop_asked, None, None, api_name=False)
        clear.click(lambda: ([], "", "", ""), None, [chatbot, answer_stats, evidence_html, status],
                    api_name="clear_chat", js=DISMISS_TOASTS)
        demo.load(lambda: gr.update(choices=choices()), None, stored, api_name="list_documents")
        if service.has_model and context is None:  # (engine replicas: known once one of them is up)
            demo.load(lambda: _answer_length_slider(service.max_context()), None, max_tokens, api_name=False)
    return demo


@dataclass
class _Asked:
    """A session's question in flight, whether its Stop was pressed, and whether the page left it for other
    documents (``leave``)."""

    job: ChatJob
    stop: bool = False
    left: bool = False


def _longest_answer(context: int | None) -> int:
    """The answer-length slider's top: at most half the context, so that the top answers (the whole context, a
    small one's top, left no room for a page: every question refused), in the slider's steps of 16."""
    return max(16, min(8192, context // 2 // 16 * 16)) if context else 8192


def _answer_length_slider(context: int | None):
    """The answer-length slider for ``context``, learnt after the page was built (nothing while still unknown)."""
    if not context:
        return gr.skip()
    longest = _longest_answer(context)
    return gr.update(maximum=longest, value=min(GenerationSettings.max_tokens, longest))


def _session(request: gr.Request | None) -> str:
    """The page's session (its questions in flight are kept by it)."""
    return request.session_hash if request is not None else ""


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


class _UploadCopies:
    """The UI framework's copies of uploads (``cache/<hash of the content>/<name>``), each removed ``grace_s`` after
    the last upload reading it is done (the document stored, or refused), unless another takes it meanwhile: the same
    file uploaded again, by any user, is the same copy, written before that upload's handler starts (three users
    sending one file at once: the first done removed it under the others, whose handlers then found no file). Used on
    the event loop alone."""

    def __init__(self, grace_s: float = UPLOAD_COPY_GRACE_S):
        self.grace_s = grace_s
        self._readers: Counter[Path] = Counter()

    @contextmanager
    def held(self, path: Path, cache: Path):
        self._readers[path] += 1
        try:
            yield
        finally:
            self._readers[path] -= 1
            if not self._readers[path]:
                del self._readers[path]
                asyncio.get_running_loop().call_later(self.grace_s, self._remove, path, cache)

    def _remove(self, path: Path, cache: Path) -> None:
        if not self._readers.get(path):
            _remove_upload_copy(path, cache)


def _remove_upload_copy(path: Path, cache: Path) -> None:
    """Delete the UI framework's copy of an upload (``cache/<hash>/<name>``), and its folder once empty."""
    if not path.resolve().is_relative_to(cache.resolve()):
        return
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass  # another file shares the folder


def _page_copies(cache: Path):
    """A delete hook: remove the UI framework's copies of a document's pages (a gallery copies what it shows,
    into ``cache/<hash of the file>/``); returns what could not be removed."""
    from gradio.processing_utils import hash_file

    def remove(folder: Path) -> list[str]:
        failed: list[str] = []
        for page in sorted(folder.glob("*.png")):
            copies = cache / hash_file(page)
            if copies.exists():
                shutil.rmtree(copies, onerror=lambda _f, path, _e: failed.append(path))
        return failed

    return remove


def mount_ui(app: FastAPI, service: GlyphService) -> FastAPI:
    key = service.config.api_key
    auth = (lambda _user, password: secrets.compare_digest(password, key)) if key else None
    blocks = build_ui(service)
    service.copy_holders.append(_page_copies(Path(blocks.GRADIO_CACHE)))
    return gr.mount_gradio_app(
        app, blocks, path="/", auth=auth,
        auth_message="Sign in with any user name and the server's API key as the password." if key else None,
        allowed_paths=[str(service.store.docs)], max_file_size=service.config.max_upload_bytes,
        ssr_mode=False, theme=THEME, footer_links=[], mcp_server=False,
        js=watch_uploads(service.config.max_upload_bytes), head=PAGE_HEAD,
    )
