"""`moe-llm serve` through real clients: the openai SDK, raw HTTP (httpx), LangChain's ChatOpenAI.

One uvicorn server on the tiny Mixtral serves the module; a few tests start their own
(an API key, a queue limit)."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from serve_helpers import running, wait_for

import moe_llm
from moe_llm.serve import create_app

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny-mixtral"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def engine(tiny_mixtral):
    return moe_llm.load(tiny_mixtral, cache_per_layer=2, prefill_chunk=16)


@pytest.fixture(scope="module")
def base(engine):
    with running(create_app(engine, model_name=MODEL, max_body_bytes=64 * 1024)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def sse_events(response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


# -- the OpenAI API ---------------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_greedy_chat_completion_equals_the_engine(client, engine):
    want = engine.generate(HELLO, max_new_tokens=12)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens
    assert r.usage.completion_tokens == len(want.token_ids)


def test_streamed_chat_concatenates_to_the_completion(client):
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_completion_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_wire_format_ends_with_done(base):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert all(o["object"] == "chat.completion.chunk" for o in objs)
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert objs[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_with_stop_and_seed(client, engine):
    want = engine.generate("def parse(", max_new_tokens=10)
    r = client.completions.create(model=MODEL, prompt="def parse(", max_tokens=10, temperature=0)
    assert r.choices[0].text == want.text and r.object == "text_completion"
    assert len(want.text) > 3
    stop = want.text[2:4]
    cut = client.completions.create(model=MODEL, prompt="def parse(", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == want.text[: want.text.find(stop)] and cut.choices[0].finish_reason == "stop"
    a, b = (
        client.completions.create(model=MODEL, prompt="def parse(", max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
        for _ in range(2)
    )
    assert a.choices[0].text == b.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt="def parse(", max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text


def test_forced_tool_call_comes_back_as_tool_calls(client):
    tools = [{"type": "function", "function": {"name": "ping", "description": "Ping the host.",
                                               "parameters": {"type": "object", "properties": {}}}}]  # fmt: skip
    r = client.chat.completions.create(model=MODEL, messages=HELLO, tools=tools, tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "ping" and json.loads(call.function.arguments) == {} and call.id.startswith("call_")
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, tools=tools, tool_choice="required",
                                                 stream=True))  # fmt: skip
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["ping"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_in_the_conversation_render(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > 20


def test_json_mode_prefills_the_object(client):
    for fmt in ({"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}):  # fmt: skip
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0,
                                           response_format=fmt)  # fmt: skip
        assert r.choices[0].message.content.startswith("{")


# -- bad input never hurts the server -----------------------------------------------------------

BAD = [
    ("malformed json", b'{"model": ', 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, "invalid_json"),
    ("unknown field", {"model": MODEL, "messages": HELLO, "frobnicate": 1}, 422, "invalid_value"),
    ("wrong type", {"model": MODEL, "messages": "hi"}, 422, "invalid_value"),
    ("wrong temperature type", {"model": MODEL, "messages": HELLO, "temperature": "hot"}, 422, "invalid_value"),
    ("negative max_tokens", {"model": MODEL, "messages": HELLO, "max_tokens": -5}, 422, "invalid_value"),
    ("huge max_tokens", {"model": MODEL, "messages": HELLO, "max_tokens": 10**12}, 400, "context_length_exceeded"),
    ("prompt over the context", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 6000}]}, 400,
     "context_length_exceeded"),
    ("unknown model", {"model": "gpt-7", "messages": HELLO}, 404, "model_not_found"),
    ("empty messages", {"model": MODEL, "messages": []}, 422, "invalid_value"),
    ("bad role", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 422, "invalid_value"),
    ("missing model", {"messages": HELLO}, 422, "invalid_value"),
    ("invalid tool schema", {"model": MODEL, "messages": HELLO, "tools": [
        {"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}]}, 422, "invalid_value"),
    ("tool without a name", {"model": MODEL, "messages": HELLO, "tools": [{"type": "function", "function": {}}]},
     422, "invalid_value"),
    ("tool_choice names no tool", {"model": MODEL, "messages": HELLO, "tools": [
        {"type": "function", "function": {"name": "x"}}], "tool_choice": {"type": "function", "function": {
            "name": "y"}}}, 400, "unsupported"),
    ("n > 1", {"model": MODEL, "messages": HELLO, "n": 3}, 400, "unsupported"),
    ("image content", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "unsupported"),
    ("bad stop", {"model": MODEL, "messages": HELLO, "stop": [""]}, 422, "invalid_value"),
    ("bad response_format", {"model": MODEL, "messages": HELLO, "response_format": {"type": "xml"}}, 422,
     "invalid_value"),
    ("malformed json_schema", {"model": MODEL, "messages": HELLO, "response_format": {"type": "json_schema",
        "json_schema": {"name": "r", "schema": {"type": "object", "properties": {"a": {"type": "wat"}}}}}}, 422,
     "invalid_value"),
    ("malformed nested tool schema", {"model": MODEL, "messages": HELLO, "tools": [{"type": "function", "function": {
        "name": "x", "parameters": {"type": "object", "properties": {"a": {"type": "array", "items": 3}}}}}]}, 422,
     "invalid_value"),
    ("seed out of range", {"model": MODEL, "messages": HELLO, "seed": -(2**70)}, 422, "invalid_value"),
]  # fmt: skip


@pytest.mark.parametrize("name,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests_get_openai_errors_and_the_next_request_works(base, client, name, body, status, code):
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(f"{base}/v1/chat/completions", timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"] == code
    ok = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_bad_completion_requests(base):
    cases = [
        ({"model": MODEL, "prompt": ""}, 400),
        ({"model": MODEL, "prompt": [10**9]}, 400),  # a token id outside the vocabulary
        ({"model": MODEL, "prompt": ["a", "b"]}, 422),
        ({"model": MODEL, "prompt": "x", "echo": True}, 400),
        ({"model": MODEL, "prompt": 5}, 422),
    ]
    for body, status in cases:
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["message"]


def test_body_over_the_limit_is_413_and_unknown_routes_404(base, client):
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 100_000}]})
    r = httpx.post(f"{base}/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no content-length: the limit is counted as the body arrives
        for _ in range(20):
            yield b"x" * 10_000

    r = httpx.post(f"{base}/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.get(f"{base}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{base}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices


def test_a_client_that_disconnects_mid_stream_frees_its_slot(base, client, engine):
    """...and its KV: the request's cache object is gone once it leaves the batch."""
    import gc
    import weakref

    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3000, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(g.startswith("data: ") for g in got)
        assert engine.batcher.active_requests == 1
        seq = engine.batcher.active[0]
        kv = weakref.ref(seq.kv)  # on CPU each request decodes from its own transformers cache
        layers = [weakref.ref(layer.keys) for layer in seq.kv.layers]
    # the connection is closed: the request leaves the batch within a step or two
    assert wait_for(lambda: engine.batcher.active_requests == 0 and engine.batcher.queue_depth == 0)
    assert engine.cache.consistent()
    del seq
    gc.collect()
    assert kv() is None and all(k() is None for k in layers)  # its keys and values are freed
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices


def test_openai_sdk_errors_carry_the_status(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10**9)


# -- health, metrics, auth, limits ----------------------------------------------------------------------


def test_health_and_prometheus_metrics(base, client):
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert httpx.get(f"{base}/health").json()["status"] == "ok"
    r = httpx.get(f"{base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    for name in ("moe_llm_tokens_per_second", "moe_llm_time_to_first_token_seconds_sum",
                 "moe_llm_time_to_first_token_seconds_count", "moe_llm_queue_depth", "moe_llm_active_requests",
                 "moe_llm_expert_cache_hit_rate", "moe_llm_bytes_to_device_total", "moe_llm_host_syncs_per_token",
                 "moe_llm_prefix_cache_hit_tokens_total"):  # fmt: skip
        assert name in values, name
    assert values["moe_llm_tokens_generated_total"] >= 3 and values["moe_llm_time_to_first_token_seconds_count"] >= 1
    assert 0.0 <= values["moe_llm_expert_cache_hit_rate"] <= 1.0
    assert any(k.startswith("moe_llm_http_errors_total") for k in values) or "moe_llm_http_errors_total" in r.text


def test_follow_up_turn_prefills_only_its_new_tokens(client, engine):
    history = [{"role": "system", "content": "Be kind. " * 5}, *HELLO]
    fresh = moe_llm.load(engine.model_path, cache_per_layer=2, prefill_chunk=16, prefix_cache=0)
    first = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0)
    reply = fresh.generate(history, max_new_tokens=8)
    assert first.choices[0].message.content == reply.text and first.choices[0].finish_reason == "length"
    before = engine.stats_dict()
    follow = [*history, {"role": "assistant", "content": reply.text}, {"role": "user", "content": "And again?"}]
    second = client.chat.completions.create(model=MODEL, messages=follow, max_tokens=8, temperature=0)
    after = engine.stats_dict()
    ran = engine.encode(history) + reply.token_ids[:-1]  # the first request's positions (its last token never ran)
    p2 = engine.encode(follow)
    assert p2[: len(ran)] == ran  # the reply re-renders to the tokens the server generated
    assert after["prefill_tokens"] - before["prefill_tokens"] == len(p2) - len(ran)  # only the turn's new tokens
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == len(ran)
    assert second.usage.prompt_tokens == len(p2) and second.usage.prompt_tokens_details.cached_tokens == len(ran)
    assert second.choices[0].message.content == fresh.generate(follow, max_new_tokens=8).text


