"""Input pipelines: image classification (TFDS, scikit-learn digits) and language modelling."""

import os

import jax


def input_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
  """`(index, count)` of the share of the data this process loads: `shard`, or by default its
  process index and count (`ilbp.execution.factory.input_shard` for executors that feed
  otherwise)."""
  return (jax.process_index(), jax.process_count()) if shard is None else tuple(shard)


def per_shard(global_size: int, what: str, shards: int) -> int:
  """The share of a global batch one process loads (one of `shards` equal shares)."""
  if global_size <= 0 or global_size % shards:
    raise ValueError(
      f"{what}={global_size} must be a positive multiple of the number of input shares "
      f"({shards}: one per process, or per group of processes feeding the same devices)."
    )
  return global_size // shards


def write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file and a rename.

  Runs sharing a cache directory may race; a reader must never see a half-written file.
  """
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
