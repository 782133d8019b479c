"""A web chat page for forward, backward and bidirectional checkpoints (docs/DESIGN.md §5).

    python -m scripts.chat_web                                        # newest model, http://127.0.0.1:8000
    python -m scripts.chat_web --source=base --model_tag=d4_bidi      # a base model: completion mode
    python -m scripts.chat_web --source=sft --model_tag=fwd_tag,bwd_tag --port 8080

One small FastAPI app and one static page (nanochat/web/index.html: no build step, nothing
fetched from elsewhere). Every generation goes through nanochat.engine (ChatHistory + Engine's
streaming fronts), the same path as scripts/chat_cli.py.

- chat, forward: a multi-turn chat; the model answers the latest question.
- chat, backward: the user types an answer; the model writes the question before it, shown
  above it and marked as generated; each next answer is an earlier one of the same conversation.
- completion (the default for base checkpoints): forward continues the text, backward writes
  the text that precedes it.
- side by side: the page sends the same text to two panes (a forward and a backward model, or
  both directions of one bidirectional model).

API (all errors are JSON {"error": "..."} with a 4xx/5xx status):
    GET  /health          {"status": "ok", "models": [...], "busy": {...}}
    GET  /api/models      the loaded models (name, direction, directions, chat, context) and limits
    POST /api/generate    {"model", "direction", "mode": "chat"|"completion", "text", "history",
                           "max_tokens", "temperature", "top_k", "seed"} -> text/event-stream of
                           `data: {json}` events: start, text (the generated text so far, reading
                           order), done, or error.

The server binds 127.0.0.1 unless --host says otherwise. Requests are bounded (body size, text
length, history turns, max_tokens); each model runs one generation at a time (an asyncio lock,
so concurrent requests never share a KV cache or interleave), and at most --max_queue requests
wait for it; more are refused with 503.
"""

import argparse
import asyncio
import json
import os
import sys
import threading

from nanochat.checkpoint_manager import SOURCE_DIRS, load_model
from nanochat.common import UserError, add_flag, compute_init, print0, run_main
from nanochat.direction import CONCRETE_DIRECTIONS
from nanochat.engine import ChatHistory, Engine

MODES = ("chat", "completion")


def page_path():
    """The page ships inside the nanochat package (see pyproject's package-data)."""
    import nanochat
    return os.path.join(os.path.dirname(os.path.abspath(nanochat.__file__)), "web", "index.html")


class Limits:
    """What one request may ask for; the page reads them from /api/models."""

    def __init__(self, max_body_bytes=64 * 1024, max_text_chars=4000, max_turns=16, max_tokens=256,
                 max_queue=8, temperature=0.8, top_k=50):
        self.max_body_bytes, self.max_text_chars, self.max_turns = max_body_bytes, max_text_chars, max_turns
        self.max_tokens, self.max_queue, self.temperature, self.top_k = max_tokens, max_queue, temperature, top_k

    def to_dict(self):
        return dict(vars(self))


class ModelSlot:
    """One loaded model, its lock (one generation at a time) and how many requests wait for it."""

    def __init__(self, name, engine, meta):
        self.name, self.engine, self.meta = name, engine, meta
        self.lock = asyncio.Lock()
        self.waiting = 0
        phase = str(meta.get("source") or meta.get("phase") or "")
        # Base checkpoints never saw the chat tokens in use: the page defaults them to completion.
        self.chat = phase not in ("base", "")

    def describe(self):
        return {"name": self.name, "direction": self.engine.direction,
                "directions": self.engine.spec.generation_directions(), "chat": self.chat,
                "source": self.meta.get("source"), "step": self.meta.get("step"),
                "context": self.engine.model.config.sequence_len}


class BadRequest(Exception):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def _number(body, key, kind, default, low, high):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise BadRequest(f"'{key}' must be a number")
    value = kind(value)
    if not low <= value <= high:
        raise BadRequest(f"'{key}' must be between {low} and {high}, not {value}")
    return value


