"""Exact evaluation: padded batches with a mask, so every example counts exactly once for
any batch size, device count and process count. Top-1, top-5, loss and the example count.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from focal_jax.training import sharding
from focal_jax.training.train_state import ModelSpec


def eval_batch_size(requested: int, mesh: Mesh) -> int:
  """`requested` rounded up to a multiple of the devices the batch is split over."""
  divisor = sharding.batch_divisor(mesh)
  return max(1, math.ceil(requested / divisor)) * divisor


def make_eval_step(spec: ModelSpec, mesh: Mesh, params_shardings: Any, rest_shardings: Any,
                   precision: str = "default") -> Callable:
  """Jitted `eval_step(params, batch, rest) -> sums` over masked examples.

  batch: {"image": [B, H, W, 3], "label": int32 [B], "mask": bool [B]} (global arrays).
  Returns int32 counts {"top1", "top5", "examples"} and float32 {"loss"} summed over the
  real (mask True) examples of the batch. Float32 products run at `precision`
  (jax.default_matmul_precision: "default", "high" or "highest").
  """
  top = min(5, spec.num_classes)

  def eval_step(params, batch, rest):
    model = nnx.merge(spec.eval_graphdef, params, rest)
    with jax.default_matmul_precision(precision):
      logits = model(batch["image"]).astype(jnp.float32)  # [B, K]
    labels, mask = batch["label"], batch["mask"]
    top1 = jnp.argmax(logits, axis=-1) == labels
    _, top_k = jax.lax.top_k(logits, top)  # [B, top]
    top5 = jnp.any(top_k == labels[:, None], axis=-1)
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"top1": jnp.sum(top1 & mask, dtype=jnp.int32),
            "top5": jnp.sum(top5 & mask, dtype=jnp.int32),
            "examples": jnp.sum(mask, dtype=jnp.int32),
            "loss": jnp.sum(jnp.where(mask, loss, 0.0))}

  batch_sharding = sharding.batch_sharding(mesh)
  return jax.jit(eval_step,
                 in_shardings=(params_shardings, {"image": batch_sharding, "label": batch_sharding,
                                                  "mask": batch_sharding}, rest_shardings),
                 out_shardings=sharding.replicated(mesh))


def evaluate(eval_step: Callable, params: Any, rest: Any, batches: Iterable[dict[str, np.ndarray]],
             mesh: Mesh, max_batches: int = -1) -> dict[str, float]:
  """Runs `eval_step` over process-local batches; returns eval/top1, eval/top5 (in %),
  eval/loss and eval/examples (the exact count of real examples seen)."""
  totals = {"top1": 0, "top5": 0, "examples": 0, "loss": 0.0}
  pending = []
  for index, local in enumerate(batches):
    if 0 <= max_batches <= index:
      break
    batch = sharding.global_batch(
        {"image": local["image"], "label": local["label"], "mask": local["mask"]}, mesh)
    pending.append(eval_step(params, batch, rest))
  for sums in jax.device_get(pending):
    for key in totals:
      totals[key] += sums[key].item()
  count = totals["examples"]
  if count == 0:
    raise ValueError("The evaluation split yielded no examples; check eval_split and data_dir.")
  return {"eval/top1": 100.0 * totals["top1"] / count, "eval/top5": 100.0 * totals["top5"] / count,
          "eval/loss": totals["loss"] / count, "eval/examples": int(count)}


def padded_batches(images: np.ndarray, labels: np.ndarray, batch_size: int
                   ) -> Iterator[dict[str, np.ndarray]]:
  """In-memory arrays as eval batches of exactly `batch_size`: the last one zero-padded,
  with "mask" False on the padding. images [N, H, W, C], labels [N]."""
  count = len(labels)
  for start in range(0, max(count, 1), batch_size):
    image = images[start:start + batch_size]
    label = labels[start:start + batch_size]
    pad = batch_size - len(label)
    mask = np.concatenate([np.ones(len(label), bool), np.zeros(pad, bool)])
    if pad:
      image = np.concatenate([image, np.zeros((pad, *images.shape[1:]), images.dtype)])
      label = np.concatenate([label, np.zeros(pad, labels.dtype)])
    yield {"image": image, "label": label.astype(np.int32), "mask": mask}
