"""Tests of focal_jax.training: schedule, weight-decay mask, configs, sharded equivalence,
exact evaluation, the end-to-end loop, resume and restore onto another device count.

A two-stage Focal Transformer at 16x16 (a ring and a pooled level in stage 1, the
single-window fallback in stage 2) keeps compilation short: the training code does not
care about depth. A persistent compilation cache lets repeated runs of the same program
(resume tests) skip recompiling.
"""

from __future__ import annotations

import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import focal_jax
from focal_jax import weights
from focal_jax.training import checkpoint, evaluate, input, loop, metrics, optim, sharding
from focal_jax.training import train_state as ts
from focal_jax.training.config import (default_config, load_config_file, model_overrides,
                                       validate_config)
from focal_jax.training.train_step import make_train_step

TINY = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), focal_levels=(2, 2), window_size=2,
            focal_windows=(3, 1), expand_sizes=(1, 1), drop_path_rate=0.1)
SIZE = 16


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Identical programs compiled again (a resumed run) come from a disk cache."""
  previous = {k: getattr(jax.config, k) for k in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for key, value in previous.items():
    jax.config.update(key, value)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """A TFDS data dir with the built-in focal_digits prepared (a few seconds)."""
  path = str(tmp_path_factory.mktemp("tfds"))
  focal_jax.data.get_builder("focal_digits", path)
  return path


def tiny_config(**changes):
  config = default_config()
  config.model.name = ""
  config.model.overrides = dict(TINY)
  config.image_size = SIZE
  config.batch_size = 16
  config.mixup.group_size = 8
  config.augment.randaugment = ""
  config.augment.crop_pct = 1.0
  config.num_train_steps = 2
  config.warmup_epochs = 0.0
  config.base_lr = 1e-3
  config.lr_base_batch_size = 16
  config.log_every_steps = 1
  config.eval_every_steps = 1000
  config.shuffle_buffer = 64
  config.data_threads = 1
  for key, value in changes.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def random_batch(seed, batch=16, size=SIZE, classes=10):
  rng = np.random.default_rng(seed)
  return {"image": rng.standard_normal((batch, size, size, 3)).astype(np.float32),
          "label": rng.integers(0, classes, batch).astype(np.int32)}


def build(config, mesh, num_classes=10, init=True):
  """(spec, shardings, state, rest, rest shardings, jitted train step), no dataset."""
  spec = ts.model_spec_from_config(config, num_classes)
  schedule = optim.schedule_fn(config, 10, config.num_train_steps)
  tx = optim.make_optimizer(config, schedule)
  _, shardings = ts.state_shardings(tx, spec, mesh, config.ema_decay > 0)
  state = ts.create_train_state(spec, tx, shardings, mesh, config.seed) if init else None
  rest = ts.init_rest(spec, mesh)
  rest_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), rest)
  step = make_train_step(config, spec, tx, schedule, mesh, shardings, rest_shardings)
  return spec, shardings, state, rest, rest_shardings, step


def flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


# ----------------------------------------------------------------------------------------
# Optimiser: schedule and weight-decay mask.
# ----------------------------------------------------------------------------------------


def test_lr_schedule_pinned_at_key_steps():
  config = default_config()
  config.batch_size = 1024  # rates scale by 1024 / 512 = 2
  rates = optim.scaled_learning_rates(config)
  assert (rates.peak, rates.warmup, rates.minimum) == pytest.approx((1e-3, 1e-6, 1e-5))
  steps_per_epoch = 100
  total = 300 * steps_per_epoch
  schedule = optim.schedule_fn(config, steps_per_epoch, total)
  warmup = 20 * steps_per_epoch
  # Step 0: the warmup LR; linear in between.
  assert float(schedule(0)) == pytest.approx(1e-6, rel=1e-5)
  assert float(schedule(warmup // 2)) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6), rel=1e-5)
  # End of warmup: timm's cosine measured from step 0 (slightly under the peak).
  at_warmup = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * warmup / total))
  assert float(schedule(warmup)) == pytest.approx(at_warmup, rel=1e-5)
  assert float(schedule(warmup)) < 1e-3
  # Middle: halfway between peak and min; end and beyond: the min LR.
  assert float(schedule(total // 2)) == pytest.approx(0.5 * (1e-3 + 1e-5), rel=1e-5)
  assert float(schedule(total)) == pytest.approx(1e-5, rel=1e-5)
  assert float(schedule(total + 500)) == pytest.approx(1e-5, rel=1e-5)
  # Monotone: up during warmup, down after.
  values = np.asarray(jax.vmap(schedule)(jnp.arange(0, total, 97)))
  split = warmup // 97 + 1
  assert np.all(np.diff(values[:split]) > 0) and np.all(np.diff(values[split:]) <= 0)


def test_focalnet_weight_decay_follows_its_official_rule():
  """FocalNet's no_weight_decay() and no_weight_decay_keywords() are {''}: the official
  set_weight_decay exempts every parameter of every FocalNet (its names all hold '')."""
  import types  # noqa: PLC0415

  from focal_jax.convert import focalnet_names  # noqa: PLC0415
  from focal_jax.training.tasks import classification  # noqa: PLC0415

  model = nnx.eval_shape(lambda: focal_jax.create_model(
      "focalnet_tiny_lrf", num_classes=10, depths=(1, 1, 2, 1), embed_dim=16))
  official = focalnet_names.official_entries(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  names = [e.key for e in official]
  assert "layers.0.blocks.0.modulation.f.weight" in names and "head.weight" in names
  assert optim.model_family("focalnet_tiny_lrf") == "focalnet"
  assert optim.model_family("focal_tiny") == optim.model_family("focalv2_tiny") == "focal"
  assert not any(optim.decays(name, (16, 16), "focalnet") for name in names)
  assert optim.decays("layers.0.blocks.0.modulation.f.weight", (16, 16), "focal")
  mask = classification.decay_mask(types.SimpleNamespace(name="focalnet_tiny_lrf"))(params)
  leaves = jax.tree.leaves(mask)
  assert len(leaves) == len(names) and not any(leaves)
  focal_rule = classification.decay_mask(types.SimpleNamespace(name="focal_tiny"))(params)
  decayed = {jax.tree_util.keystr(k, simple=True, separator=".")
             for k, v in jax.tree_util.tree_leaves_with_path(focal_rule) if v}
  assert "layers.0.blocks.0.modulation.focal_layers.0.kernel" in decayed  # what FocalNet spares


def test_weight_decay_mask_follows_the_official_rule():
  model = nnx.eval_shape(lambda: focal_jax.create_model(
      None, num_classes=10, img_size=SIZE, ape=True, use_layerscale=True, **TINY))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # ShapeDtypeStruct leaves
  mask = {jax.tree_util.keystr(k, simple=True, separator="."): bool(v)
          for k, v in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))}
  decayed = {k for k, v in mask.items() if v}
  # Decayed: every matrix / conv kernel, including the fc pooling weights (2-D officially).
  for name in ("patch_embed.proj.kernel", "layers.0.blocks.0.attn.qkv.kernel",
               "layers.0.blocks.0.attn.proj.kernel", "layers.0.blocks.0.mlp.fc1.kernel",
               "layers.0.blocks.0.mlp.fc2.kernel", "layers.0.blocks.0.pool_layers.0.kernel",
               "layers.0.downsample.proj.kernel", "head.kernel"):
    assert mask[name], name
  # Not decayed: norms, biases, layerscale, the absolute position embedding, all three
  # relative-position tables (the official skip list and keywords).
  for name in ("patch_embed.norm.scale", "patch_embed.norm.bias", "patch_embed.proj.bias",
               "layers.0.blocks.0.norm1.scale", "layers.0.blocks.0.attn.qkv.bias",
               "layers.0.blocks.0.pool_layers.0.bias", "layers.0.blocks.0.gamma_1",
               "absolute_pos_embed", "layers.0.blocks.0.attn.relative_position_bias_table",
               "layers.0.blocks.0.attn.relative_position_bias_table_to_neighbors",
               "layers.0.blocks.0.attn.relative_position_bias_table_to_windows.0",
               "norm.scale", "head.bias"):
    assert not mask[name], name
  # Exactly the >= 2-D tensors that are neither position tables nor the embedding decay.
  expected = {k for k, v in jax.tree_util.tree_leaves_with_path(params)
              for k in [jax.tree_util.keystr(k, simple=True, separator=".")]
              if len(v.shape) > 1 and "relative_position_bias_table" not in k
              and k != "absolute_pos_embed"}
  assert decayed == expected
  assert len(decayed) == 2 * 5 + 2 + 1  # 2 blocks x (qkv, proj, fc1, fc2, pool); 2 convs; head


def test_adamw_decays_only_masked_parameters():
  config = default_config()
  params = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones((2,))}}
  tx = optim.make_optimizer(config, lambda step: 0.1)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  assert np.allclose(updates["w"], -0.1 * 0.05)  # lr * weight_decay * w
  assert np.allclose(updates["norm"]["scale"], 0.0)


# ----------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------


def test_unknown_config_key_and_variant_fail_at_once():
  config = default_config()
  config.batchsize = 64
  with pytest.raises(ValueError, match=r"'batchsize' \(did you mean 'batch_size'\?\)"):
    validate_config(config)
  config = default_config()
  config.model.name = "focal_huge"
  with pytest.raises(ValueError, match="Unknown model variant.*focal_tiny"):
    validate_config(config)
  config = default_config()
  config.model.overrides.embed_dims = 64
  with pytest.raises(ValueError, match="Unknown model option"):
    validate_config(config)


@pytest.mark.parametrize("name", ["base", "demo", "demo_finetune", "finetune", "focal_tiny",
                                  "focal_tiny_conv", "focal_small", "focal_small_conv",
                                  "focal_base", "focal_base_conv", "focalv2_tiny", "focalv2_small",
                                  "focalv2_base"])
def test_config_files_are_valid(name):
  config = load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py"))
  validate_config(config)
  if name.startswith(("focal_", "focalv2_")):
    assert config.model.name == name
    expected_drop = {"tiny": 0.2, "small": 0.3, "base": 0.5}[name.split("_")[1]]
    assert config.model.overrides.drop_path_rate == expected_drop
    assert optim.scaled_learning_rates(config).peak == pytest.approx(1e-3)  # 5e-4 * 1024 / 512


def _command_line_config(monkeypatch, *args):
  """The config `python main.py --config configs/base.py ARGS` trains (main.py's flag)."""
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415
  argv = ["main.py", "--config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                              "base.py"), *args]
  monkeypatch.setattr("sys.argv", argv)  # the override flags are read from sys.argv
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize("name", sorted(focal_jax.VARIANTS))
def test_variant_name_on_the_command_line_brings_its_drop_path_rate(monkeypatch, name):
  """--config.model.name=focal_base on configs/base.py trains Focal-B's recipe rate (0.5),
  not Focal-T's (SPEC: T 0.2, S 0.3, B 0.5; conv and Focal-fast alike)."""
  config = _command_line_config(monkeypatch, f"--config.model.name={name}")
  validate_config(config)
  expected = {"tiny": 0.2, "small": 0.3, "base": 0.5}[name.split("_")[1]]
  overrides = model_overrides(config)  # what the model and the checkpoint's description get
  assert overrides["drop_path_rate"] == expected
  assert focal_jax.make_config(config.model.name, **overrides).drop_path_rate == expected


def test_explicit_drop_path_rate_beats_the_variant(monkeypatch):
  config = _command_line_config(monkeypatch, "--config.model.name=focal_base",
                                "--config.model.overrides.drop_path_rate=0.1")
  assert model_overrides(config)["drop_path_rate"] == 0.1
  config = default_config()
  config.model.name = ""  # a model from overrides alone keeps the base recipe's rate
  assert model_overrides(config)["drop_path_rate"] == 0.2


def test_load_config_file_passes_its_argument_and_names_a_bad_file(tmp_path):
  path = tmp_path / "sized.py"
  path.write_text("from focal_jax.training.config import default_config\n\n\n"
                  "def get_config(arg='32'):\n"
                  "  config = default_config()\n  config.image_size = int(arg)\n  return config\n")
  assert load_config_file(path).image_size == 32
  assert load_config_file(str(path), "64").image_size == 64
  with pytest.raises(FileNotFoundError, match="missing.py"):
    load_config_file(tmp_path / "missing.py")
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(ValueError, match="empty.py defines no get_config"):
    load_config_file(tmp_path / "empty.py")


# ----------------------------------------------------------------------------------------
# Sharding: 8 devices (data 2 x fsdp 4) against one device.
# ----------------------------------------------------------------------------------------


def test_fsdp_shards_parameters_by_logical_rules():
  mesh = sharding.make_mesh(2, 4)
  spec = ts.model_spec_from_config(tiny_config(), 10)
  shardings = sharding.param_shardings(spec.abstract_params, mesh)
  layer = shardings["layers"][0]["blocks"][0]
  assert layer["attn"]["qkv"]["kernel"].spec == jax.P("fsdp", None)
  assert layer["mlp"]["fc2"]["kernel"].spec == jax.P(None, "fsdp")
  assert layer["norm1"]["scale"].spec == jax.P(None)
  assert shardings["patch_embed"]["proj"]["kernel"].spec == jax.P(None, None, None, "fsdp")
  assert sharding.logical_to_mesh_spec(("embed", "mlp"), (6, 8), mesh) == jax.P(None, None)


def test_sharded_step_matches_one_device_and_compiles_once():
  """Same losses and parameters on data 2 x fsdp 4 as on one device, after 3 steps with
  mixup, stochastic depth and gradient accumulation.

  Tolerance (float32; the devices sum in a different order): loss and gradient norm rtol
  1e-6; parameters mean |diff| < 1e-8 and every entry within 5e-5 (5% of one AdamW update
  at lr 1e-3). Adam divides by sqrt(v) + 1e-8, so rounding in near-zero gradients is
  amplified for a handful of entries: measured mean 7.7e-10, max 5.8e-6, 1 of 19,447
  entries above 1e-6 (with a 4-stage model: max 1.05e-5, 17 of 311,404).
  """
  config = tiny_config(grad_accum_steps=2, num_train_steps=3)
  one, eight = sharding.make_mesh(1, 1), sharding.make_mesh(2, 4)
  *_, state, rest, _, step = build(config, one)
  _, shardings_8, _, rest_8, _, step_8 = build(config, eight, init=False)
  state_8 = jax.device_put(jax.tree.map(jnp.copy, state), shardings_8)  # the same start
  metrics_1, metrics_8 = [], []
  for i in range(3):
    state, m1 = step(state, sharding.global_batch(random_batch(i), one), rest)
    state_8, m8 = step_8(state_8, sharding.global_batch(random_batch(i), eight), rest_8)
    metrics_1.append(jax.device_get(m1))
    metrics_8.append(jax.device_get(m8))
  assert step._cache_size() == 1 and step_8._cache_size() == 1, "recompiled after step 1"
  leaf = state_8.params["layers"][0]["blocks"][0]["attn"]["qkv"]["kernel"]
  assert leaf.sharding.spec == jax.P("fsdp", None) and len(leaf.sharding.device_set) == 8
  assert int(state.step) == int(state_8.step) == 3
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([m[key] for m in metrics_8], [m[key] for m in metrics_1],
                               rtol=1e-6, err_msg=key)
  assert metrics_1[0]["loss"] != metrics_1[1]["loss"]  # the steps really differ
  params_1, params_8 = flat(state.params), flat(state_8.params)
  diffs = np.concatenate([np.abs(params_8[k] - params_1[k]).ravel() for k in params_1])
  assert diffs.mean() < 1e-8, diffs.mean()
  assert diffs.max() < 5e-5, diffs.max()


# ----------------------------------------------------------------------------------------
# Exact evaluation.
# ----------------------------------------------------------------------------------------


def test_eval_counts_every_example_once_on_eight_devices():
  mesh = sharding.make_mesh(2, 4)
  config = tiny_config()
  spec = ts.model_spec_from_config(config, 10)
  params_shardings = sharding.param_shardings(spec.abstract_params, mesh)
  params = ts.init_params(spec, params_shardings)
  rest = ts.init_rest(spec, mesh)
  rest_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), rest)
  eval_step = evaluate.make_eval_step(spec, mesh, params_shardings, rest_shardings)
  data = random_batch(7, batch=37)
  # The reference: one forward pass over all 37 on one device, no padding.
  forward = jax.jit(lambda p, r, x: nnx.merge(spec.eval_graphdef, p, r)(x))
  logits = np.asarray(forward(jax.device_get(params), jax.device_get(rest), data["image"]))
  # Make some predictions right so top-1 is not trivially ~10%.
  labels = data["label"].copy()
  labels[::2] = logits[::2].argmax(-1)
  results = evaluate.evaluate(eval_step, params, rest,
                              evaluate.padded_batches(data["image"], labels, 16), mesh)
  assert results["eval/examples"] == 37
  top1 = 100 * np.mean(logits.argmax(-1) == labels)
  top5 = 100 * np.mean([label in np.argsort(-row)[:5] for row, label in zip(logits, labels)])
  assert results["eval/top1"] == pytest.approx(top1)
  assert results["eval/top5"] == pytest.approx(top5)
  assert top1 >= 50
  # An eval batch that does not divide the devices is rounded up, never dropped.
  assert evaluate.eval_batch_size(12, mesh) == 16


