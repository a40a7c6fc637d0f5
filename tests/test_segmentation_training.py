"""Segmentation through the training seam: the README's demo command run to its end and
resumed exactly, mmsegmentation's loss, metrics, schedule and weight-decay rule, and the
segmentation step compiled ahead of time for a TPU slice.
"""

import json
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from focal_jax import weights
from focal_jax.convert.segmentation_names import segmentation_entries
from focal_jax.models.segmenter import create_segmenter
from focal_jax.training import loop, metrics, optim, sharding
from focal_jax.training import train_state as ts
from focal_jax.training.config import load_config_file
from focal_jax.training.tasks import segmentation as seg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_SEG = os.path.join(ROOT, "configs", "demo_seg.py")
# configs/demo_seg.py shrunk: 32x32 crops, narrow heads, 4 steps of batch 8 (one image on
# each of the 8 CPU devices of conftest), a save every 2.
SHRINK = {"image_size": 32, "batch_size": 8, "num_train_steps": 4, "warmup_steps": 2,
          "log_every_steps": 2, "eval_every_steps": 4, "checkpoint_every_steps": 2,
          "eval_steps": 3, "model.overrides.decode_channels": 16,
          "model.overrides.auxiliary_channels": 8}


def test_metrics_match_a_hand_computed_example():
  # 3 classes; class 2 is in neither labels nor predictions (left out of the means);
  # pixels labelled 255 do not count, whatever is predicted there.
  label = np.array([[0, 0, 1, 255], [1, 1, 0, 255]])
  prediction = np.array([[0, 1, 1, 2], [1, 0, 0, 0]])
  totals = seg.intersect_and_union(prediction, label, 3)
  # class 0: labelled {a, b, f}, predicted {a, e, f}: I 2, U 4; class 1: labelled {c, d, e},
  # predicted {b, c, d}: I 2, U 4.
  np.testing.assert_array_equal(totals, [[2, 2, 0], [4, 4, 0], [3, 3, 0], [3, 3, 0]])
  values = seg.segmentation_metrics(totals + seg.intersect_and_union(
      np.array([[1, 1]]), np.array([[1, 0]]), 3))  # a second image: class 0 missed
  # class 0: I 2, U 4 + 1 (labelled 4); class 1: I 2 + 1, U 4 + 2 (labelled 4).
  assert values["mIoU"] == pytest.approx(100 * (2 / 5 + 3 / 6) / 2)
  assert values["mAcc"] == pytest.approx(100 * (2 / 4 + 3 / 4) / 2)
  assert values["aAcc"] == pytest.approx(100 * 5 / 8)
  assert np.isnan(values["iou"][2]) and np.isnan(values["acc"][2])


def test_loss_is_mmsegmentations_default_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=(2, 3, 4)).astype(np.int32)
  labels[0, 0, :] = 255
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_p, np.minimum(labels, 4)[..., None], -1)[..., 0]
  # F.cross_entropy(reduction="none", ignore_index=255).mean(): ignored pixels count as 0
  # in a mean over all 24 pixels (avg_non_ignore=False).
  expected = np.where(labels == 255, 0.0, nll).sum() / labels.size
  got = seg.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # Logits at 1/2 resolution are resized to the labels first (bilinear, align_corners=False).
  small = jnp.asarray(logits[:, :, :2])
  resized = jax.image.resize(small, (2, 3, 4, 5), "bilinear", antialias=False)
  np.testing.assert_allclose(seg.pixel_cross_entropy(small, jnp.asarray(labels)),
                             seg.pixel_cross_entropy(resized, jnp.asarray(labels)), rtol=1e-5)


def test_class_weight_weighs_each_pixel_by_its_label():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=(2, 3, 4)).astype(np.int32)
  labels[1, 2, :] = 255
  weight = np.array([0.5, 1.0, 2.0, 3.0, 0.1], np.float32)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_p, np.minimum(labels, 4)[..., None], -1)[..., 0]
  # F.cross_entropy(weight=w, reduction="none", ignore_index=255).mean(): w[label] * nll.
  expected = np.where(labels == 255, 0.0, weight[np.minimum(labels, 4)] * nll).sum() / labels.size
  got = seg.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), tuple(weight))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  config = load_config_file(DEMO_SEG)
  config.segmentation.class_weight = (1.0,) * 10
  with pytest.raises(ValueError, match="10 values; expected one per class"):
    seg.class_weights(config, 11)