def parse_request(body, slots, limits):
    """Validate a /api/generate body; returns (slot, plan) or raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = set(body) - {"model", "direction", "mode", "text", "history", "max_tokens", "temperature", "top_k", "seed"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    name = body.get("model") or next(iter(slots))
    if name not in slots:
        raise BadRequest(f"unknown model {name!r}: loaded models are {', '.join(slots)}", status=404)
    slot = slots[name]
    requested = body.get("direction") or None  # none: the model's default (forward for bidirectional)
    if requested is not None and requested not in CONCRETE_DIRECTIONS:
        raise BadRequest(f"'direction' must be forward or backward, not {requested!r}")
    try:
        direction = slot.engine.spec.generation_direction(requested)
    except UserError as e:
        raise BadRequest(f"model {name!r}: {e}")
    mode = body.get("mode") or ("chat" if slot.chat else "completion")
    if mode not in MODES:
        raise BadRequest(f"'mode' must be chat or completion, not {mode!r}")
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("'text' must be a non-empty string: a question or beginning (forward), "
                         "an answer or ending (backward)")
    if len(text) > limits.max_text_chars:
        raise BadRequest(f"'text' has {len(text)} characters; the limit is {limits.max_text_chars}", status=413)
    history = body.get("history") or []
    if mode == "completion" and history:
        raise BadRequest("'history' is for chat mode; completion takes only 'text'")
    if not isinstance(history, list) or len(history) % 2:
        raise BadRequest("'history' must be a list of whole exchanges (user and assistant messages)")
    if len(history) > 2 * limits.max_turns:
        raise BadRequest(f"'history' has {len(history) // 2} exchanges; the limit is {limits.max_turns}", status=413)
    for i, m in enumerate(history):
        # Reading order: forward [user, assistant, ...]; backward [user, assistant, ...] too (the
        # exchanges after the answer being typed now).
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != expected or not isinstance(m.get("content"), str):
            raise BadRequest(f"history[{i}] must be {{\"role\": \"{expected}\", \"content\": <string>}}")
        if len(m["content"]) > limits.max_text_chars:
            raise BadRequest(f"history[{i}] is longer than {limits.max_text_chars} characters", status=413)
    sampling = {
        "max_tokens": _number(body, "max_tokens", int, min(64, limits.max_tokens), 1, limits.max_tokens),
        "temperature": _number(body, "temperature", float, limits.temperature, 0.0, 2.0),
        "top_k": _number(body, "top_k", int, limits.top_k, 0, slot.engine.tokenizer.get_vocab_size()) or None,
        "seed": _number(body, "seed", int, 42, 0, 2 ** 31 - 1),
    }
    return slot, {"direction": direction, "mode": mode, "text": text, "history": history, "sampling": sampling}


def plan_generation(slot, plan):
    """(a function that starts the token stream, exchanges dropped to fit the context). Checks
    the prompt fits here, so an over-long input is a 400, not an error mid-stream."""
    engine, direction, text, sampling = slot.engine, plan["direction"], plan["text"], plan["sampling"]
    limit = engine.model.config.sequence_len
    room = min(sampling["max_tokens"], 32)
    try:
        if plan["mode"] == "completion":
            n = len(engine.spec.generation_prompt(engine.tokenizer.encode(text), direction))
            if n + room > limit:
                raise UserError(f"the text is {n} tokens with its header; the model's context is {limit} tokens")
            return (lambda: engine.complete_stream(text, direction, **sampling)), 0
        history = ChatHistory(direction, plan["history"])
        dropped = history.fit(engine, text, room)
        conversation = history.request(text)
        return (lambda: engine.chat_stream(conversation, direction, **sampling)), dropped
    except UserError as e:
        raise BadRequest(str(e), status=413)
    except ValueError as e:
        raise BadRequest(str(e))


def sse(event):
    return f"data: {json.dumps(event)}\n\n"


def create_app(slots, limits=None):
    """The FastAPI app over already-loaded models: {name: ModelSlot}."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    limits = limits or Limits()
    for slot in slots.values():
        # An asyncio lock belongs to the event loop that first waits on it: one per app (server).
        slot.lock, slot.waiting = asyncio.Lock(), 0
    app = FastAPI(title="nanochat-direction chat", docs_url=None, redoc_url=None, openapi_url=None)

    def error(message, status):
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def index():
        with open(page_path(), encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    def health():
        return {"status": "ok", "models": list(slots),
                "busy": {name: s.lock.locked() for name, s in slots.items()}}

    @app.get("/api/models")
    def models():
        return {"models": [s.describe() for s in slots.values()], "limits": limits.to_dict()}

    @app.post("/api/generate")
    async def generate(request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            return error(f"request body over {limits.max_body_bytes} bytes", 413)
        raw = b""
        async for chunk in request.stream():  # read at most the limit, whatever the headers said
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                return error(f"request body over {limits.max_body_bytes} bytes", 413)
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error("the body is not valid JSON", 400)
        try:
            slot, plan = parse_request(body, slots, limits)
            start_stream, dropped = plan_generation(slot, plan)
        except BadRequest as e:
            return error(str(e), e.status)
        if slot.lock.locked() and slot.waiting >= limits.max_queue:
            return error(f"model {slot.name!r} is busy ({slot.waiting} requests waiting); try again shortly", 503)
        return StreamingResponse(stream_events(slot, plan, start_stream, dropped), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def stream_events(slot, plan, start_stream, dropped):
    """Hold the model's lock for the whole generation. Tokens are produced in a worker thread
    (torch releases the GIL) and handed to the event loop through a queue; the worker releases
    the lock when it is done with the model, so a client that goes away mid-generation (which
    cancels this coroutine) never lets a second generation start on a model still in use."""
    loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    slot.waiting += 1
    try:
        await slot.lock.acquire()
    finally:
        slot.waiting -= 1

    def work():
        n = 0
        try:
            for text in start_stream():
                n += 1
                loop.call_soon_threadsafe(queue.put_nowait, ("text", text, n))
                if cancel.is_set():
                    break
            loop.call_soon_threadsafe(queue.put_nowait, ("done", None, n))
        except Exception as e:  # reported to the page; the server keeps serving
            loop.call_soon_threadsafe(queue.put_nowait, ("error", f"{type(e).__name__}: {e}", n))
        finally:
            loop.call_soon_threadsafe(slot.lock.release)

    try:
        yield sse({"type": "start", "model": slot.name, "direction": plan["direction"], "mode": plan["mode"],
                   "dropped_exchanges": dropped})
        worker = threading.Thread(target=work, name=f"generate-{slot.name}", daemon=True)
        worker.start()
    except BaseException:
        slot.lock.release()
        raise
    text = ""
    try:
        while True:
            kind, payload, n = await queue.get()
            if kind == "text":
                text = payload
                yield sse({"type": "text", "text": text})
            elif kind == "done":
                yield sse({"type": "done", "text": text, "tokens": n})
                return
            else:
                yield sse({"type": "error", "error": payload})
                return
    finally:
        cancel.set()


AUTO_ORDER = ("sft", "rl", "mid", "base")


def auto_source(tag, step):
    """The first of sft, rl, mid, base that has the checkpoint (`bash runcpu.sh` makes base ones)."""
    from nanochat.checkpoint_manager import resolve_checkpoint
    for source in AUTO_ORDER:
        try:
            resolve_checkpoint(source, tag, step)
        except UserError:
            continue
        print0(f"--source=auto: using the {source} checkpoint{f' {tag!r}' if tag else 's'}")
        return source
    what = f"tag {tag!r}" if tag else "any tag"
    raise UserError(f"no checkpoint with {what} in any source ({', '.join(AUTO_ORDER)}): train one first "
                    "(bash runcpu.sh makes base models)")


def load_slots(sources, tags, steps, device):
    """{name: ModelSlot} for the comma lists of --source/--model_tag/--step."""
    n = max(len(sources), len(tags), len(steps))
    for what, values in (("--source", sources), ("--model_tag", tags), ("--step", steps)):
        if len(values) not in (1, n):
            raise UserError(f"{what} has {len(values)} values; give one, or one per model ({n})")
    slots = {}
    for i in range(n):
        source, tag, step = (v[i] if len(v) > 1 else v[0] for v in (sources, tags, steps))
        if source == "auto":
            source = auto_source(tag, step)
        if source not in SOURCE_DIRS:
            raise UserError(f"unknown --source {source!r}: use auto or one of {', '.join(SOURCE_DIRS)}")
        model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=tag, step=step)
        meta["source"] = source
        name = meta["model_tag"] if meta["model_tag"] not in slots else f"{source}:{meta['model_tag']}"
        slots[name] = ModelSlot(name, Engine(model, tokenizer, meta), meta)
        print0(f"loaded {name}: a {meta['direction']} {source} model, step {meta['step']}")
    return slots


def build_parser():
    p = argparse.ArgumentParser(description="Web chat page: forward, backward and side-by-side generation")
    add_flag(p, "source", default="auto", help="checkpoint source(s): auto (the first of sft, rl, mid, base that has "
             "the checkpoint) | base | mid | sft | rl; a comma list gives one per model")
    add_flag(p, "model_tag", default="", help="tag(s) or experiment id(s), comma separated (default: newest)")
    add_flag(p, "step", default="", help="checkpoint step(s), comma separated (default: last)")
    add_flag(p, "host", default="127.0.0.1", help="address to bind (default: this machine only)")
    add_flag(p, "port", type=int, default=8000)
    add_flag(p, "max_tokens", type=int, default=256, help="most tokens one request may generate")
    add_flag(p, "max_turns", type=int, default=16, help="most earlier exchanges one chat request may carry")
    add_flag(p, "max_queue", type=int, default=8, help="requests that may wait for a busy model")
    add_flag(p, "temperature", type=float, default=0.8, help="default sampling temperature")
    add_flag(p, "top_k", type=int, default=50, help="default top-k (0 = off)")
    add_flag(p, "device_type", default="")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1 or args.max_turns < 0 or args.max_queue < 0 or not 0 < args.port < 65536:
        raise UserError("--max_tokens must be >= 1, --max_turns and --max_queue >= 0, --port in 1..65535")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("the web page needs fastapi and uvicorn: pip install -e '.[web]'")
    sources = [s.strip() for s in args.source.split(",") if s.strip()] or ["auto"]
    tags = [t.strip() or None for t in args.model_tag.split(",")] if args.model_tag else [None]
    try:
        steps = [int(s) if s.strip() else None for s in args.step.split(",")] if args.step else [None]
    except ValueError:
        raise UserError(f"--step={args.step!r}: give integers, comma separated")
    _, _, _, _, device = compute_init(args.device_type)
    slots = load_slots(sources, tags, steps, device)
    limits = Limits(max_tokens=args.max_tokens, max_turns=args.max_turns, max_queue=args.max_queue,
                    temperature=args.temperature, top_k=args.top_k)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print0(f"warning: --host={args.host} makes the page reachable from other machines; it has no login")
    print0(f"chat page: http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}/")
    uvicorn.run(create_app(slots, limits), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
