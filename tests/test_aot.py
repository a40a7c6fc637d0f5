"""`python -m focal_jax.aot`: the training step compiled for a TPU slice without a TPU.

The README's command (the demo config on v5e:2x2, 4 chips) and one absurd batch are the
two compiles; the error cases stop before compiling.
"""

import contextlib
import io
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from focal_jax import aot, hlo_cost, vit_reference
from focal_jax.training import memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
# The README's command: python -m focal_jax.aot --config configs/demo.py --topology v5e:2x2
#   --batch-per-chip 16 --num-classes 10 --json
README_ARGS = ["--config", DEMO, "--topology", "v5e:2x2", "--batch-per-chip", "16",
               "--num-classes", "10", "--json"]


def run_main(argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert aot.main(argv) == 0
  return out.getvalue()


@pytest.fixture(scope="module")
def small():
  """The README command's report: one JSON object on the last line."""
  return json.loads(run_main(README_ARGS).strip().splitlines()[-1])


def test_report_fields_are_present_and_sane(small):
  assert small["model"] == "custom" and small["topology"] == "v5e:2x2"
  assert small["chips"] == 4 and small["batch_per_chip"] == 16 and small["global_batch"] == 64
  assert small["dtype"] == "bfloat16" and small["img_size"] == 32
  assert small["hbm_bytes"] == 16 * 2**30
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "flops_per_chip", "compile_s"):
    assert small[key] > 0, key
  # The donated state comes back in place: outputs alias arguments, minus the metrics.
  assert 0 < small["alias_bytes"] <= min(small["argument_bytes"], small["output_bytes"])
  assert small["total_bytes"] == (small["argument_bytes"] + small["output_bytes"]
                                  - small["alias_bytes"] + small["temp_bytes"]
                                  + small["code_bytes"])
  assert small["fits"] is True
  # Parameters and two Adam moments in float32, replicated: 3 copies per chip and the
  # chip's 16 images.
  assert small["argument_bytes"] > 3 * 4 * small["params"] + 16 * 32 * 32 * 3 * 4
  # Gradients are all-reduced over the 4 chips.
  assert small["collective"] > 0
  assert small["flops_per_chip"] > 0 and small["bytes_accessed_per_chip"] > 0
  assert small["copy"] >= 0 and small["transpose"] >= 0


def test_compiled_tpu_step_has_no_gather_or_scatter(small):
  assert small["gather"] == 0 and small["scatter"] == 0


def test_an_absurd_batch_does_not_fit_and_memory_grows_with_the_batch(small):
  huge = aot.run(aot.parser().parse_args([*README_ARGS[:4], "--num-classes", "10",
                                          "--batch-per-chip", str(2**15)]))
  # XLA refuses to compile a TPU program that cannot fit, naming the bytes it needs.
  assert huge["fits"] is False and "RESOURCE_EXHAUSTED" in huge["compile_error"]
  assert huge["total_bytes"] > huge["hbm_bytes"]
  assert huge["argument_bytes"] > 2**15 * 32 * 32 * 3 * 4  # the chip's images alone
  # The line through the two compiles puts the largest batch between them.
  largest = memory.largest_batch(16, small["total_bytes"], 2**15, huge["total_bytes"],
                                 small["hbm_bytes"])
  assert 16 < largest < 2**15


def test_mixup_groups_that_straddle_chips_keep_the_step_sharded():
  """Three mixup groups of 32 over 4 chips (24 examples each) put group boundaries inside
  chips; the step must still split the forward pass by example rather than replicate it
  (which, without the sharding constraint after mixup, took 8x the temporaries)."""
  devices, generation = aot.tpu_devices("v5e:2x2")
  base = aot.load_config(DEMO)
  base.mixup.prob = 1.0
  temps = {}
  for per_chip in (32, 24):  # 32: a whole group per chip; 24: groups straddle chips
    args = aot.parser().parse_args([*README_ARGS[:4], "--batch-per-chip", str(per_chip)])
    config = aot.step_config(base, args, len(devices), per_chip)
    config.mixup.group_size = 32
    report = aot.compile_step(config, devices, 10, generation.hbm_bytes)
    temps[per_chip] = report["temp_bytes"]
  assert temps[24] < 1.5 * temps[32], temps


