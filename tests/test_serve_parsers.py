"""The reasoning / tool-call parser of the server (mimoflash/serve/parsers.py), fed like a stream: every split point."""

from __future__ import annotations

import json

import pytest

from mimoflash.serve.parsers import ChatOutputParser, convert_parameter

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "hourly": {"type": "boolean"},
    "temps": {"type": "array"}, "ratio": {"type": "number"}, "opts": {"type": "object"}}}}}]

CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
        "<parameter=days>3</parameter>\n<parameter=hourly>true</parameter>\n<parameter=temps>[1, 2]</parameter>\n"
        "<parameter=ratio>0.5</parameter>\n<parameter=opts>{\"a\": 1}</parameter>\n</function>\n</tool_call>")
ARGS = {"city": "New York", "days": 3, "hourly": True, "temps": [1, 2], "ratio": 0.5, "opts": {"a": 1}}


def run(text: str, pieces: list[int] | None = None, **kw):
    """Feed `text` cut at `pieces` (sizes) -> (reasoning, content, streamed tool-call entries, parser)."""
    p = ChatOutputParser(**kw)
    chunks, at = [], 0
    for n in pieces or [len(text)]:
        chunks.append(text[at:at + n])
        at += n
    chunks.append(text[at:])
    r = c = ""
    entries = []
    for i, ch in enumerate(chunks):
        d = p.feed(ch, final=i == len(chunks) - 1)
        r, c = r + d.reasoning, c + d.content
        entries += d.tool_calls
    return r, c, entries, p


def test_reasoning_and_content_split_at_every_point():
    text = "<think>\nlet me see\n</think>\n\nThe answer is 4."
    whole = run(text)
    assert whole[:2] == ("let me see", "The answer is 4.")
    for k in range(1, len(text)):
        assert run(text, [k])[:2] == whole[:2], k
    assert run(text, [1] * len(text))[:2] == whole[:2]            # one character per delta


def test_prompt_opened_think_and_no_reasoning_parsing():
    assert run("still thinking</think>done", start_in_reasoning=True)[:2] == ("still thinking", "done")
    assert run("<think>x</think>y", parse_reasoning=False)[:2] == ("", "<think>x</think>y")


def test_partial_tag_at_end_is_flushed_as_text():
    assert run("a < b and 1 <thi")[:2] == ("", "a < b and 1 <thi")


def test_tool_call_typed_arguments_streamed_in_fragments():
    text = "Let me check.\n" + CALL
    for pieces in (None, [5] * 60, [1] * len(text)):
        r, c, entries, p = run(text, pieces, tools=TOOLS)
        assert c == "Let me check." and r == ""
        (call,) = p.tool_calls()
        assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == ARGS
        assert entries[0]["function"] == {"name": "get_weather", "arguments": ""} and entries[0]["id"] == call["id"]
        frags = "".join(e["function"]["arguments"] for e in entries)
        assert json.loads(frags) == ARGS
        if pieces == [1] * len(text):                             # header, one per parameter, closing brace
            assert len(entries) == 1 + len(ARGS) + 1


def test_tool_call_inside_think_is_kept():
    text = "<think>I need data " + CALL + " then answer</think>It is sunny."
    r, c, entries, p = run(text, [7] * 40, tools=TOOLS)
    assert r.replace("  ", " ") == "I need data then answer"
    assert c == "It is sunny."
    assert [json.loads(t["function"]["arguments"]) for t in p.tool_calls()] == [ARGS]


def test_two_calls_and_no_params():
    two = CALL + "\n<tool_call>\n<function=noop>\n</function>\n</tool_call>"
    _, c, entries, p = run(two, [3] * 200, tools=TOOLS)
    calls = p.tool_calls()
    assert [x["function"]["name"] for x in calls] == ["get_weather", "noop"] and c == ""
    assert calls[1]["function"]["arguments"] == "{}"
    assert {e["index"] for e in entries} == {0, 1}


def test_malformed_call_is_returned_as_text_and_tools_off_means_text():
    bad = "<tool_call>not a call</tool_call> ok"
    _, c, entries, p = run(bad, [4] * 20, tools=TOOLS)
    assert c == bad and entries == [] and p.tool_calls() == []
    _, c, _, p = run(CALL, tools=None)
    assert c == CALL and p.tool_calls() == []


def test_unclosed_call_at_the_end_closes_its_arguments():
    cut = CALL[:CALL.index("<parameter=hourly>")]
    _, _, entries, p = run(cut, [6] * 40, tools=TOOLS)
    assert json.loads(p.tool_calls()[0]["function"]["arguments"]) == {"city": "New York", "days": 3}


@pytest.mark.parametrize("raw,schema,want", [
    ("42", {"type": "integer"}, 42), (" 42 ", {"type": "integer"}, 42), ("4.5", {"type": "number"}, 4.5),
    ("7", {"type": "number"}, 7), ("False", {"type": "boolean"}, False), ("null", {"type": ["integer", "null"]}, None),
    ("[1]", {"type": "array"}, [1]), ("hi", {"type": "integer"}, "hi"), ("\nx\n", {"type": "string"}, "x"),
    ("12", None, "12"), ('{"a": 1}', {"type": "object"}, {"a": 1}), ("5", 5, "5"), ("5", {"type": 7}, "5"),
    ("5", {"type": ["integer", 3]}, 5),
])
def test_convert_parameter(raw, schema, want):
    assert convert_parameter(raw, schema) == want


def test_reasoning_token_count():
    p = ChatOutputParser()
    p.feed("<think>a", num_tokens=2)
    p.feed(" b", num_tokens=1)
    p.feed("</think>", num_tokens=1)
    p.feed("c", num_tokens=1, final=True)
    assert p.reasoning_tokens == 4
