"""What a head's logits are scored against: classification and language modelling.

A task turns a batch into the network input, gives the training loss with its metrics, and
gives evaluation *sums* plus a count, so metrics are divided only after aggregating over
batches and devices and padded examples (weight 0) never count (docs/design.md, "Honest
metrics").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


class _Batch:
  """A task's split of a batch: the network input (`input_key`), and the rest."""

  input_key: str

  def inputs(self, batch: dict) -> jax.Array:
    return batch[self.input_key]

  def targets(self, batch: dict) -> dict:
    """Everything the losses read: the batch without the network input, so that pipeline
    stages 2..K never receive images or tokens."""
    return {k: v for k, v in batch.items() if k != self.input_key}


@dataclasses.dataclass(frozen=True)
class Classification(_Batch):
  """Image classification: batch {"image", "label"[, "mask"]}, logits [B, C]."""

  input_key: str = "image"
  label_smoothing: float = 0.0

  def loss(self, logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
    """Mean cross-entropy (with optional label smoothing) and accuracy over the batch."""
    labels = batch["label"]
    if self.label_smoothing:
      num_classes = logits.shape[-1]
      targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), self.label_smoothing)
      loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
    else:
      loss = _cross_entropy(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, {"accuracy": accuracy}

  def eval_sums(self, logits: jax.Array, batch: dict) -> dict:
    """Sums of loss and correct predictions, and the count, over real (mask 1) examples."""
    labels = batch["label"]
    mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32))
    return {
      "loss": jnp.sum(_cross_entropy(logits, labels) * mask),
      "accuracy": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
      "count": jnp.sum(mask),
    }

  @staticmethod
  def finalize(sums: dict) -> dict:
    count = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss"]) / count, "accuracy": float(sums["accuracy"]) / count}


@dataclasses.dataclass(frozen=True)
class LanguageModeling(_Batch):
  """Next-token prediction: batch {"inputs", "targets", "weights"}, logits [B, L, V]."""

  input_key: str = "inputs"

  def loss(self, logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
    """Token-weighted mean cross-entropy and token accuracy (padding has weight 0)."""
    weights = batch["weights"]
    denom = jnp.maximum(jnp.sum(weights), 1.0)
    loss = jnp.sum(_cross_entropy(logits, batch["targets"]) * weights) / denom
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * weights) / denom
    return loss, {"accuracy": correct}

  def eval_sums(self, logits: jax.Array, batch: dict) -> dict:
    """Token-weighted sums of loss and correct predictions, and the number of real tokens."""
    weights = batch["weights"]
    return {
      "loss": jnp.sum(_cross_entropy(logits, batch["targets"]) * weights),
      "accuracy": jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * weights),
      "count": jnp.sum(weights),
    }

  @staticmethod
  def finalize(sums: dict) -> dict:
    count = max(float(sums["count"]), 1.0)
    loss = float(sums["loss"]) / count
    # Perplexity from the token-weighted mean loss: exp of a mean, not a mean of exps.
    return {
      "loss": loss,
      "accuracy": float(sums["accuracy"]) / count,
      "perplexity": float(jnp.exp(min(loss, 80.0))),
    }
