"""Language-modelling input pipelines: LM1B (TFDS) and an offline corpus of Python stdlib source.

`get_data` returns a `TextData`: per-process numpy batches of packed token sequences, the
tokenizer, and token counts. Both corpora follow the same rules.

Packing. Documents (LM1B sentences, stdlib files) are tokenized, each followed by EOS, and
concatenated into one stream. Training cuts the stream into disjoint windows of `seq_len + 1`
tokens (the trailing partial window is dropped): inputs = w[:-1], targets = w[1:], weights 1.
Evaluation steps its windows by `seq_len`, so consecutive windows share one token and every
token of the eval stream but the first is a target exactly once; the last window is padded and
zero rows fill the last batch, all with weight 0, so `num_eval_tokens` is the true denominator.

Determinism. Train batches are a pure function of (seed, step): `train_batches(s)` yields what
`train_batches(0)` yields from step s on.
  * stdlib: the packed windows live in memory. Global sample i is window perm_e[i % n] with
    e = i // n and perm_e a permutation drawn from (seed, e), so any step is reached by
    arithmetic. Process p takes rows [p*b, (p+1)*b) of each global batch, so the global batch
    does not depend on the number of processes.
  * lm1b (30M sentences, ~4 GB of text) streams instead of living in memory. Each process reads
    its own `tfds.even_splits` share; epoch e is one pass with file order and a 2**16-sentence
    shuffle buffer seeded from (seed, e) (shuffle before repeat), then packing. The window count
    of an epoch, tokens // (seq_len + 1), does not depend on the order, so a resume finds its
    epoch by arithmetic from a one-off token count (cached in `cache_dir`) and replays only the
    start of that epoch: sentences are read and tokenized, no batches are built. Trade-offs: a
    resume costs up to one epoch of reading, batches depend on the process count, and the buffer
    shuffle is local (LM1B's training files are shuffled already). tf.data shuffles with op
    seeds, so the order also depends on TF's global seed (`tf.random.set_seed`): keep it fixed.

Tokenizers ("bytes", "sentencepiece"): `ilbp.data.tokenizers`.

The stdlib corpus is every *.py file under `sysconfig.get_paths()["stdlib"]` (site-packages,
dist-packages, __pycache__ excluded), sorted and read as UTF-8 with errors replaced; a file is
eval when the first 8 bytes of sha256(relative path) fall in the lowest 5%. CPython 3.11.7 here:
1,790 files, 31,525,224 bytes; train 1,704 files, 29,720,421 bytes (29,722,241 byte tokens with
EOS); eval 86 files, 1,804,803 bytes (1,804,888 eval targets). sentencepiece with 8000 pieces:
9,027,733 train and 534,162 eval tokens, ~2 min to train and encode once, then read from cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from ilbp import files
from ilbp.data import input_shard, per_shard
from ilbp.data.tokenizers import TOKENIZERS, Tokenizer, get_tokenizer

DATASETS = ("lm1b", "stdlib")
EVAL_FRACTION = 0.05  # share of stdlib files held out for evaluation
_SHUFFLE_BUFFER = 2**16  # LM1B sentences (~10 MB); the files themselves are shuffled already
_READ_BATCH = 4096  # sentences per tf.data -> numpy transfer, to amortise per-call overhead
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class TextData:
  """A language-modelling dataset, as the trainer sees it.

  Attributes:
    train_batches: start_step -> endless iterator of this process's training batches, numpy
      {"inputs": int32 [b, L], "targets": int32 [b, L], "weights": float32 [b, L]}.
    eval_batches: () -> iterator over one full pass of the eval set, same keys; padding has
      weight 0.
    vocab_size: size of the model's output layer.
    tokenizer: encode/decode, pad_id (0) and eos_id.
    num_train_tokens: tokens in the training stream (all processes) when known, else None.
    num_eval_tokens: weighted target tokens in one eval pass, summed over all processes.
  """

  train_batches: Callable[[int], Iterator[dict]]
  eval_batches: Callable[[], Iterator[dict]]
  vocab_size: int
  tokenizer: Tokenizer
  num_train_tokens: int | None
  num_eval_tokens: int


def get_data(
  name: str,
  *,
  batch_size: int,
  seq_len: int,
  seed: int,
  tokenizer: str = "bytes",
  vocab_size: int = 8000,
  cache_dir: str | None = None,
  eval_batch_size: int | None = None,
  max_eval_sequences: int | None = None,
  data_dir: str | None = None,
  max_files: int | None = None,
  shard: tuple[int, int] | None = None,
) -> TextData:
  """Builds a packed language-modelling dataset.

  Args:
    name: "lm1b" (TFDS) or "stdlib" (the Python standard library's source, offline).
    batch_size: global training batch size; must divide by the number of shards.
    seq_len: tokens per sequence L.
    seed: fixes the training order; batches are a pure function of (seed, step).
    tokenizer: "bytes" or "sentencepiece".
    vocab_size: sentencepiece vocabulary size (ignored for bytes).
    cache_dir: where the sentencepiece model, token arrays and token counts are cached;
      required for sentencepiece.
    eval_batch_size: global eval batch size; defaults to `batch_size`.
    max_eval_sequences: evaluate only the first this many windows of the eval stream.
    data_dir: TFDS data directory for lm1b, local or gs://.
    max_files: stdlib only: keep the first this many files of each split (tests, smoke runs).
    shard: `(index, count)`: this process loads shard `index` of `count` equal shares of every
      batch (default: `(jax.process_index(), jax.process_count())`; see
      `ilbp.execution.factory.input_shard`).

  Returns:
    The `TextData`.

  Raises:
    ValueError: an unknown name or tokenizer, or bad sizes.
    ilbp.data.prepare.DatasetUnavailableError: LM1B is not prepared under `data_dir` and cannot
      be downloaded here; raised within seconds, saying how to prepare it elsewhere.
  """
  if name not in DATASETS:
    raise ValueError(f"Unknown text dataset {name!r}; valid names: {', '.join(DATASETS)}.")
  if tokenizer not in TOKENIZERS:
    raise ValueError(f"Unknown tokenizer {tokenizer!r}; valid names: {', '.join(TOKENIZERS)}.")
  if tokenizer == "sentencepiece" and cache_dir is None:
    raise ValueError("The sentencepiece tokenizer needs a cache_dir to store its model in.")
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
  eval_batch_size = eval_batch_size or batch_size
  procs = input_shard(shard)
  for what, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
    per_shard(size, what, procs[1])
  if max_files is not None and name != "stdlib":
    raise ValueError("max_files applies to the stdlib corpus only.")
  common = dict(
    tok_kind=tokenizer,
    vocab_size=vocab_size,
    cache_dir=cache_dir,
    seq_len=seq_len,
    batch_size=batch_size,
    eval_batch_size=eval_batch_size,
    max_eval_sequences=max_eval_sequences,
    seed=seed,
    procs=procs,
  )
  if name == "lm1b":
    return _lm1b_data(data_dir=data_dir, **common)
  return _stdlib_data(max_files=max_files, **common)


# --- Shared pieces -------------------------------------------------------------------------


def _seed(*xs: int) -> int:
  """A 63-bit seed mixed from integers, for numpy generators and tf.data alike."""
  state = np.random.SeedSequence([x % 2**64 for x in xs]).generate_state(1, np.uint64)[0]
  return int(state >> np.uint64(1))


def _compact(stream: np.ndarray, vocab_size: int) -> np.ndarray:
  """Halves memory and cache size when the ids fit in 16 bits."""
  return stream.astype(np.uint16 if vocab_size <= 2**16 else np.int32)


def _cached(path: str | None, compute: Callable[[], np.ndarray], save: bool = True) -> np.ndarray:
  """Loads `path` if it exists, else computes (and saves, when there is a path and `save`)."""
  if path is not None and os.path.exists(path):
    return np.load(path)
  value = np.asarray(compute())
  if path is not None and save:
    buf = io.BytesIO()
    np.save(buf, value)
    files.write_bytes(path, buf.getvalue())
  return value


def _lm_batch(windows: np.ndarray) -> dict:
  """Splits [b, L + 1] windows into next-token inputs and targets."""
  w = windows.astype(np.int32)
  return {
    "inputs": np.ascontiguousarray(w[:, :-1]),
    "targets": np.ascontiguousarray(w[:, 1:]),
    "weights": np.ones((w.shape[0], w.shape[1] - 1), np.float32),
  }


def _eval_fn(
  stream: np.ndarray, seq_len: int, batch_size: int, max_sequences: int | None, procs
) -> tuple[Callable[[], Iterator[dict]], int]:
  """Eval batches of stride-`seq_len` windows over `stream` (at most `max_sequences` of them)
  and their real-token count over all processes; `procs` is (process_index, process_count)."""
  index, count = procs
  n = max(1, -(-(len(stream) - 1) // seq_len))  # windows needed for every token to be a target
  if max_sequences is not None:
    n = min(n, max_sequences)
  used = min(len(stream), n * seq_len + 1)
  flat = np.zeros(n * seq_len + 1, stream.dtype)
  flat[:used] = stream[:used]
  b = batch_size // count

  def eval_batches() -> Iterator[dict]:
    offsets = np.arange(seq_len + 1)
    for start in range(0, n, batch_size):
      rows = start + index * b + np.arange(b)
      real = (rows < n)[:, None]
      # Window r is flat[r*L : r*L + L + 1]; rows past the end repeat a window, then get masked.
      pos = np.minimum(rows, n - 1)[:, None] * seq_len + offsets
      w = flat[pos].astype(np.int32) * real
      yield {
        "inputs": np.ascontiguousarray(w[:, :-1]),
        "targets": np.ascontiguousarray(w[:, 1:]),
        "weights": ((pos[:, 1:] < used) & real).astype(np.float32),
      }

  return eval_batches, max(used - 1, 0)


def _rebatch(chunks: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
  """Regroups arrays of windows with any number of rows into arrays of exactly `rows` rows."""
  buf = None
  for chunk in chunks:
    buf = chunk if buf is None or not len(buf) else np.concatenate([buf, chunk])
    k = len(buf) // rows
    for i in range(k):
      yield buf[i * rows : (i + 1) * rows]
    buf = buf[k * rows :]


# --- stdlib: in memory, arithmetic order ---------------------------------------------------


def _hash01(rel: str) -> float:
  """A stable pseudo-random number in [0, 1) per path (Python's hash() is salted per run)."""
  return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") / 2**64


def stdlib_files(max_files: int | None = None) -> tuple[str, list[str], list[str]]:
  """Lists the stdlib corpus and its split by file.

  Args:
    max_files: keep only the first this many files (sorted) of each split.

  Returns:
    (root, train, eval): the stdlib directory and each split's sorted relative POSIX paths.
  """
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for parent, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]  # installed packages are not stdlib
    rel = os.path.relpath(parent, root)
    paths += [os.path.normpath(os.path.join(rel, f)) for f in names if f.endswith(".py")]
  paths = sorted(p.replace(os.sep, "/") for p in paths)
  held_out = [p for p in paths if _hash01(p) < EVAL_FRACTION]
  train = [p for p in paths if _hash01(p) >= EVAL_FRACTION]
  if max_files is not None:
    train, held_out = train[:max_files], held_out[:max_files]
  return root, train, held_out


def _read_source(root: str, rel: str) -> str:
  # Bytes first, so the text is exact (no newline translation) whatever the platform.
  with open(os.path.join(root, rel), "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def _array_train_fn(
  windows: np.ndarray, batch_size: int, seed: int, procs
) -> Callable[[int], Iterator[dict]]:
  """Endless batches of in-memory windows, reshuffled every epoch by a (seed, epoch) perm."""
  index, count = procs
  n, b = len(windows), batch_size // count
  if n == 0:
    raise ValueError("The training split is shorter than one window of seq_len + 1 tokens.")

  def train_batches(start_step: int = 0) -> Iterator[dict]:
    perms: dict[int, np.ndarray] = {}
    step = start_step
    while True:
      sample = step * batch_size + index * b + np.arange(b, dtype=np.int64)
      epochs, pos = np.divmod(sample, n)
      rows = np.empty(b, np.int64)
      for e in map(int, np.unique(epochs)):
        if e not in perms:
          perms = {k: v for k, v in perms.items() if k >= epochs.min()}  # drop finished epochs
          perms[e] = np.random.default_rng(_seed(seed, e)).permutation(n)
        rows[epochs == e] = perms[e][pos[epochs == e]]
      yield _lm_batch(windows[rows])
      step += 1

  return train_batches


def _stdlib_data(
  *,
  max_files,
  tok_kind,
  vocab_size,
  cache_dir,
  seq_len,
  batch_size,
  eval_batch_size,
  max_eval_sequences,
  seed,
  procs,
) -> TextData:
  """The stdlib corpus: tokenized once (cached in cache_dir), packed and ordered in numpy."""
  root, train_files, eval_files = stdlib_files(max_files)
  corpus = "stdlib" if max_files is None else f"stdlib-max{max_files}"

  def lines() -> Iterator[str]:
    # Hash order mixes packages; sorted order would fill the sample from the first few.
    for rel in sorted(train_files, key=_hash01):
      yield from _read_source(root, rel).splitlines()

  tok = get_tokenizer(tok_kind, vocab_size, cache_dir, corpus, lines)
  # Cached token arrays are keyed by the exact file list and sizes: they follow the Python.
  sizes = [f"{r}:{os.path.getsize(os.path.join(root, r))}" for r in train_files + eval_files]
  fingerprint = hashlib.sha256("\n".join(sorted(sizes)).encode("utf-8")).hexdigest()[:10]

  def stream(files: list[str], split: str) -> np.ndarray:
    path = None
    if cache_dir is not None:
      path = os.path.join(cache_dir, f"tokens_{corpus}_{tok.name}_{split}_{fingerprint}.npy")
    compute = lambda: _compact(
      tok.encode_documents([_read_source(root, r) for r in files]), tok.vocab_size
    )
    return _cached(path, compute)

  train = stream(train_files, "train")
  windows = train[: len(train) // (seq_len + 1) * (seq_len + 1)].reshape(-1, seq_len + 1)
  eval_batches, num_eval_tokens = _eval_fn(
    stream(eval_files, "eval"), seq_len, eval_batch_size, max_eval_sequences, procs
  )
  return TextData(
    train_batches=_array_train_fn(windows, batch_size, seed, procs),
    eval_batches=eval_batches,
    vocab_size=tok.vocab_size,
    tokenizer=tok,
    num_train_tokens=len(train),
    num_eval_tokens=num_eval_tokens,
  )


# --- lm1b: streamed with tf.data -------------------------------------------------------------


def _lm1b_data(
  *,
  data_dir,
  tok_kind,
  vocab_size,
  cache_dir,
  seq_len,
  batch_size,
  eval_batch_size,
  max_eval_sequences,
  seed,
  procs,
) -> TextData:
  """LM1B: eval tokenized once (cached), training streamed from TFDS and packed on the fly."""
  import tensorflow_datasets as tfds  # imported here: the stdlib corpus needs no TensorFlow

  from ilbp.data import prepare

  builder = prepare.prepared_builder("lm1b", data_dir)  # Offline: fails in seconds, says how.
  index, count = procs
  shard = tfds.even_splits("train", n=count)[index] if count > 1 else "train"
  version = str(builder.info.version)

  def sentences(split, shuffle_seed: int | None = None) -> Iterator[np.ndarray]:
    """Batches of raw UTF-8 sentences, in file order or in the order of `shuffle_seed`."""
    ds = builder.as_dataset(
      split=split,
      shuffle_files=shuffle_seed is not None,
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
    ).map(lambda x: x["text"])
    if shuffle_seed is not None:
      ds = ds.shuffle(_SHUFFLE_BUFFER, seed=shuffle_seed)
    return iter(tfds.as_numpy(ds.batch(_READ_BATCH).prefetch(2)))

  def sample() -> Iterator[str]:
    for batch in sentences("train"):
      yield from (s.decode("utf-8", errors="replace") for s in batch)

  tok = get_tokenizer(tok_kind, vocab_size, cache_dir, "lm1b", sample)
  cache = lambda what: (
    None if cache_dir is None else os.path.join(cache_dir, f"{what}_lm1b_{tok.name}_{version}.npy")
  )

  def read_eval() -> np.ndarray:
    # With a cap, read only the sentences that the capped windows need.
    limit = None if max_eval_sequences is None else max_eval_sequences * seq_len + 1
    parts, total = [], 0
    for batch in sentences("test"):
      parts.append(tok.encode_documents(batch))
      total += len(parts[-1])
      if limit is not None and total >= limit:
        break
    return _compact(np.concatenate(parts), tok.vocab_size)

  eval_stream = _cached(cache("tokens-test"), read_eval, save=max_eval_sequences is None)
  eval_batches, num_eval_tokens = _eval_fn(
    eval_stream, seq_len, eval_batch_size, max_eval_sequences, procs
  )
  count_path = cache(f"count-train-{index}of{count}")

  def shard_tokens() -> int:
    # One unshuffled pass: the token count is the same in every epoch's order.
    total = lambda: np.int64(sum(len(tok.encode_documents(b)) for b in sentences(shard)))
    return int(_cached(count_path, total))

  def epoch_windows(epoch: int, skip_tokens: int) -> Iterator[np.ndarray]:
    buf = np.zeros(0, np.int32)
    for batch in sentences(shard, _seed(seed, epoch)):
      stream = tok.encode_documents(batch)
      if skip_tokens:  # resuming: these tokens belong to windows an earlier run consumed
        k = min(skip_tokens, len(stream))
        stream, skip_tokens = stream[k:], skip_tokens - k
      buf = np.concatenate([buf, stream])
      n = len(buf) // (seq_len + 1)
      if n:
        yield buf[: n * (seq_len + 1)].reshape(n, seq_len + 1)
        buf = buf[n * (seq_len + 1) :]

  b = batch_size // count

  def train_batches(start_step: int = 0) -> Iterator[dict]:
    epoch, skip = 0, 0
    if start_step:
      per_epoch = shard_tokens() // (seq_len + 1)
      if per_epoch == 0:
        raise ValueError("The LM1B training shard is shorter than one window.")
      epoch, skip = divmod(start_step * b, per_epoch)

    def windows() -> Iterator[np.ndarray]:
      e, skip_tokens = epoch, skip * (seq_len + 1)
      while True:
        empty = True
        for w in epoch_windows(e, skip_tokens):
          empty = False
          yield w
        if empty:  # would otherwise loop forever over a shard shorter than one window
          raise ValueError("The LM1B training shard is shorter than one window.")
        e, skip_tokens = e + 1, 0

    return (_lm_batch(w) for w in _rebatch(windows(), b))

  known = count == 1 and count_path is not None and os.path.exists(count_path)
  return TextData(
    train_batches=train_batches,
    eval_batches=eval_batches,
    vocab_size=tok.vocab_size,
    tokenizer=tok,
    num_train_tokens=int(np.load(count_path)) if known else None,
    num_eval_tokens=num_eval_tokens,
  )
