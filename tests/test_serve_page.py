"""The chat page at / in headless Chromium: it sends a message, streams the reply and draws the
expert-cache grid from /v1/engine/experts. Chromium is required (CI installs it); missing, the
test fails rather than skips."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from serve_helpers import running

import moe_llm
from moe_llm.serve import create_app

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "headless Chromium is needed for this test: apt-get install -y chromium"
    return path


def render(url: str, profile) -> str:
    """The page's DOM after its scripts ran (network included) for up to 20 s of virtual time."""
    out = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def engine(tiny_mixtral):
    return moe_llm.load(tiny_mixtral, cache_per_layer=2)


def test_page_streams_a_reply_and_draws_the_expert_grid(engine, tmp_path):
    with running(create_app(engine, model_name="tiny-page")) as url:
        dom = render(f"{url}/?prompt=Hello%20page", tmp_path / "profile")
    assert '<b id="model">tiny-page</b>' in dom  # /v1/models answered
    assert '<div class="user">Hello page</div>' in dom
    reply = re.search(r'<div class="assistant"[^>]*>(.*?)</div>', dom, re.S)
    assert reply and reply.group(1).strip(), "no streamed reply on the page"
    grid = re.search(r'<table class="grid" id="grid" data-ready="1">(.*?)</table>', dom, re.S)
    assert grid, "the expert grid was not drawn"
    rows = re.findall(r"<tr>(.*?)</tr>", grid.group(1), re.S)
    assert len(rows) == 1 + len(engine.cache.layers)  # a header row, then one row per MoE layer
    cells = re.findall(r'<td title="layer (\d+), expert (\d+): routed (\d+) times"( class="resident")?', grid.group(1))
    assert len(cells) == len(engine.cache.layers) * engine.cache.num_experts
    resident = {(int(layer), int(e)) for layer, e, _, r in cells if r}
    assert 0 < len(resident) <= engine.cache.num_slots  # outlined: experts holding a device slot
    assert sum(int(n) for _, _, n, _ in cells) > 0
    assert "hit rate" in dom and "tok/s" in dom


def test_page_with_an_api_key_reports_the_401(engine, tmp_path):
    with running(create_app(engine, model_name="tiny-page", api_key="k")) as url:
        dom = render(f"{url}/", tmp_path / "profile")
    assert re.search(r'<div class="error">[^<]*API key', dom)