# ----------------------------------------------------------------------------------------
# The loop: end to end, resume, other device counts, export.
# ----------------------------------------------------------------------------------------


def test_one_step_end_to_end(tmp_path, digits_dir):
  """One step on the built-in focal_digits (TFDS): metrics, checkpoint, curves, export."""
  workdir = str(tmp_path / "run")
  config = tiny_config(dataset="focal_digits", data_dir=digits_dir, eval_split="test",
                       num_train_steps=1, eval_batch_size=16, ema_decay=0.5,
                       **{"mesh.data": 1})  # sharding is tested above
  result = loop.train_and_evaluate(config, workdir)
  assert result.step == 1
  records = metrics.read_metrics(workdir)
  train = [r for r in records if "train/loss" in r]
  evals = [r for r in records if "eval/top1" in r]
  assert [r["step"] for r in train] == [1] and np.isfinite(train[0]["train/loss"])
  assert train[0]["train/lr"] == pytest.approx(1e-3)
  assert len(evals) == 1 and evals[0]["step"] == 1 and evals[0]["eval/examples"] == 364
  assert 0 <= evals[0]["eval/top1"] <= evals[0]["eval/top5"] <= 100
  assert evals[0]["eval_ema/examples"] == 364  # the EMA parameters are evaluated too
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  assert os.path.getsize(os.path.join(workdir, metrics.CURVES_FILE)) > 1000
  # TensorBoard event files that TensorFlow's own reader accepts (CRCs checked).
  import tensorflow as tf  # noqa: PLC0415
  events_dir = os.path.join(workdir, metrics.TENSORBOARD_DIR)
  scalars = {}
  for name in os.listdir(events_dir):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(events_dir, name)):
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = value.simple_value
  assert scalars[("train/loss", 1)] == pytest.approx(train[0]["train/loss"])
  assert scalars[("eval/examples", 1)] == 364
  # The export rebuilds the trained model for inference.
  model = weights.load_exported_model(os.path.join(workdir, loop.EXPORT_DIR))
  assert model.config.num_classes == 10 and model.config.embed_dim == 16
  trained = flat(result.state.params)
  exported = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert trained.keys() == exported.keys()
  assert all(np.array_equal(trained[k], exported[k]) for k in trained)
  # So does the workdir's checkpoint (what the conversion CLI reads from a workdir).
  model, description = weights.load_workdir_model(workdir)
  assert description["overrides"]["embed_dim"] == 16
  from_workdir = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert all(np.array_equal(trained[k], from_workdir[k]) for k in trained)
  # EMA after one step from a copy of the initial parameters: 0.5 * (init + trained).
  ema_model, _ = weights.load_workdir_model(workdir, ema=True)
  ema = flat(nnx.to_pure_dict(nnx.state(ema_model, nnx.Param)))
  assert all(np.array_equal(ema[k], flat(result.state.ema_params)[k]) for k in trained)
  assert not all(np.array_equal(ema[k], trained[k]) for k in trained)


