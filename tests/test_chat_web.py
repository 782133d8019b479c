"""scripts.chat_web: the API over the engine (streamed text equals Engine.chat / complete, in
reading order), bounded and validated requests with JSON errors, one generation at a time per
model, and the page itself. The browser test lives in tests/test_chat_web_browser.py.

Models: the session's tiny forward / backward / bidirectional base checkpoints (tests/conftest.py)."""

import json
import threading

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]'")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import TRAINED_TAGS as TAGS  # noqa: E402


@pytest.fixture(scope="module")
def models(trained):
    return trained["dir"]  # read-only: chatting writes nothing


@pytest.fixture(scope="module")
def slots(models):
    import os
    from scripts.chat_web import load_slots
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = models
    try:
        return load_slots(["base"], [TAGS["forward"], TAGS["backward"], TAGS["bidirectional"]], [None], "cpu")
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_BASE_DIR")
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old


def make_client(slots, **limits):
    from scripts.chat_web import Limits, create_app
    # The server answers only its own address (HostGuard): the client asks for it by that address.
    return TestClient(create_app(slots, Limits(**limits)), base_url="http://127.0.0.1:8000")


def events(response):
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return [json.loads(line[len("data: "):]) for line in response.text.split("\n\n") if line.startswith("data: ")]


def generate(client, **body):
    return client.post("/api/generate", json=body)


def test_page_health_and_model_list(slots):
    with make_client(slots) as client:
        page = client.get("/")
        assert page.status_code == 200 and "<textarea id=\"input\"" in page.text
        assert "://" not in page.text.replace("http://www.w3.org", "")  # nothing loaded from elsewhere
        assert client.get("/health").json() == {"status": "ok", "models": list(slots),
                                                 "busy": {name: False for name in slots}}
        listed = {m["name"]: m for m in client.get("/api/models").json()["models"]}
        assert listed[TAGS["bidirectional"]]["directions"] == ["forward", "backward"]
        assert listed[TAGS["backward"]]["directions"] == ["backward"]
        assert listed[TAGS["forward"]]["chat"] is False  # base checkpoints default to completion


def test_forward_chat_streams_the_engine_answer_with_history(slots):
    from nanochat.engine import ChatHistory
    history = [{"role": "user", "content": "What is 2*3?"}, {"role": "assistant", "content": "6"}]
    body = dict(model=TAGS["forward"], direction="forward", mode="chat", text="And 3*3?", history=history,
                max_tokens=8, temperature=1.0, top_k=20, seed=5)
    with make_client(slots) as client:
        evs = events(generate(client, **body))
    assert evs[0]["type"] == "start" and evs[-1]["type"] == "done"
    texts = [e["text"] for e in evs if e["type"] == "text"]
    assert len(texts) == evs[-1]["tokens"] >= 1
    assert all(b.startswith(a.rstrip("\ufffd")) for a, b in zip(texts, texts[1:]))  # grows at the end
    engine = slots[TAGS["forward"]].engine
    expected = engine.chat(ChatHistory("forward", history).request("And 3*3?"), direction="forward",
                           max_tokens=8, temperature=1.0, top_k=20, seed=5)[0]
    assert evs[-1]["text"] == expected


def test_backward_streams_grow_at_the_front(slots):
    """Backward text is generated right to left: each streamed text ends with the previous one."""
    from nanochat.engine import ChatHistory
    with make_client(slots) as client:
        comp = events(generate(client, model=TAGS["bidirectional"], direction="backward", mode="completion",
                               text="The end.", max_tokens=10, temperature=0.0))
        chat = events(generate(client, model=TAGS["backward"], mode="chat", text="6", max_tokens=10, temperature=0.0,
                               history=[{"role": "user", "content": "And 3*3?"}, {"role": "assistant", "content": "9"}]))
    for evs in (comp, chat):
        texts = [e["text"] for e in evs if e["type"] == "text"]
        assert texts and all(b.endswith(a.lstrip("\ufffd")) for a, b in zip(texts, texts[1:]))
    bidi = slots[TAGS["bidirectional"]].engine
    assert comp[-1]["text"] == bidi.complete("The end.", direction="backward", max_tokens=10, temperature=0.0)[0]["generated"]
    bwd = slots[TAGS["backward"]].engine
    history = ChatHistory("backward", [{"role": "user", "content": "And 3*3?"}, {"role": "assistant", "content": "9"}])
    assert chat[-1]["text"] == bwd.chat(history.request("6"), max_tokens=10, temperature=0.0)[0]


