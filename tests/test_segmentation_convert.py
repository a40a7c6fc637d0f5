"""Segmenter weights through the command line: mmsegmentation file -> export -> file."""

import numpy as np
import pytest

import focal_jax
from focal_jax import convert
from focal_jax.convert import __main__ as cli
from focal_jax.weights import files

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


def tiny_args():
  return [arg for key, value in TINY.items()
          for arg in ("--set", f"{key}={list(value) if isinstance(value, tuple) else value}")]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_segmentation_from_torch_then_to_torch_is_bit_exact(tmp_path, suffix):
  torch = pytest.importorskip("torch") if suffix == ".pth" else None
  segmenter = focal_jax.create_segmenter("focal_tiny", 7, 64, seed=2, **TINY)
  state = convert.to_torch_state_dict(segmenter)
  source = str(tmp_path / f"upernet{suffix}")
  files.save_weights_file(state, source, meta={"CLASSES": ["a", "b"]})
  export = str(tmp_path / "export")
  cli.main(["from-torch", "--task", "segmentation", "--model", "focal_tiny", "--img-size", "64",
            "--checkpoint", source, "--output", export, *tiny_args()])
  back = str(tmp_path / f"back{suffix}")
  cli.main(["to-torch", "--model", "focal_tiny", "--checkpoint", export, "--output", back])
  if torch is not None:  # mmsegmentation's wrapper, readable without unpickling code
    raw = torch.load(back, weights_only=True)
    assert set(raw) == {"meta", "state_dict"}
    assert raw["meta"]["task"] == "segmentation" and raw["meta"]["num_classes"] == 7
  loaded = files.load_weights_file(back)
  assert set(loaded) == set(state)
  for key, value in state.items():
    got = loaded[key] if isinstance(loaded[key], np.ndarray) else loaded[key].numpy()
    assert got.dtype == value.dtype, key
    np.testing.assert_array_equal(got, value, err_msg=key)


def test_segmentation_checkpoint_of_another_variant_is_a_clear_error(tmp_path, capsys):
  segmenter = focal_jax.create_segmenter("focal_tiny", 7, 64, **TINY)
  source = str(tmp_path / "upernet.safetensors")
  files.save_weights_file(convert.to_torch_state_dict(segmenter), source)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["from-torch", "--task", "segmentation", "--model", "focal_tiny_conv",
              "--img-size", "64", "--checkpoint", source, "--output", str(tmp_path / "export"),
              *tiny_args()])
  assert exit_info.value.code == 2
  message = capsys.readouterr().err
  assert "UPerNet focal_tiny_conv" in message and "backbone.patch_embed.proj.weight" in message
