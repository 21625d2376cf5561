"""Tokenizer, chat template and streaming detokenizer.

This module owns everything between text and token ids:

* `Tokenizer` wraps a byte-level BPE `tokenizer.json` (the Hugging Face `tokenizers` format, which is what
  MiMo-V2-Flash ships, docs/MODEL.md §5.1) plus the optional `tokenizer_config.json`, from which it takes the special
  tokens and the Jinja chat template. We use the `tokenizers` library directly rather than transformers'
  `AutoTokenizer`: it is the same Rust code underneath and it keeps transformers out of the runtime deps
  (ARCHITECTURE §6).
* Chat templates are rendered in jinja2's `ImmutableSandboxedEnvironment`. A template comes from a
  checkpoint, i.e. it is untrusted code, so it must not reach Python internals or mutate our objects.
  The environment mirrors what checkpoint templates expect from transformers: `trim_blocks`,
  `lstrip_blocks`, loop controls, a `raise_exception` global and a `tojson` filter that keeps non-ASCII text.
* `DEFAULT_CHAT_TEMPLATE` is used when a checkpoint has none. The official MiMo-V2-Flash template text is
  not known (docs/MODEL.md §5.2 and §8), so this is our ChatML rendering of the conventions that are documented:
  ChatML turns, Qwen3-style thinking switch (`enable_thinking` false/undefined renders an empty
  `<think>\\n\\n</think>\\n\\n` block after the generation prompt, which tells the model to skip reasoning)
  and the Qwen3-Coder XML tool-call format that SGLang's `mimo` parser and vLLM's `qwen3_xml` parser read.
* `IncrementalDetokenizer` turns a stream of generated ids into text deltas for streaming responses.

Token ids of `<think>`, `<tool_call>` etc. are never hard-coded: they differ between vocabularies (docs/MODEL.md §5.1)
and are looked up by content.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"

ROLES = ("system", "user", "assistant", "tool")

# Our ChatML rendering; see the module docstring for why it exists and what it follows. Every tag uses the
# `-` whitespace control, so the output is exactly the string literals below whatever the env options are.
DEFAULT_CHAT_TEMPLATE = r"""{#- mimoflash default ChatML template (mimoflash/tokenizer.py) -#}
{%- macro render_value(value) -%}
    {%- if value is string -%}{{- value -}}{%- else -%}{{- value | tojson -}}{%- endif -%}
{%- endmacro -%}
{%- set loop_messages = messages -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if messages and messages[0].role == 'system' -%}
        {{- messages[0].content + '\n\n' -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nTo call a function, reply with the following format:\n' -}}
    {{- '<tool_call>\n<function=NAME>\n<parameter=ARG>VALUE</parameter>\n</function>\n</tool_call>\n\n' -}}
    {{- 'Write one <parameter=...> line per argument and one <tool_call> block per call. ' -}}
    {{- 'Function results come back inside <tool_response></tool_response> tags.<|im_end|>\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message.role == 'tool' -%}
        {{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- if message.reasoning_content -%}
            {{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' -}}
        {%- endif -%}
        {%- set content = message.content if message.content is string else '' -%}
        {{- content -}}
        {%- for tool_call in (message.tool_calls or []) -%}
            {%- set fn = tool_call.function if tool_call.function is defined else tool_call -%}
            {%- if content or not loop.first -%}{{- '\n' -}}{%- endif -%}
            {{- '<tool_call>\n<function=' + fn.name + '>\n' -}}
            {%- for name, value in (fn.arguments or {}) | items -%}
                {{- '<parameter=' + name + '>' + render_value(value) + '</parameter>\n' -}}
            {%- endfor -%}
            {{- '</function>\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- else -%}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if not enable_thinking -%}
        {{- '<think>\n\n</think>\n\n' -}}
    {%- endif -%}
{%- endif -%}
"""


class ChatTemplateError(ValueError):
    """Raised by a template's `raise_exception(...)`: the template rejected the conversation."""


def has_tokenizer(path: str | Path) -> bool:
    """True if `path` is a directory holding a `tokenizer.json`."""
    return (Path(path) / "tokenizer.json").is_file()


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as plain strings or as serialized AddedToken dicts.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token entry {value!r} is neither a string nor an AddedToken dict")


def _make_jinja_env() -> ImmutableSandboxedEnvironment:
    def raise_exception(message: str):
        raise ChatTemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # ensure_ascii=False: tool schemas in Chinese should cost Chinese tokens, not \uXXXX escapes.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env



def _check_encodable(text) -> None:
    """The Rust tokenizer rejects strings it cannot turn into UTF-8 with a bare TypeError; say what is wrong instead.
    Such strings hold lone surrogates, which is how Python keeps bytes that were not valid UTF-8 (argv, stdin)."""
    if not isinstance(text, str):
        raise ValueError(f"text to encode must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode at character {e.start} (a lone surrogate, e.g. from bytes that "
                         "were not UTF-8); decode the input with errors='replace' first") from None

class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template from `tokenizer_config.json`."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        config: dict | None = None,
        chat_template: str | dict[str, str] | None = None,
        generation_eos_ids: Sequence[int] = (),
        name_or_path: str | None = None,
    ):
        self._tok = tokenizer
        self.config = dict(config or {})
        self.name_or_path = name_or_path
        where = name_or_path or "<in-memory tokenizer>"
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.pad_token = _token_content(self.config.get("pad_token"))
        self.bos_token = _token_content(self.config.get("bos_token"))
        # Without a config, fall back to the ChatML conventions (end of turn ends generation).
        if self.eos_token is None:
            self.eos_token = next((t for t in (IM_END, ENDOFTEXT) if self.token_to_id(t) is not None), None)
        if self.pad_token is None:
            self.pad_token = ENDOFTEXT if self.token_to_id(ENDOFTEXT) is not None else self.eos_token
        for name in ("eos_token", "pad_token", "bos_token"):
            tok = getattr(self, name)
            if tok is not None and self.token_to_id(tok) is None:
                raise ValueError(f"{name} {tok!r} from the tokenizer config of {where} is not in the vocabulary")
        self.special_tokens: dict[str, int] = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        self._generation_eos_ids = [int(i) for i in generation_eos_ids]

        # A template may be one string or HF's list of named templates; "tool_use" is picked when tools are given.
        if chat_template is None:
            chat_template = self.config.get("chat_template")
        if isinstance(chat_template, list):
            if not all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in chat_template):
                raise ValueError(f"chat_template list of {where} needs {{'name', 'template'}} entries")
            chat_template = {t["name"]: t["template"] for t in chat_template}
        if chat_template is None:
            chat_template = DEFAULT_CHAT_TEMPLATE
        self.chat_template = chat_template
        env = _make_jinja_env()
        sources = chat_template if isinstance(chat_template, dict) else {"default": chat_template}
        self._templates: dict[str, jinja2.Template] = {}
        for name, source in sources.items():
            try:
                self._templates[name] = env.from_string(source)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"chat template {name!r} of {where} does not parse: {e}") from e

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` and, when present, `tokenizer_config.json`, `chat_template.jinja` and the
        `eos_token_id` of `generation_config.json` (checkpoints often list extra stop ids there)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path} (expected a byte-level BPE tokenizers file)")
        try:
            tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON or unknown model types
            raise ValueError(f"cannot parse {tok_file}: {e}") from e

        config = _read_json(path / "tokenizer_config.json") or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path / 'tokenizer_config.json'} must hold a JSON object")
        chat_template = None
        # transformers >= 4.43 saves the template in its own file, which then takes precedence.
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            chat_template = jinja_file.read_text(encoding="utf-8")

        gen_eos: list[int] = []
        gen_config = _read_json(path / "generation_config.json")
        if isinstance(gen_config, dict):
            eos = gen_config.get("eos_token_id")
            gen_eos = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
        return cls(tok, config, chat_template, gen_eos, name_or_path=str(path))

    # ---------------------------------------------------------------- ids <-> text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # add_special_tokens only controls the post-processor (e.g. a BOS); special tokens written in the text,
        # such as <|im_start|> in a rendered chat prompt, are always matched as single tokens.
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            _check_encodable(text)
            raise

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts at once; the Rust side spreads them over threads."""
        texts = list(texts)
        try:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]
        except TypeError:
            for t in texts:
                _check_encodable(t)
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may have more rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def stop_token_ids(self) -> set[int]:
        """Ids that end generation: eos, end of turn and end of text, whichever exist."""
        ids = {self.token_to_id(t) for t in (IM_END, ENDOFTEXT)} | {self.eos_token_id}
        ids.update(self._generation_eos_ids)
        ids.discard(None)
        return ids

    @property
    def think_start_id(self) -> int | None:
        return self.token_to_id(THINK_START)

    @property
    def think_end_id(self) -> int | None:
        return self.token_to_id(THINK_END)

    # ---------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: Sequence[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt string (tokenize it with `encode`).

        `enable_thinking=None` leaves the variable undefined in the template, which is what an OpenAI request
        without `chat_template_kwargs` means; the default template treats it as thinking off (docs/MODEL.md §5.2).
        Extra keyword arguments are passed to the template (e.g. `chat_template_kwargs` from a request).
        """
        messages = validate_messages(messages)
        if tools is not None:
            if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
                raise ValueError("tools must be a list of JSON-schema dicts (OpenAI 'tools' format)")
            tools = list(tools)
        name = "tool_use" if tools and "tool_use" in self._templates else "default"
        template = self._templates.get(name) or next(iter(self._templates.values()))
        context = dict(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            **kwargs,
        )
        if enable_thinking is not None:
            context["enable_thinking"] = enable_thinking
        return template.render(**context)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse {path}: {e}") from e


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    # OpenAI clients may send content as a list of parts; text parts are all a text model can use.
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        kinds = sorted({str(p.get("type")) for p in content} - {"text"})
        raise ValueError(f"{where}: only text content parts are supported, got part types {kinds}")
    raise ValueError(f"{where}: 'content' must be a string, got {type(content).__name__}")


def _normalize_tool_call(call: Any, where: str) -> dict:
    if not isinstance(call, dict):
        raise ValueError(f"{where}: a tool call must be a dict, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where}: a tool call needs a non-empty string 'function.name'")
    args = fn.get("arguments", {})
    # OpenAI sends arguments as a JSON string; templates iterate them as a mapping (vLLM does the same parse).
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: tool call arguments are not valid JSON: {e}") from e
    if not isinstance(args, dict):
        raise ValueError(f"{where}: tool call arguments must be a JSON object, got {type(args).__name__}")
    out = {k: v for k, v in call.items() if k not in ("function", "name", "arguments")}
    out["type"] = "function"
    out["function"] = {"name": fn["name"], "arguments": args}
    return out


def validate_messages(messages: Any) -> list[dict]:
    """Check a chat conversation and return a normalized copy; raise `ValueError` saying what is wrong.

    Normalizes text-part lists to strings, `content=None` on tool-calling assistant turns to "", and tool-call
    arguments to dicts in OpenAI shape `{"type": "function", "function": {"name", "arguments"}}`.
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: role must be one of {list(ROLES)}, got {role!r}")
        m = dict(m)
        if role == "assistant":
            calls = m.get("tool_calls")
            if calls is not None and not isinstance(calls, (list, tuple)):
                raise ValueError(f"{where}: 'tool_calls' must be a list")
            m["tool_calls"] = [_normalize_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls or [])]
            if not m["tool_calls"]:
                del m["tool_calls"]
            if m.get("content") is None and calls:
                m["content"] = ""
            reasoning = m.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise ValueError(f"{where}: 'reasoning_content' must be a string")
        else:
            for key in ("tool_calls", "reasoning_content"):
                if m.get(key) is not None:
                    raise ValueError(f"{where}: only assistant messages may have '{key}' (role is {role!r})")
        if "content" not in m:
            raise ValueError(f"{where}: missing 'content'")
        m["content"] = _content_text(m["content"], where)
        out.append(m)
    return out


class IncrementalDetokenizer:
    """Turn generated ids into text deltas, one token at a time, for streaming.

    Byte-level BPE tokens are bytes, not characters: an emoji can span three tokens, and decoding a prefix
    that ends inside a character yields U+FFFD. So each `push` decodes only a short window of trailing tokens
    and holds text back while the window still ends in U+FFFD.

    The window is `[prefix, read)` + new tokens. `prefix` starts where the last emitted chunk started, so the
    window always begins on a character boundary and has one chunk of left context (tokenizers whose decoder
    strips a leading space, like SentencePiece, then still decode the boundary right). The emitted delta is
    `decode(window)[len(decode(prefix..read)):]`. Work per token is O(window), and the window is a few tokens
    unless a character is being held back. Same idea as vLLM's `detokenize_incrementally` and TGI's
    `decode_token`; this is our own implementation.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._window: list[int] = []  # tokens from `prefix` on; everything before is already in self.text
        self._read = 0  # index in _window where the not-yet-emitted tokens start

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ("" while a character is incomplete)."""
        self._window.append(int(token_id))
        prefix_text = self._decode(self._window[: self._read])
        full_text = self._decode(self._window)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text) :]
        # The emitted chunk becomes the left context of the next window; older tokens are dropped.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (replacement characters included), e.g. when generation stops mid-character."""
        prefix_text = self._decode(self._window[: self._read])
        full_text = self._decode(self._window)
        delta = full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self.text += delta
        return delta

    @property
    def pending_tokens(self) -> int:
        """Tokens pushed but not yet turned into text."""
        return len(self._window) - self._read