def test_a_restart_rewrites_the_steps_after_its_checkpoint_for_tensorboard_too(tmp_path):
  """A first run logs steps 1-6 and dies; the rerun resumes from step 3 and logs 4-6 again
  (other values, as after a change of data): metrics.jsonl and TensorBoard's own loader
  both hold each step once, with the rerun's values. An evaluation (step -1, an export)
  logged before is kept."""
  from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415
  workdir = str(tmp_path / "run")
  evaluation = metrics.MetricWriter(workdir)
  evaluation.write(-1, {"eval/top1": 50.0})
  evaluation.close()
  first = metrics.MetricWriter(workdir, resume_step=0)
  for step in range(1, 7):
    first.write(step, {"train/loss": float(step)})
  first.close()
  rerun = metrics.MetricWriter(workdir, resume_step=3)
  for step in range(4, 7):
    rerun.write(step, {"train/loss": 10.0 * step})
  rerun.close()
  expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
  assert [(r["step"], r["train/loss"]) for r in metrics.read_metrics(workdir)
          if "train/loss" in r] == expected
  loader = event_accumulator.EventAccumulator(os.path.join(workdir, metrics.TENSORBOARD_DIR))
  loader.Reload()
  assert [(e.step, e.value) for e in loader.Scalars("train/loss")] == expected
  assert [(e.step, e.value) for e in loader.Scalars("eval/top1")] == [(-1, 50.0)]


