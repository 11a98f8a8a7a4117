"""Tokenizers of the language-modelling pipelines (`ilbp.data.text`).

"bytes": pad 0, EOS 1, byte b -> b + 2; vocabulary 258.

"sentencepiece": a unigram model with pad 0, EOS 1, unk 2 and no BOS, trained on at most
`SPM_MAX_CHARS` (10M) characters of training text (LM1B: its first training sentences in file
order; stdlib: lines of training files in hash order). Identity normalization, kept whitespace
and byte fallback make decode(encode(s)) == s for any text, which source code needs; byte
fallback also means vocab_size must exceed 259 plus the distinct characters kept (sentencepiece
says so if not). The model is cached as `<cache_dir>/spm_<corpus>_<vocab_size>.model` and
reused when present.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np
import sentencepiece as spm

from ilbp import files

TOKENIZERS = ("bytes", "sentencepiece")
SPM_MAX_CHARS = 10_000_000  # bound on sentencepiece's training sample; more changes little


class Tokenizer(Protocol):
  """What the trainer and the pipelines need from a tokenizer."""

  name: str  # identifies the vocabulary in cache file names
  vocab_size: int
  pad_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...

  def encode_documents(self, docs: Sequence[str | bytes]) -> np.ndarray: ...


class ByteTokenizer:
  """UTF-8 bytes shifted past two special ids: pad 0, EOS 1, byte b -> b + 2."""

  name = "bytes"
  vocab_size = 258
  pad_id = 0
  eos_id = 1

  def encode(self, text: str) -> list[int]:
    return [b + 2 for b in text.encode("utf-8")]

  def decode(self, ids: Iterable[int]) -> str:
    # Special ids carry no text; a window cut mid-character decodes to U+FFFD, not an error.
    return bytes(int(i) - 2 for i in ids if i >= 2).decode("utf-8", errors="replace")

  def encode_documents(self, docs: Sequence[str | bytes]) -> np.ndarray:
    """Returns the int32 token stream of `docs`, each followed by EOS."""
    raw = [d.encode("utf-8") if isinstance(d, str) else d for d in docs]
    ids = np.frombuffer(b"".join(raw), np.uint8).astype(np.int32) + 2
    ends = np.cumsum(np.array([len(r) for r in raw], np.int64))
    return np.insert(ids, ends, self.eos_id)


class SentencePieceTokenizer:
  """A sentencepiece model; build it with `train` or from a saved `model_proto`."""

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = self._sp.pad_id()
    self.eos_id = self._sp.eos_id()
    # The hash ties cached token arrays to this exact model, not just to its size.
    self.name = f"spm{self.vocab_size}-{hashlib.sha256(model_proto).hexdigest()[:10]}"

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> SentencePieceTokenizer:
    """Trains a unigram model.

    Args:
      texts: training sentences or lines; empty ones are skipped.
      vocab_size: requested vocabulary size, including 3 special ids and 256 byte-fallback
        pieces. A corpus too small for it yields a smaller vocabulary (see `vocab_size`).

    Returns:
      The trained tokenizer.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
      sentence_iterator=(t for t in texts if t),
      model_writer=model,
      vocab_size=vocab_size,
      model_type="unigram",
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      hard_vocab_limit=False,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
    )
    return cls(model.getvalue())

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def encode_documents(self, docs: Sequence[str | bytes]) -> np.ndarray:
    """Returns the int32 token stream of `docs`, each followed by EOS."""
    texts = [d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in docs]
    out: list[int] = []
    for ids in self._sp.encode(texts, num_threads=os.cpu_count() or 1):
      out.extend(ids)
      out.append(self.eos_id)
    return np.asarray(out, np.int32)


def get_tokenizer(
  kind: str, vocab_size: int, cache_dir: str | None, corpus: str, sample: Callable
) -> Tokenizer:
  """The byte tokenizer, or the cached / newly trained sentencepiece model of `corpus`.

  Args:
    kind: "bytes" or "sentencepiece".
    vocab_size: sentencepiece's vocabulary size (ignored for bytes).
    cache_dir: where the sentencepiece model is cached (required for sentencepiece).
    corpus: the corpus's name, part of the cached model's file name.
    sample: a callable returning an iterable of training texts; read up to `SPM_MAX_CHARS`.

  Returns:
    The tokenizer.
  """
  if kind == "bytes":
    return ByteTokenizer()
  path = os.path.join(cache_dir, f"spm_{corpus}_{vocab_size}.model")
  if os.path.exists(path):
    with open(path, "rb") as f:
      return SentencePieceTokenizer(f.read())

  def bounded() -> Iterator[str]:
    chars = 0
    for text in sample():
      if chars >= SPM_MAX_CHARS:
        return
      chars += len(text)
      yield text

  tok = SentencePieceTokenizer.train(bounded(), vocab_size)
  files.write_bytes(path, tok.model_proto)
  return tok
