"""The web UI (Gradio Blocks), mounted at ``/`` of the API's FastAPI app.

It calls the same :class:`GlyphService` as the HTTP API (no loopback HTTP), so uploads,
answers, limits and metrics are shared. Errors appear in a status box and as a warning
toast, never as a traceback.
"""

from __future__ import annotations

import base64
import logging
import secrets
from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from glyphserve.errors import GlyphserveError
from glyphserve.serve.backends import ChatJob, ChatSettings, Delta, Reply, Turn
from glyphserve.serve.service import DPIS, NEWLINES, PRESETS, GlyphService, RenderOptions
from glyphserve.serve.store import DocumentRecord

log = logging.getLogger("glyphserve.serve")

FILE_TYPES = [".pdf", ".docx", ".txt", ".md", ".markdown"]
THINKING_TITLE = "Thinking"
# System fonts only: the default theme would link web fonts, and the UI must work offline.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def _fail(exc: Exception) -> str:
    """Show ``exc`` as a toast and return the status-box text."""
    if isinstance(exc, GlyphserveError):
        message = exc.message
    else:
        log.error("UI action failed", exc_info=exc)
        message = "internal error; the server log has the details"
    gr.Warning(message)
    return f"**Error:** {message}"


def _document_label(record: DocumentRecord) -> str:
    return f"{record.name or 'pasted text'} · {record.pages} page{'s' if record.pages != 1 else ''} · {record.id[:8]}"


def _stats_markdown(record: DocumentRecord) -> str:
    s = record.summary
    ratio = f"{s['compression_ratio']:.2f}×" if s.get("compression_ratio") else "n/a"
    render = s.get("render", {})
    return (
        f"| characters | text tokens | vision tokens | compression |\n|---:|---:|---:|---:|\n"
        f"| {s['characters']:,} | {s['text_tokens']:,} | {s['vision_tokens']:,} | {ratio} |\n\n"
        f"{record.pages} page(s) · {render.get('dpi', '?')} dpi · newline {render.get('newline', '?')} · "
        f"font {render.get('font', '?')}" + (f"\n\n⚠️ {s['warning']}" if s.get("warning") else "")
    )


def _reply_markdown(reply: Reply) -> str:
    timings = " · ".join(f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in reply.timings.items() if seconds)
    lines = [f"**Timings:** {timings or 'n/a'}"]
    if reply.backend == "engine":
        c = reply.cache
        lines.append(
            f"**Cache:** vision {c.get('vision_hits', 0)} hit(s) / {c.get('vision_misses', 0)} miss(es) · "
            f"prefix reused {c.get('prefix_reused_tokens', 0)} tokens · "
            f"**Tokens:** {reply.prompt_tokens} prompt ({reply.vision_tokens} vision), "
            f"{reply.completion_tokens} generated ({reply.finish_reason})"
        )
    else:
        lines.append(f"**Extractive:** {len(reply.citations)} passage(s) found")
    return "\n\n".join(lines)


