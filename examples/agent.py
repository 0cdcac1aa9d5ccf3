"""A small tool-using agent: the model asks for a tool, we run it, the model answers.

`ChatMoeLLM.bind_tools` shows the tools to the model; its reply is parsed into
`tool_calls`, each call is dispatched to the matching LangChain tool, and the
results go back as `ToolMessage`s until the model answers without a call. The
tiny default model has random weights and will not call tools; a real instruct
model (or the test's scripted replies) does.

    python examples/agent.py --model /models/Mixtral-8x7B-Instruct-v0.1 --experts-bits 2
"""

import argparse

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langchain_moe_llm import ChatMoeLLM

from moe_llm.defaults import default_model_dir


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@tool
def expert_memory_gib(params_billion: float, bits: float) -> float:
    """GiB needed to hold `params_billion` billion expert parameters at `bits` bits each."""
    return round(params_billion * 1e9 * bits / 8 / 2**30, 2)


TOOLS = [multiply, expert_memory_gib]


def run_agent(chat: ChatMoeLLM, question: str, tools: list[BaseTool] = TOOLS, max_turns: int = 4) -> list[BaseMessage]:
    """Alternate model turns and tool calls; return the whole conversation."""
    by_name = {t.name: t for t in tools}
    model = chat.bind_tools(tools)
    messages: list[BaseMessage] = [HumanMessage(question)]
    for _ in range(max_turns):
        reply: AIMessage = model.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            if call["name"] in by_name:
                result = by_name[call["name"]].invoke(call)  # a ToolMessage carrying the call id
            else:
                result = ToolMessage(f"unknown tool {call['name']!r}", tool_call_id=call["id"], status="error")
            print(f"  tool {call['name']}({call['args']}) -> {result.content}")
            messages.append(result)
    return messages


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    parser.add_argument("--question", default="How many GiB do 45 billion expert parameters take at 2.5 bits?")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--experts-bits", type=int, default=None, help="2, 3 or 4 (default: checkpoint precision)")
    args = parser.parse_args()
    chat = ChatMoeLLM(
        model_path=str(args.model or default_model_dir()[0]),
        device=args.device,
        experts_bits=args.experts_bits,
        max_tokens=args.max_tokens,
    )
    print(f"Q: {args.question}")
    conversation = run_agent(chat, args.question)
    print(f"A: {conversation[-1].text}")
