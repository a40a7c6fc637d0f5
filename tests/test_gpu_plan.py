"""`python -m focal_jax.aot` for NVIDIA GPUs: XLA's CUDA compiler (the `gpu-plan` packages,
installed apart by setup.sh) compiles the training step for GPUs this host does not have.

Two compiles of a two-stage model on two H100s (a small batch and an absurd one); the rest
stops before compiling.
"""

import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import pytest

from focal_jax import accelerators, aot, cuda_compiler, hlo_cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "data", "tiny_plan_config.py")
ARGS = ["--config", TINY, "--topology", "h100:2", "--num-classes", "10"]
# The fields of a TPU row (tests/test_aot.py's report), which GPU rows share.
ROW_FIELDS = {
    "model", "topology", "chips", "batch_per_chip", "global_batch", "grad_accum_steps", "dtype",
    "img_size", "remat", "fsdp", "params", "compile_s", "argument_bytes", "output_bytes",
    "alias_bytes", "temp_bytes", "code_bytes", "total_bytes", "hbm_bytes", "fits",
    "flops_per_chip", "flops_source", "bytes_accessed_per_chip", "bytes_by_group", "gather",
    "scatter", "copy", "transpose", "collective", "peak_flops_per_chip",
    "hbm_bandwidth_per_chip", "flops_per_byte", "roofline_img_s_per_chip"}


def _python(code, **env):
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, env={**os.environ, "PYTHONPATH": ROOT, **env})


@pytest.fixture(scope="module")
def small():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert aot.main([*ARGS, "--batch-per-chip", "8", "--json"]) == 0
  return json.loads(out.getvalue().strip().splitlines()[-1])


def test_gpu_row_has_the_tpu_rows_fields_and_fits(small):
  assert set(small) == ROW_FIELDS
  assert small["topology"] == "h100:2" and small["chips"] == 2 and small["global_batch"] == 16
  h100 = accelerators.GPU_CARDS["h100"]
  # JAX's allocator takes 75% of a GPU's memory unless told otherwise.
  assert small["hbm_bytes"] == int(0.75 * h100.memory_bytes)
  assert small["fits"] is True and 0 < small["total_bytes"] < small["hbm_bytes"]
  for key in ("argument_bytes", "temp_bytes", "params", "bytes_accessed_per_chip"):
    assert small[key] > 0, key
  # XLA:GPU counts no FLOPs: they come from the model's forward pass, three times per image.
  assert small["flops_source"] == "model" and small["flops_per_chip"] > 0
  assert small["peak_flops_per_chip"] == h100.peak_bf16_flops
  assert small["hbm_bandwidth_per_chip"] == h100.memory_bandwidth
  expected_cap = 8 / max(small["flops_per_chip"] / h100.peak_bf16_flops,
                         small["bytes_accessed_per_chip"] / h100.memory_bandwidth)
  assert small["roofline_img_s_per_chip"] == pytest.approx(expected_cap)
  assert small["collective"] > 0  # gradients are all-reduced over the two GPUs
  assert set(small["bytes_by_group"]) == set(hlo_cost.GROUPS)


def test_compiled_gpu_step_has_no_gather_or_scatter(small):
  assert small["gather"] == 0 and small["scatter"] == 0


def test_an_absurd_batch_does_not_fit_on_the_gpu(small):
  huge = aot.run(aot.parser().parse_args([*ARGS, "--batch-per-chip", str(2**20)]))
  assert huge["fits"] is False and huge["total_bytes"] > huge["hbm_bytes"]
  assert huge["argument_bytes"] > 2**20 * 16 * 16 * 3 * 4  # the GPU's images alone


def test_every_card_description_is_one_xla_reads():
  """Each card's target description gives compile-only devices of that card."""
  for name, card in accelerators.GPU_CARDS.items():
    devices = cuda_compiler.gpu_devices(card.target_config(), 1, 2)
    assert len(devices) == 2 and devices[0].device_kind == card.name, name


def test_gpu_topologies_are_parsed_and_bad_ones_refused():
  devices, target = aot.topology_devices("a100-40gb:2x4")
  assert len(devices) == 8 and {d.process_index for d in devices} == {0, 1}
  assert target.peak_flops["float32"] == accelerators.GPU_CARDS["a100-40gb"].peak_tf32_flops
  for bad in ("h100:", "h100:2x", "h100:eight", "v100:8"):
    with pytest.raises(aot.AotError, match="Unknown topology"):
      aot.topology_devices(bad)


def test_missing_packages_name_the_extra():
  result = _python("from focal_jax import aot; aot.main(['--config', %r, '--topology', "
                   "'h100:8', '--batch-per-chip', '8'])" % TINY,
                   FOCAL_JAX_GPU_PLAN_DIR=os.path.join(ROOT, "no-such-directory"))
  assert result.returncode != 0
  assert "gpu-plan" in result.stderr and "pip install" in result.stderr
  assert f"jax-cuda13-plugin=={jax.__version__}" in result.stderr


def test_other_processes_do_not_see_the_plugin():
  """The installed `gpu-plan` packages change nothing for any other command: CPU stays the
  backend and `import jax` prints nothing."""
  assert cuda_compiler.plan_dir().is_dir(), "./setup.sh installs the gpu-plan packages"
  result = _python("import jax; print(jax.devices())", JAX_PLATFORMS="")
  assert result.returncode == 0 and result.stdout.startswith("[CpuDevice(id=0)")
  assert "plugin" not in result.stderr.lower() and "cuda" not in result.stderr.lower()
