"""A web chat page for forward, backward and bidirectional checkpoints (docs/DESIGN.md §5).

    python -m scripts.chat_web                                        # newest model, http://127.0.0.1:8000
    python -m scripts.chat_web --source=base --model_tag=d4_bidi      # a base model: completion mode
    python -m scripts.chat_web --source=sft --model_tag=fwd_tag,bwd_tag --port 8080

One FastAPI app and one static page (nanochat/web/index.html, nothing fetched from elsewhere);
every generation goes through nanochat.engine, as in scripts/chat_cli.py. The modes (chat,
completion, side by side) and the API: docs/QUICKSTART.md, "Chat". The server answers only its
own page (Host and Origin checked: 403 otherwise), bounds and validates every request (all errors
JSON), runs one generation per model at a time and lets at most --max_queue wait: docs/SAFETY.md.
"""

import argparse
import asyncio
import json
import os
import re
import sys
import threading

from nanochat.checkpoint_manager import SOURCE_DIRS, load_model
from nanochat.common import UserError, add_flag, check_number, compute_init, get_base_dir, print0, run_main
from nanochat.engine import ChatHistory, Engine
from nanochat.paths import validate_name

MODES = ("chat", "completion")


class Limits:
    """What one request may ask for; the page reads them from /api/models."""

    def __init__(self, max_body_bytes=64 * 1024, max_text_chars=4000, max_turns=16, max_tokens=256,
                 max_queue=8, temperature=0.8, top_k=50):
        self.max_body_bytes, self.max_text_chars, self.max_turns = max_body_bytes, max_text_chars, max_turns
        self.max_tokens, self.max_queue, self.temperature, self.top_k = max_tokens, max_queue, temperature, top_k


class ModelSlot:
    """One loaded model, its lock (one generation at a time) and its admitted requests (<= 1 + max_queue)."""

    def __init__(self, name, engine, meta):
        self.name, self.engine, self.meta = name, engine, meta
        self.lock = asyncio.Lock()
        self.admitted = 0
        phase = str(meta.get("source") or meta.get("phase") or "")
        # Base checkpoints never saw the chat tokens in use: the page defaults them to completion.
        self.chat = phase not in ("base", "")

    @property
    def waiting(self):
        return max(0, self.admitted - (1 if self.lock.locked() else 0))

    def admit(self, max_queue):
        """A Ticket for one more request, or None when 1 + max_queue are admitted already. Runs on
        the event loop with no await between the check and the increment: atomic for a burst."""
        if self.admitted >= max_queue + 1:
            return None
        self.admitted += 1
        return Ticket(self)

    def describe(self):
        return {"name": self.name, "direction": self.engine.direction,
                "directions": self.engine.spec.generation_directions(), "chat": self.chat,
                "source": self.meta.get("source"), "step": self.meta.get("step"),
                "context": self.engine.model.config.sequence_len}


class Ticket:
    """One admitted request's place. A generation thread that takes it over gives it back with the
    model's lock, so a client that hangs up does not free a place while the model still works."""

    def __init__(self, slot):
        self.slot, self.released, self.taken_by_worker = slot, False, False

    def release(self):
        if not self.released:
            self.released = True
            self.slot.admitted -= 1


class BadRequest(Exception):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def _number(body, key, kind, default, low, high):
    """A numeric field: type, finiteness and range through nanochat.common.check_number."""
    value = body.get(key, default)
    if value is None:
        return default
    try:
        return kind(check_number(f"'{key}'", value, low, high, integer=kind is int))
    except UserError as e:
        raise BadRequest(str(e))


def _string(body, key):
    """An optional string field: None when absent or empty."""
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string, not {type(value).__name__}")
    return value or None


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse_request(body, slots, limits):
    """Validate a /api/generate body; returns (slot, plan) or raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = set(body) - {"model", "direction", "mode", "text", "history", "max_tokens", "temperature", "top_k", "seed"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    name = _string(body, "model") or next(iter(slots))
    if name not in slots:
        raise BadRequest(f"unknown model {name!r}: loaded models are {', '.join(slots)}", status=404)
    slot = slots[name]
    try:  # no direction: the model's default (forward for bidirectional)
        direction = slot.engine.spec.generation_direction(_string(body, "direction"))
    except UserError as e:
        raise BadRequest(f"model {name!r}: {e}")
    mode = _string(body, "mode") or ("chat" if slot.chat else "completion")
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
        if not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] != expected \
                or not isinstance(m["content"], str):
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
    """(a function that starts the token stream, exchanges dropped to fit the context); an over-long
    input is refused here, not mid-stream."""
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


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def _split_host(value, default_port):
    """'name[:port]' or '[v6]:port' -> (lowercased name, port); None when it does not parse."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("" if not rest else None)
    elif ":" in value:  # an IPv6 literal comes in brackets; 'a:b:c' is no host
        name, _, port = value.partition(":")
        port = port if ":" not in port else None
    else:
        name, port = value, ""
    if port is None or (port and not port.isdigit()) or not re.fullmatch(r"[a-z0-9._-]+|[0-9a-f:.]+", name):
        return None
    return name, int(port) if port else default_port


