"""The scripts the web UI runs in the page: what the UI framework (Gradio) offers no call for.

Each is a constant the UI hands the framework (an event's ``js``, the page's ``js`` or ``head``), tested in a real
browser (tests/serve/test_ui.py, tests/serve/test_page_scripts.py).
"""

from __future__ import annotations

# Each toast reports on an earlier action: a new action (an upload, a question...) takes them off the page, or a
# stale error stayed up to 10 s beside the next upload's success. The UI framework has no call to dismiss a toast:
# its close buttons are pressed. Then the action waits (up to 1 s) until they have faded out and left the page: a
# toast shown while they fade joins them, and the timer of the earliest closes them all, so an error that came at
# once went again within a moment (an earlier error's 10 s ran out). (An event's js runs before its handler and hands
# the handler its inputs.)
_CLOSE_TOASTS = """
    const open = document.querySelectorAll('[data-testid="toast-close"]');
    open.forEach((button) => button.click());
    for (let waited = 0; open.length && document.querySelector('[data-testid="toast-body"]') && waited < 1000;
         waited += 50) {
        await new Promise((resolve) => setTimeout(resolve, 50));
    }"""
DISMISS_TOASTS = f"""async (...inputs) => {{{_CLOSE_TOASTS}
    return inputs;
}}"""
# A question sent while a file was on its way (picked, sent, rendered) was asked about the document chosen before,
# or refused ("upload or select a document first") with the upload's status written over the refusal: the handler
# reads the chosen documents as it starts, and the upload chooses its document as it ends. So the page counts its
# uploads in flight (``window.glyphserveUploads``: from the file picked or dropped on the upload box,
# ``_WATCH_UPLOADS``, until the upload's event has ended, UPLOAD_ENDED, or its request failed,
# REPORT_FAILED_UPLOADS), and a question waits for them, at most UPLOAD_WAIT_S (then the count is dropped: a request
# lost uncounted never ends it), before its handler runs. The inputs it hands on are the page's as the question was
# sent, but for the chat: the one the upload emptied, if it did so meanwhile (showing its document), or the
# conversation about the document before went with the question and came back over the new document's chat. The
# question box is emptied in the page as the question is sent, not by its handler as it starts: a question that
# waited had its handler wipe the next one, typed meanwhile.
UPLOAD_WAIT_S = 300
_ASK_AFTER_UPLOADS = f"""async (...inputs) => {{
    const box = document.querySelector('#question textarea');
    if (box && box.value === inputs[QUESTION]) {{
        box.value = '';
        box.dispatchEvent(new Event('input', {{bubbles: true}}));
    }}{_CLOSE_TOASTS}
    const uploads = window.glyphserveUploads;
    if (uploads && uploads.count) {{
        await uploads.idle({UPLOAD_WAIT_S * 1000});
        if (!document.querySelector('#chat .message-row')) inputs[CHAT] = [];
    }}
    return inputs;
}}"""


def ask_after_uploads(question_input: int, chat_input: int) -> str:
    """A question's script (its event's ``js``): it empties the question box and waits for the uploads in flight;
    ``question_input`` and ``chat_input`` are the places of the question and the chat among the event's inputs."""
    return _ASK_AFTER_UPLOADS.replace("QUESTION", str(int(question_input))).replace("CHAT", str(int(chat_input)))


