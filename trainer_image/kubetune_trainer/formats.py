"""Dataset formats: detect, check every record, and convert to TRL's SFT row shapes.

=================  ==========================================  ===========================
format             fields (renamable via ``fieldMapping``)      trains on
=================  ==========================================  ===========================
alpaca             instruction, input (optional), output        the output only
chat               messages: [{role, content}, ...]             the assistant turns only
prompt_completion  prompt, completion                           the completion only
text               text                                         every token
preference         prompt, chosen, rejected (text, or lists     the chosen over the rejected
                   of messages; objective dpo)                  response (DPO)
=================  ==========================================  ===========================

Pure Python: no tokenizer needed to find a malformed record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from kubetune_api.base import json_kind
from kubetune_api.spec import FieldMapping

from .datafiles import UnreadableJsonError, loads, shown

ConcreteFormat = Literal["alpaca", "chat", "prompt_completion", "text", "preference"]
#: The formats each objective trains on.
OBJECTIVE_FORMATS: dict[str, tuple[ConcreteFormat, ...]] = {
    "sft": ("alpaca", "chat", "prompt_completion", "text"),
    "dpo": ("preference",),
}
ROLES = ("system", "user", "assistant")


def detect_format(record: Mapping[str, Any], fields: FieldMapping) -> ConcreteFormat | None:
    """The format a record's keys suggest, most specific first (preference last); None if none fits."""
    keys = set(record)
    if fields.messages in keys:
        return "chat"
    if {fields.prompt, fields.completion} <= keys:
        return "prompt_completion"
    if {fields.instruction, fields.output} <= keys:
        return "alpaca"
    if fields.text in keys:
        return "text"
    # Last: a record any supervised format fits was detected as that before preference existed.
    if {fields.chosen, fields.rejected} <= keys:
        return "preference"
    return None


def format_fields(fmt: ConcreteFormat, fields: FieldMapping) -> str:
    """The fields that make a record ``fmt``: ``"fields 'instruction' and 'output'"``."""
    names = {
        "chat": [fields.messages],
        "prompt_completion": [fields.prompt, fields.completion],
        "alpaca": [fields.instruction, fields.output],
        "text": [fields.text],
        "preference": [fields.prompt, fields.chosen, fields.rejected],
    }[fmt]
    quoted = ", ".join(f"'{n}'" for n in names[:-1]) + (" and " if len(names) > 1 else "") + f"'{names[-1]}'"
    return f"field {quoted}" if len(names) == 1 else f"fields {quoted}"


def describe_formats(fields: FieldMapping) -> str:
    return (
        f"chat ('{fields.messages}'), prompt_completion ('{fields.prompt}' + '{fields.completion}'), "
        f"alpaca ('{fields.instruction}' + '{fields.output}'), text ('{fields.text}'), "
        f"preference ('{fields.prompt}' + '{fields.chosen}' + '{fields.rejected}')"
    )


def _string(record: Mapping[str, Any], name: str, *, required: bool, allow_empty: bool = False) -> list[str]:
    if name not in record:
        return [f"missing '{name}'"] if required else []
    value = record[name]
    if not isinstance(value, str):
        return [f"field '{name}' must be a string, got {json_kind(value)}"]
    if not allow_empty and not value.strip():
        return [f"field '{name}' is empty"]
    return []


def _messages(
    record: Mapping[str, Any], name: str, *, needs_assistant: bool = True
) -> tuple[list[str], list[dict[str, str]]]:
    """Check a ``messages`` field; CSV cells may hold it as a JSON string.

    ``needs_assistant``: a conversation to learn from has an assistant turn; a preference
    prompt need not.
    """
    if name not in record:
        return [f"missing '{name}'"], []
    value = record[name]
    if isinstance(value, str):
        try:
            value = loads(value)
        except UnreadableJsonError as exc:
            return [f"field '{name}' is not a JSON list of messages ({exc})"], []
    if not isinstance(value, list):
        return [f"field '{name}' must be a list of messages, got {json_kind(value)}"], []
    if not value:
        return [f"field '{name}' is empty"], []
    problems: list[str] = []
    messages: list[dict[str, str]] = []
    for index, message in enumerate(value):
        at = f"{name}[{index}]"
        if not isinstance(message, dict):
            problems.append(f"field '{at}' must be an object with role and content")
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            got = "nothing" if "role" not in message else shown(role)
            problems.append(f"field '{at}.role' must be one of {', '.join(ROLES)}, got {got}")
        if not isinstance(content, str):
            kind = "nothing" if "content" not in message else json_kind(content)
            problems.append(f"field '{at}.content' must be a string, got {kind}")
        elif role == "assistant" and not content.strip():
            problems.append(f"field '{at}.content' is empty")
        if isinstance(role, str) and isinstance(content, str):
            messages.append({"role": role, "content": content})
    if needs_assistant and not problems and not any(m["role"] == "assistant" for m in messages):
        problems.append(f"field '{name}' has no assistant message to learn from")
    return problems, messages