def test_stream_draws_the_same_tokens_as_generate(slots):
    engine = slots[TAGS["bidirectional"]].engine
    prompt = engine.spec.generation_prompt(engine.tokenizer.encode("alice reads"), "forward")
    for temperature in (0.0, 1.0):
        streamed = list(engine.stream(prompt, max_tokens=12, temperature=temperature, seed=7))
        assert streamed == engine.generate(prompt, max_tokens=12, temperature=temperature, seed=7)[0]


@pytest.mark.parametrize("body,status,message", [
    ("not json", 400, "not valid JSON"),
    ({"model": "nope", "text": "hi"}, 404, "unknown model"),
    ({"model": TAGS["forward"], "direction": "backward", "text": "hi"}, 400, "cannot generate backward"),
    ({"model": TAGS["forward"], "direction": "sideways", "text": "hi"}, 400, "one of forward, backward"),
    ({"model": TAGS["forward"], "text": "  "}, 400, "non-empty"),
    ({"model": TAGS["forward"], "text": "hi", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": TAGS["forward"], "text": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": TAGS["forward"], "text": "hi", "mode": "poem"}, 400, "chat or completion"),
    ({"model": TAGS["forward"], "text": "hi", "mode": "chat", "history": [{"role": "user", "content": "x"}]}, 400, "whole exchanges"),
    ({"model": TAGS["forward"], "text": "hi", "mode": "chat", "history": [{"role": "user", "content": "x"},
                                                                          {"role": "assistant", "content": "y"}] * 3}, 413, "limit is 2"),
    ({"model": TAGS["forward"], "text": "x" * 501}, 413, "limit is 500"),
    ({"model": TAGS["forward"], "text": "word " * 80}, 413, "context"),
    ({"model": TAGS["forward"], "text": "hi", "stream": True}, 400, "unknown field"),
])
def test_bad_requests_get_a_json_error(slots, body, status, message):
    with make_client(slots, max_text_chars=500, max_turns=2, max_tokens=32) as client:
        if isinstance(body, str):
            response = client.post("/api/generate", content=body, headers={"content-type": "application/json"})
        else:
            response = generate(client, **body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_oversized_body_is_refused_before_parsing(slots):
    with make_client(slots, max_body_bytes=1000) as client:
        response = client.post("/api/generate", content=json.dumps({"text": "x" * 2000}),
                               headers={"content-type": "application/json"})
    assert response.status_code == 413 and "body over 1000 bytes" in response.json()["error"]

    def chunks():  # no content-length: the limit holds while reading
        for _ in range(20):
            yield b"x" * 100
    with make_client(slots, max_body_bytes=1000) as client:
        response = client.post("/api/generate", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "body over 1000 bytes" in response.json()["error"]


def test_one_generation_at_a_time_and_a_bounded_queue(slots, monkeypatch):
    """Three requests for one model: the first blocks inside generation until the second is
    queued; generations never overlap; with the queue full a further request gets 503."""
    from nanochat.engine import Engine
    original = Engine.stream
    active, peak, first_started, release = [0], [0], threading.Event(), threading.Event()

    def slow_stream(self, *a, **kw):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        first_started.set()
        release.wait(timeout=30)
        try:
            yield from original(self, *a, **kw)
        finally:
            active[0] -= 1
    monkeypatch.setattr(Engine, "stream", slow_stream)
    slot = slots[TAGS["forward"]]
    body = dict(model=TAGS["forward"], mode="completion", text="alice", max_tokens=4, temperature=0.0)
    results = {}
    with make_client(slots, max_queue=1) as client:
        def call(key):
            results[key] = generate(client, **body)
        first = threading.Thread(target=call, args=("first",))
        first.start()
        assert first_started.wait(timeout=30)
        second = threading.Thread(target=call, args=("second",))
        second.start()
        for _ in range(3000):  # wait until the second request is queued behind the lock
            if slot.waiting == 1:
                break
            threading.Event().wait(0.01)
        assert slot.waiting == 1 and client.get("/health").json()["busy"][TAGS["forward"]] is True
        third = generate(client, **body)
        assert third.status_code == 503 and "busy" in third.json()["error"]
        release.set()
        first.join(timeout=60)
        second.join(timeout=60)
    assert peak[0] == 1
    a, b = events(results["first"]), events(results["second"])
    assert a[-1]["type"] == b[-1]["type"] == "done" and a[-1]["text"] == b[-1]["text"]
    assert not slot.lock.locked() and slot.waiting == 0


def test_bad_command_lines_are_user_errors(models, monkeypatch):
    from nanochat.common import UserError
    from scripts.chat_web import main
    monkeypatch.setenv("NANOCHAT_BASE_DIR", models)
    with pytest.raises(UserError, match="--model_tag has 2 values"):
        main(["--source=base", "--model_tag=a,b", "--step=1,2,3", "--device_type=cpu"])
    with pytest.raises(UserError, match="no base checkpoint with tag 'nope'"):
        main(["--source=base", "--model_tag=nope", "--device_type=cpu"])
    with pytest.raises(UserError, match="--port"):
        main(["--port=0"])
    from scripts.chat_web import auto_source
    assert auto_source(TAGS["forward"], None) == "base"  # only a base checkpoint with this tag
    assert auto_source(TAGS["backward"], None) == "sft"  # sft comes first
    with pytest.raises(UserError, match="no checkpoint with tag 'nope' in any source"):
        main(["--model_tag=nope", "--device_type=cpu"])


# ---- end to end in a real browser ------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900"]


def browser_or_skip(tmp_path):
    """A headless Debian chromium driven by Selenium, or a skip that says what is missing
    (runtests.sh: setup_env.sh with the browser extra installs chromium and chromium-driver with apt as root)."""
    import os
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[browser]'): browser test not run")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} is missing (apt-get install chromium chromium-driver): browser test not run")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    try:
        return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as e:  # a browser that is installed but cannot start is a skip with its reason
        pytest.skip(f"chromium did not start: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


@pytest.fixture
def live_server(slots):
    """The app served by uvicorn on a free local port, in a thread."""
    import socket
    import uvicorn
    from scripts.chat_web import Limits, create_app
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(slots, Limits(max_tokens=16)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_page_in_a_real_browser(live_server, tmp_path):
    """Open the page, chat forward with a bidirectional model and see the answer stream in,
    switch to backward and see each generated question placed above its answer, then side by
    side; a screenshot is saved in the test's tmp dir."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    driver = browser_or_skip(tmp_path)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(live_server)
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled() and d.find_elements(By.ID, "model-0"))
        Select(driver.find_element(By.ID, "model-0")).select_by_value(TAGS["bidirectional"])
        Select(driver.find_element(By.ID, "mode")).select_by_value("chat")
        max_tokens = driver.find_element(By.ID, "maxTokens")
        max_tokens.clear()
        max_tokens.send_keys("12")

        def send(text):
            box = driver.find_element(By.ID, "input")
            box.send_keys(text)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_element(By.ID, "status").text == "done")

        def bubbles(pane=0):
            return [(m.get_attribute("class"), m.find_element(By.CLASS_NAME, "who").text,
                     m.find_element(By.CLASS_NAME, "body").text)
                    for m in driver.find_elements(By.CSS_SELECTOR, f"#transcript-{pane} .msg")]

        send("What is 2*3?")
        transcript = driver.find_element(By.ID, "transcript-0")
        assert int(transcript.get_attribute("data-updates")) >= 2  # several streamed text events rendered
        (user_cls, _, question), (gen_cls, gen_who, answer) = bubbles()
        assert "user" in user_cls and question == "What is 2*3?"
        assert "generated" in gen_cls and "streaming" not in gen_cls and gen_who.lower() == "assistant" and answer

        Select(driver.find_element(By.ID, "direction-0")).select_by_value("backward")
        assert "conversation cleared" in driver.find_element(By.ID, "transcript-0").text
        send("6")
        send("4")  # an earlier answer: its exchange goes above the first one
        rows = bubbles()
        assert [r[2] for r in rows if "generated" not in r[0]] == ["4", "6"]
        assert ["generated" in r[0] for r in rows] == [True, False, True, False]
        assert all("question (generated" in r[1].lower() for r in rows if "generated" in r[0])

        driver.find_element(By.ID, "sideBySide").click()
        wait.until(lambda d: d.find_elements(By.ID, "transcript-1"))
        assert Select(driver.find_element(By.ID, "direction-1")).first_selected_option.text == "forward"
        send("The end.")
        left, right = bubbles(0), bubbles(1)
        assert "generated" in left[0][0] and left[1][2] == "The end."  # backward: written text first
        assert right[0][2] == "The end." and "generated" in right[1][0]  # forward: written text after
        shot = tmp_path / "chat_web.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    finally:
        driver.quit()