class _FixedLogits:
  """Stands in for the segmenter in the train hook: fixed decode and auxiliary logits."""

  def __init__(self, decode, auxiliary):
    self.logits = (decode, auxiliary)

  def forward_train(self, images):
    del images
    return self.logits


def test_the_demo_trains_with_its_class_weights_on_both_heads():
  # configs/demo_seg.py weighs background 0.1: unweighted, its 89.5 % of the pixels keep
  # the demo from learning the digits (mIoU 8.1 %: background everywhere).
  config = load_config_file(DEMO_SEG)
  weights = seg.class_weights(config, 11)
  assert weights == (1.0,) * 10 + (0.1,)
  rng = np.random.default_rng(2)
  labels = jnp.asarray(rng.integers(0, 11, size=(8, 8, 8)), jnp.int32)
  decode = jnp.asarray(rng.normal(size=(8, 2, 2, 11)), jnp.float32)
  auxiliary = jnp.asarray(rng.normal(size=(8, 1, 1, 11)), jnp.float32)
  mesh = sharding.make_mesh()
  spec = types.SimpleNamespace(num_classes=11)
  hooks = seg.train_hooks(config, spec, mesh)
  images = jnp.zeros((8, 8, 8, 3), jnp.float32)
  got = hooks.loss(_FixedLogits(decode, auxiliary), (images, labels))
  expected = (seg.pixel_cross_entropy(decode, labels, weights)
              + 0.4 * seg.pixel_cross_entropy(auxiliary, labels, weights))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  unweighted = seg.pixel_cross_entropy(decode, labels) + 0.4 * seg.pixel_cross_entropy(
      auxiliary, labels)
  assert abs(float(got) - float(unweighted)) > 1e-3


def test_segmentation_knobs_reach_the_training_transforms():
  config = load_config_file(DEMO_SEG)
  config.segmentation.ratio_range = (0.8, 1.25)
  config.segmentation.cat_max_ratio = 1.0
  config.segmentation.hflip = 0.0
  config.segmentation.photometric = False
  transforms = seg.augment_config(config)
  assert (transforms.crop_size, transforms.ratio_range, transforms.cat_max_ratio,
          transforms.hflip, transforms.photometric) == (64, (0.8, 1.25), 1.0, 0.0, False)


def test_weight_decay_follows_the_substring_rule_on_official_names():
  spec = ts.model_spec("focal_tiny", 150, 512, {}, 0, create_segmenter)
  mask = seg.decay_mask(spec)(nnx.to_pure_dict(spec.abstract_params))
  official = {tuple(e.path): e.key for e in segmentation_entries(nnx.eval_shape(spec.create))
              if e.path is not None}
  decayed = {}
  for path, decays in jax.tree_util.tree_leaves_with_path(mask):
    keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    name = official[keys]
    assert decays == (not any(s in name for s in ("absolute_pos_embed",
                                                  "relative_position_bias_table", "norm"))), name
    decayed[name] = decays
  assert not decayed["backbone.norm0.weight"] and not decayed["backbone.norm0.bias"]
  assert not decayed["backbone.layers.0.blocks.0.norm1.weight"]
  assert not decayed["backbone.patch_embed.norm.bias"]
  assert not decayed["backbone.layers.0.blocks.0.attn.relative_position_bias_table_to_neighbors"]
  assert decayed["decode_head.fpn_bottleneck.bn.weight"]  # "bn": the heads' BN decays
  assert decayed["decode_head.conv_seg.bias"] and decayed["backbone.layers.0.blocks.0.mlp.fc1.bias"]


def test_poly_schedule_is_mmcvs_with_linear_warmup():
  rates = optim.LearningRates(peak=6e-5, warmup=6e-11, minimum=0.0)
  schedule = optim.poly_schedule(rates, 1500, 160_000, 1.0)
  poly = lambda t: 6e-5 * (1 - t / 160_000)  # noqa: E731
  assert float(schedule(0)) == pytest.approx(poly(0) * 1e-6, rel=1e-4)
  assert float(schedule(750)) == pytest.approx(poly(750) * (1 - 0.5 * (1 - 1e-6)), rel=1e-5)
  assert float(schedule(1500)) == pytest.approx(poly(1500), rel=1e-5)
  assert float(schedule(80_000)) == pytest.approx(3e-5, rel=1e-5)
  assert float(schedule(160_000)) == 0.0