def test_api_key_is_required_on_v1(engine):
    with running(create_app(engine, model_name=MODEL, api_key="s3cret")) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(f"{url}/v1/chat/completions", json={}).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_a_full_queue_answers_429_with_retry_after(tiny_mixtral):
    engine = moe_llm.load(tiny_mixtral, cache_per_layer=2, max_batch=1, max_queue=1)
    engine.eos_ids = set()  # the first request must run its 3000 tokens, not stop at a random EOS
    with running(create_app(engine, model_name=MODEL)) as url:
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()
            next(lines)
            assert wait_for(lambda: engine.batcher.active_requests == 1)  # it holds the only batch slot
            waiting = {}

            def second():
                waiting["r"] = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                                          json={"model": MODEL, "messages": HELLO, "max_tokens": 2})  # fmt: skip

            t = threading.Thread(target=second)
            t.start()
            assert wait_for(lambda: engine.batcher.queue_depth == 1)
            r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        t.join(timeout=120)  # the first stream is closed: the waiting request runs
        assert waiting["r"].status_code == 200
        assert "moe_llm_requests_rejected_total 1" in httpx.get(f"{url}/metrics").text


def test_concurrent_requests_are_batched_and_match_solo_runs(base, engine):
    prompts = [[{"role": "user", "content": f"Question number {i}: " + "why? " * i}] for i in range(4)]
    want = [engine.generate(p, max_new_tokens=16).text for p in prompts]
    rows_before = engine.batcher.counters.max_rows
    engine.batcher.counters.max_rows = 0
    got = [None] * 4
    barrier = threading.Barrier(4)

    def ask(i):
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        barrier.wait()
        got[i] = c.chat.completions.create(model=MODEL, messages=prompts[i], max_tokens=16, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [g.choices[0].message.content for g in got] == want
    assert engine.batcher.counters.max_rows >= 2  # at least two requests decoded in one step
    engine.batcher.counters.max_rows = max(rows_before, engine.batcher.counters.max_rows)


def test_langchain_chat_openai_against_the_server(base):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{base}/v1", api_key="x", model=MODEL, temperature=0, max_tokens=6, max_retries=0)
    whole = chat.invoke("Hello there")
    streamed = "".join(c.content for c in chat.stream("Hello there"))
    assert whole.content == streamed and whole.usage_metadata["output_tokens"] >= 1


def test_expert_state_endpoint_has_the_grid(base, client, engine):
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    s = httpx.get(f"{base}/v1/engine/experts").json()
    assert s["layers"] == list(engine.cache.layers) and s["num_experts"] == 8
    assert len(s["uses"]) == len(s["layers"]) and all(len(row) == 8 for row in s["uses"])
    assert sum(map(sum, s["uses"])) > 0
    assert sorted(map(tuple, s["resident"])) == sorted(engine.cache.keys())
    assert 0.0 <= s["stats"]["hit_rate"] <= 1.0


def test_serve_command_starts_and_refuses_bad_options(tiny_mixtral):
    import os
    import signal
    import subprocess
    import sys

    from serve_helpers import serve_process

    bad = subprocess.run([sys.executable, "-m", "moe_llm", "serve", str(tiny_mixtral), "--port", "0"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: --port")
    env = {**os.environ, "MOE_LLM_API_KEY": "from-env"}
    args = ("--max-batch", "2", "--model-name", "cli-tiny", "--cache-per-layer", "2")
    with serve_process(tiny_mixtral, *args, env=env) as (proc, url):
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key came from MOE_LLM_API_KEY
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-env"}).json()
        assert models["data"][0]["id"] == "cli-tiny"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0  # Ctrl-C: drained, a clean exit


def test_a_barrage_of_mutated_requests_leaves_the_server_healthy(base, client, engine):
    """Each field of a valid request replaced by values of every JSON type, sent 8 at a time: every
    answer is a success or an OpenAI error object, and the server is as before afterwards."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(0)
    values = [None, 0, -1, 2**70, 1.5, float("1e308"), "", "x" * 300, [], [1, "a"], {}, {"a": {"b": []}}, True]
    valid = {"model": MODEL, "messages": HELLO, "max_tokens": 2, "temperature": 0}
    fields = ["model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "tools",
              "tool_choice", "response_format", "stream_options", "n", "max_completion_tokens"]  # fmt: skip
    bodies = []
    for field in fields:
        for v in values:
            body = {**valid, field: v}
            if field in ("max_tokens", "max_completion_tokens") and (v is None or isinstance(v, int) and 0 < v < 100):
                continue  # a valid length: the default (512 tokens) or a long one only costs time
            bodies.append(json.dumps(body).encode())
    bodies += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(20)]

    def send(raw: bytes):
        path = rng.choice(["/v1/chat/completions", "/v1/completions"])
        r = httpx.post(f"{base}{path}", content=raw, headers={"content-type": "application/json"}, timeout=120)
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
            assert r.status_code in (400, 404, 413, 422), r.text
        return r.status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, bodies))
    assert 200 in statuses and 422 in statuses and 400 in statuses
    assert wait_for(lambda: engine.batcher.active_requests == 0)
    assert engine.cache.consistent()
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == engine.generate(HELLO, max_new_tokens=12).text


@pytest.mark.parametrize("drain", ["30", "1"])
def test_sigterm_drains_what_is_in_flight_and_exits_0(tiny_mixtral, drain):
    """SIGTERM stops the server taking requests; a stream in flight runs to its [DONE] (or, past
    --drain-timeout, is cut), and the command exits 0."""
    import signal
    import time

    from serve_helpers import serve_process

    with serve_process(tiny_mixtral, "--cache-per-layer", "2", "--drain-timeout", drain) as (proc, url):
        got = {"events": 0, "done": False}
        tokens = 120 if drain == "30" else 3000  # the second one cannot finish within a second

        def stream():
            body = {"model": "x", "messages": HELLO, "max_tokens": tokens, "stream": True, "temperature": 0}
            body["model"] = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            try:
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        got["events"] += line.startswith("data: {")
                        got["done"] |= line == "data: [DONE]"
            except httpx.HTTPError:
                pass  # cut at the drain timeout

        t = threading.Thread(target=stream)
        t.start()
        assert wait_for(lambda: got["events"] > 0, timeout=30)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        t.join(timeout=30)
        if drain == "30":
            assert got["done"]  # the request in flight finished
        else:
            assert not got["done"] and time.monotonic() - t0 < 20  # cut after about a second
        err = proc.stderr.read()
        assert "stopped" in err and "Traceback" not in err, err
