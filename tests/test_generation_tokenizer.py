"""Tokenizers and the incremental detokenizer: UTF-8 split across ids, stop strings across tokens,
and a real transformers tokenizer built offline in a temp directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from infscaled.errors import ModelError
from infscaled.generation.errors import GenerationError, RequestError
from infscaled.generation.tokenizer import (
    BUILTIN_TOKENIZER_DIR,
    HFTokenizer,
    StreamDecoder,
    Tokenizer,
    load_tokenizer,
    model_eos_ids,
)

TEXT = "héllo wörld → 你好 🙂!"
BUILTIN = load_tokenizer("builtin:llama-tiny")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def stream(tokenizer: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], StreamDecoder]:
    decoder = StreamDecoder(tokenizer, stop)
    deltas = [decoder.feed(i) for i in ids]
    if not decoder.stopped:
        deltas.append(decoder.flush())
    return deltas, decoder


def test_builtin_tokenizer_is_a_hugging_face_byte_level_bpe(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from infscaled.models import train_tokenizer

    tok = BUILTIN
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and len(ids) < len(TEXT.encode())  # merges, yet every byte string encodes
    assert tok.eos_token_id == 0
    assert tok.decode([ids[0], 0, 1, 600, 31999, ids[1]]) == tok.decode(ids[:2])  # specials, ids past the vocab
    assert tok.decode(tok.apply_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])) \
        == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    # Any Hugging Face client loads the shipped directory and counts the same tokens.
    hf = AutoTokenizer.from_pretrained(str(BUILTIN_TOKENIZER_DIR), local_files_only=True)
    assert hf.encode(TEXT) == ids and len(hf) == 512
    # The shipped files are what a fresh training gives (deterministic).
    assert train_tokenizer.main(["--check"]) == 0
    assert train_tokenizer.main(["--check", "--out", str(tmp_path)]) == 1


def test_stream_never_emits_partial_utf8() -> None:
    tok = BUILTIN
    deltas, decoder = stream(tok, tok.encode(TEXT))
    assert "".join(deltas) == TEXT == decoder.text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some id ended inside a character and waited for the next
    # An incomplete character at the very end comes out as U+FFFD on flush; junk ids are skipped.
    cjk = tok.encode("你")
    assert len(cjk) == 3  # one byte symbol per UTF-8 byte: no merge for it in the corpus
    deltas, _ = stream(tok, [*tok.encode("h"), 600, *cjk[:2]])
    assert deltas == ["h", "", "", "", "\ufffd"]


@pytest.mark.parametrize(("stop", "expected"), [
    (("wör",), "héllo "),  # a multi-byte stop string split across ids
    (("o w", "llo"), "hé"),  # the earliest match wins
    (("lo", "héllo wörld"), "hél"),
    (("!",), "héllo wörld → 你好 🙂"),
    (("你好 🙂!x",), TEXT),  # a prefix held back to the end, then released
    (("zzz",), TEXT),
])
def test_stop_strings_across_token_boundaries(stop: tuple[str, ...], expected: str) -> None:
    tok = BUILTIN
    deltas, decoder = stream(tok, tok.encode(TEXT), stop)
    assert "".join(deltas) == expected == decoder.text
    assert decoder.stopped == (expected != TEXT)
    if decoder.stopped:
        assert decoder.stop_string in stop
        assert decoder.feed(104) == ""


def test_held_back_text_is_released_once_the_stop_string_is_ruled_out() -> None:
    tok = BUILTIN
    decoder = StreamDecoder(tok, ("abc",))
    assert "".join(decoder.feed(i) for i in tok.encode("x ab")) == "x "
    assert decoder.feed(tok.encode("d")[0]) == "abd"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained on a few lines, with BOS/EOS and a chat template."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["hello world", "hello there world", "the world says hello"] * 20, trainer)
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("hf-tokenizer")
    tok.save_pretrained(path)
    return path


def test_hf_tokenizer_from_a_directory(hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = load_tokenizer(str(hf_dir))
    assert isinstance(tok, HFTokenizer) and tok.eos_token_id == 1
    ids = tok.encode(TEXT)
    assert ids[0] == 0 and tok.decode(ids) == TEXT  # BOS added, skipped when decoding
    # Characters outside the training text are split into byte tokens: the decoder waits for them.
    deltas, decoder = stream(tok, ids[1:] + [1])
    assert "".join(deltas) == TEXT and all("\ufffd" not in d for d in deltas)
    assert len([d for d in deltas if d]) < len(ids) - 1
    deltas, _ = stream(tok, tok.encode("hello world says hello")[1:], ("ld s",))
    assert "".join(deltas) == "hello wor"
    chat = tok.apply_chat([{"role": "user", "content": "hello"}])
    assert tok.tok.decode(chat) == "<|user|>hello</s><|assistant|>"  # the template's tokens, no extra BOS
    assert tok.decode(chat) == "<|user|>hello<|assistant|>"


def test_hf_tokenizer_without_chat_template_refuses_chat(hf_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    plain.chat_template = None
    plain.save_pretrained(tmp_path)
    for name in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(RequestError, match="has no chat template: use /v1/completions") as err:
        HFTokenizer(tmp_path).apply_chat([{"role": "user", "content": "hi"}])
    assert err.value.status == 400


def test_a_chat_template_that_refuses_the_messages_is_a_400(hf_dir: Path, tmp_path: Path) -> None:
    """Templates raise for conversations their model was not trained on (Gemma: no system role;
    Mistral: roles must alternate): the client gets a 400 with the template's words, not a 500.
    A template that does not parse is the model's fault: a 500 that says so."""
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                            "supported') }}{% endif %}" + CHAT_TEMPLATE)
    strict.save_pretrained(tmp_path / "strict")
    tok = HFTokenizer(tmp_path / "strict")
    assert tok.decode(tok.apply_chat([{"role": "user", "content": "hello"}])) == "<|user|>hello<|assistant|>"
    for role in ("system", "developer"):  # developer is sent to the template as system
        with pytest.raises(RequestError, match="chat template refused these messages: System role not supp") as err:
            tok.apply_chat([{"role": role, "content": "be brief"}, {"role": "user", "content": "hello"}])
        assert (err.value.status, err.value.param) == (400, "messages")
    strict.chat_template = "{% for m in messages %}{{ m['content'] }"
    strict.save_pretrained(tmp_path / "broken")
    with pytest.raises(GenerationError, match="chat template of .*broken cannot be used") as broken:
        HFTokenizer(tmp_path / "broken").apply_chat([{"role": "user", "content": "hello"}])
    assert broken.value.status == 500


def test_load_tokenizer_by_source(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer("builtin:llama-tiny"), HFTokenizer)
    with pytest.raises(ModelError, match="python: models have no tokenizer"):
        load_tokenizer("python:infscaled.models.zoo:vgg_tiny")
    with pytest.raises(ModelError, match="no tokenizer files in the directory"):
        load_tokenizer(str(tmp_path))


def test_model_eos_ids_come_from_generation_config_else_config(tmp_path: Path) -> None:
    """What transformers' generate stops at: generation_config.json's eos ids, else config.json's."""
    assert model_eos_ids(tmp_path) == () and model_eos_ids("org/not-a-directory") == ()
    (tmp_path / "config.json").write_text('{"eos_token_id": 5}')
    assert model_eos_ids(tmp_path) == (5,)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [7, 5]}')
    assert model_eos_ids(tmp_path) == (7, 5)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [7,')
    with pytest.raises(ModelError, match=r"cannot read generation_config\.json"):
        model_eos_ids(tmp_path)