def _preference(record: Mapping[str, Any], fields: FieldMapping) -> tuple[list[str], dict[str, Any]]:
    """Check a preference pair; return its problems and, when it has none, the TRL row.

    The prompt's kind decides the pair's: a string prompt takes string responses, a list of
    messages takes lists of messages (TRL's conversational preference rows, rendered with the
    chat template). A pair whose two responses are the same teaches DPO nothing (its loss
    gradient is zero), so it is refused like an empty response.
    """
    names = (fields.chosen, fields.rejected)
    if fields.prompt in record and isinstance(record[fields.prompt], list):
        prompt_problems, prompt = _messages(record, fields.prompt, needs_assistant=False)
        checked = [_messages(record, name) for name in names]
        problems = prompt_problems + [p for found, _ in checked for p in found]
        row: dict[str, Any] = {"prompt": prompt, "chosen": checked[0][1], "rejected": checked[1][1]}
    else:
        problems = [p for name in (fields.prompt, *names) for p in _string(record, name, required=True)]
        row = {
            "prompt": record.get(fields.prompt),
            "chosen": record.get(names[0]),
            "rejected": record.get(names[1]),
        }
    if not problems and row["chosen"] == row["rejected"]:
        problems.append(
            f"fields '{fields.chosen}' and '{fields.rejected}' are the same: the pair prefers nothing"
        )
    return problems, row


def check_record(fmt: ConcreteFormat, record: Mapping[str, Any], fields: FieldMapping) -> list[str]:
    """Every problem with one record, as ``"missing 'output'"``-style phrases."""
    if fmt == "preference":
        return _preference(record, fields)[0]
    if fmt == "alpaca":
        return (
            _string(record, fields.instruction, required=True)
            + _string(record, fields.input, required=False, allow_empty=True)
            + _string(record, fields.output, required=True)
        )
    if fmt == "chat":
        return _messages(record, fields.messages)[0]
    if fmt == "prompt_completion":
        return _string(record, fields.prompt, required=True) + _string(
            record, fields.completion, required=True
        )
    return _string(record, fields.text, required=True)


def alpaca_prompt(instruction: str, input_text: str) -> str:
    """The user turn built from an alpaca record: the instruction, then the input if any."""
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def to_example(fmt: ConcreteFormat, record: Mapping[str, Any], fields: FieldMapping) -> dict[str, Any]:
    """Convert a checked record to a TRL row: conversational for alpaca/chat, strings otherwise.

    alpaca -> ``{"prompt": [user], "completion": [assistant]}`` (loss on the completion);
    chat -> ``{"messages": [...]}``; prompt_completion -> ``{"prompt": str, "completion": str}``;
    text -> ``{"text": str}``; preference -> ``{"prompt", "chosen", "rejected"}``, strings or
    lists of messages.
    """
    if fmt == "preference":
        return _preference(record, fields)[1]
    if fmt == "alpaca":
        user = alpaca_prompt(record[fields.instruction], record.get(fields.input) or "")
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": record[fields.output]}],
        }
    if fmt == "chat":
        return {"messages": _messages(record, fields.messages)[1]}
    if fmt == "prompt_completion":
        return {"prompt": record[fields.prompt], "completion": record[fields.completion]}
    return {"text": record[fields.text]}


def split_last_assistant_turn(messages: list[dict[str, str]]) -> dict[str, Any]:
    """``messages`` as a conversational prompt/completion pair ending at the last assistant turn.

    Used when the chat template cannot mark assistant tokens: the loss then covers
    only the final assistant turn, earlier turns are context.
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}
