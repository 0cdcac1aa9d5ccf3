"""LlamaIndex `MoeLLM` as a function-calling LLM: tool calls parsed from scripted model text, a
`FunctionAgent` that runs a Python tool and answers with its result, `structured_predict`, and chat
on a checkpoint without a chat template."""

from __future__ import annotations

import pytest
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.llms.moe_llm import MoeLLM
from pydantic import BaseModel

MULTIPLY_CALL = '[TOOL_CALLS] [{"name": "multiply", "arguments": {"a": 6, "b": 7}}]'


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def now() -> str:
    """The current time."""
    return "noon"


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str
    age: int


TOOLS = [FunctionTool.from_defaults(multiply), FunctionTool.from_defaults(now)]


def test_is_a_function_calling_llm(engine, base_engine):
    llm = MoeLLM(engine=engine)
    assert isinstance(llm, FunctionCallingLLM) and llm.metadata.is_function_calling_model
    assert llm.metadata.is_chat_model
    # a checkpoint without a template still calls tools (through the generic template), but its
    # query engines should prompt it with plain text
    base = MoeLLM(engine=base_engine).metadata
    assert base.is_function_calling_model and not base.is_chat_model


def test_chat_with_tools_parses_the_call(scripted):
    engine = scripted([f"Let me compute. {MULTIPLY_CALL}"])
    llm = MoeLLM(engine=engine, max_new_tokens=256)
    response = llm.chat_with_tools(TOOLS, user_msg="What is 6 times 7?")
    calls = llm.get_tool_calls_from_response(response)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("multiply", {"a": 6, "b": 7})]
    assert calls[0].tool_id and response.message.content == "Let me compute."
    assert response.raw["finish_reason"] == "tool_calls"
    assert '"name": "multiply"' in engine.prompts[0] and '"name": "now"' in engine.prompts[0]


def test_stream_chat_with_tools_holds_the_call_back(scripted):
    llm = MoeLLM(engine=scripted([f"Let me compute. {MULTIPLY_CALL}"]), max_new_tokens=256)
    responses = list(llm.stream_chat_with_tools(TOOLS, user_msg="What is 6 times 7?"))
    assert "".join(r.delta or "" for r in responses).strip() == "Let me compute."
    assert all("[" not in (r.message.content or "") for r in responses)
    assert [c.tool_name for c in llm.get_tool_calls_from_response(responses[-1])] == ["multiply"]
    assert all(not llm.get_tool_calls_from_response(r, error_on_no_tool_call=False) for r in responses[:-1])


def test_no_call_or_a_broken_call(scripted):
    llm = MoeLLM(engine=scripted(["It is 42.", '[TOOL_CALLS] [{"name": "multiply", "arguments": {"a": ']))
    plain = llm.chat_with_tools(TOOLS, user_msg="6*7?")
    assert plain.message.content == "It is 42." and llm.get_tool_calls_from_response(plain, False) == []
    with pytest.raises(ValueError, match="Expected at least one tool call"):
        llm.get_tool_calls_from_response(plain)
    broken = llm.chat_with_tools(TOOLS, user_msg="6*7?")
    with pytest.raises(ValueError, match="multiply.*JSONDecodeError"):
        llm.get_tool_calls_from_response(broken)


def test_only_one_call_unless_parallel_calls_are_allowed(scripted):
    two = f'{MULTIPLY_CALL[:-1]}, {{"name": "now", "arguments": {{}}}}]'
    llm = MoeLLM(engine=scripted([two, two]), max_new_tokens=256)
    single = llm.chat_with_tools(TOOLS, user_msg="go")
    assert [c.tool_name for c in llm.get_tool_calls_from_response(single)] == ["multiply"]
    both = llm.chat_with_tools(TOOLS, user_msg="go", allow_parallel_tool_calls=True)
    assert [c.tool_name for c in llm.get_tool_calls_from_response(both)] == ["multiply", "now"]


