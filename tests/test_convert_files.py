"""Weight files: .pth with and without the official training wrapper, .safetensors; files
that would run code, and damaged or wrong files, each refused with its own message."""

import pathlib
import pickle
import re
import sys
import zipfile

import numpy as np
import pytest
from test_convert_cli import official_file, overrides_args

from focal_jax.convert import __main__ as cli
from focal_jax.weights import files

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


# ----------------------------------------------------------------------------------------
# Official training checkpoints, and pickles that would run code.
# ----------------------------------------------------------------------------------------


def training_checkpoint(state_dict, config):
  """What the official training loop saves: weights, AdamW and scheduler state, epoch,
  accuracy and its yacs config."""
  tensors = {key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()}
  optimizer = {"state": {0: {"step": torch.tensor(300.0), "exp_avg": torch.zeros(3),
                             "exp_avg_sq": torch.zeros(3)}},
               "param_groups": [{"lr": 5e-6, "weight_decay": 0.05, "params": [0]}]}
  return {"model": tensors, "optimizer": optimizer,
          "lr_scheduler": {"t_initial": 300, "base_values": [5e-4]}, "max_accuracy": 82.2,
          "epoch": 299, "config": config}


def yacs_config():
  from yacs.config import CfgNode  # noqa: PLC0415  test dependency (requirements.txt)
  return CfgNode({"MODEL": {"NAME": "focal_tiny_patch4_window7_224", "NUM_CLASSES": 5},
                  "TRAIN": {"EPOCHS": 300, "BASE_LR": 5e-4}})


