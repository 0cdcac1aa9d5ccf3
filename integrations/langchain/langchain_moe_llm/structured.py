"""Output parsers for `ChatMoeLLM.with_structured_output`.

LangChain's own parsers accept replies that do not hold the structure: the tool-call
parsers return None when there is no valid call, and `JsonOutputParser` reads a reply such
as `{I cannot` as the partial object `{}`. A local model does that often, so here a final
reply without the structure raises `OutputParserException` (which `include_raw=True`
reports as `parsing_error`); streams still yield partial results as they grow.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser
from langchain_core.outputs import ChatGeneration, Generation


def _snippet(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def validate(model: type, value: Any, text: str) -> Any:
    """`value` as an instance of the pydantic (v2 or v1) `model`, or OutputParserException."""
    try:
        return model.model_validate(value) if hasattr(model, "model_validate") else model.parse_obj(value)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError (v1 and v2) is a ValueError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OutputParserException(f"the reply does not match {model.__name__}: {reason}", llm_output=text) from exc


def json_object(text: str) -> dict[str, Any]:
    """The JSON object a reply holds (text around it is ignored), or OutputParserException."""
    start = text.find("{")
    try:
        if start == -1:
            raise ValueError("no '{'")
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError as exc:
        raise OutputParserException(
            f"the reply is not a JSON object ({exc}): {_snippet(text)}", llm_output=text
        ) from None
    return value


class JsonReplyParser(JsonOutputParser):
    """JSON mode: the reply's object, validated into `validate_as` (a pydantic model) when set."""

    validate_as: Any = None

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        if partial and self.validate_as is None:
            return super().parse_result(result, partial=True)
        text = result[0].text
        try:
            value = json_object(text)
            return value if self.validate_as is None else validate(self.validate_as, value, text)
        except OutputParserException:
            if partial:  # a stream that has not yet produced a whole object
                return None
            raise


class ToolCallReplyParser(JsonOutputKeyToolsParser):
    """Forced tool call: the arguments of the first call of `key_name`, validated into
    `validate_as` when set."""

    validate_as: Any = None
    first_tool_only: bool = True

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        args = super().parse_result(result, partial=partial)
        if partial:
            if args is None or self.validate_as is None:
                return args
            try:
                return validate(self.validate_as, args, "")
            except OutputParserException:
                return None
        text = result[0].text
        if args is None:
            message = result[0].message if isinstance(result[0], ChatGeneration) else None
            invalid = [c.get("args") or "" for c in getattr(message, "invalid_tool_calls", None) or []]
            raise OutputParserException(
                f"the reply holds no valid {self.key_name} tool call: {_snippet(invalid[0] if invalid else text)}",
                llm_output=text,
            )
        return args if self.validate_as is None else validate(self.validate_as, args, text)
