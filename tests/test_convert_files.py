"""Weight files: .pth with and without the official training wrapper, .safetensors."""

import pickle
import sys
import textwrap

import numpy as np
import pytest

from focal_jax.convert import files

torch = pytest.importorskip("torch", reason="needs PyTorch (pip install -e '.[convert]')")


def sample_state_dict():
  rng = np.random.default_rng(0)
  return {"patch_embed.proj.weight": rng.standard_normal((4, 3, 4, 4)).astype(np.float32),
          "layers.0.blocks.0.attn.relative_position_index": np.arange(6, dtype=np.int64)}


def test_pth_round_trip_loads_with_weights_only(tmp_path):
  path = str(tmp_path / "weights.pth")
  files.save_torch_file(sample_state_dict(), path)
  raw = torch.load(path, weights_only=True)
  assert set(raw) == {"model"}
  loaded = files.load_weights_file(path)
  for key, value in sample_state_dict().items():
    np.testing.assert_array_equal(loaded[key].numpy(), value)
    assert loaded[key].numpy().dtype == value.dtype


def test_official_training_checkpoint_with_pickled_config(tmp_path, monkeypatch):
  """The official loop pickles a yacs CfgNode: weights_only refuses it, we read the weights."""
  package = tmp_path / "fake_yacs"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "config.py").write_text(textwrap.dedent("""
      class CfgNode(dict):
          def __init__(self, init=None):
              super().__init__(init or {})
              self.frozen = False
  """))
  monkeypatch.syspath_prepend(str(tmp_path))
  from fake_yacs.config import CfgNode

  tensors = {k: torch.from_numpy(v) for k, v in sample_state_dict().items()}
  path = str(tmp_path / "ckpt_epoch_299.pth")
  torch.save({"model": tensors, "optimizer": {"state": {}}, "lr_scheduler": {"t": 3},
              "max_accuracy": 82.1, "epoch": 299, "config": CfgNode({"MODEL": {"NAME": "focal"}})},
             path)
  # Loading must not import or run the config's code: make its module unimportable.
  monkeypatch.delitem(sys.modules, "fake_yacs.config")
  monkeypatch.delitem(sys.modules, "fake_yacs")
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
  with pytest.raises(pickle.UnpicklingError):
    torch.load(path, weights_only=True)
  with pytest.warns(UserWarning, match="restricted unpickler"):
    loaded = files.load_weights_file(path)
  assert set(loaded) == set(sample_state_dict())
  np.testing.assert_array_equal(loaded["patch_embed.proj.weight"].numpy(),
                                sample_state_dict()["patch_embed.proj.weight"])
  assert "fake_yacs" not in sys.modules


def test_safetensors_round_trip_without_torch_types(tmp_path):
  path = str(tmp_path / "weights.safetensors")
  files.save_weights_file(sample_state_dict(), path)
  loaded = files.load_weights_file(path)
  for key, value in sample_state_dict().items():
    assert isinstance(loaded[key], np.ndarray)
    np.testing.assert_array_equal(loaded[key], value)


def test_failed_write_keeps_the_existing_file(tmp_path):
  path = str(tmp_path / "weights.safetensors")
  files.save_weights_file(sample_state_dict(), path)
  before = open(path, "rb").read()
  with pytest.raises(Exception):  # noqa: B017 (whatever the writer raises)
    files.save_weights_file({"bad": object()}, path)
  assert open(path, "rb").read() == before
  assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_missing_file_and_directory_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint file"):
    files.load_torch_file(str(tmp_path / "absent.pth"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    files.save_weights_file(sample_state_dict(), str(tmp_path / "nope" / "w.pth"))
