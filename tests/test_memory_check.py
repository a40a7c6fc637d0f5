"""Before its first step a run checks that the compiled train step fits in device memory
(on the CPU only with a configured capacity), and stops with the largest batch that fits."""

import re

import pytest

import focal_jax
from focal_jax.training import loop, memory
from focal_jax.training.config import default_config

TINY = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), focal_levels=(2, 2), window_size=2,
            focal_windows=(3, 1), expand_sizes=(1, 1), drop_path_rate=0.1)


def config(data_dir, capacity):
  c = default_config()
  c.model.name = ""
  c.model.overrides = dict(TINY)
  c.dataset, c.data_dir, c.train_split, c.eval_split = "focal_digits", data_dir, "train", "test"
  c.image_size, c.batch_size, c.mixup.group_size = 16, 16, 8
  c.augment.randaugment, c.augment.crop_pct = "", 1.0
  c.num_train_steps, c.warmup_epochs, c.shuffle_buffer, c.data_threads = 2, 0.0, 64, 1
  c.device_memory_bytes = capacity
  return c


def test_a_step_that_cannot_fit_stops_the_run_with_the_largest_batch(tmp_path, caplog):
  data_dir = str(tmp_path / "tfds")
  focal_jax.data.get_builder("focal_digits", data_dir)
  caplog.set_level("INFO")
  with pytest.raises(memory.StepTooLarge) as error:
    loop.train_and_evaluate(config(data_dir, 1000), str(tmp_path / "run1"))
  refusal = error.value
  assert "Train step memory:" in caplog.text  # logged before refusing
  assert refusal.need > refusal.capacity == 1000
  # The second compile at half the batch needs less, and none fits in 1000 bytes.
  assert refusal.other_batch == 8 and 0 < refusal.other_need < refusal.need
  assert refusal.largest == 0
  message = str(refusal)
  assert "batch_size=16 needs" in message and "at batch_size=8 it needs" in message
  assert "no batch_size fits" in message and "python -m focal_jax.aot" in message
  assert not (tmp_path / "run1" / "checkpoints").exists() or not any(
      (tmp_path / "run1" / "checkpoints").iterdir())
  # Between the two figures the line answers 8 (the estimate the message would give).
  between = (refusal.need + refusal.other_need) // 2
  assert memory.largest_batch(16, refusal.need, 8, refusal.other_need, between, 8) == 8


def test_a_step_that_fits_trains(tmp_path, caplog):
  data_dir = str(tmp_path / "tfds")
  focal_jax.data.get_builder("focal_digits", data_dir)
  caplog.set_level("INFO")
  result = loop.train_and_evaluate(config(data_dir, 1 << 40), str(tmp_path / "run"))
  assert result.step == 2
  assert re.search(r"Train step memory: [\d.]+ [KM]iB per device of 1024\.00 GiB", caplog.text)


@pytest.mark.parametrize("message, temp", [
    # The temporaries alone exceed the chip: the error names them.
    ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory "
     "required for HLO temporaries (17.11G) exceeds available HBM (15.75G). HLO module: jit_step.",
     int(17.11 * 2 ** 30)),
    # They fit alone but not with the rest: the error names all the program holds.
    ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of "
     "memory in memory space hbm. Used 15.77G of 15.75G hbm. Exceeded hbm capacity by 19.00M.",
     int(15.77 * 2 ** 30) - 500 * 2 ** 20),
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB.", None),
])
def test_both_forms_of_xlas_refusal_give_the_temporaries(message, temp):
  assert memory.oom_temp_bytes(message, argument_bytes=500 * 2 ** 20) == temp
