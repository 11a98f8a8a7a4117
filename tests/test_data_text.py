"""ilbp.data.text and ilbp.data.tokenizers: tokenizers, packing, eval masking, determinism,
corpora."""

import itertools
import os

import jax
import numpy as np
import pytest

from ilbp.data import text, tokenizers

SMALL = dict(batch_size=4, seq_len=32, seed=0, max_files=6)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.fixture(scope="module")
def small_stdlib():
  return text.get_data("stdlib", eval_batch_size=3, **SMALL)


def test_byte_tokenizer_round_trip():
  tok = tokenizers.ByteTokenizer()
  s = "def f(x):\n\treturn x  # héllo ✓"
  ids = tok.encode(s)
  assert min(ids) >= 2 and max(ids) < tok.vocab_size == 258
  assert tok.decode(ids) == s
  assert tok.decode([tok.pad_id, *ids, tok.eos_id]) == s  # special ids carry no text
  stream = tok.encode_documents(["ab", "", b"c"])
  np.testing.assert_array_equal(stream, [99, 100, 1, 1, 101, 1])


def test_sentencepiece_round_trip_and_cache(tmp_path):
  root, train_files, _ = text.stdlib_files(max_files=4)
  lines = [ln for f in train_files for ln in text._read_source(root, f).splitlines()]
  tok = tokenizers.SentencePieceTokenizer.train(lines, vocab_size=400)
  assert (tok.pad_id, tok.eos_id) == (0, 1) and 259 < tok.vocab_size <= 400
  s = "class A:\n    def f(self):  # ünïcode ✓\n\t\treturn None\n"
  ids = tok.encode(s)
  assert max(ids) < tok.vocab_size and tok.pad_id not in ids
  assert tok.decode(ids) == s
  assert tok.decode([*ids, tok.eos_id, tok.pad_id]) == s

  kw = dict(SMALL, tokenizer="sentencepiece", vocab_size=400, cache_dir=str(tmp_path))
  data = text.get_data("stdlib", **kw)
  model = tmp_path / "spm_stdlib-max6_400.model"
  assert model.exists()
  mtime = os.path.getmtime(model)
  again = text.get_data("stdlib", **kw)  # reuses the model and the cached token arrays
  assert os.path.getmtime(model) == mtime and again.tokenizer.name == data.tokenizer.name
  _assert_same(_take(data.train_batches(3), 2), _take(again.train_batches(3), 2))
  batch = next(data.eval_batches())
  assert batch["inputs"].max() < data.vocab_size == data.tokenizer.vocab_size


def test_train_batches_are_packed_windows(small_stdlib):
  for batch in _take(small_stdlib.train_batches(0), 3):
    assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (4, 32)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["weights"].dtype == np.float32 and np.all(batch["weights"] == 1)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  # Files are separated by EOS inside the packed stream.
  eos = small_stdlib.tokenizer.eos_id
  assert any(np.any(b["targets"] == eos) for b in _take(small_stdlib.train_batches(0), 50))


def test_eval_counts_every_real_token_once(small_stdlib):
  root, _, eval_files = text.stdlib_files(max_files=6)
  stream = tokenizers.ByteTokenizer().encode_documents(
    [text._read_source(root, f) for f in eval_files]
  )
  batches = list(small_stdlib.eval_batches())
  weights = np.concatenate([b["weights"] for b in batches])
  targets = np.concatenate([b["targets"] for b in batches])
  assert all(b["inputs"].shape == (3, 32) for b in batches)
  assert weights.sum() == small_stdlib.num_eval_tokens == len(stream) - 1
  # The weighted targets, in order, are the whole eval stream after its first token.
  np.testing.assert_array_equal(targets[weights == 1], stream[1:])
  assert np.all(targets[weights == 0] == 0)  # padding: pad id, no weight
  assert len(weights) % 3 == 0 and weights[-1, -1] == 0  # last window padded
  for b in batches:
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  _assert_same(list(small_stdlib.eval_batches()), batches)  # every call is a fresh full pass


def test_eval_cap_and_padded_rows():
  data = text.get_data("stdlib", eval_batch_size=4, max_eval_sequences=5, **SMALL)
  batches = list(data.eval_batches())
  assert len(batches) == 2
  weights = np.concatenate([b["weights"] for b in batches])
  assert data.num_eval_tokens == 5 * 32 == weights.sum()
  assert np.all(weights[5:] == 0) and np.all(batches[1]["inputs"][1:] == 0)


