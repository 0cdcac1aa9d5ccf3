"""Configuration: explicit arguments over MOE_LLM_* variables over the TOML file over the
defaults; every bad value is refused with one line naming its field and its source."""

from __future__ import annotations

import pytest

import moe_llm
from moe_llm.config import EngineConfig, GenerationConfig
from moe_llm.errors import ConfigError, InputError
from moe_llm.settings import config_path, resolve_engine_config

pytestmark = pytest.mark.usefixtures("one_thread")


def toml(tmp_path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_precedence_explicit_over_environment_over_file(tmp_path):
    path = toml(tmp_path, '[engine]\ndevice = "cpu"\ncache_per_layer = 2\nprefetch = false\nmax_context = 512\n')
    env = {"MOE_LLM_CACHE_PER_LAYER": "4", "MOE_LLM_PREFETCH": "true"}
    cfg = resolve_engine_config({}, environ=env, path=path)
    assert (cfg.cache_per_layer, cfg.prefetch, cfg.max_context) == (4, True, 512)
    cfg = resolve_engine_config({"cache_per_layer": 6, "prefetch": None}, environ=env, path=path)
    assert (cfg.cache_per_layer, cfg.prefetch) == (6, True)  # None means "not given"
    assert resolve_engine_config({}, environ={}, path=None) == EngineConfig()


def test_a_higher_layer_choosing_the_budget_clears_a_lower_cache_size(tmp_path):
    path = toml(tmp_path, "[engine]\ncache_per_layer = 2\n")
    cfg = resolve_engine_config({}, environ={"MOE_LLM_GPU_BUDGET": "12GiB"}, path=path)
    assert cfg.cache_per_layer is None and cfg.gpu_budget == 12 * 2**30
    cfg = resolve_engine_config({"cache_per_layer": 3}, environ={"MOE_LLM_GPU_BUDGET": "12GiB"}, path=None)
    assert cfg.cache_per_layer == 3 and cfg.gpu_budget is None


def test_decode_options_from_the_environment():
    env = {"MOE_LLM_CUDA_GRAPHS": "off", "MOE_LLM_HEAD_BITS": "4"}
    cfg = resolve_engine_config({}, environ=env, path=None)
    assert cfg.cuda_graphs is False and cfg.head_bits == 4
    cfg = resolve_engine_config({}, environ={}, path=None)
    assert cfg.cuda_graphs is True and cfg.head_bits is None  # the LM head stays 16-bit unless asked


def test_head_bits_accept_4_or_none():
    assert EngineConfig.build(head_bits="4").head_bits == 4
    assert EngineConfig.build(head_bits="none").head_bits is None
    with pytest.raises(ConfigError, match="^head_bits: Input should be 4$"):
        EngineConfig.build(head_bits=2)


def test_bits_none_string_forces_full_precision_over_a_setting():
    env = {"MOE_LLM_EXPERTS_BITS": "2"}
    assert resolve_engine_config({}, environ=env, path=None).experts_bits == 2
    assert resolve_engine_config({"experts_bits": "none"}, environ=env, path=None).experts_bits is None


@pytest.mark.parametrize(
    "env,message",
    [
        (
            {"MOE_LLM_CACHE_PER_LAYER": "0"},
            "MOE_LLM_CACHE_PER_LAYER: cache_per_layer must be between 1 and num_experts",
        ),
        ({"MOE_LLM_GPU_BUDGET": "lots"}, "MOE_LLM_GPU_BUDGET: gpu_budget: invalid size 'lots'"),
        ({"MOE_LLM_DEVICE": "tpu"}, "MOE_LLM_DEVICE: device must be 'cpu' or 'cuda[:N]'"),
        ({"MOE_LLM_EXPERTS_BITS": "5"}, "MOE_LLM_EXPERTS_BITS: experts_bits"),
        ({"MOE_LLM_PREFETCH": "maybe"}, "MOE_LLM_PREFETCH: prefetch"),
        ({"MOE_LLM_HEAD_BITS": "3"}, "MOE_LLM_HEAD_BITS: head_bits: Input should be 4"),
        ({"MOE_LLM_CUDA_GRAPHS": "sometimes"}, "MOE_LLM_CUDA_GRAPHS: cuda_graphs"),
    ],
)
def test_environment_errors_name_the_variable(env, message):
    with pytest.raises(ConfigError) as exc:
        resolve_engine_config({}, environ=env, path=None)
    assert str(exc.value).startswith(message)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config.toml engine.max_context: max_context must be positive"):
        resolve_engine_config({}, environ={}, path=toml(tmp_path, "[engine]\nmax_context = -1\n"))
    with pytest.raises(ConfigError, match=r"unknown setting engine.cache_size"):
        resolve_engine_config({}, environ={}, path=toml(tmp_path, "[engine]\ncache_size = 2\n"))
    with pytest.raises(ConfigError, match=r"unknown table or key 'device'"):
        resolve_engine_config({}, environ={}, path=toml(tmp_path, 'device = "cpu"\n'))
    with pytest.raises(ConfigError, match="is not valid TOML"):
        resolve_engine_config({}, environ={}, path=toml(tmp_path, "[engine\n"))


def test_settings_file_location(tmp_path):
    assert config_path({"XDG_CONFIG_HOME": str(tmp_path)}) is None
    (tmp_path / "moe-llm").mkdir()
    (tmp_path / "moe-llm" / "config.toml").write_text("[engine]\n")
    assert config_path({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "moe-llm" / "config.toml"
    with pytest.raises(ConfigError, match="MOE_LLM_CONFIG points to"):
        config_path({"MOE_LLM_CONFIG": str(tmp_path / "nope.toml")})


def test_load_reads_the_environment_and_the_file(tiny_mixtral, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LLM_CONFIG", str(toml(tmp_path, "[engine]\ncache_per_layer = 5\nprefetch = false\n")))
    monkeypatch.setenv("MOE_LLM_CACHE_PER_LAYER", "3")
    engine = moe_llm.load(tiny_mixtral)
    assert engine.plan.slots == 3 * 2 and engine.runtime.prefetcher is None  # 3 per MoE layer, 2 layers
    assert moe_llm.load(tiny_mixtral, cache_per_layer=1).plan.slots == 2


def test_cache_size_above_the_expert_count_names_the_count(tiny_mixtral):
    with pytest.raises(ConfigError, match=r"^cache_per_layer must be between 1 and num_experts \(8\), got 9$"):
        moe_llm.load(tiny_mixtral, cache_per_layer=9)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"cache_per_layer": 0}, "cache_per_layer must be between 1 and num_experts, got 0"),
        ({"cache_per_layer": 2, "gpu_budget": "1GiB"}, "give either cache_per_layer or gpu_budget, not both"),
        ({"gpu_budget": "-3GiB"}, "gpu_budget: invalid size '-3GiB'"),
        ({"dtype": "int8"}, "dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
        ({"cache_size": 2}, "cache_size: Extra inputs are not permitted"),
    ],
)
def test_engine_config_messages(kwargs, message):
    with pytest.raises(ConfigError) as exc:
        EngineConfig.build(**kwargs)
    assert str(exc.value) == message or str(exc.value).startswith(message)


def test_generation_config_messages():
    with pytest.raises(InputError, match="^max_new_tokens must be at least 1, got 0$"):
        GenerationConfig.build(max_new_tokens=0)
    with pytest.raises(InputError, match="^temperature must be between 0 and 100, got -1.0$"):
        GenerationConfig.build(temperature=-1.0)