def _shrunk() -> ml_collections.ConfigDict:
  config = load_config_file(DEMO_SEG)
  for key, value in SHRINK.items():
    node = config
    *parents, last = key.split(".")
    for parent in parents:
      node = node[parent]
    node[last] = value
  return config


def test_readme_demo_command_runs_to_its_end_and_resumes_exactly(tmp_path):
  workdir = str(tmp_path / "demo_seg")
  command = [sys.executable, "main.py", "--config", DEMO_SEG, "--workdir", workdir,
             *(f"--config.{k}={v}" for k, v in SHRINK.items())]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "PYTHONPATH": ROOT})
  assert done.returncode == 0, done.stderr[-3000:]
  records = metrics.read_metrics(workdir)
  evals = [r for r in records if "eval/mIoU" in r]
  assert len(evals) == 1 and evals[0]["step"] == 4 and evals[0]["eval/examples"] == 3
  assert 0 <= evals[0]["eval/mIoU"] <= 100 and 0 < evals[0]["eval/aAcc"] <= 100
  per_class = json.loads(open(os.path.join(workdir, "eval_per_class.json")).read())
  assert len(per_class["IoU"]) == 11 and per_class["mIoU"] == evals[0]["eval/mIoU"]
  exported = weights.load_exported_params(os.path.join(workdir, "export"))
  # The export holds the BatchNorm statistics, moved by training.
  bn = exported["decode_head"]["fpn_bottleneck"]["bn"]
  assert int(bn["num_batches_tracked"]) == 4 and float(np.abs(bn["mean"]).sum()) > 0

  # Resume from the step-2 checkpoint: the same records and the same final state.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  result = loop.train_and_evaluate(_shrunk(), workdir)
  assert result.step == 4
  strip = lambda rs: [{k: v for k, v in r.items() if k != "train/img_per_sec"} for r in rs]  # noqa: E731
  assert strip(metrics.read_metrics(workdir)) == strip(records)
  again = ts.model_variables(jax.device_get(result.state.params),
                             jax.device_get(result.state.batch_stats))
  assert _flat(again).keys() == _flat(exported).keys()
  for name, value in _flat(again).items():
    np.testing.assert_array_equal(value, _flat(exported)[name], err_msg=name)

  # The multi-scale + flip column, evaluated from the workdir's last checkpoint.
  config = _shrunk()
  config.mode = "eval"
  config.segmentation.eval_scales = (0.75, 1.0)
  config.segmentation.eval_flip = True
  result = loop.train_and_evaluate(config, workdir)
  assert result.step == 4 and result.eval_metrics["eval/examples"] == 3
  assert 0 <= result.eval_metrics["eval/mIoU"] <= 100
  config.segmentation.eval_scales = ()
  with pytest.raises(ValueError, match="eval_scales"):
    loop.train_and_evaluate(config, workdir)


def _flat(tree) -> dict[str, np.ndarray]:
  """{'a.0.b': array}: exports read back with string keys where the model has integers."""
  return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
          np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("config_name,model_name,params", [
    ("upernet_focal_tiny_ade20k", None, 60_844_352),
    ("upernet_focal_small_ade20k", None, 83_105_912),
    ("upernet_focal_base_ade20k", None, 123_740_844),
    ("upernet_focal_tiny_ade20k", "focalnet_tiny_srf", 60_822_512)])
def test_ade20k_configs_build_the_recipe_and_the_readme_models(config_name, model_name, params):
  """The README's ADE20K commands: each config passes validation and builds (abstractly) the
  UPerNet of the parameter table, with the recipe's optimiser and schedule settings; the
  FocalNet backbones train from the same config with model.name replaced."""
  from focal_jax.training.config import validate_config
  from focal_jax.training.tasks import get_task

  config = load_config_file(os.path.join(ROOT, "configs", f"{config_name}.py"))
  if model_name:
    config.model.name = model_name
  validate_config(config)
  assert (config.task, config.dataset, config.image_size) == ("segmentation", "ade20k", 512)
  assert (config.base_lr, config.weight_decay, config.lr_schedule) == (6e-5, 0.01, "poly")
  assert (config.batch_size, config.num_train_steps, config.warmup_steps) == (16, 160_000, 1500)
  assert config.model.overrides.drop_path_rate == 0.3 and config.mixup.prob == 0.0
  spec = get_task(config).model_spec(config, 150)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract_params))
  assert count == params