def test_resume_equals_uninterrupted_run(small_stdlib):
  windows = small_stdlib.num_train_tokens // 33
  steps = 2 * windows // 4 + 5  # crosses two epoch boundaries
  full = _take(small_stdlib.train_batches(0), steps)
  for start in (1, windows // 4, steps - 3):
    _assert_same(_take(small_stdlib.train_batches(start), steps - start), full[start:])
  # Each epoch is a permutation of the same windows.
  first = np.concatenate([b["inputs"] for b in full])[:windows]
  second = np.concatenate([b["inputs"] for b in full])[windows : 2 * windows]
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(np.unique(first, axis=0), np.unique(second, axis=0))


def test_seeds_differ():
  a = text.get_data("stdlib", **dict(SMALL, seed=1))
  b = text.get_data("stdlib", **dict(SMALL, seed=2))
  x, y = next(a.train_batches(0)), next(b.train_batches(0))
  assert not np.array_equal(x["inputs"], y["inputs"])


def test_processes_split_each_global_batch(small_stdlib, monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  shares = []
  for index in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    shares.append(text.get_data("stdlib", eval_batch_size=4, **SMALL))
  for step, whole in enumerate(_take(small_stdlib.train_batches(7), 3), start=7):
    parts = [next(s.train_batches(step)) for s in shares]
    assert parts[0]["inputs"].shape == (2, 32)
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), whole["inputs"])
  eval_weight = sum(b["weights"].sum() for s in shares for b in s.eval_batches())
  assert eval_weight == shares[0].num_eval_tokens == small_stdlib.num_eval_tokens
  with pytest.raises(ValueError, match=r"multiple of the number of input shares \(2"):
    text.get_data("stdlib", **dict(SMALL, batch_size=3))
  # An explicit input shard wins over the process index (an spmd grid's data columns).
  again = text.get_data("stdlib", eval_batch_size=4, shard=(0, 2), **SMALL)
  _assert_same(_take(again.train_batches(7), 2), _take(shares[0].train_batches(7), 2))


def test_stdlib_split_is_by_file_disjoint_and_deterministic():
  root, train, held_out = text.stdlib_files()
  assert (root, train, held_out) == text.stdlib_files()
  assert train == sorted(train) and held_out == sorted(held_out)
  assert not set(train) & set(held_out)
  assert all(f.endswith(".py") and "site-packages" not in f for f in train + held_out)
  assert 0.02 < len(held_out) / (len(train) + len(held_out)) < 0.1
  assert all(os.path.isfile(os.path.join(root, f)) for f in held_out)
  _, train6, held6 = text.stdlib_files(max_files=6)
  assert train6 == train[:6] and held6 == held_out[:6]


def test_lm1b_under_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=40):
    kw = dict(batch_size=4, seq_len=16, seed=0, eval_batch_size=8, cache_dir=str(tmp_path))
    data = text.get_data("lm1b", **kw)
    full = _take(data.train_batches(0), 12)  # ~40 windows per epoch: crosses epochs
    for batch in full:
      assert batch["inputs"].shape == batch["weights"].shape == (4, 16)
      assert batch["inputs"].dtype == np.int32 and np.all(batch["weights"] == 1)
      np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
      assert batch["inputs"].min() >= 1 and batch["inputs"].max() < data.vocab_size
    _assert_same(_take(data.train_batches(9), 3), full[9:])
    _assert_same(_take(data.train_batches(3), 2), full[3:5])
    assert text.get_data("lm1b", **kw).num_train_tokens > 0  # counted once the resume ran
    other = _take(text.get_data("lm1b", **dict(kw, seed=1)).train_batches(0), 2)
    assert not np.array_equal(other[0]["inputs"], full[0]["inputs"])
    weights = np.concatenate([b["weights"] for b in data.eval_batches()])
    assert weights.sum() == data.num_eval_tokens > 0 and weights.shape[1] == 16
    spm = text.get_data("lm1b", **dict(kw, tokenizer="sentencepiece", vocab_size=280))
    assert (tmp_path / "spm_lm1b_280.model").exists()
    batch = next(spm.train_batches(0))
    assert batch["inputs"].shape == (4, 16) and batch["inputs"].max() < spm.vocab_size


def test_bad_arguments():
  with pytest.raises(ValueError, match="lm1b, stdlib"):
    text.get_data("wikitext", batch_size=4, seq_len=8, seed=0)
  with pytest.raises(ValueError, match="cache_dir"):
    text.get_data("stdlib", batch_size=4, seq_len=8, seed=0, tokenizer="sentencepiece")
  with pytest.raises(ValueError, match="bytes, sentencepiece"):
    text.get_data("stdlib", batch_size=4, seq_len=8, seed=0, tokenizer="chars")