def test_fsdp_keeps_scanned_activations_split_by_example():
  """With parameters sharded over 4 chips (FSDP), a scanned run of 8 blocks must keep its
  activations split by example: before the block outputs were constrained, XLA followed
  the parameters' sharding and the step took 2.5x the temporaries of plain data parallelism
  (Focal-B at 2 x 64 per chip on v5e: 31.8 instead of 14.3 GiB)."""
  devices, generation = aot.tpu_devices("v5e:2x2")
  base = aot.load_config(DEMO)
  base.model.overrides["depths"] = (1, 1, 8, 1)  # stage 3 runs under lax.scan
  temps = {}
  for fsdp in (1, 4):
    args = aot.parser().parse_args([*README_ARGS[:4], "--batch-per-chip", "128",
                                    "--fsdp", str(fsdp)])
    config = aot.step_config(base, args, len(devices), 128)
    report = aot.compile_step(config, devices, 10, generation.hbm_bytes)
    temps[fsdp] = report["temp_bytes"]
    assert report["gather"] == 0 and report["scatter"] == 0
  assert temps[4] < 1.5 * temps[1], temps


def test_op_counter_sees_a_gather():
  """The HLO counter itself finds a gather when there is one (a CPU compile)."""
  table, index = jax.numpy.arange(12.0).reshape(3, 4), jax.numpy.array([2, 0])
  text = jax.jit(lambda t, i: t[i].T @ t[i]).lower(table, index).compile().as_text()
  counts = aot.hlo_op_counts(text)
  assert counts["gather"] >= 1


def test_largest_batch_search_confirms_its_answer():
  """max_batch fits a line, then compiles at the answer and below it until one fits."""
  capacity = 1000
  compiled = []

  def measure(batch):  # affine with a kink: above 64 each example costs 1.5x
    compiled.append(batch)
    total = 100 + 10 * batch + (5 * (batch - 64) if batch > 64 else 0)
    return {"batch_per_chip": batch, "total_bytes": total, "fits": total <= capacity}

  first = measure(32)
  answer = aot.max_batch(measure, first, capacity, quantum=8)
  # Line through 32 and 16: 100 + 10 b <= 1000 -> 90 -> 88; 88 costs 1100, 80 costs 1000.
  assert answer == 80 and compiled == [32, 16, 88, 80]


def test_largest_batch_search_climbs_when_memory_flattens_near_the_capacity():
  """Near the capacity XLA:TPU rematerialises by itself, so the line underestimates: the
  search compiles above a confirmed answer while the next batch fits."""
  capacity = 1000
  compiled = []

  def measure(batch):  # 10 per example up to 64, then 4
    compiled.append(batch)
    total = 100 + 10 * min(batch, 64) + 4 * max(0, batch - 64)
    return {"batch_per_chip": batch, "total_bytes": total, "fits": total <= capacity}

  answer = aot.max_batch(measure, measure(64), capacity, quantum=16)
  # Line through 64 (740) and 32 (420): 90 -> 80 (804, fits); 96 (868) and 112 (932) fit,
  # 128 (996) fits, three steps up: the search stops there.
  assert answer == 128 and compiled == [64, 32, 80, 96, 112, 128]


