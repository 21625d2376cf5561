"""Reasoning and tool calls, parsed incrementally out of the generated text.

MiMo writes its reasoning inside `<think>...</think>` and calls tools in the Qwen3-Coder XML form
(docs/MODEL.md §5.2):

    <tool_call>
    <function=get_weather>
    <parameter=city>Paris</parameter>
    <parameter=days>3</parameter>
    </function>
    </tool_call>

`ChatOutputParser.feed(text)` takes the text deltas of one choice as they stream and returns what they add to the
OpenAI message: `reasoning_content`, `content` and `tool_calls` deltas. The same parser serves the non-streaming
path (feed everything, then `feed("", final=True)`), so both paths give the same message.

Rules:
* Tags may arrive split over several deltas: text that could be the beginning of a tag is held back until it is
  decided.
* Whitespace at the start and end of each segment (between tags) is dropped: the template writes
  `<think>\\n...\\n</think>\\n\\n` and a round-tripped `reasoning_content` must not grow newlines each turn.
* A tool call is recognised in content *and inside `<think>`* (models do call tools while reasoning; dropping
  those calls loses them). Nothing of a call is emitted before its `<function=NAME>` line is complete, so a block
  that turns out malformed is given back as plain text.
* Arguments are typed by the tool's JSON schema: a parameter declared `integer` becomes a JSON number, `string`
  stays the raw text, objects and arrays are parsed as JSON. Each parameter is streamed as a JSON fragment once its
  `</parameter>` is seen; the fragments of one call concatenate to a JSON object, as OpenAI's streaming does.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

THINK_START, THINK_END = "<think>", "</think>"
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"<function=([^>\n]+)>")
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)    # OpenAI streaming entries: {index, id?, type?, function}


@dataclass
class _Call:
    index: int
    text: str = ""
    id: str | None = None
    name: str | None = None
    params_done: int = 0
    arguments: str = ""


def tool_parameter_schemas(tools: list[dict] | None) -> dict[str, dict]:
    """{function name: {parameter name: JSON schema}} from OpenAI `tools`."""
    out: dict[str, dict] = {}
    for t in tools or []:
        fn = t.get("function", {})
        params = fn.get("parameters") or {}
        props = (params.get("properties") or {}) if isinstance(params, dict) else {}
        out[fn.get("name", "")] = props if isinstance(props, dict) else {}
    return out


def convert_parameter(raw: str, schema: dict | None) -> Any:
    """The XML text of one parameter -> a JSON value of the type its schema declares (text when unsure)."""
    value = raw[1:] if raw.startswith("\n") else raw
    value = value[:-1] if value.endswith("\n") else value
    types = schema.get("type") if isinstance(schema, dict) else None
    types = [types] if isinstance(types, str) else [t for t in types if isinstance(t, str)] \
        if isinstance(types, list) else []
    if not types or types == ["string"]:         # undeclared parameters stay text, as the model wrote them
        return value
    s = value.strip()
    for ty in types:
        try:
            if ty == "integer":
                return int(s)
            if ty == "number":
                f = float(s)
                return int(f) if f.is_integer() and re.fullmatch(r"-?\d+", s) else f
            if ty == "boolean" and s.lower() in ("true", "false"):
                return s.lower() == "true"
            if ty == "null" and s.lower() in ("null", "none", ""):
                return None
            if ty in ("object", "array"):
                v = json.loads(s)
                if isinstance(v, dict if ty == "object" else list):
                    return v
        except ValueError:
            continue
    return value


class ChatOutputParser:
    """Incremental splitter of one choice's text into reasoning, content and tool calls (see the module doc)."""

    def __init__(self, start_in_reasoning: bool = False, tools: list[dict] | None = None,
                 parse_reasoning: bool = True):
        self.mode = "reasoning" if start_in_reasoning else "content"
        self.parse_reasoning = parse_reasoning
        self.parse_tools = tools is not None
        self.schemas = tool_parameter_schemas(tools)
        self._buf = ""                 # text not yet classified (may end in a partial tag)
        self._ws = ""                  # whitespace held back at the end of the current segment
        self._seg_start = True         # at the start of a segment: leading whitespace is dropped
        self._call: _Call | None = None
        self.calls: list[_Call] = []
        self.reasoning_tokens = 0
        self.saw_reasoning = start_in_reasoning

    @property
    def tags(self) -> tuple[str, ...]:
        tags = (THINK_START, THINK_END) if self.parse_reasoning else ()
        return tags + ((CALL_START,) if self.parse_tools else ())

    def count_tokens(self, n: int, mode_before: str) -> None:
        if mode_before == "reasoning" or self.mode == "reasoning":
            self.reasoning_tokens += n

    # ------------------------------------------------------------------ feeding
    def feed(self, text: str, final: bool = False, num_tokens: int = 0) -> ParsedDelta:
        before = self.mode
        out = ParsedDelta()
        self._buf += text
        while True:
            if self._call is not None:
                if not self._feed_call(out, final):
                    break
                continue
            hit = _first_tag(self._buf, self.tags)
            if hit is None:
                keep = 0 if final else _partial_tag_suffix(self._buf, self.tags)
                self._emit(out, self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            at, tag = hit
            self._emit(out, self._buf[:at])
            self._buf = self._buf[at + len(tag):]
            if tag in (THINK_START, THINK_END):               # a new segment: surrounding whitespace dropped
                self._ws, self._seg_start = "", True
            if tag == THINK_START:
                self.mode, self.saw_reasoning = "reasoning", True
            elif tag == THINK_END:
                self.mode = "content"
            else:
                self._call = _Call(index=len(self.calls))
        if final:
            self._ws = ""
        self.count_tokens(num_tokens, before)
        return out

    def _emit(self, out: ParsedDelta, text: str) -> None:
        if not text:
            return
        if self._seg_start:
            text = text.lstrip()
            if not text:
                return
            self._seg_start = False
        body = text.rstrip()
        if not body:
            self._ws += text
            return
        piece, self._ws = self._ws + body, text[len(body):]
        if self.mode == "reasoning":
            out.reasoning += piece
        else:
            out.content += piece

    def _feed_call(self, out: ParsedDelta, final: bool) -> bool:
        """Advance the open tool call; True if it closed (continue parsing after it)."""
        call = self._call
        end = self._buf.find(CALL_END)
        if end >= 0:
            call.text += self._buf[:end]
            self._buf = self._buf[end + len(CALL_END):]
        else:
            keep = 0 if final else _partial_tag_suffix(self._buf, (CALL_END,))
            call.text += self._buf[:len(self._buf) - keep]
            self._buf = self._buf[len(self._buf) - keep:]
        closed = end >= 0 or final
        self._advance_call(out, call, closed)
        if not closed:
            return False
        self._call = None
        if call.name is None:                      # not a tool call after all: give the text back
            self._emit(out, CALL_START + call.text + (CALL_END if end >= 0 else ""))
        else:
            self.calls.append(call)
        return True             # a call does not end the text segment around it: held whitespace stays pending

    def _advance_call(self, out: ParsedDelta, call: _Call, closed: bool) -> None:
        if call.name is None:
            m = _FUNCTION.search(call.text)
            if m is None:
                return
            call.name, call.id = m.group(1).strip(), f"call_{uuid.uuid4().hex[:24]}"
            out.tool_calls.append({"index": call.index, "id": call.id, "type": "function",
                                   "function": {"name": call.name, "arguments": ""}})
        params = list(_PARAMETER.finditer(call.text))
        frag = ""
        schema = self.schemas.get(call.name, {})
        for m in params[call.params_done:]:
            name = m.group(1).strip()
            value = convert_parameter(m.group(2), schema.get(name))
            frag += ("{" if call.params_done == 0 else ", ") + json.dumps(name) + ": " + json.dumps(value)
            call.params_done += 1
        if closed:
            frag += "}" if call.params_done else "{}"
        if frag:
            call.arguments += frag
            out.tool_calls.append({"index": call.index, "function": {"arguments": frag}})

    # ------------------------------------------------------------------ results
    def tool_calls(self) -> list[dict]:
        """The completed calls in OpenAI's non-streaming shape."""
        return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.calls]


def _first_tag(text: str, tags: tuple[str, ...]) -> tuple[int, str] | None:
    best = None
    for t in tags:
        at = text.find(t)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, t)
    return best


def _partial_tag_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a tag (held back until decided)."""
    best = 0
    for t in tags:
        for k in range(min(len(t) - 1, len(text)), best, -1):
            if text.endswith(t[:k]):
                best = k
                break
    return best
