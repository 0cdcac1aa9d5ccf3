"""Shared fixtures: tiny random-init MoE checkpoints in the real HF format, built once per session."""

from __future__ import annotations

import pytest
import torch

from moe_llm.tiny import make_tiny

# Tiny models run fastest on one intra-op thread, and one thread count for the whole
# session keeps float reductions (hence greedy near-ties) identical across tests and the
# worker threads that adapters and concurrency tests start.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread; several threads on a busy 2-core box
    spin against each other (10x slower decode, 100x slower hqq)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> checkpoint dir (2 layers, 8 experts, hidden 64)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family in ("mixtral", "qwen3_moe", "olmoe"):
        out[family] = make_tiny(root / family, family, seed=0, layers=2)
    return out


@pytest.fixture(scope="session")
def tiny_mixtral(tiny_dirs):
    return tiny_dirs["mixtral"]


@pytest.fixture(scope="session")
def tiny_engine(tiny_mixtral):
    """One shared unquantized CPU engine on the tiny Mixtral (2 slots per layer)."""
    import moe_llm

    return moe_llm.load(tiny_mixtral, device="cpu", cache_per_layer=2)


@pytest.fixture(scope="session")
def tiny_base_mixtral(tiny_mixtral, tmp_path_factory):
    """The tiny Mixtral as a base checkpoint: its tokenizer has no chat template (like Mixtral-8x7B-v0.1)."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("tiny-base") / "mixtral-base"
    shutil.copytree(tiny_mixtral, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="session")
def tiny_base_engine(tiny_base_mixtral):
    """A CPU engine on the templateless tiny Mixtral (chat falls back to the generic template)."""
    import moe_llm

    return moe_llm.load(tiny_base_mixtral, device="cpu", cache_per_layer=2)