def test_loop_runs_on_mock_imagenet(tmp_path):
  """The imagenet2012 path (1000 classes, JPEGs of random sizes) through the loop, with
  bfloat16 compute (parameters stay float32). Mocked data needs no preparation, so no
  manual tars are asked for (the real builder is tested on generated tars in test_data.py)."""
  import tensorflow_datasets as tfds  # noqa: PLC0415
  config = tiny_config(dataset="imagenet2012", num_train_steps=1, eval_batch_size=8,
                       dtype="bfloat16", **{"mesh.data": 1})
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    result = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert result.step == 1 and result.eval_metrics["eval/examples"] == 20
  assert result.state.params["head"]["kernel"].shape == (32, 1000)
  assert result.state.params["head"]["kernel"].dtype == jnp.float32
  assert np.isfinite(result.eval_metrics["eval/loss"])


def _stop_after(monkeypatch, batches_before_stop):
  """Delivers SIGTERM to the loop (as a preemption would) when it asks for batch N+1."""
  original = input.train_batches

  def train_batches(*args, **kwargs):
    iterator = original(*args, **kwargs)
    for index, batch in enumerate(iterator):
      if index == batches_before_stop:
        # The loop's SIGTERM handler, called as the interpreter would on a preemption signal.
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
      yield batch

  monkeypatch.setattr(input, "train_batches", train_batches)