def test_missing_libtpu_names_the_install_line(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu now fails
  with pytest.raises(SystemExit) as error:
    aot.main(["--config", DEMO, "--topology", "v5e:2x2", "--batch-per-chip", "8"])
  message = str(error.value)
  assert "libtpu" in message and f'pip install "jax[tpu]=={jax.__version__}"' in message


@pytest.mark.parametrize("topology", ["v9x:2x2", "v5e", "v5e:two"])
def test_unknown_topology_is_refused(topology):
  with pytest.raises(SystemExit) as error:
    aot.main(["--config", DEMO, "--topology", topology, "--batch-per-chip", "8"])
  message = str(error.value)
  assert f"Unknown topology {topology!r}" in message and "v5e:2x2" in message


def test_a_shape_libtpu_refuses_is_reported():
  with pytest.raises(SystemExit) as error:
    aot.main(["--config", DEMO, "--topology", "v5e:3x5", "--batch-per-chip", "8"])
  assert "libtpu does not know the topology 'v5e:3x5'" in str(error.value)


def test_a_global_batch_that_does_not_divide_over_the_chips_is_refused():
  with pytest.raises(SystemExit) as error:
    aot.main(["--config", DEMO, "--topology", "v5e:2x2", "--global-batch", "30"])
  message = str(error.value)
  assert "--global-batch 30 does not divide over the 4 chips" in message
  assert "multiple of 4" in message


def test_per_chip_batch_that_accumulation_cannot_split_is_refused():
  with pytest.raises(SystemExit) as error:
    aot.main(["--config", DEMO, "--topology", "v5e:2x2", "--batch-per-chip", "7",
              "--grad-accum", "2"])
  assert "grad_accum_steps=2" in str(error.value)


@pytest.mark.parametrize("variant", ["focal_tiny", "focal_small", "focal_base", "focal_tiny_conv",
                                     "focal_small_conv", "focal_base_conv", "focalv2_tiny",
                                     "focalv2_small", "focalv2_base"])
def test_the_readme_table_commands_build_the_official_step_configs(variant):
  """The README table's commands (`--config configs/<variant>.py --topology v5e:2x2|v4:2x2x1
  --batch-per-chip 128 [--remat]`) up to the compile: 512 examples over 4 chips, the base
  variants in 2 accumulation steps of 64 per chip, remat only when asked."""
  for topology in ("v5e:2x2", "v4:2x2x1"):
    devices, _ = aot.tpu_devices(topology)
    for remat in ([], ["--remat"]):
      args = aot.parser().parse_args(["--config", os.path.join(ROOT, "configs", f"{variant}.py"),
                                      "--topology", topology, "--batch-per-chip", "128", *remat])
      config = aot.step_config(aot.load_config(args.config), args, len(devices), 128)
      assert len(devices) == 4 and config.batch_size == 512
      assert config.grad_accum_steps == (2 if variant.endswith(("base", "base_conv")) else 1)
      assert config.mesh.data == 4 and config.mesh.fsdp == 1
      assert bool(config.model.overrides.get("remat", False)) == bool(remat)
      assert config.model.name == variant


def test_roofline_fields_follow_from_the_chip_and_the_step(small):
  v5e = aot.TPU_GENERATIONS["v5e"]
  assert small["peak_flops_per_chip"] == v5e.peak_bf16_flops == 197e12
  assert small["hbm_bandwidth_per_chip"] == v5e.hbm_bandwidth == 819e9
  assert small["flops_source"] == "xla"
  flops, nbytes = small["flops_per_chip"], small["bytes_accessed_per_chip"]
  assert small["flops_per_byte"] == pytest.approx(flops / nbytes)
  assert small["roofline_img_s_per_chip"] == pytest.approx(
      16 / max(flops / 197e12, nbytes / 819e9))


def test_bytes_by_group_add_up_to_the_step(small):
  """The kernels grouped by what they compute: every group of the fixed set, the bytes
  summing to XLA's own count, the FLOPs to the model's."""
  groups = small["bytes_by_group"]
  assert list(groups) == list(hlo_cost.GROUPS)
  for name, group in groups.items():
    assert group["bytes"] >= 0 and group["flops"] >= 0 and group["kernels"] >= 0, name
    assert (group["bytes"] > 0) == (group["kernels"] > 0), name
  for name in ("attention_keys", "attention_products", "attention_projections", "softmax",
               "mlp", "norm", "patch_embed", "optimizer", "collectives"):
    assert groups[name]["kernels"] > 0 and groups[name]["bytes"] > 0, name
  for name in ("attention_products", "attention_projections", "mlp", "patch_embed"):
    assert groups[name]["flops"] > 0, name
  total = sum(group["bytes"] for group in groups.values())
  assert total == pytest.approx(small["bytes_accessed_per_chip"], rel=0.15)
  args = aot.parser().parse_args(README_ARGS)
  config = aot.step_config(aot.load_config(DEMO), args, 4, 16)
  model_flops = aot.model_step_flops(aot.model_spec(config, 10), 16)
  assert sum(group["flops"] for group in groups.values()) == pytest.approx(model_flops, rel=0.25)


def test_tiled_layouts_pad_the_bytes():
  """A TPU array takes the room of whole (8, 128) tiles: 49 x 49 bfloat16 fills 56 x 128."""
  assert hlo_cost.array_bytes("bf16[49,49]{1,0:T(8,128)(2,1)}") == 56 * 128 * 2
  # Dimension 0 is minor here: it pads to 128, dimension 1 to 56.
  assert hlo_cost.array_bytes("f32[3,49]{0,1:T(8,128)}") == 128 * 56 * 4
  assert hlo_cost.array_bytes("(f32[2,3]{1,0}, s32[4]{0})") == 2 * 3 * 4 + 4 * 4


def test_vit_reference_is_vit_s16():
  spec = vit_reference.model_spec(1000, 224, jnp.bfloat16)
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(spec.abstract_params))
  assert params == 22_050_664  # ViT-S/16 (DeiT-S): 22.05 M
  assert vit_reference.official_macs() == pytest.approx(4.6e9, rel=0.01)


