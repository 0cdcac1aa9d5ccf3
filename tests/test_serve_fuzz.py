"""A property-based fuzzer against the server's own OpenAPI schema (hypothesis): request bodies
drawn from each POST route's schema, and arbitrary JSON in their place, a few hundred requests
in all. No answer is a 5xx; every error is an OpenAI error object with a 4xx status; and
afterwards the server answers a normal request as before, with nothing left running."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import running, wait_for

import moe_llm
from moe_llm.serve import create_app

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny-mixtral"
ROUTES = ("/v1/chat/completions", "/v1/completions")
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def served(tiny_mixtral):
    engine = moe_llm.load(tiny_mixtral, cache_per_layer=2, max_context=512)
    with running(create_app(engine, model_name=MODEL, default_max_tokens=4)) as url:
        yield engine, url


@pytest.fixture(scope="module")
def spec(served):
    _, url = served
    r = httpx.get(f"{url}/openapi.json")
    assert r.status_code == 200
    return r.json()


def body_schema(spec: dict, route: str) -> dict:
    """The route's request body schema, with the components its references point into."""
    return spec["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]


def from_schema(schema: dict, root: dict, name: str = ""):
    """A hypothesis strategy for the JSON Schema subset pydantic writes: $ref, anyOf, enum, const,
    and the types with their bounds, required and optional properties, extra keys where allowed.
    A "model" string is the served name half of the time, so requests get past the model check."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return st.deferred(lambda: from_schema(target, root, name))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, root, name) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "string":
        return st.just(MODEL) | st.text(max_size=30) if name == "model" else st.text(max_size=30)
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum")
        if kind == "integer":
            return st.integers(None if low is None else int(low) + ("exclusiveMinimum" in schema), high)
        return st.floats(low, high, exclude_min="exclusiveMinimum" in schema, allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), root), max_size=3)
    if kind == "object":
        props = schema.get("properties", {})
        required = {k: from_schema(v, root, k) for k, v in props.items() if k in schema.get("required", ())}
        optional = {k: from_schema(v, root, k) for k, v in props.items() if k not in required}
        fixed = st.fixed_dictionaries(required, optional=optional)
        if schema.get("additionalProperties") is True:
            extra = st.dictionaries(st.text(max_size=8), JSON, max_size=2)
            return st.tuples(fixed, extra).map(lambda t: {**t[1], **t[0]})
        return fixed
    return JSON  # no constraint: any JSON


def short(body):
    """Keep generation short: a schema-valid token count above 4 becomes 4 (the answer to a long
    one is right but slow), everything else is sent as drawn."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > 4:
                body[key] = 4
    return body


def check(url: str, route: str, body) -> None:
    r = httpx.post(f"{url}{route}", json=body, timeout=120)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
        assert r.status_code in (400, 404, 413, 422), r.text


def test_the_schema_describes_both_routes(spec):
    for route in ROUTES:
        schema = body_schema(spec, route)
        assert schema["$ref"].startswith("#/components/schemas/")
        name = schema["$ref"].rsplit("/", 1)[1]
        assert "model" in spec["components"]["schemas"][name]["properties"]


@pytest.mark.parametrize("route", ROUTES)
def test_bodies_drawn_from_the_schema_never_get_a_server_error(served, spec, route):
    _, url = served

    @FUZZ
    @given(from_schema(body_schema(spec, route), spec).map(short))
    def fuzz(body):
        check(url, route, body)

    fuzz()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "tools",
          "tool_choice", "response_format", "stream_options", "n"]  # fmt: skip


@FUZZ
@given(route=st.sampled_from(ROUTES), body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6) | JSON)
def _arbitrary(url, route, body):
    check(url, route, short(body))


def test_arbitrary_json_never_gets_a_server_error_and_the_server_stays_healthy(served):
    engine, url = served
    _arbitrary(url)
    assert wait_for(lambda: engine.batcher.active_requests == 0 and engine.batcher.queue_depth == 0)
    assert engine.cache.consistent()
    hello = [{"role": "user", "content": "Hello there"}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": hello, "max_tokens": 6,
                                                        "temperature": 0}, timeout=60)  # fmt: skip
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == engine.generate(hello, max_new_tokens=6).text