def test_required_tool_prefills_the_call(scripted):
    engine = scripted(['{"a": 2, "b": 3}}]'])  # the model only writes the arguments
    llm = MoeLLM(engine=engine, max_new_tokens=256)
    response = llm.chat_with_tools(TOOLS[:1], user_msg="2*3?", tool_required=True)
    assert [c.tool_kwargs for c in llm.get_tool_calls_from_response(response)] == [{"a": 2, "b": 3}]
    assert engine.prompts[0].endswith('[TOOL_CALLS] [{"name": "multiply", "arguments": ')


def test_predict_and_call_runs_the_tool(scripted):
    llm = MoeLLM(engine=scripted([MULTIPLY_CALL]), max_new_tokens=256)
    out = llm.predict_and_call(TOOLS, user_msg="What is 6 times 7?")
    assert out.response == "42" and out.sources[0].tool_name == "multiply"


def test_structured_predict_fills_a_pydantic_model(scripted):
    engine = scripted(['{"name": "Ada", "age": 36}}]', '{"name": "Ada", "age": 36}}]'])
    llm = MoeLLM(engine=engine, max_new_tokens=256)
    prompt = PromptTemplate("Who is in this text? {text}")
    person = llm.structured_predict(Person, prompt, text="Ada Lovelace was 36.")
    assert person == Person(name="Ada", age=36)
    assert "Ada Lovelace was 36." in engine.prompts[0]
    assert engine.prompts[0].endswith('[TOOL_CALLS] [{"name": "Person", "arguments": ')


async def test_async_structured_predict_and_chat_with_tools(scripted):
    llm = MoeLLM(engine=scripted(['{"name": "Ada", "age": 36}}]', MULTIPLY_CALL]), max_new_tokens=256)
    person = await llm.astructured_predict(Person, PromptTemplate("Who? {text}"), text="Ada, 36.")
    assert person == Person(name="Ada", age=36)
    response = await llm.achat_with_tools(TOOLS, user_msg="6*7?")
    assert [c.tool_kwargs for c in llm.get_tool_calls_from_response(response)] == [{"a": 6, "b": 7}]


@pytest.mark.parametrize("streaming", [True, False])
async def test_function_agent_calls_a_python_tool_and_uses_its_result(scripted, streaming):
    seen = []

    def multiply_and_record(a: int, b: int) -> int:
        """Multiply two integers."""
        seen.append((a, b))
        return a * b

    tool = FunctionTool.from_defaults(multiply_and_record, name="multiply")
    engine = scripted([f"I will compute it. {MULTIPLY_CALL}", "6 times 7 is 42."])
    llm = MoeLLM(engine=engine, max_new_tokens=256)
    agent = FunctionAgent(tools=[tool], llm=llm, system_prompt="Use the tools.", streaming=streaming)
    handler = agent.run(user_msg="What is 6 times 7?")
    results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    output = await handler
    assert seen == [(6, 7)]  # the real Python function ran, with the parsed arguments
    assert [(r.tool_name, r.tool_output.content) for r in results] == [("multiply", "42")]
    assert output.response.content == "6 times 7 is 42."
    assert not llm.get_tool_calls_from_response(ChatResponse(message=output.response), error_on_no_tool_call=False)
    second = engine.prompts[1]  # the call and its result went back to the model
    assert MULTIPLY_CALL in second and '[TOOL_RESULTS] {"call_id": ' in second and '"content": "42"' in second


def test_chat_on_a_checkpoint_without_a_template(base_engine, scripted_base):
    messages = [ChatMessage(role=MessageRole.SYSTEM, content="Be brief."), ChatMessage(role="user", content="Hi")]
    expected = base_engine.generate(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], max_new_tokens=8
    )
    assert MoeLLM(engine=base_engine, max_new_tokens=8).chat(messages).message.content == expected.text
    scripted_llm = MoeLLM(engine=scripted_base(["Hello.<|im_end|>\n<|im_start|>user\nmore"]), max_new_tokens=64)
    assert scripted_llm.chat(messages).message.content == "Hello."  # the turn marker ends the reply
