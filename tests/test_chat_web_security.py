"""scripts.chat_web through real HTTP on 127.0.0.1: only its own page may drive it (Host and
Origin checked, 403 JSON otherwise), --max_queue holds under a concurrent burst, every request
field is validated with a JSON error (also for malformed bodies and 500s), and the server's own
flags are checked before anything loads (docs/SAFETY.md, "The chat server")."""

import http.client
import json
import socket
import threading
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]'")
pytest.importorskip("uvicorn", reason="the web extra is not installed: pip install -e '.[web]'")

from conftest import TRAINED_TAGS as TAGS, run_inprocess  # noqa: E402
from test_chat_web import models, slots  # noqa: E402,F401  (module fixtures: tiny trained checkpoints)


@contextmanager
def serve(slots, limits=None, extra_hosts=(), any_origin=False):
    """uvicorn on a free 127.0.0.1 port in a thread, guarded for exactly that port; yields the port."""
    import uvicorn
    from scripts.chat_web import HostGuard, Limits, create_app
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    guard = HostGuard("127.0.0.1", port, extra_hosts, any_origin=any_origin)
    app = create_app(slots, limits or Limits(max_tokens=16), guard)
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def request(port, method, path, body=None, headers=None, read=True):
    """One HTTP request; (status, parsed JSON or text, connection). Headers as given (Host too)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    headers = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    data = body if isinstance(body, bytes) else (None if body is None else json.dumps(body).encode())
    if data is not None:
        headers.setdefault("Content-Type", "application/json")
        headers["Content-Length"] = str(len(data))
    for key, value in headers.items():
        if value is not None:
            conn.putheader(key, value)
    conn.endheaders(data)
    response = conn.getresponse()
    if not read:
        return response.status, response, conn
    raw = response.read().decode()
    conn.close()
    if response.getheader("content-type", "").startswith("application/json"):
        return response.status, json.loads(raw), None
    return response.status, raw, None


BODY = {"model": TAGS["forward"], "mode": "completion", "text": "alice", "max_tokens": 4, "temperature": 0.0}


def test_only_the_listening_address_is_answered(slots):
    with serve(slots) as port:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
            status, body, _ = request(port, "GET", "/api/models", headers={"Host": host})
            assert status == 200 and body["models"], host
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1", "",
                     f"127.0.0.1:{port}@evil.example", "a:b:c"):
            for method, path, body in (("GET", "/", None), ("GET", "/api/models", None), ("POST", "/api/generate", BODY)):
                status, reply, _ = request(port, method, path, body, headers={"Host": host})
                assert status == 403 and "does not answer for host" in reply["error"], (host, path)


def test_a_foreign_origin_cannot_generate(slots, monkeypatch):
    """The DNS-rebinding-free case: a page on another site POSTs text/plain (no CORS preflight)."""
    from nanochat.engine import Engine
    calls, original = [], Engine.stream

    def counting_stream(self, *a, **kw):
        calls.append(1)
        yield from original(self, *a, **kw)
    monkeypatch.setattr(Engine, "stream", counting_stream)
    with serve(slots) as port:
        for origin in ("http://evil.example", f"http://evil.example:{port}", f"http://localhost:{port + 1}",
                       "null", "file://", f"127.0.0.1:{port}"):
            status, reply, _ = request(port, "POST", "/api/generate", json.dumps(BODY).encode(),
                                       headers={"Origin": origin, "Content-Type": "text/plain"})
            assert status == 403 and "only this server's own page" in reply["error"], origin
        assert calls == []  # nothing reached the model
        for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", None):  # its own page; curl
            status, reply, _ = request(port, "POST", "/api/generate", BODY, headers={"Origin": origin})
            assert status == 200 and '"type": "done"' in reply, (origin, reply)
    assert len(calls) == 3


def test_reverse_proxy_flags(slots):
    """--allowed_hosts adds the public name (Host and Origin); --allow_any_origin drops only the
    Origin check (a foreign Host is still refused)."""
    with serve(slots, extra_hosts=["chat.example.com", "other.example:8443"]) as port:
        ok = [("chat.example.com", "https://chat.example.com"), ("chat.example.com:9000", "http://chat.example.com:9000"),
              ("other.example:8443", "https://other.example:8443")]
        for host, origin in ok:
            assert request(port, "GET", "/api/models", headers={"Host": host, "Origin": origin})[0] == 200
        assert request(port, "GET", "/api/models", headers={"Host": "other.example"})[0] == 403
        assert request(port, "GET", "/api/models", headers={"Origin": "https://evil.example"})[0] == 403
    with serve(slots, any_origin=True) as port:
        assert request(port, "GET", "/api/models", headers={"Origin": "https://evil.example"})[0] == 200
        assert request(port, "GET", "/api/models", headers={"Host": "evil.example"})[0] == 403
    from nanochat.common import UserError
    from scripts.chat_web import HostGuard
    with pytest.raises(UserError, match="--allowed_hosts entry"):
        HostGuard("127.0.0.1", 8000, ["a:b:c"])


def test_a_concurrent_burst_never_exceeds_max_queue(slots, monkeypatch):
    """20 clients at once, generation blocked: exactly 1 + max_queue are admitted (one generates,
    max_queue wait), the rest get 503 JSON. Then all of them hang up and a second burst arrives:
    the generation still holds the model (and its place), so max_queue more are admitted; the
    admitted count never passes 1 + max_queue. After release every stream ends and the model is free."""
    from nanochat.engine import Engine
    from scripts.chat_web import Limits, ModelSlot
    max_queue, release, original = 3, threading.Event(), Engine.stream
    peak, admit = [0], ModelSlot.admit

    def blocked_stream(self, *a, **kw):
        release.wait(timeout=60)
        yield from original(self, *a, **kw)

    def recording_admit(self, limit):
        ticket = admit(self, limit)
        peak[0] = max(peak[0], self.admitted)
        return ticket
    monkeypatch.setattr(Engine, "stream", blocked_stream)
    monkeypatch.setattr(ModelSlot, "admit", recording_admit)
    slot = slots[TAGS["forward"]]

    def wait_for(condition):
        for _ in range(1500):
            if condition():
                return True
            threading.Event().wait(0.02)
        return False

    with serve(slots, Limits(max_tokens=16, max_queue=max_queue)) as port:
        def burst(n):
            results, barrier = [None] * n, threading.Barrier(n)

            def one(i):
                barrier.wait()
                results[i] = request(port, "POST", "/api/generate", BODY, read=False)
            threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            admitted = [(r, c) for status, r, c in results if status == 200]
            for status, response, conn in results:
                if status != 200:
                    assert status == 503, status
                    error = json.loads(response.read())["error"]
                    assert "busy" in error and f"the limit is {max_queue}" in error
                    conn.close()
            return admitted
        try:
            first = burst(20)
            assert len(first) == 1 + max_queue
            assert wait_for(lambda: slot.lock.locked() and slot.waiting == max_queue)
            for _, conn in first:  # every client hangs up; the generating one's place stays taken
                conn.close()  # until its thread has let go of the model
            assert wait_for(lambda: slot.admitted == 1), slot.admitted
            second = burst(20)
            assert len(second) == max_queue
            assert peak[0] == 1 + max_queue
        finally:
            release.set()
        for response, conn in second:  # each admitted client that stayed gets its answer
            assert '"type": "done"' in response.read().decode()
            conn.close()
        assert wait_for(lambda: slot.admitted == 0 and not slot.lock.locked()), slot.admitted
        status, reply, _ = request(port, "POST", "/api/generate", BODY)
        assert status == 200 and '"type": "done"' in reply
    assert peak[0] == 1 + max_queue


RAW_BAD_BODIES = [  # (raw body, a phrase of the JSON error)
    (b'{"text": "hi", "max_tokens": Infinity}', "not valid JSON"),
    (b'{"text": "hi", "top_k": NaN}', "not valid JSON"),
    (b'{"text": "hi", "seed": -Infinity}', "not valid JSON"),
    (b'{"text": "hi", "max_tokens": 1e400}', "'max_tokens' must be an integer"),
    (b'{"text": "hi", "temperature": 1e400}', "'temperature' must be a finite number"),
    (b'{"text": "hi", "seed": 1e400}', "'seed' must be an integer"),
    (b'{"text": "hi", "max_tokens": 99999999999999999999999999999999999999999}', "'max_tokens'="),
    (b'{"text": "hi", "top_k": 2.5}', "'top_k' must be an integer"),
    (b'{"text": "hi", "temperature": -0.5}', "'temperature'=-0.5 is out of range"),
    (b'{"text": "hi", "seed": true}', "'seed' must be an integer"),
    (b'{"text": ["hi"]}', "'text' must be a non-empty string"),
    (b'{"text": "hi", "model": ["x"]}', "'model' must be a string"),
    (b'{"text": "hi", "direction": {"a": 1}}', "'direction' must be a string"),
    (b'{"text": "hi", "mode": 3}', "'mode' must be a string"),
    (b'{"text": "hi", "mode": "chat", "history": [{"role": "user", "content": ["x"]}, '
     b'{"role": "assistant", "content": "y"}]}', "history[0]"),
    (b'{"text": "hi", "mode": "chat", "history": [{"role": "user", "content": "x", "extra": [[[]]]}, '
     b'{"role": "assistant", "content": "y"}]}', "history[0]"),
    (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
    (b'{"text": "\xff\xfe"}', "not valid JSON"),
    (b"", "the body must be a JSON object"),
]


def test_every_bad_field_is_a_json_400_before_the_model(slots, monkeypatch):
    from nanochat.engine import Engine
    calls = []
    monkeypatch.setattr(Engine, "stream", lambda self, *a, **kw: calls.append(1) or iter(()))
    with serve(slots) as port:
        for raw, phrase in RAW_BAD_BODIES:
            status, reply, _ = request(port, "POST", "/api/generate", raw)
            assert status == 400 and isinstance(reply, dict) and phrase in reply["error"], (raw[:60], status, reply)
    assert calls == []


def test_unknown_paths_methods_and_internal_errors_are_json(slots, monkeypatch):
    import scripts.chat_web as chat_web
    with serve(slots) as port:
        assert request(port, "GET", "/nope") == (404, {"error": "Not Found"}, None)
        assert request(port, "DELETE", "/api/generate") == (405, {"error": "Method Not Allowed"}, None)

        def broken(slot, plan):
            raise RuntimeError("boom")
        monkeypatch.setattr(chat_web, "plan_generation", broken)
        status, reply, _ = request(port, "POST", "/api/generate", BODY)
        assert status == 500 and "internal server error (RuntimeError)" in reply["error"]


@pytest.mark.parametrize("flags,message", [
    (["--temperature=nan"], "--temperature must be a finite number, not nan"),
    (["--temperature=inf"], "--temperature must be a finite number, not inf"),
    (["--temperature=-1"], "--temperature=-1.0 is out of range"),
    (["--temperature=3"], "--temperature=3.0 is out of range: it must be between 0.0 and 2.0"),
    (["--top_k=-5"], "--top_k=-5 is out of range"),
    (["--model_tag=../x"], "invalid --model_tag '../x'"),
    (["--model_tag=nl\n"], "invalid --model_tag 'nl\\n'"),
    (["--source=nope"], "unknown --source 'nope'"),
    (["--allowed_hosts=a:b:c"], "--allowed_hosts entry 'a:b:c'"),
])
def test_server_flags_are_checked_before_anything_loads(flags, message, monkeypatch, tmp_path):
    """Checked before a model loads: an empty base dir would otherwise say 'no checkpoint'."""
    from nanochat.common import UserError
    from scripts.chat_web import main
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError) as info:
        main(flags + ["--device_type=cpu"])
    assert message in str(info.value)


def test_no_checkpoint_says_what_was_looked_for(models, monkeypatch, tmp_path):
    from nanochat.common import UserError
    from scripts.chat_web import main
    monkeypatch.setenv("NANOCHAT_BASE_DIR", models)
    with pytest.raises(UserError, match="no checkpoint with tag 'nope' in any source .looked in .*base_checkpoints/nope"):
        main(["--model_tag=nope", "--device_type=cpu"])
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no checkpoint with any tag in any source .looked in .*chatsft_checkpoints"):
        main(["--device_type=cpu"])
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "file"))
    with pytest.raises(UserError, match="is a file, not a directory"):
        main(["--device_type=cpu"])


def test_a_bad_flag_is_one_line_and_exit_status_2(tmp_path):
    result = run_inprocess("scripts.chat_web", "--temperature=nan", base_dir=str(tmp_path))  # as `python -m` runs it
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --temperature must be a finite number, not nan"]