class HostGuard:
    """Which Host and Origin headers the server answers: (name, port) pairs, port None for any.
    A foreign Host is DNS rebinding (evil.example resolving to 127.0.0.1 still sends its own name);
    a foreign Origin is another site's page driving the server (even by a no-preflight POST)."""

    def __init__(self, bind_host, port, extra_hosts=(), any_origin=False):
        """The loopback names and the bound address at `port` (None: any port), plus the
        --allowed_hosts entries ('name' for any port, 'name:port')."""
        self.hosts = {(name, port) for name in LOOPBACK_NAMES + (bind_host.strip("[]").lower(),)}
        self.any_origin = any_origin
        for entry in extra_hosts:
            parsed = _split_host(entry, None)
            if parsed is None:
                raise UserError(f"--allowed_hosts entry {entry!r} is not a host name or host:port")
            self.hosts.add(parsed)

    def _known(self, name_port):
        return name_port is not None and (name_port in self.hosts or (name_port[0], None) in self.hosts)

    def refusal(self, host, origin):
        """None when the request may be served; otherwise why it is refused."""
        if host is None or not self._known(_split_host(host, 80)):
            return (f"this server does not answer for host {host!r}: open it at the address it listens on "
                    "(behind a reverse proxy, start it with --allowed_hosts=<public host>)")
        if origin is not None and not self.any_origin:
            scheme, sep, rest = origin.partition("://")
            port = {"http": 80, "https": 443}.get(scheme.lower())
            if not sep or port is None or not self._known(_split_host(rest, port)):
                return (f"requests from the page at {origin!r} are refused: only this server's own page may "
                        "use it (--allow_any_origin lifts this)")
        return None