def test_resume_continues_exactly_and_restores_on_another_device_count(
    tmp_path, digits_dir, monkeypatch):
  config = tiny_config(dataset="focal_digits", data_dir=digits_dir, eval_split="test",
                       num_train_steps=3, checkpoint_every_steps=0, eval_batch_size=16,
                       log_every_steps=3, **{"mesh.data": 2, "mesh.fsdp": 4})
  # Uninterrupted: 3 steps.
  full = loop.train_and_evaluate(config, str(tmp_path / "full"))
  # Interrupted: SIGTERM during step 2 -> checkpoint at 2, stop; the same call resumes.
  workdir = str(tmp_path / "resumed")
  with monkeypatch.context() as patch:
    _stop_after(patch, 1)
    stopped = loop.train_and_evaluate(config, workdir)
  assert stopped.step == 2
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2]
  resumed = loop.train_and_evaluate(config, workdir)
  assert resumed.step == 3
  full_params, resumed_params = flat(full.state.params), flat(resumed.state.params)
  assert all(np.array_equal(full_params[k], resumed_params[k]) for k in full_params), \
      "a resumed run must end bit-identical to an uninterrupted one on the CPU"
  assert flat(full.state.opt_state).keys() == flat(resumed.state.opt_state).keys()
  assert resumed.eval_metrics == full.eval_metrics
  # The stop at step 2 cut the log interval 1-3: no record of its own, and the mean at
  # step 3 still covers steps 1-3 (the checkpoint carried the losses of steps 1 and 2).
  steps = [r["step"] for r in metrics.read_metrics(workdir) if "train/loss" in r]
  assert steps == [3]
  losses = {r["step"]: r["train/loss"] for r in metrics.read_metrics(str(tmp_path / "full"))
            if "train/loss" in r}
  assert losses == {r["step"]: r["train/loss"] for r in metrics.read_metrics(workdir)
                    if "train/loss" in r}
  # The 8-device checkpoint evaluated on one device (config.mode = "eval").
  eval_config = tiny_config(dataset="focal_digits", data_dir=digits_dir, eval_split="test",
                            num_train_steps=3, eval_batch_size=16, mode="eval",
                            **{"mesh.data": 1})
  single = loop.train_and_evaluate(eval_config, workdir)
  assert single.eval_metrics["eval/examples"] == 364 == full.eval_metrics["eval/examples"]
  assert single.eval_metrics["eval/top1"] == pytest.approx(full.eval_metrics["eval/top1"])
  assert single.eval_metrics["eval/loss"] == pytest.approx(full.eval_metrics["eval/loss"],
                                                           rel=1e-5)
  last = metrics.read_metrics(workdir)[-1]
  assert last["step"] == 3 and last["eval/checkpoint"].endswith("checkpoints")
  meta = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).read_meta(3)
  assert meta["data_step"] == 3 and meta["model"]["overrides"]["embed_dim"] == 16


def test_checkpoint_of_another_model_is_refused(tmp_path, digits_dir):
  workdir = str(tmp_path / "run")
  config = tiny_config(dataset="focal_digits", data_dir=digits_dir, eval_split="test")
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  other = weights.model_description("focal_tiny", 10, 32, {})
  ckpt.save(1, {"x": jnp.zeros(2)}, {"step": 1, "data_step": 1, "model": other})
  ckpt.close()
  with pytest.raises(ValueError, match="another model"):
    loop.train_and_evaluate(config, workdir)


def test_main_rejects_an_unknown_key_before_anything_starts(tmp_path):
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  root = os.path.join(os.path.dirname(__file__), "..")
  result = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/demo.py", "--workdir", str(tmp_path),
       "--config.batchsize=32"], cwd=root, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'Did you mean "batch_size"' in result.stderr
  assert not os.listdir(tmp_path)  # nothing was written
