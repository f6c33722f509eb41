"""Byte-level BPE tokenizer with DeepSeek's special tokens and chat format.

    tok = Tokenizer.train(texts, vocab_size=4096)    # or Tokenizer.from_dir("deepseek-ai/DeepSeek-R1")
    tok.save("runs/tok")                              # tokenizer.json + tokenizer_config.json (HF-loadable)
    ids, loss_mask = tok.render_chat([{"role": "user", "content": "2+2?"},
                                      {"role": "assistant", "content": "<think>easy</think>4"}])

A thin wrapper over a `tokenizers.Tokenizer`: the Rust library does the work, this file fixes the
special tokens, the chat format and one rule about text that *looks* like a special token:

    Plain-text rule. `encode(text)` and every message content in `render_chat` treat special-token
    strings as ordinary text ("<｜User｜>" typed by a user becomes a dozen byte tokens, not id 3), so
    data or user input can never forge a turn boundary or an end of sentence. `encode(text,
    allow_special=True)` parses them into their ids (what HF tokenizers do by default). The one
    exception is the reasoning span: "<think>" and "</think>" inside *assistant* content become their
    single ids, because that is how a reasoning model must emit them.

Either way decoding is lossless: decode(encode(s)) == s for every str that UTF-8 can hold.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

# DeepSeek's strings, in the order (= ids) our own trained tokenizers give them. Note the fullwidth
# bars "｜" (U+FF5C) and the "▁" (U+2581): ASCII look-alikes would be different tokens.
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK]  # ids 0..6
# The largest vocabulary `Tokenizer.train` makes: far past any real one (DeepSeek's is 129,280), and
# small enough for the trainer's tables (2**32 made it ask for 72 TB and abort the process).
MAX_VOCAB = 1 << 22

# The same format as `render_chat` in Jinja, for HF `apply_chat_template`. System messages are joined
# with a blank line and put right after bos (DeepSeek-R1's template). `think` (default true) is an
# extra template variable: apply_chat_template(..., think=False) omits the "<think>\n" opener.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% if ns.system %}{% set ns.system = ns.system + '\\n\\n' %}{% endif %}"
    "{% set ns.system = ns.system + m['content'] %}"
    "{% endif %}{% endfor %}{{ ns.system }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '" + USER + "' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '" + ASSISTANT + "' + m['content'] + '" + EOS + "' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}"
    "{% if think is not defined or think %}{{ '" + THINK + "\\n' }}{% endif %}{% endif %}"
)

_THINK_SPLIT = re.compile(f"({re.escape(THINK)}|{re.escape(END_THINK)})")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")      # SentencePiece-style byte tokens


def _byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's, tokenizers' ByteLevel): the printable stand-in of each byte
    -> that byte. Printable Latin-1 bytes stand for themselves; the other 68, in byte order, take the
    characters from U+0100 on."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(0x100 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_chars()


class Tokenizer:
    """DeepSeek-style tokenizer over any HF tokenizer.json (ours or an official DeepSeek one)."""

    def __init__(self, backend: _HFTokenizer):
        self.backend = backend  # parses added tokens in text; used for decode and allow_special=True
        # A twin without added tokens: encoding with it treats "<｜User｜>" etc. as plain text. This
        # is stricter than tokenizers' `encode_special_tokens` flag, which leaves non-special added
        # tokens (DeepSeek-R1's "<think>") matched. Decoding always goes through `backend`.
        spec = json.loads(backend.to_str())
        spec["added_tokens"] = []
        self._plain = _HFTokenizer.from_str(json.dumps(spec))

        def find(s: str) -> int | None:
            return backend.token_to_id(s)

        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        decoder = json.dumps(spec.get("decoder"))
        self._byte_level = '"ByteLevel"' in decoder
        self._metaspace = not self._byte_level and ('"Metaspace"' in decoder or "\\u2581" in decoder)
        self._bytes: dict[int, bytes] = {}
        self.bos_id, self.eos_id, self.pad_id = find(BOS), find(EOS), find(PAD)
        self.user_id, self.assistant_id = find(USER), find(ASSISTANT)
        self.think_id, self.end_think_id = find(THINK), find(END_THINK)  # None in DeepSeek-V3's tokenizer
        missing = [s for s, i in ((BOS, self.bos_id), (EOS, self.eos_id), (USER, self.user_id),
                                  (ASSISTANT, self.assistant_id)) if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks DeepSeek special tokens {missing}; train one with "
                             "`nanoseek tokenizer` or use a DeepSeek tokenizer.json")

    # --- construction

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Byte-level BPE on `texts`. `vocab_size` counts the 7 specials and the 256 byte symbols; it is
        an upper bound (a small corpus may run out of merges first)."""
        floor = len(SPECIAL_TOKENS) + 256
        if vocab_size < floor:
            raise ValueError(f"vocab_size {vocab_size} < {floor} (7 special tokens + 256 byte symbols)")
        if vocab_size > MAX_VOCAB:
            raise ValueError(f"vocab_size {vocab_size} > {MAX_VOCAB}")
        tok = _HFTokenizer(models.BPE())
        # use_regex: GPT-2's split into words/numbers/punctuation before BPE, so merges never cross
        # word boundaries. No prefix space, no normalizer: the text is kept byte for byte.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
            # every byte gets a symbol even if the corpus never shows it: this is what makes any
            # Unicode text encodable without an unknown token.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        # The trainer marks all its special tokens special=True. DeepSeek-R1 marks <think>/</think>
        # special=False so decode(skip_special=True) keeps the reasoning tags; do the same.
        spec = json.loads(tok.to_str())
        for added in spec["added_tokens"]:
            if added["content"] in (THINK, END_THINK):
                added["special"] = False
        return cls(_HFTokenizer.from_str(json.dumps(spec)))

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json (any HF fast tokenizer with DeepSeek's special strings)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json there")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:   # noqa: BLE001 - the tokenizers library raises plain Exception on a bad file
            raise ValueError(f"{path} is not a tokenizer file the tokenizers library can read: {e}") from None
        return cls(backend)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `path/tokenizer.json` (a model directory, ours or a Hugging Face download)."""
        return cls.from_file(Path(path) / "tokenizer.json")

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json so transformers' AutoTokenizer loads it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD if self.pad_id is not None else EOS,
            "add_bos_token": False, "add_eos_token": False,
            # HF's default clean-up rewrites " ," -> "," etc. on decode, breaking the round trip
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
            "chat_template": CHAT_TEMPLATE,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # --- facts

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (a model's embedding may be larger, e.g. padded)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        """Hash of the serialized tokenizer; data shards record it to catch a tokenizer swap."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    # --- encode / decode

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings are plain text unless allow_special."""
        ids = (self.backend if allow_special else self._plain).encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: list[str], add_bos: bool = False, allow_special: bool = False) -> list[list[int]]:
        """`encode` over many texts; tokenizers runs them in parallel threads."""
        encs = (self.backend if allow_special else self._plain).encode_batch(texts, add_special_tokens=False)
        return [[self.bos_id, *e.ids] if add_bos else e.ids for e in encs]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`. skip_special drops bos/eos/pad/User/Assistant but keeps <think> tags."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, as in the text that decoding a sequence of tokens builds. A token
        holding part of a UTF-8 character has its own byte(s), where decode([id]) gives U+FFFD (the
        `bytes` of OpenAI's logprobs). An id the tokenizer lacks: b"", as decode gives no text for it."""
        got = self._bytes.get(token_id)
        if got is not None:
            return got
        piece = self._added.get(token_id)
        added = piece is not None
        if not added:
            piece = self.backend.id_to_token(token_id)
            if piece is None:       # an id past the tokenizer (a model's padded vocabulary)
                return b""
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if self._byte_level and all(c in _BYTE_LEVEL for c in piece):
            # the ByteLevel decoder maps every token's characters to bytes when all are in its alphabet,
            # added tokens included ("<think>" is its own bytes; an added "ö" is the byte 0xF6)
            got = bytes(_BYTE_LEVEL[c] for c in piece)
        elif fallback and not self._byte_level:
            got = bytes([int(fallback.group(1), 16)])
        elif added:
            got = piece.encode()
        elif self._metaspace:       # SentencePiece-style pieces: "▁" is the space before a word
            got = piece.replace("\u2581", " ").encode()
        else:
            got = self.decode([token_id]).encode()
        self._bytes[token_id] = got
        return got

    # --- chat

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    think: bool = True) -> tuple[list[int], list[int]]:
        """DeepSeek-R1 chat format -> (ids, loss_mask).

        bos, system contents (joined by a blank line), then "<｜User｜>"+content or
        "<｜Assistant｜>"+content+"<｜end▁of▁sentence｜>" per turn. loss_mask is 1 on assistant content
        and its closing eos (what the model must learn to produce), 0 on everything it is given.
        add_generation_prompt appends "<｜Assistant｜>" and, with think and a tokenizer that has the
        token, "<think>\\n" as R1's template does. Contents follow the plain-text rule (module doc).
        """
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: list[int], m: int) -> None:
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        add([self.bos_id], 0)
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        if system:
            add(self.encode(system), 0)
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "system":
                continue
            if role == "user":
                add([self.user_id], 0)
                add(self.encode(m["content"]), 0)
            elif role == "assistant":
                add([self.assistant_id], 0)
                add(self._encode_assistant(m["content"]), 1)
                add([self.eos_id], 1)  # learning to stop is part of the answer
            else:
                raise ValueError(f"message {i}: role {role!r}; expected system, user or assistant")
        if add_generation_prompt:
            add([self.assistant_id], 0)
            if think and self.think_id is not None:
                add([self.think_id, *self.encode("\n")], 0)
        return ids, mask

    def _encode_assistant(self, content: str) -> list[int]:
        """Plain text except that <think> / </think> become their single ids (when the vocab has them)."""
        if self.think_id is None or self.end_think_id is None:
            return self.encode(content)
        ids: list[int] = []
        for piece in _THINK_SPLIT.split(content):  # the capture group keeps the tags as pieces
            if piece == THINK:
                ids.append(self.think_id)
            elif piece == END_THINK:
                ids.append(self.end_think_id)
            elif piece:
                ids.extend(self.encode(piece))
        return ids