UPLOAD_ENDED = "() => { if (window.glyphserveUploads) window.glyphserveUploads.ended(); }"
# The UI framework refuses a file over the size limit in the page, before sending it, with a toast and no event of
# ours: the status box went on saying what the action before did (an earlier upload's error beside the refusal),
# and the toasts before stayed. So the page refuses such a file first (picked, or dropped on the upload box; the
# framework's listeners never see it) and reports it by pressing a hidden button (#upload-refused) that holds its
# name and size: the server says why, as for any upload it refuses (``_refused_upload``). A file the upload box takes
# (picked, or dropped on its button: the box's label takes none) is counted in flight (``ask_after_uploads``). Run
# at page load.
_WATCH_UPLOADS = """() => {
    const uploads = window.glyphserveUploads = {
        count: 0,
        waiting: [],
        began() { this.count += 1; },
        ended() {
            this.count = Math.max(0, this.count - 1);
            if (!this.count) this.waiting.splice(0).forEach((wake) => wake());
        },
        idle(most) {
            if (!this.count) return null;
            return new Promise((wake) => {
                this.waiting.push(wake);
                setTimeout(() => {  // still waiting: the count is dropped
                    if (this.waiting.includes(wake)) {
                        this.count = 1;
                        this.ended();
                    }
                }, most);
            });
        },
    };
    const refuse = (event, files) => {
        if (!(event.target instanceof Element) || !event.target.closest('#upload') || !files || !files.length) return;
        const over = Array.from(files).find((file) => file.size > LIMIT);
        if (!over) {
            if (event.target.closest('#upload .upload-container')) uploads.began();
            return;
        }
        event.stopPropagation();  // (capturing: before the upload box's own listeners)
        event.preventDefault();
        if (event.type === 'change') event.target.value = '';
        const report = document.querySelector('#upload-refused');
        report.dataset.file = JSON.stringify({name: over.name, size: over.size});
        report.click();
    };
    document.addEventListener('change', (event) => refuse(event, event.target.files), true);
    document.addEventListener('drop', (event) => refuse(event, event.dataTransfer && event.dataTransfer.files), true);
}"""
# The hidden button's event hands its handler the file the page refused, as the button's own value.
REFUSED_FILE = f"""async () => {{{_CLOSE_TOASTS}
    return [document.querySelector('#upload-refused').dataset.file || ''];
}}"""


def watch_uploads(max_upload_bytes: int) -> str:
    """The page's script that refuses a file over ``max_upload_bytes`` before the UI framework sends it."""
    return _WATCH_UPLOADS.replace("LIMIT", str(int(max_upload_bytes)))


# The UI framework's page runs each event by a request that joins the server's queue (answered with the event's id)
# and reads what the events of the page send on one event stream, which the server closes once none of them is left.
# Two events racing lose one: the server closes the stream as one event ends, just before a second event's join
# reaches the queue, and when the join's answer reaches the page before the stream's close does, the page takes the
# stream as open for the new event and waits for it forever (its every box said "pending"). A proxy between page and
# server (Ray Serve's, in CI: a join took 0.6 s while the page load's list of documents ended) widens the window to
# the stream's delay; the framework's own script never opens the stream again. So the page keeps its stream: fetch
# is wrapped, the events joined are followed by their ids, and a close that comes while one of them has not ended is
# not handed on: the stream is opened again for the same session and read on as one, and what the queue held for
# the page arrives on it. (A join still under way at the close finds the stream closed and opens it itself.)
KEEP_EVENT_STREAM = """<script>
(() => {
    const send = window.fetch.bind(window);
    const joined = new Set();  // events joined, not ended
    const ended = new Set();  // events ended before their join was answered
    const CLOSE = 'data: {"msg":"close_stream","event_id":null}\\n\\n';
    const urlOf = (input) => (input instanceof Request ? input.url : String(input));
    const read = (message) => {
        if (!message.startsWith('data: ')) return null;
        try { return JSON.parse(message.slice(6)); } catch (error) { return null; }
    };
    window.fetch = async (input, init) => {
        const url = urlOf(input);
        if (url.includes('/queue/join')) {
            const response = await send(input, init);
            if (response.ok) {
                try {
                    const id = (await response.clone().json()).event_id;
                    if (id && !ended.delete(id)) joined.add(id);
                } catch (error) { /* not the queue's answer: nothing to follow */ }
            }
            return response;
        }
        const method = (init && init.method) || (input instanceof Request ? input.method : 'GET');
        if (!url.includes('/queue/data') || method.toUpperCase() !== 'GET') return send(input, init);
        const again = input instanceof Request ? new Request(input) : null;
        const first = await send(input, init);
        if (!first.ok || !first.body) return first;
        const encoder = new TextEncoder();
        const stream = new ReadableStream({
            async start(controller) {
                let response = first;
                try {
                    for (;;) {
                        const reader = response.body.getReader();
                        const decoder = new TextDecoder();
                        let buffer = '', reopen = false, closed = false;
                        for (;;) {
                            const {value, done} = await reader.read();
                            if (done) break;
                            buffer += decoder.decode(value, {stream: true});
                            for (let end = buffer.indexOf('\\n\\n'); end >= 0; end = buffer.indexOf('\\n\\n')) {
                                const message = buffer.slice(0, end + 2);
                                buffer = buffer.slice(end + 2);
                                const data = read(message);
                                if (data && data.msg === 'process_completed' && data.event_id
                                        && !joined.delete(data.event_id)) ended.add(data.event_id);
                                if (data && data.msg === 'close_stream') closed = true;
                                if (data && data.msg === 'close_stream' && joined.size) reopen = true;
                                else controller.enqueue(encoder.encode(message));
                            }
                        }
                        if (buffer) controller.enqueue(encoder.encode(buffer));
                        // A stream that ended without the server's close (a proxy's timeout, a replica gone) left
                        // the framework's script taking it as open for good, every later event waiting: closed here
                        // as the server would, the next event opens it again (and gets what the queue held).
                        if (!closed) {
                            joined.clear();
                            controller.enqueue(encoder.encode(CLOSE));
                            break;
                        }
                        if (!reopen) break;
                        response = null;
                        for (let wait = 250; wait <= 1000 && !response; wait *= 2) {  // a proxy's error: tried again
                            const next = await (again ? send(new Request(again)) : send(input, init));
                            if (next.ok && next.body) response = next;
                            else {
                                if (next.body) next.body.cancel().catch(() => {});
                                await new Promise((resolve) => setTimeout(resolve, wait));
                            }
                        }
                        if (!response) {  // close as the server would: the next event opens the stream again
                            joined.clear();
                            controller.enqueue(encoder.encode(CLOSE));
                            break;
                        }
                    }
                    controller.close();
                } catch (error) {  // the page fails every event waiting on the stream
                    joined.clear();
                    controller.error(error);
                }
            },
        });
        return new Response(stream, {status: first.status, statusText: first.statusText, headers: first.headers});
    };
})();
</script>"""