def test_segmentation_step_compiles_gather_free_with_its_heads_grouped():
  """The README's segmentation plan on the demo config (its 11 classes taken from the
  config's class weights): fits, no gather or scatter, UPerNet's heads in their own group."""
  report = json.loads(run_main(["--config", os.path.join(ROOT, "configs", "demo_seg.py"),
                                "--topology", "v5e:2x2", "--batch-per-chip", "2",
                                "--json"]).strip().splitlines()[-1])
  assert report["fits"] and report["gather"] == 0 and report["scatter"] == 0
  assert report["global_batch"] == 8 and report["img_size"] == 64
  head = report["bytes_by_group"]["decode_head"]
  assert head["flops"] > 0.1 * report["flops_per_chip"] and head["kernels"] > 0


# A loop of 4 trips whose body slices one row of a stacked [4, 256] array with XLA:GPU's
# asynchronous fusion (`fusion-start` runs it, `fusion-done` waits), as a scanned stage does.
_ASYNC_SLICE_LOOP = """HloModule loop

%fused_slice (p0: f32[4,256], p1: s32[]) -> f32[1,256] {
  %p0 = f32[4,256]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,256]{1,0} dynamic-slice(%p0, %p1, %z), dynamic_slice_sizes={1,256}
}

%body (t: (f32[4,256], s32[])) -> (f32[4,256], s32[]) {
  %t = (f32[4,256]{1,0}, s32[]) parameter(0)
  %w = f32[4,256]{1,0} get-tuple-element(%t), index=0
  %i = s32[] get-tuple-element(%t), index=1
  %fs = ((f32[4,256]{1,0}, s32[]), f32[1,256]{1,0}, u32[]) fusion-start(%w, %i), kind=kLoop, calls=%fused_slice
  %fd = f32[1,256]{1,0} fusion-done(%fs)
  ROOT %r = (f32[4,256]{1,0}, s32[]) tuple(%w, %i)
}

%cond (t: (f32[4,256], s32[])) -> pred[] {
  %t = (f32[4,256]{1,0}, s32[]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[4,256]) -> f32[4,256] {
  %a = f32[4,256]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %t0 = (f32[4,256]{1,0}, s32[]) tuple(%a, %zero)
  %loop = (f32[4,256]{1,0}, s32[]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %out = f32[4,256]{1,0} get-tuple-element(%loop), index=0
}
"""


def test_an_asynchronous_fusion_in_a_loop_counts_the_slice_it_reads():
  """Each trip reads one 1 KiB row, its index, and writes the row: not the whole stacked
  array twice (the start's operand and the done's tuple), which made a scanned stage look
  ten times as heavy on the GPU."""
  groups = hlo_cost.cost_by_group(_ASYNC_SLICE_LOOP)
  assert sum(g["kernels"] for g in groups.values()) == 1
  assert sum(g["bytes"] for g in groups.values()) == 4 * (1024 + 4 + 1024)
