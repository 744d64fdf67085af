"""The builtin models' tokenizer: a byte-level BPE trained offline with Hugging Face `tokenizers`.

`python -m infscaled.models.train_tokenizer` trains it on the small corpus below and writes
`infscaled/models/builtin_tokenizer/` (tokenizer.json, tokenizer_config.json), which the package
ships; `--check` exits 1 if the shipped files differ from a fresh training (tests run it: the
training is deterministic for a given `tokenizers` version). Any Hugging Face client loads the
directory (`AutoTokenizer.from_pretrained(builtin_tokenizer_dir())`), so clients that count
tokens count what the server counts.

512 ids, the tiny models' vocabulary: 3 special tokens, the 256 byte symbols, 253 merges. Every
byte string encodes; ids a model emits beyond the vocabulary (the 3B benchmark model has 32,000)
decode to no text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

VOCAB_SIZE = 512
EOS, BOS, PAD = "<|endoftext|>", "<|begin_of_text|>", "<|pad|>"
DIR = Path(__file__).resolve().parent / "builtin_tokenizer"
# The chat format of the byte tokenizer it replaces: each message as "<|role|>\ncontent\n", then
# the assistant's marker. The markers are plain text, not special ids.
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

CORPUS = """\
A pipeline cuts a model into stages of consecutive layers. Each stage runs in its own worker
process, and micro-batches stream from one stage to the next. When one stage is slower than the
others, it is replicated, and the dispatcher sends each micro-batch to the replica with the
shortest queue. The first stage embeds the tokens, the middle stages run the transformer blocks,
and the last stage turns the hidden states into logits and samples the next token.

The controller keeps the state of the cluster: which agents are connected, which devices they
offer, which jobs are running and where each stage replica lives. An agent starts the workers of
the jobs placed on its devices, watches them, and reports their metrics every second. A client
sends its request to the controller, which forwards it to the dispatcher of the job, and the
answer streams back token by token.

Once upon a time there was a small model that wanted to tell stories. It knew only a few hundred
words, and most of them were short: the, and, of, to, in, is, was, it, that, for, on, with, as,
at, by, from, this, be, are, have, had, not, but, what, all, were, when, we, there, can, an,
your, which, their, said, if, do, will, each, about, how, up, out, them, then, she, he, many,
some, so, these, would, other, into, has, more, her, two, like, him, see, time, could, no, make,
than, first, been, its, who, now, people, my, made, over, did, down, only, way, find, use, may,
water, long, little, very, after, words, called, just, where, most, know, get, through, back.

Hello! How are you today? I am fine, thank you. What would you like to talk about? Tell me a
story about a dragon, a castle and a brave girl who learned to read the stars. The answer is 42.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 100 128 256 512 1024 2048 4096 3.14 2.5 1e-4 -1.
Questions and answers: Q: What is the capital of France? A: Paris. Q: Which is larger, 7 or 9?
A: 9. Q: Is the sky blue? A: Yes. Choose the best answer: (A) red (B) green (C) blue (D) yellow.

def forward(self, x):
    for block in self.blocks:
        x = block(x)
    return self.norm(x)

{"model": "llama-generate", "prompt": "Once upon a time", "max_tokens": 32, "stream": true}
"""


def train() -> Any:
    """A fresh `tokenizers.Tokenizer` trained on CORPUS (byte-level BPE, VOCAB_SIZE ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS, BOS, PAD], min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return tok


def files() -> dict[str, str]:
    """File name -> text of the tokenizer directory."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": BOS, "pad_token": PAD,
              "unk_token": None, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    return {"tokenizer.json": train().to_str(pretty=True) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    parser.add_argument("--out", type=Path, default=DIR, help=f"directory to write (default {DIR})")
    args = parser.parse_args(argv)
    expected = files()
    if args.check:
        stale = [name for name, text in expected.items()
                 if not (args.out / name).exists() or (args.out / name).read_text() != text]
        if stale:
            print(f"{args.out}: {', '.join(stale)} differ from a fresh training; rerun without --check")
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in expected.items():
        (args.out / name).write_text(text)
    print(f"wrote {', '.join(expected)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