def build_ui(service: GlyphService) -> gr.Blocks:
    info = service.describe()
    if info["notice"]:
        banner = f"⚠️ **{info['notice']}**"
    else:
        banner = f"Model: **{info['model']}** — answers come from the vision-language model, streamed."

    def choices():
        return [(_document_label(r), r.id) for r in service.store.list()]

    def gallery_items(record: DocumentRecord):
        return [(str(service.store.page_path(record.id, n)), f"page {n}") for n in range(1, record.pages + 1)]

    async def render(file_path, pasted, preset, dpi, newline):
        try:
            if file_path:
                path = Path(file_path)
                record = await service.add_document(
                    data=path.read_bytes(), filename=path.name, name=path.name,
                    options=RenderOptions(preset, int(dpi), newline))
            elif pasted and pasted.strip():
                record = await service.add_document(text=pasted, options=RenderOptions(preset, int(dpi), newline))
            else:
                return (gr.skip(),) * 5 + (_fail(GlyphserveError("upload a file or paste some text first")),) + \
                    (gr.skip(),) * 3
        except Exception as exc:
            return (gr.skip(),) * 5 + (_fail(exc),) + (gr.skip(),) * 3
        status = f"Rendered **{record.name or 'pasted text'}** into {record.pages} page(s)."
        return (record.id, gallery_items(record), _stats_markdown(record),
                gr.update(choices=choices(), value=record.id), [], status, "", "", None)

    def select(document_id):
        if not document_id:
            return (gr.skip(),) * 7
        try:
            record = service.store.get(document_id)
        except Exception as exc:
            return (gr.skip(),) * 5 + (_fail(exc), gr.skip())
        selected = f"Selected **{record.name or 'pasted text'}**."
        return (record.id, gallery_items(record), _stats_markdown(record), [], "", selected, "")

    async def chat(question, history, document_id, use_cache, max_tokens, temperature):
        history = list(history or [])
        if not document_id:
            yield history, gr.skip(), gr.skip(), _fail(GlyphserveError("render or select a document first")), gr.skip()
            return
        if not question or not question.strip():
            yield history, gr.skip(), gr.skip(), _fail(GlyphserveError("type a question first")), gr.skip()
            return
        turns = [Turn(m["role"], _text(m["content"])) for m in history
                 if not (m.get("metadata") or {}).get("title") and m["role"] in ("user", "assistant")]
        job = ChatJob(question=question, history=turns, document_id=document_id,
                      settings=ChatSettings(max_tokens=int(max_tokens), temperature=float(temperature),
                                            use_cache=bool(use_cache)))
        history.append({"role": "user", "content": question})
        yield history, "", "", "Answering…", ""
        thinking = answer = None
        try:
            items = await service.stream(job)
            try:
                async for item in items:
                    if isinstance(item, Delta) and item.channel == "thinking":
                        if thinking is None:
                            thinking = {"role": "assistant", "content": "",
                                        "metadata": {"title": THINKING_TITLE, "status": "pending"}}
                            history.append(thinking)
                        thinking["content"] += item.text
                    elif isinstance(item, Delta):
                        if answer is None:
                            answer = {"role": "assistant", "content": ""}
                            history.append(answer)
                        answer["content"] += item.text
                    else:
                        if thinking is not None:
                            thinking["metadata"]["status"] = "done"
                        yield history, "", _reply_markdown(item), "Done.", evidence(document_id, item)
                        return
                    yield history, "", "", "Answering…", ""
            finally:
                await items.aclose()
        except Exception as exc:
            yield history, gr.skip(), gr.skip(), _fail(exc), gr.skip()

    def evidence(document_id: str, reply: Reply) -> str:
        """The page rows of each cited passage, inline (wide strips do not suit a gallery's square tiles)."""
        figures = []
        for c in reply.citations:
            if c.page is None or not c.rows:
                continue
            png = service.page_png(document_id, c.page, c.rows)
            figures.append(
                f'<figure style="margin:0 0 12px 0"><figcaption><b>page {c.page}</b></figcaption>'
                f'<img alt="page {c.page}, rows {c.rows[0]}-{c.rows[1]}" style="max-width:100%;border:1px solid #ddd" '
                f'src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
            )
        return "<h4>Where the answer sits</h4>" + "".join(figures) if figures else ""

    with gr.Blocks(title="glyphserve", analytics_enabled=False) as demo:
        gr.Markdown("# glyphserve\nRender a long document into compact pages, then ask questions about it.")
        gr.Markdown(banner, elem_id="backend-notice")
        document = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                with gr.Tab("Upload"):
                    upload = gr.File(label="PDF, DOCX, TXT or Markdown", file_types=FILE_TYPES, type="filepath",
                                     elem_id="upload")
                with gr.Tab("Paste text"):
                    pasted = gr.Textbox(label="Text", lines=8, elem_id="pasted")
                preset = gr.Radio(list(PRESETS), value="auto", label="Preset")
                dpi = gr.Radio(list(DPIS), value=DPIS[0], label="DPI")
                newline = gr.Radio(list(NEWLINES), value=NEWLINES[0], label="Newlines")
                render_button = gr.Button("Render", variant="primary", elem_id="render")
                stored = gr.Dropdown(choices=choices(), value=None, label="Stored documents", elem_id="stored")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=2):
                stats = gr.Markdown("", elem_id="stats")
                gallery = gr.Gallery(label="Rendered pages", columns=4, height=480, object_fit="contain",
                                     elem_id="pages")
        chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chat", buttons=["copy"])
        with gr.Row():
            question = gr.Textbox(placeholder="Ask a question about the document", show_label=False, scale=5,
                                  elem_id="question")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            clear = gr.Button("Clear conversation", scale=1, elem_id="clear")
        with gr.Accordion("Settings", open=False):
            use_cache = gr.Checkbox(value=True, label="Use caches (vision features, document prefix)")
            max_tokens = gr.Slider(16, 8192, value=ChatSettings.max_tokens, step=16, label="Maximum answer tokens")
            temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
        answer_stats = gr.Markdown("", elem_id="answer-stats")
        evidence_html = gr.HTML("", label="Where the answer sits", visible=not service.has_model, elem_id="evidence")

        render_button.click(
            render, [upload, pasted, preset, dpi, newline],
            [document, gallery, stats, stored, chatbot, status, answer_stats, evidence_html, upload],
            concurrency_limit=2,
        )
        stored.input(select, [stored], [document, gallery, stats, chatbot, answer_stats, status, evidence_html])
        chat_inputs = [question, chatbot, document, use_cache, max_tokens, temperature]
        chat_outputs = [chatbot, question, answer_stats, status, evidence_html]
        for trigger in (send.click, question.submit):
            trigger(chat, chat_inputs, chat_outputs, concurrency_limit=service.config.queue_size)
        clear.click(lambda: ([], "", "", ""), None, [chatbot, answer_stats, evidence_html, status])
        demo.load(lambda: gr.update(choices=choices()), None, stored)  # documents added since start
    return demo


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def mount_ui(app: FastAPI, service: GlyphService) -> FastAPI:
    key = service.config.api_key
    auth = (lambda _user, password: secrets.compare_digest(password, key)) if key else None
    return gr.mount_gradio_app(
        app, build_ui(service), path="/", auth=auth,
        auth_message="Sign in with any user name and the server's API key as the password." if key else None,
        allowed_paths=[str(service.store.docs)], max_file_size=service.config.max_upload_bytes,
        ssr_mode=False, theme=THEME, footer_links=[], mcp_server=False,
    )
