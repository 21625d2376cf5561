"""Tokenizer, chat template and incremental detokenizer, on a tiny BPE trained from a generated corpus."""

import json
import random

import jinja2.exceptions
import pytest

from mimoflash.tokenizer import DEFAULT_CHAT_TEMPLATE, IncrementalDetokenizer, Tokenizer, has_tokenizer
from mimoflash.train.tokenizer_train import SPECIAL_TOKENS, main as train_main, train_tokenizer

WORDS = ["def", "return", "self", "value", "import", "torch", "class", "for", "in", "range", "print"]
EXTRA = ["héllo wörld", "你好，世界", "こんにちは", "🙂🚀👩‍💻", "naïve café", "ünïcödé"]
MULTIBYTE = "Hi 你好 🙂 café 👩‍💻 done — 世界🚀!"


def make_corpus(root, n_docs=12, seed=0):
    rng = random.Random(seed)
    paths = []
    for i in range(n_docs):
        lines = [" ".join(rng.choice(WORDS + EXTRA) for _ in range(rng.randint(3, 10))) for _ in range(20)]
        p = root / f"doc{i:02d}.txt"
        p.write_text(f"# document {i}\n" + "\n".join(lines) + "\n", encoding="utf-8")
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus").mkdir()
    files = make_corpus(root / "corpus")
    train_tokenizer(files, root / "tok", vocab_size=400, min_frequency=2, progress=False)
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def test_special_tokens_first_and_stable(tok, tok_dir, tmp_path):
    for i, content in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(content) == i and tok.id_to_token(i) == content
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0 and tok.bos_token_id is None
    assert tok.stop_token_ids == {0, 2}
    assert (tok.think_start_id, tok.think_end_id) == (3, 4)
    # Retraining on a different corpus keeps the special ids.
    other = make_corpus(tmp_path, n_docs=3, seed=7)
    tok2 = train_tokenizer(other, tmp_path / "tok2", vocab_size=300, progress=False)
    assert [tok2.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    # Markers are plain added tokens so that decode(skip_special_tokens=True) keeps them for the parsers.
    assert set(tok.special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


def test_round_trip(tok):
    for text in [MULTIBYTE, "def f(x):\n    return x  # ok\n", "\x00\x7f binary-ish \ufffd", ""]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user\n<think>hm</think><|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and 3 in ids and 4 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\n<think>hm</think>"
    assert tok.encode_batch(["a b", MULTIBYTE]) == [tok.encode("a b"), tok.encode(MULTIBYTE)]


def test_from_dir_errors(tmp_path, tok_dir):
    assert has_tokenizer(tok_dir) and not has_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ValueError, match="does not parse"):
        Tokenizer.from_dir(tmp_path)
    # No config at all: ChatML defaults and the built-in template.
    (tmp_path / "tokenizer_config.json").unlink()
    bare = Tokenizer.from_dir(tmp_path)
    assert bare.eos_token == "<|im_end|>" and bare.pad_token == "<|endoftext|>"
    assert bare.chat_template == DEFAULT_CHAT_TEMPLATE


CONV = [{"role": "system", "content": "You are MiMo."}, {"role": "user", "content": "Hi"}]
CONV_TEXT = "<|im_start|>system\nYou are MiMo.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_chat_template_thinking_switch(tok):
    no_think = CONV_TEXT + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.apply_chat_template(CONV) == no_think
    assert tok.apply_chat_template(CONV, enable_thinking=False) == no_think
    assert tok.apply_chat_template(CONV, enable_thinking=True) == CONV_TEXT + "<|im_start|>assistant\n"
    assert tok.apply_chat_template(CONV, add_generation_prompt=False) == CONV_TEXT


def test_chat_template_history_reasoning_and_tools(tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    msgs = CONV + [
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "Need weather.",
            "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": 2}'}},
                {"name": "noop", "arguments": {}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    out = tok.apply_chat_template(msgs, tools=tools, enable_thinking=True)
    assert out.startswith(
        "<|im_start|>system\nYou are MiMo.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(tools[0]) + "\n</tools>\n\n"
    )
    assert out.count("<|im_start|>system") == 1  # the user's system prompt merged into the tools block
    assert out.endswith(
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nNeed weather.\n</think>\n\nLet me check.\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>北京</parameter>\n<parameter=days>2</parameter>\n"
        "</function>\n</tool_call>\n<tool_call>\n<function=noop>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # content=None is allowed on a tool-calling assistant turn.
    call_only = [{"role": "user", "content": "x"},
                 {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"a": [1]}}]}]
    assert "<|im_start|>assistant\n<tool_call>\n<function=f>\n<parameter=a>[1]</parameter>\n" in (
        tok.apply_chat_template(call_only, add_generation_prompt=False))


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "must be a list"),
        ([], "empty"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\]: role must be one of"),
        ([{"role": "user"}], "missing 'content'"),
        ([{"role": "user", "content": 3}], "'content' must be a string"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text content parts"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "only assistant messages may have 'tool_calls'"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
         r"tool_calls\[0\]: tool call arguments are not valid JSON"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}], "function.name"),
        ([{"role": "assistant", "content": "x", "reasoning_content": 5}], "reasoning_content"),
    ],
)
def test_invalid_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_template_sandbox_and_raise_exception(tok_dir):
    base = Tokenizer.from_dir(tok_dir)
    evil = Tokenizer(base._tok, base.config, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template(CONV)
    mutate = Tokenizer(base._tok, base.config, chat_template="{{ messages.append(1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        mutate.apply_chat_template(CONV)
    strict = Tokenizer(base._tok, base.config, chat_template="{{ raise_exception('no system prompts') }}")
    with pytest.raises(ValueError, match="no system prompts"):
        strict.apply_chat_template(CONV)
    # Named templates (HF list form): "tool_use" is chosen when tools are given.
    named = Tokenizer(base._tok, base.config, chat_template=[
        {"name": "default", "template": "D"}, {"name": "tool_use", "template": "T{{ tools | tojson }}"}])
    assert named.apply_chat_template(CONV) == "D"
    assert named.apply_chat_template(CONV, tools=[{"name": "é"}]) == 'T[{"name": "é"}]'


@pytest.mark.parametrize("skip", [False, True])
def test_incremental_detokenizer_matches_full_decode(tok, skip):
    text = "<|im_start|>assistant\n<think>" + MULTIBYTE * 3 + "</think>ok<|im_end|>"
    ids = tok.encode(text)
    # The tiny vocab must actually split some characters across tokens for this test to mean anything.
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = []
    for n, i in enumerate(ids, 1):
        pieces.append(det.push(i))
        full = tok.decode(ids[:n], skip_special_tokens=skip)
        assert "".join(pieces) == det.text
        assert full.startswith(det.text)
        if not full.endswith("\ufffd"):
            assert det.text == full  # nothing held back once the last character is complete
        assert "\ufffd" not in det.text
        assert len(det._window) <= 16  # O(window), not O(total)
    assert det.text == tok.decode(ids, skip_special_tokens=skip)
    assert det.flush() == ""


def test_incremental_detokenizer_flush_partial(tok):
    # Stop the stream inside a character: push holds the bytes back, flush releases them as U+FFFD.
    ids = tok.encode(MULTIBYTE)
    n = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    det = IncrementalDetokenizer(tok)
    out = "".join(det.push(i) for i in ids[:n])
    assert det.pending_tokens > 0 and not out.endswith("\ufffd")
    out += det.flush()
    assert out == det.text == tok.decode(ids[:n]) and det.pending_tokens == 0


def test_transformers_autotokenizer_compat(tok, tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for text in [MULTIBYTE, "<|im_start|>user\nhi<|im_end|>\n<think>x</think>", "def f():\n\treturn 1\n"]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.eos_token_id == tok.eos_token_id and hf.pad_token_id == tok.pad_token_id
    assert len(hf) == tok.vocab_size
    msgs = CONV + [{"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
                   {"role": "user", "content": "Bye"}]
    for thinking in (True, False):
        ours = tok.apply_chat_template(msgs, enable_thinking=thinking)
        theirs = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
        assert ours == theirs


def test_train_cli_skips_binary_and_rejects_empty(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    make_corpus(corpus / "sub", n_docs=3)
    (corpus / "blob.txt").write_bytes(b"\x00\x01\x02" * 50)
    (corpus / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (corpus / "skip.md").write_text("not matched by the glob")
    argv = ["--input", str(corpus), "--glob", "*.txt", "--out", str(tmp_path / "t"), "--vocab-size", "300"]
    assert train_main(argv) == 0
    tok = Tokenizer.from_dir(tmp_path / "t")
    out = capsys.readouterr().out
    assert "trained on 3 files" in out and "1 binary" in out and "1 not utf-8" in out
    assert tok.vocab_size <= 300 and has_tokenizer(tmp_path / "t")
    with pytest.raises(ValueError, match="no usable text"):
        train_tokenizer([corpus / "blob.txt"], tmp_path / "t2", vocab_size=300, progress=False)
    with pytest.raises(ValueError, match="no input files"):
        train_tokenizer([], tmp_path / "t3", progress=False)
