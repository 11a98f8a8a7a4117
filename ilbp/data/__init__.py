"""Input pipelines: image classification (TFDS, scikit-learn digits) and language modelling."""

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
