"""Dataset formats: detect, check every record, and convert to TRL's SFT row shapes.

=================  ==========================================  ===========================
format             fields (renamable via ``fieldMapping``)      trains on
=================  ==========================================  ===========================
alpaca             instruction, input (optional), output        the output only
chat               messages: [{role, content}, ...]             the assistant turns only
prompt_completion  prompt, completion                           the completion only
text               text                                         every token
preference         prompt, chosen, rejected (text, or lists     the chosen over the rejected
                   of messages; objectives dpo, orpo, reward)   response
unpaired_          prompt, completion, label (true: desirable;  desirable completions up,
preference         text, or lists of messages; objective kto)   undesirable ones down (KTO)
classification     text, text_pair (optional), label (a name   the label (task
                   or an index: labels.py)                      sequence-classification)
=================  ==========================================  ===========================

Pure Python: no tokenizer needed to find a malformed record.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Literal

from kubetune_api.base import json_kind
from kubetune_api.spec import FieldMapping

from .datafiles import UnreadableJsonError, loads, shown
from .labels import label_problem

#: Every dataset.format but auto (tests/trainer/test_data_validation.py checks that they agree).
ConcreteFormat = Literal[
    "alpaca", "chat", "prompt_completion", "text", "preference", "unpaired_preference", "classification"
]
ROLES = ("system", "user", "assistant")


def _detected_by(fmt: ConcreteFormat, fields: FieldMapping) -> set[str]:
    """The fields whose presence makes a record look like ``fmt``."""
    return {
        "chat": {fields.messages},
        "prompt_completion": {fields.prompt, fields.completion},
        "alpaca": {fields.instruction, fields.output},
        "text": {fields.text},
        "preference": {fields.chosen, fields.rejected},
        "unpaired_preference": {fields.prompt, fields.completion, fields.label},
        "classification": {fields.text, fields.label},
    }[fmt]


#: Most specific first. Preference and classification come after the supervised formats: a record
#: a supervised format fits was detected as that before they existed (a text record with a label
#: column stays text for objective sft).
DETECTION_ORDER: tuple[ConcreteFormat, ...] = (
    "chat",
    "unpaired_preference",
    "prompt_completion",
    "alpaca",
    "text",
    "preference",
    "classification",
)


def detect_format(
    record: Mapping[str, Any], fields: FieldMapping, wanted: Collection[str] = ()
) -> ConcreteFormat | None:
    """The format a record's keys suggest: the first (in :data:`DETECTION_ORDER`) of ``wanted``,
    the formats the run trains on (``spec.data_formats``), that fits, else the first that fits;
    None if none does.

    A boolean label beside a prompt and a completion is KTO's mark: such a record is
    unpaired_preference, never prompt_completion (SFT would train on the undesirable completions
    too). With a label of another type it is unpaired_preference only where wanted (objective kto,
    which then says what to write), and prompt_completion otherwise, as before KTO existed.
    """
    keys = set(record)
    fitting = [fmt for fmt in DETECTION_ORDER if _detected_by(fmt, fields) <= keys]
    if "unpaired_preference" in fitting:  # then prompt_completion fits too
        if isinstance(record[fields.label], bool):
            fitting.remove("prompt_completion")
        elif "unpaired_preference" not in wanted:
            fitting.remove("unpaired_preference")
    return next((fmt for fmt in fitting if fmt in wanted), fitting[0] if fitting else None)


def _names(fmt: ConcreteFormat, fields: FieldMapping) -> list[str]:
    """The fields that make a record ``fmt``, as ``fields`` names them."""
    return {
        "chat": [fields.messages],
        "prompt_completion": [fields.prompt, fields.completion],
        "alpaca": [fields.instruction, fields.output],
        "text": [fields.text],
        "preference": [fields.prompt, fields.chosen, fields.rejected],
        "unpaired_preference": [fields.prompt, fields.completion, fields.label],
        "classification": [fields.text, fields.label],
    }[fmt]


def format_fields(fmt: ConcreteFormat, fields: FieldMapping) -> str:
    """The fields that make a record ``fmt``: ``"fields 'instruction' and 'output'"``."""
    names = _names(fmt, fields)
    quoted = ", ".join(f"'{n}'" for n in names[:-1]) + (" and " if len(names) > 1 else "") + f"'{names[-1]}'"
    return f"field {quoted}" if len(names) == 1 else f"fields {quoted}"


#: The order formats are listed in (detection's, most specific first).
LISTED: tuple[ConcreteFormat, ...] = (
    "chat",
    "prompt_completion",
    "alpaca",
    "text",
    "preference",
    "unpaired_preference",
    "classification",
)


def describe_formats(fields: FieldMapping, formats: Collection[str] = ()) -> str:
    """``"chat ('messages'), prompt_completion ('prompt' + 'completion'), ..."``: the formats the
    run trains on (``formats``; every format when empty)."""
    shown = [fmt for fmt in LISTED if not formats or fmt in formats]
    described = []
    for fmt in shown:
        quoted = " + ".join("'" + name + "'" for name in _names(fmt, fields))
        described.append(f"{fmt} ({quoted})")
    return ", ".join(described)


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


def _kinds_differ(record: Mapping[str, Any], prompt: str, name: str) -> str | None:
    """Said when a response is text and its prompt messages, or the reverse (a string that holds
    a JSON list, as a CSV cell does, counts as messages)."""
    value, chat = record.get(name), isinstance(record.get(prompt), list)
    text = isinstance(value, str) and not value.lstrip().startswith("[")
    if (chat and text) or (not chat and isinstance(value, list)):
        kinds = ("text", "a list of messages") if chat else ("a list of messages", "text")
        return (
            f"field '{name}' is {kinds[0]} and '{prompt}' is {kinds[1]}: give the prompt and its"
            " responses both as text or both as lists of messages"
        )
    return None


def _prompt_and_responses(
    record: Mapping[str, Any], prompt: str, responses: dict[str, str]
) -> tuple[list[str], dict[str, Any]]:
    """Check a prompt and its responses (TRL's name -> the record's field); return the problems
    and the TRL row. The prompt's kind decides the responses': a string prompt takes string
    responses, a list of messages lists of messages (TRL's conversational rows, rendered with the
    chat template)."""
    mixed = {name: m for name in responses.values() if (m := _kinds_differ(record, prompt, name))}
    if prompt in record and isinstance(record[prompt], list):
        prompt_problems, messages = _messages(record, prompt, needs_assistant=False)
        checked = {key: _messages(record, name) for key, name in responses.items()}
        problems = prompt_problems + [p for found, _ in checked.values() for p in found]
        row: dict[str, Any] = {"prompt": messages, **{key: found[1] for key, found in checked.items()}}
    else:
        names = (prompt, *responses.values())
        problems = [p for name in names for p in _string(record, name, required=True)]
        row = {"prompt": record.get(prompt), **{key: record.get(name) for key, name in responses.items()}}
    if mixed:  # instead of "must be a string" or "not a JSON list", which hide the cause
        problems = [p for p in problems if not any(f"field '{n}' " in p for n in mixed)]
        problems += mixed.values()
    return problems, row


def _preference(record: Mapping[str, Any], fields: FieldMapping) -> tuple[list[str], dict[str, Any]]:
    """Check a preference pair; return its problems and, when it has none, the TRL row.

    A pair whose two responses are the same teaches DPO nothing (its loss gradient is zero), so
    it is refused like an empty response.
    """
    responses = {"chosen": fields.chosen, "rejected": fields.rejected}
    problems, row = _prompt_and_responses(record, fields.prompt, responses)
    if not problems and row["chosen"] == row["rejected"]:
        problems.append(
            f"fields '{fields.chosen}' and '{fields.rejected}' are the same: the pair prefers nothing"
        )
    return problems, row


def _unpaired(record: Mapping[str, Any], fields: FieldMapping) -> tuple[list[str], dict[str, Any]]:
    """Check a KTO record (a prompt, one completion and whether it is desirable); return its
    problems and the TRL row ``{"prompt", "completion", "label"}``."""
    problems, row = _prompt_and_responses(record, fields.prompt, {"completion": fields.completion})
    name, label = fields.label, record.get(fields.label)
    if name not in record:
        problems.append(f"missing '{name}'")
    elif isinstance(label, str):
        problems.append(f"field '{name}' must be true or false, not the string {shown(label)}")
    elif not isinstance(label, bool):
        problems.append(f"field '{name}' must be true or false, got {json_kind(label)}")
    return problems, {**row, "label": label}


def _classification(record: Mapping[str, Any], fields: FieldMapping) -> list[str]:
    """A text (and optional second text) with a label of the right type; whether the label is in
    the label set is checked once the set is known (dataset.py, labels.py)."""
    problems = _string(record, fields.text, required=True) + _string(record, fields.text_pair, required=False)
    if fields.label not in record:
        return [*problems, f"missing '{fields.label}'"]
    wrong = label_problem(record[fields.label], fields.label)
    return problems + ([wrong] if wrong else [])


def check_record(fmt: ConcreteFormat, record: Mapping[str, Any], fields: FieldMapping) -> list[str]:
    """Every problem with one record, as ``"missing 'output'"``-style phrases."""
    if fmt == "preference":
        return _preference(record, fields)[0]
    if fmt == "unpaired_preference":
        return _unpaired(record, fields)[0]
    if fmt == "classification":
        return _classification(record, fields)
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
    lists of messages; unpaired_preference -> ``{"prompt", "completion", "label"}``, strings or
    lists of messages, label a boolean; classification -> ``{"text", "text_pair", "label"}``
    (``text_pair`` None without one: every row has the key, as datasets takes the columns from the
    first row), the label as written (dataset.py turns it into its index).
    """
    if fmt == "preference":
        return _preference(record, fields)[1]
    if fmt == "unpaired_preference":
        return _unpaired(record, fields)[1]
    if fmt == "classification":
        pair = record.get(fields.text_pair)
        return {"text": record[fields.text], "text_pair": pair, "label": record[fields.label]}
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