def _block_yacs(monkeypatch):
  """From here on `import yacs` fails: loading must not import the config's code."""
  for name in [m for m in sys.modules if m == "yacs" or m.startswith("yacs.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "yacs", None)
  monkeypatch.setitem(sys.modules, "yacs.config", None)


def test_official_training_checkpoint_converts(tmp_path, monkeypatch, capsys):
  _, state = official_file(tmp_path, ".safetensors")
  path = str(tmp_path / "ckpt_epoch_299.pth")
  torch.save(training_checkpoint(state, yacs_config()), path)
  with pytest.raises(pickle.UnpicklingError, match="yacs.config.CfgNode"):
    torch.load(path, weights_only=True)  # what torch does without the mapping
  _block_yacs(monkeypatch)
  whole = files.load_torch_checkpoint(path)
  assert whole["epoch"] == 299 and whole["max_accuracy"] == 82.2
  assert whole["lr_scheduler"] == {"t_initial": 300, "base_values": [5e-4]}
  assert whole["optimizer"]["state"][0]["step"].item() == 300.0
  assert whole["config"]["MODEL"]["NAME"] == "focal_tiny_patch4_window7_224"
  assert whole["config"]["TRAIN"]["BASE_LR"] == 5e-4
  export = str(tmp_path / "export")
  cli.main(["from-torch", "--model", "focal_tiny", "--checkpoint", path, "--output", export,
            *overrides_args()])
  assert "wrote" in capsys.readouterr().out
  cli.main(["to-torch", "--checkpoint", export, "--output", str(tmp_path / "back.safetensors")])
  back = files.load_weights_file(str(tmp_path / "back.safetensors"))
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


class Ref:
  """A global of a hostile pickle: only its module and (dotted) name are written."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("never called while writing the file")


class Call:
  """Unpickles as `ref(*args)`, as a hostile file would have it."""

  def __init__(self, ref, *args):
    self.ref, self.args = ref, args

  def __reduce__(self):
    return self.ref, self.args


class CraftingPickler(pickle._Pickler):
  """Writes `Ref`s as GLOBAL opcodes, under a protocol 4 header (so that a dotted name
  such as `torch` / `os.system` resolves attribute by attribute) without framing."""

  dispatch = dict(pickle._Pickler.dispatch)

  def _save_ref(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[Ref] = _save_ref

  def dump(self, obj):
    self.write(pickle.PROTO + b"\x04")
    self.save(obj)
    self.write(pickle.STOP)


class crafting_pickle:  # noqa: N801  stands in for the pickle module in torch.save
  Pickler = CraftingPickler
  dump = staticmethod(pickle.dump)  # the legacy format's header records


@pytest.mark.parametrize("attack, legacy", [
    ("numpy.testing._private.utils.runstring", False),  # exec()s its argument
    ("torch.os.system", False),  # a dotted name through a torch module: os.system
    ("torch.os.system", True),  # the same in torch's legacy (pre-zip) format
])
def test_a_pickle_that_would_run_code_is_refused_naming_its_globals(tmp_path, attack, legacy,
                                                                     capsys):
  marker = tmp_path / "ran"
  config = yacs_config()
  config["EVIL"] = (Call(Ref("numpy.testing._private.utils", "runstring"),
                         f"import pathlib; pathlib.Path({str(marker)!r}).touch()", {})
                    if attack.startswith("numpy") else
                    Call(Ref("torch", "os.system"), f"touch {marker}"))
  _, state = official_file(tmp_path, ".safetensors")
  path = str(tmp_path / "ckpt_epoch_299.pth")
  torch.save(training_checkpoint(state, config), path, pickle_module=crafting_pickle,
             _use_new_zipfile_serialization=not legacy)
  with pytest.raises(files.UnsafeCheckpointError) as error:
    files.load_weights_file(path)
  message = str(error.value)
  assert message.startswith(f"{path} is refused: its pickle names {attack}, which loading it "
                            "would import and call")
  assert "yacs.config.CfgNode, read as a dict" in message and "weights_only=False" in message
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["from-torch", "--model", "focal_tiny", "--checkpoint", path,
              "--output", str(tmp_path / "export"), *overrides_args()])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.startswith(f"error: {path} is refused: its pickle names")
  assert not marker.exists() and not (tmp_path / "export").exists()


# ----------------------------------------------------------------------------------------
# Damaged and wrong files: one message each, naming the file, through the command line.
# ----------------------------------------------------------------------------------------


def _zip_of_something_else(path):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("readme.txt", "not weights")


def _truncated(path, suffix):
  source, _ = official_file(pathlib.Path(path).parent, suffix)
  data = open(source, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _legacy_truncated(path):
  torch.save({"model": {"w": torch.ones(64, 64)}}, path, _use_new_zipfile_serialization=False)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _tensor_values(path, change):
  """The tiny official state_dict as .pth, with `change(key, array)` applied to the
  weights of the first qkv projection."""
  _, state = official_file(pathlib.Path(path).parent, ".safetensors")
  key = "layers.0.blocks.0.attn.qkv.weight"
  state[key] = change(state[key])
  files.save_torch_file(state, path)


def _nan(array):
  array = array.copy()
  array[0, :3] = np.nan
  return array


def _inf(array):
  array = array.copy()
  array[1, 1] = -np.inf
  return array


DAMAGED = {  # name: (writes the file at path, the message after "error: {path}")
    "empty.pth": (lambda p: open(p, "wb").close(),
                  r" is empty \(0 bytes\): an interrupted download or copy\? Fetch or copy it again."),
    "truncated.pth": (lambda p: _truncated(p, ".pth"),
                      r" cannot be read as a PyTorch checkpoint: it is truncated: a zip archive "
                      r"\(the format torch.save writes\) without its end"),
    "legacy_truncated.pth": (_legacy_truncated,
                             r" cannot be read as a PyTorch checkpoint: it ends early \(truncated\?\)"),
    "notes.pth": (lambda p: open(p, "w").write("hello, these are not weights\n"),
                  r" cannot be read as a PyTorch checkpoint: it is not a PyTorch checkpoint "
                  r"\(it starts with b'hello, these are'\)"),
    "archive.pth": (_zip_of_something_else,
                    r" cannot be read as a PyTorch checkpoint: it is a zip archive but not one "
                    r"torch.save wrote \(no data.pkl; it holds readme.txt\)"),
    "numpy_pickle.pth": (lambda p: pickle.dump({"model": {"w": np.ones(3)}}, open(p, "wb")),
                         r" cannot be read as a PyTorch checkpoint: it is a pickle but not one "
                         r"torch.save wrote \(UnpicklingError: Unsupported operand 149\)."),
    "tensor.pth": (lambda p: torch.save(torch.ones(3), p),
                   r" holds a Tensor, expected a state_dict or a \{'model': state_dict\} "
                   "dictionary."),
    "strings.pth": (lambda p: torch.save({"model": {"head.weight": "zeros"}}, p),
                    r" is not a state_dict: a state_dict maps names to tensors, but it holds "
                    r"'head.weight' \(str\)."),
    "empty.safetensors": (lambda p: open(p, "wb").close(), r" is empty \(0 bytes\)"),
    "truncated.safetensors": (lambda p: _truncated(p, ".safetensors"),
                              r" cannot be read as .safetensors: it is truncated \(its header "
                              r"lists more bytes than the file holds\)"),
    "notes.safetensors": (lambda p: open(p, "w").write("hello, these are not weights\n"),
                          r" cannot be read as .safetensors: it is damaged or not a "
                          r".safetensors file \(SafetensorError: Error while deserializing"),
    "nan.pth": (lambda p: _tensor_values(p, _nan),
                r"The weights in {path} cannot be used:\n  1 parameter\(s\) with NaN or Inf "
                r"values:\n    layers.0.blocks.0.attn.qkv.weight: 3 of 768 values are NaN or Inf"),
    "inf.pth": (lambda p: _tensor_values(p, _inf),
                r"The weights in {path} cannot be used:\n  1 parameter\(s\) with NaN or Inf "
                r"values:\n    layers.0.blocks.0.attn.qkv.weight: 1 of 768 values"),
    "integers.pth": (lambda p: _tensor_values(p, lambda a: np.round(a * 100).astype(np.int64)),
                     r"The weights in {path} cannot be used:\n  1 parameter\(s\) not "
                     r"floating point \(expected one of float16, bfloat16, float32, float64\):"
                     r"\n    layers.0.blocks.0.attn.qkv.weight: int64"),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_a_damaged_or_wrong_file_is_one_clear_error(tmp_path, name, capsys):
  write, expected = DAMAGED[name]
  path = str(tmp_path / name)
  write(path)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["from-torch", "--model", "focal_tiny", "--checkpoint", path,
              "--output", str(tmp_path / "export"), *overrides_args()])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  expected = expected.replace("{path}", re.escape(path))
  if not expected.startswith("The"):
    expected = re.escape(path) + expected
  assert re.match(f"error: {expected}", error), error
  assert "Traceback" not in error and error.count("\n") < 8
  assert not (tmp_path / "export").exists()


def test_a_state_dict_of_another_variant_names_the_file(tmp_path, capsys):
  source, _ = official_file(tmp_path, ".pth")
  with pytest.raises(SystemExit):
    cli.main(["from-torch", "--model", "focal_tiny_conv", "--checkpoint", source,
              "--output", str(tmp_path / "export"), *overrides_args()])
  error = capsys.readouterr().err
  assert error.startswith(f"error: The state_dict in {source} does not match focal_tiny_conv")
  assert "wrongly shaped keys" in error


# ----------------------------------------------------------------------------------------
# .safetensors in every float dtype the official weights come in.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_safetensors_of_each_float_dtype_convert(tmp_path, dtype):
  """float16 / bfloat16 weights (bfloat16 through ml_dtypes, which the loader imports
  itself) convert, and come back as the float32 values they stand for."""
  import ml_dtypes  # noqa: PLC0415
  _, state = official_file(tmp_path, ".safetensors")
  stored = {key: value.astype(getattr(ml_dtypes, dtype) if dtype == "bfloat16" else dtype)
            if value.dtype == np.float32 else value for key, value in state.items()}
  path = str(tmp_path / f"weights_{dtype}.safetensors")
  files.save_weights_file(stored, path)
  header = open(path, "rb").read(4096)
  assert {"float32": b'"F32"', "float16": b'"F16"', "bfloat16": b'"BF16"'}[dtype] in header
  loaded = files.load_weights_file(path)
  assert loaded["head.weight"].dtype.name == dtype
  export = str(tmp_path / "export")
  cli.main(["from-torch", "--model", "focal_tiny", "--checkpoint", path, "--output", export,
            *overrides_args()])
  cli.main(["to-torch", "--checkpoint", export, "--output", str(tmp_path / "back.safetensors")])
  back = files.load_weights_file(str(tmp_path / "back.safetensors"))
  for key, value in stored.items():
    assert back[key].dtype == (np.float32 if value.dtype != np.int64 else np.int64)
    np.testing.assert_array_equal(back[key], value.astype(back[key].dtype), err_msg=key)
  if dtype != "float32":  # the rounding is real: the values differ from the float32 ones
    assert not np.array_equal(back["head.weight"], state["head.weight"])