# A file whose upload request the server refuses (503 while the bodies in flight fill their budget, 408 for a body
# that stalls) got the UI framework's toast "HTTP 503: " and the server's JSON error body, raw, and the status box
# went on saying what the action before did. The failed response's body becomes the server's message alone (the
# toast reads "HTTP 503: the server is busy ..."), and the page reports the refusal by pressing the hidden button
# (#upload-refused) with the files' names and the message, for the status box (``ui._refused_upload``). An upload
# request failed, or not answered, ends its count in flight (``ask_after_uploads``). The upload's request alone: the
# framework's reads of its progress (``upload_progress``) are aborted at times while the upload goes on.
REPORT_FAILED_UPLOADS = """<script>
(() => {
    const send = window.fetch.bind(window);
    window.fetch = async (input, init) => {
        const url = new URL(input instanceof Request ? input.url : String(input), window.location.href);
        if (!url.pathname.endsWith('/gradio_api/upload')) return send(input, init);
        let response;
        try {
            response = await send(input, init);
        } catch (error) {  // no answer: the upload's event will not come
            if (window.glyphserveUploads) window.glyphserveUploads.ended();
            throw error;
        }
        if (response.ok) return response;
        if (window.glyphserveUploads) window.glyphserveUploads.ended();
        let message = '';
        try {
            const body = await response.clone().json();
            message = (body && body.error && body.error.message) || '';
        } catch (error) { /* not the server's error body: the framework's own words */ }
        if (!message) return response;
        const form = init && init.body instanceof FormData ? init.body : null;
        const names = form ? form.getAll('files').map((file) => file.name).filter(Boolean) : [];
        const report = document.querySelector('#upload-refused');
        if (report) {
            report.dataset.file = JSON.stringify({name: names.join(', '), status: response.status, message});
            report.click();
        }
        return new Response(message, {status: response.status, statusText: response.statusText,
                                      headers: {'content-type': 'text/plain; charset=utf-8'}});
    };
})();
</script>"""
# The page's head: its scripts that wrap fetch, each on its own paths.
PAGE_HEAD = KEEP_EVENT_STREAM + REPORT_FAILED_UPLOADS
