"""The conversion command line: official file -> parameter export -> official file."""

import numpy as np
import pytest

import focal_jax
from focal_jax import convert
from focal_jax.convert import __main__ as cli
from focal_jax.weights import files

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_classes=5)


def official_file(tmp_path, suffix=".pth"):
  model = focal_jax.create_model("focal_tiny", seed=3, **TINY)
  state = convert.to_torch_state_dict(model)
  path = str(tmp_path / f"official{suffix}")
  files.save_weights_file(state, path)
  return path, state


def overrides_args():
  return [arg for key, value in TINY.items() if key != "num_classes"
          for arg in ("--set", f"{key}={list(value) if isinstance(value, tuple) else value}")]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_from_torch_then_to_torch_is_bit_exact(tmp_path, suffix):
  if suffix == ".pth":
    pytest.importorskip("torch")
  source, state = official_file(tmp_path, suffix)
  export = str(tmp_path / "export")
  cli.main(["from-torch", "--model", "focal_tiny", "--checkpoint", source, "--output", export,
            *overrides_args()])
  back = str(tmp_path / f"back{suffix}")
  cli.main(["to-torch", "--model", "focal_tiny", "--checkpoint", export, "--output", back])
  loaded = files.load_weights_file(back)
  assert set(loaded) == set(state)
  if suffix == ".pth":  # safetensors files keep keys sorted; .pth keeps the official order
    assert list(loaded) == list(state)
  for key, value in state.items():
    got = loaded[key] if isinstance(loaded[key], np.ndarray) else loaded[key].numpy()
    np.testing.assert_array_equal(got, value, err_msg=key)


def test_wrong_variant_is_a_clear_error(tmp_path, capsys):
  source, _ = official_file(tmp_path, ".safetensors")
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["from-torch", "--model", "focal_tiny_conv", "--checkpoint", source,
              "--output", str(tmp_path / "export"), *overrides_args()])
  assert exit_info.value.code == 2
  message = capsys.readouterr().err
  assert "focal_tiny_conv" in message and "wrongly shaped" in message
  assert not (tmp_path / "export").exists()


def test_refuses_to_overwrite_a_non_empty_directory(tmp_path):
  source, _ = official_file(tmp_path, ".safetensors")
  target = tmp_path / "export"
  target.mkdir()
  (target / "keep.txt").write_text("precious")
  with pytest.raises(SystemExit, match="not empty"):
    cli.main(["from-torch", "--model", "focal_tiny", "--checkpoint", source,
              "--output", str(target), *overrides_args()])
  assert (target / "keep.txt").read_text() == "precious"


def test_not_a_checkpoint_is_a_clear_error(tmp_path, capsys):
  with pytest.raises(SystemExit):
    cli.main(["to-torch", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "x.pth")])
  assert "neither a training workdir" in capsys.readouterr().err