class OnlyOwnPage:
    """ASGI middleware: a request the HostGuard refuses gets 403 with a JSON body, before routing."""

    def __init__(self, app, guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {}
            for key, value in scope["headers"]:
                headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
            problem = self.guard.refusal(headers.get("host"), headers.get("origin"))
            if problem is not None:
                from fastapi.responses import JSONResponse
                await JSONResponse({"error": problem}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(slots, limits=None, guard=None):
    """The FastAPI app over loaded models {name: ModelSlot}; `guard` defaults to the loopback names
    on any port (main() passes the address it listens on)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    class GenerationResponse(StreamingResponse):
        """A stream that gives its ticket back however it ends, unless the generation thread took it."""

        def __init__(self, content, ticket, **kwargs):
            super().__init__(content, **kwargs)
            self.ticket = ticket

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                if not self.ticket.taken_by_worker:
                    self.ticket.release()

    limits = limits or Limits()
    for slot in slots.values():
        # An asyncio lock belongs to the event loop that first waits on it: one per app (server).
        slot.lock, slot.admitted = asyncio.Lock(), 0
    app = FastAPI(title="nanochat-direction chat", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(OnlyOwnPage, guard=guard or HostGuard("127.0.0.1", None))

    def error(message, status):
        return JSONResponse({"error": message}, status_code=status)

    # Every error is JSON {"error": ...}: unknown paths and methods, and anything unexpected (500).
    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error(str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return error(f"internal server error ({type(exc).__name__}); the server log has the details", 500)

    @app.get("/", response_class=HTMLResponse)
    def index():
        import nanochat  # the page ships inside the package (pyproject's package-data)
        with open(os.path.join(os.path.dirname(nanochat.__file__), "web", "index.html"), encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    def health():
        return {"status": "ok", "models": list(slots),
                "busy": {name: s.lock.locked() for name, s in slots.items()}}

    @app.get("/api/models")
    def models():
        return {"models": [s.describe() for s in slots.values()], "limits": dict(vars(limits))}

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
        try:  # NaN / Infinity are not JSON; a deeply nested body must not reach the recursion limit
            body = json.loads(raw or b"null", parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError):
            return error("the body is not valid JSON", 400)
        except RecursionError:
            return error("the body is not valid JSON: nested too deeply", 400)
        try:
            slot, plan = parse_request(body, slots, limits)
            start_stream, dropped = plan_generation(slot, plan)
        except BadRequest as e:
            return error(str(e), e.status)
        ticket = slot.admit(limits.max_queue)
        if ticket is None:
            return error(f"model {slot.name!r} is busy ({slot.waiting} requests waiting, the limit is "
                         f"{limits.max_queue}); try again shortly", 503)
        return GenerationResponse(stream_events(slot, plan, start_stream, dropped, ticket), ticket,
                                  media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def stream_events(slot, plan, start_stream, dropped, ticket):
    """Hold the model's lock for the whole generation. A worker thread makes the tokens (torch
    releases the GIL) and releases the lock and ticket when done with the model, so a client that
    goes away mid-generation never lets a second generation start on a model still in use."""
    loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    await slot.lock.acquire()

    def release():
        slot.lock.release()
        ticket.release()

    def post(fn, *args):
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: the server is shutting down and nothing waits
            pass

    def work():
        n = 0
        try:
            for text in start_stream():
                n += 1
                post(queue.put_nowait, ("text", text, n))
                if cancel.is_set():
                    break
            post(queue.put_nowait, ("done", None, n))
        except Exception as e:  # reported to the page; the server keeps serving
            post(queue.put_nowait, ("error", f"{type(e).__name__}: {e}", n))
        finally:
            post(release)

    try:
        yield sse({"type": "start", "model": slot.name, "direction": plan["direction"], "mode": plan["mode"],
                   "dropped_exchanges": dropped})
        worker = threading.Thread(target=work, name=f"generate-{slot.name}", daemon=True)
        ticket.taken_by_worker = True
        worker.start()
    except BaseException:
        ticket.taken_by_worker = False
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
    from nanochat.checkpoint_manager import checkpoint_dir_for, resolve_checkpoint
    for source in AUTO_ORDER:
        try:
            resolve_checkpoint(source, tag, step)
        except UserError:
            continue
        print0(f"--source=auto: using the {source} checkpoint{f' {tag!r}' if tag else 's'}")
        return source
    # Say where we looked: the tag's directory in each source (or each source's directory).
    looked = [checkpoint_dir_for(s, tag) if tag else os.path.join(get_base_dir(), SOURCE_DIRS[s]) for s in AUTO_ORDER]
    what = f"tag {tag!r}" + (f" at step {step}" if step is not None else "") if tag else "any tag"
    raise UserError(f"no checkpoint with {what} in any source (looked in {', '.join(looked)}): train one "
                    "first (bash runcpu.sh makes base models)")


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
    add_flag(p, "allowed_hosts", default="", help="behind a reverse proxy: comma list of the host names "
             "(name or name:port) the browser uses, accepted in Host and Origin besides the listening address")
    add_flag(p, "allow_any_origin", action="store_true", help="answer requests made by pages of other sites "
             "(Origin not checked); any web page you visit can then use the models")
    add_flag(p, "port", type=int, default=8000)
    add_flag(p, "max_tokens", type=int, default=256, help="most tokens one request may generate")
    add_flag(p, "max_turns", type=int, default=16, help="most earlier exchanges one chat request may carry")
    add_flag(p, "max_queue", type=int, default=8, help="requests that may wait for a busy model")
    add_flag(p, "temperature", type=float, default=0.8, help="default sampling temperature (0..2)")
    add_flag(p, "top_k", type=int, default=50, help="default top-k (0 or -1 = off)")
    add_flag(p, "device_type", default="")
    return p


def check_flags(args):
    """Every flag checked before anything loads (one error, exit status 2). Returns (sources, tags, steps)."""
    if args.max_tokens < 1 or args.max_turns < 0 or args.max_queue < 0 or not 0 < args.port < 65536:
        raise UserError("--max_tokens must be >= 1, --max_turns and --max_queue >= 0, --port in 1..65535")
    check_number("--temperature", args.temperature, 0.0, 2.0)  # the range a request may ask for
    args.top_k = max(0, check_number("--top_k", args.top_k, low=0, integer=True, off=-1))
    get_base_dir()  # a NANOCHAT_BASE_DIR that is a file is said as such, not as "no checkpoint"
    sources = [s.strip() for s in args.source.split(",") if s.strip()] or ["auto"]
    for source in sources:
        if source != "auto" and source not in SOURCE_DIRS:
            raise UserError(f"unknown --source {source!r}: use auto or one of {', '.join(SOURCE_DIRS)}")
    # Only spaces after commas are trimmed: a tag with a newline is refused by validate_name, not renamed.
    tags = [t.strip(" ") or None for t in args.model_tag.split(",")] if args.model_tag else [None]
    for tag in tags:
        if tag is not None:
            validate_name(tag, "--model_tag")
    try:
        steps = [int(s) if s.strip() else None for s in args.step.split(",")] if args.step else [None]
    except ValueError:
        raise UserError(f"--step={args.step!r}: give integers, comma separated")
    return sources, tags, steps


def main(argv=None):
    args = build_parser().parse_args(argv)
    sources, tags, steps = check_flags(args)
    guard = HostGuard(args.host, args.port, [h for h in args.allowed_hosts.split(",") if h.strip()],
                                 any_origin=args.allow_any_origin)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("the web page needs fastapi and uvicorn: pip install -e '.[web]'")
    _, _, _, _, device = compute_init(args.device_type)
    slots = load_slots(sources, tags, steps, device)
    limits = Limits(max_tokens=args.max_tokens, max_turns=args.max_turns, max_queue=args.max_queue,
                    temperature=args.temperature, top_k=args.top_k)
    if args.host not in LOOPBACK_NAMES:
        print0(f"warning: --host={args.host} makes the page reachable from other machines; it has no login. "
               "It answers only the addresses it knows: name the one others type with --allowed_hosts")
    if args.allow_any_origin:
        print0("warning: --allow_any_origin: any web page you visit can send requests to this server")
    print0(f"chat page: http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}/")
    uvicorn.run(create_app(slots, limits, guard), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
