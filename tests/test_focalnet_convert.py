"""FocalNet weight files in the three layouts (official, timm, transformers): the command
line both ways, fine-tuning from each with `create_model(checkpoint_path=...)`, and the
checks every weights file goes through. No third-party FocalNet code is needed here."""

import logging

import jax
import numpy as np
import pytest
from flax import nnx

import focal_jax
from focal_jax import convert, pretrained
from focal_jax.convert import __main__ as cli
from focal_jax.convert import focalnet_names
from focal_jax.weights import files

NAME = "focalnet_huge_fl4"  # post-norms, layer scale, norm in the modulation, conv embedding
TINY = dict(embed_dim=8, depths=(1, 1, 2, 1), num_classes=5, img_size=64)


def flat(model) -> dict[str, np.ndarray]:
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {pretrained.param_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module")
def source():
  """(model, its official state_dict) with random weights (not the initial values)."""
  model = focal_jax.create_model(NAME, seed=3, **TINY)
  state = convert.to_torch_state_dict(model)
  rng = np.random.default_rng(0)
  state = {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in state.items()}
  return convert.from_torch_state_dict(state, NAME, **TINY), state


def write(state, layout, model, path):
  """`state` (official layout) written as a file in `layout`."""
  foreign = focalnet_names.from_official(state, layout, model)
  files.save_weights_file(foreign, path) if path.endswith(".safetensors") else _torch_save(foreign, path)
  return path


def _torch_save(state, path):
  torch = pytest.importorskip("torch")
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)


FILES = {"official.pth": "official", "timm.pth": "timm",
         "model.safetensors": "transformers", "pytorch_model.bin": "transformers"}


def options_args():
  return [arg for key, value in TINY.items() if key not in ("num_classes", "img_size")
          for arg in ("--set", f"{key}={list(value) if isinstance(value, tuple) else value}")]


def test_official_state_dict_round_trip_and_keys(source):
  model, state = source
  assert len(state) == 130 and list(state)[:4] == [
      "patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight",
      "patch_embed.norm.bias"]
  assert state["layers.0.blocks.0.modulation.h.weight"].shape == (8, 8, 1, 1)
  assert state["layers.0.blocks.0.modulation.focal_layers.3.0.weight"].shape == (8, 1, 9, 9)
  assert state["layers.0.blocks.0.modulation.f.weight"].shape == (8 * 2 + 5, 8)
  back = convert.to_torch_state_dict(convert.from_torch_state_dict(state, NAME, **TINY))
  assert list(back) == list(state)
  for key in state:
    np.testing.assert_array_equal(back[key], state[key], err_msg=key)


@pytest.mark.parametrize("filename", FILES)
def test_cli_reads_each_layout_and_writes_the_official_one(tmp_path, source, filename):
  model, state = source
  path = write(state, FILES[filename], model, str(tmp_path / filename))
  export, back = str(tmp_path / "export"), str(tmp_path / "back.pth")
  cli.main(["from-torch", "--model", NAME, "--checkpoint", path, "--output", export,
            "--img-size", "64", *options_args()])
  cli.main(["to-torch", "--model", NAME, "--checkpoint", export, "--output", back])
  loaded = files.load_weights_file(back)
  assert list(loaded) == list(state)
  for key in state:
    np.testing.assert_array_equal(np.asarray(loaded[key]), state[key], err_msg=key)


@pytest.mark.parametrize("filename", ["timm.pth", "model.safetensors"])
def test_fine_tuning_from_foreign_layouts_keeps_all_but_the_head(tmp_path, source, filename,
                                                                 caplog):
  model, state = source
  path = write(state, FILES[filename], model, str(tmp_path / filename))
  options = {k: v for k, v in TINY.items() if k != "num_classes"}
  with caplog.at_level(logging.WARNING):
    tuned = focal_jax.create_model(NAME, num_classes=3, checkpoint_path=path, **options)
  assert "head.kernel" in caplog.text and "head.bias" in caplog.text
  ours, theirs = flat(tuned), flat(model)
  assert ours["head.kernel"].shape == (64, 3)
  for name, value in theirs.items():
    if not name.startswith("head."):
      np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_wrong_variant_and_bad_values_name_the_file(tmp_path, source):
  model, state = source
  path = write(state, "transformers", model, str(tmp_path / "model.safetensors"))
  with pytest.raises(convert.StateDictMismatch) as error:
    cli_state = files.load_weights_file(path)
    convert.from_torch_state_dict(cli_state, "focalnet_large_fl3", source=path, **TINY)
  assert path in str(error.value) and "unexpected keys" in str(error.value)
  broken = dict(state)
  broken["norm.weight"] = np.full_like(state["norm.weight"], np.nan)
  bad = write(broken, "timm", model, str(tmp_path / "timm.pth"))
  with pytest.raises(SystemExit):
    cli.main(["from-torch", "--model", NAME, "--checkpoint", bad, "--output",
              str(tmp_path / "out"), "--img-size", "64", *options_args()])
  with pytest.raises(convert.InvalidWeights, match="norm.weight: 64 of 64 values are NaN"):
    convert.from_torch_state_dict(files.load_weights_file(bad), NAME, source=bad, **TINY)


def test_layouts_are_recognised_by_their_keys(source):
  model, state = source
  for layout in focalnet_names.LAYOUTS:
    foreign = focalnet_names.from_official(state, layout, model)
    assert focalnet_names.layout_of(foreign) == layout
    back = focalnet_names.to_official(foreign, model)
    assert list(back) == list(state)
    for key in state:
      np.testing.assert_array_equal(back[key], state[key], err_msg=f"{layout}: {key}")
  timm_keys = focalnet_names.from_official(state, "timm", model)
  assert "layers.1.downsample.proj.weight" in timm_keys  # downsamples open the next stage
  assert "layers.0.blocks.0.norm1_post.weight" in timm_keys and "head.fc.weight" in timm_keys
  hf_keys = focalnet_names.from_official(state, "transformers", model)
  assert "focalnet.encoder.stages.0.layers.0.modulation.projection_in.weight" in hf_keys
  assert "classifier.weight" in hf_keys
