"""LangChain's own standard test suites for `ChatMoeLLM`, offline on the tiny checkpoint.

Every standard test runs. The ones marked xfail below need a model that *chooses*
to call a tool or to answer in JSON; the tiny model has random weights and writes
noise, so it cannot. Forced tool choice prefills the call's name, and a forced
call of a tool without parameters is complete without the model
(`test_tool_calling_with_no_arguments` passes for that reason), but arguments
must come from the model. The parsing and dispatch behind those tests are tested
with scripted model output in test_langchain_chat.py.

Standard tests that skip themselves, and why:
- test_init_from_env: no environment configuration (no API key; a local path is passed explicitly);
- test_serdes: a model holds a live engine (GPU buffers), so it is not serializable (`is_lc_serializable` False);
- *_with_model_override: one engine serves one model (`supports_model_override` is False);
- image/audio/pdf/anthropic-input tests: text-only models (their `supports_*` flags are False);
- test_stream_time: a VCR cassette benchmark for HTTP APIs; there is no HTTP here.

Both suites run twice: on the tiny checkpoint with its chat template, and on a base checkpoint
whose tokenizer has none (like Mixtral-8x7B-v0.1), where chat uses the generic template.
"""

from __future__ import annotations

import pytest
from langchain_moe_llm import ChatMoeLLM
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

# the standard tests' own parametrizations, repeated on the xfail overrides
BOTH_OUTPUT_VERSIONS = pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
SCHEMA_TYPES = pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
RANDOM_WEIGHTS = "the tiny test model has random weights: it never chooses a tool call or JSON by itself"


class _SharedEngine:
    """Hand the session's engine to the suite's model fixture (it builds a new model per test)."""

    _engine = None

    @pytest.fixture(autouse=True)
    def _use_engine(self, engine):
        type(self)._engine = engine

    @property
    def chat_model_class(self) -> type[ChatMoeLLM]:
        return ChatMoeLLM

    @property
    def supports_model_override(self) -> bool:
        return False  # one engine serves one model: a per-call `model=` cannot switch it


class TestChatMoeLLMUnit(_SharedEngine, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict:
        return {"engine": self._engine}  # no max_tokens/stop: test_standard_params passes its own


class TestChatMoeLLMIntegration(_SharedEngine, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict:
        return {"engine": self._engine, "max_tokens": 8}  # short replies keep CI fast

    @property
    def supports_json_mode(self) -> bool:
        return True  # with_structured_output(method="json_mode") is implemented (system prompt + "{" prefill)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS)
    @BOTH_OUTPUT_VERSIONS
    def test_tool_calling(self, model) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS)
    async def test_tool_calling_async(self, model) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS)
    def test_bind_runnables_as_tools(self, model) -> None:
        super().test_bind_runnables_as_tools(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS)
    def test_tool_choice(self, model) -> None:
        super().test_tool_choice(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS)
    @SCHEMA_TYPES
    def test_structured_output(self, model, schema_type) -> None:
        super().test_structured_output(model, schema_type)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS)
    @SCHEMA_TYPES
    async def test_structured_output_async(self, model, schema_type) -> None:
        await super().test_structured_output_async(model, schema_type)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS)
    def test_structured_output_pydantic_2_v1(self, model) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS)
    def test_structured_output_optional_param(self, model) -> None:
        super().test_structured_output_optional_param(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS)
    def test_json_mode(self, model) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS)
    @BOTH_OUTPUT_VERSIONS
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS)
    def test_unicode_tool_call_integration(self, model, *, tool_choice=None, force_tool_call=True) -> None:
        super().test_unicode_tool_call_integration(model, tool_choice=tool_choice, force_tool_call=force_tool_call)


class _BaseCheckpoint:
    """The same suite on a checkpoint without a chat template."""

    @pytest.fixture(autouse=True)
    def _use_engine(self, base_engine):
        type(self)._engine = base_engine


class TestChatMoeLLMUnitBaseCheckpoint(_BaseCheckpoint, TestChatMoeLLMUnit):
    pass


class TestChatMoeLLMIntegrationBaseCheckpoint(_BaseCheckpoint, TestChatMoeLLMIntegration):
    pass
