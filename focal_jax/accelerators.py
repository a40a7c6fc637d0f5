"""Published facts about the accelerators the compile plans target: TPU generations and
NVIDIA GPU cards.

Memory sizes decide whether a step fits; peak matrix FLOP/s and memory bandwidth give the
roofline (a step can run no faster than its FLOPs at the peak rate, nor than its bytes at
the memory bandwidth); for GPUs the same facts, with the SM limits, make the target
description XLA compiles for without the card (`GpuCard.target_config`).
"""

from __future__ import annotations

import dataclasses

GIB = 1 << 30
GB = 10**9
TFLOPS = 10**12


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """One TPU chip: HBM, peak bf16 matrix FLOP/s and HBM bandwidth (bytes/s)."""

  hbm_bytes: int
  chip_config: str | None  # "megacore": the chip's two TensorCores act as one device
  peak_bf16_flops: float
  hbm_bandwidth: float


# Google Cloud's system architecture pages, per generation:
#   v4   https://cloud.google.com/tpu/docs/v4   32 GiB HBM2, 275 TFLOP/s bf16, 1,228 GB/s
#   v5e  https://cloud.google.com/tpu/docs/v5e  16 GiB HBM2, 197 TFLOP/s bf16,   819 GB/s
#   v5p  https://cloud.google.com/tpu/docs/v5p  95 GiB HBM2e, 459 TFLOP/s bf16, 2,765 GB/s
#   v6e  https://cloud.google.com/tpu/docs/v6e  32 GiB HBM, 918 TFLOP/s bf16,   1,640 GB/s
# v4 and v5p chips have two TensorCores, used as one megacore device.
TPU_GENERATIONS = {
    "v4": TpuGeneration(32 * GIB, "megacore", 275 * TFLOPS, 1228 * GB),
    "v5e": TpuGeneration(16 * GIB, None, 197 * TFLOPS, 819 * GB),
    "v5p": TpuGeneration(95 * GIB, "megacore", 459 * TFLOPS, 2765 * GB),
    "v6e": TpuGeneration(32 * GIB, None, 918 * TFLOPS, 1640 * GB),
}


@dataclasses.dataclass(frozen=True)
class GpuCard:
  """One NVIDIA GPU as XLA's GPU compiler sees it (`GpuDeviceInfoProto`), plus its peak
  dense tensor-core FLOP/s (bfloat16 and TensorFloat-32, the float32 matmul default)."""

  name: str  # as the driver names the device
  sm_count: int
  memory_bytes: int  # as the driver reports it (a little under the marketed size)
  memory_bandwidth: float  # bytes/s
  l2_cache_bytes: int
  clock_ghz: float  # boost clock
  compute_capability: tuple[int, int]
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  threads_per_sm: int
  fp32_units_per_sm: int
  peak_bf16_flops: float  # dense
  peak_tf32_flops: float  # dense
  registers_per_sm: int = 65536
  registers_per_block: int = 65536
  shared_memory_per_block: int = 48 * 1024  # without opting in
  threads_per_block: int = 1024

  def target_config(self) -> str:
    """The card as a `GpuTargetConfigProto` in text form, for
    `jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`."""
    major, minor = self.compute_capability
    # Hopper and Blackwell: XLA targets the arch-specific instructions (sm_90a, sm_100a).
    extension = "ACCELERATED_FEATURES" if major >= 9 else "NONE"
    return f"""gpu_device_info {{
  threads_per_block_limit: {self.threads_per_block}
  threads_per_warp: 32
  shared_memory_per_block: {self.shared_memory_per_block}
  shared_memory_per_core: {self.shared_memory_per_sm}
  threads_per_core_limit: {self.threads_per_sm}
  core_count: {self.sm_count}
  fpus_per_core: {self.fp32_units_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.memory_bandwidth)}
  l2_cache_size: {self.l2_cache_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} feature_extension: {extension} }}
  registers_per_core_limit: {self.registers_per_sm}
  registers_per_block_limit: {self.registers_per_block}
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{self.name}"
"""


# Sources. SM counts, clocks, L2, memory and bandwidth: NVIDIA's whitepapers and datasheets
#   A100: "NVIDIA A100 Tensor Core GPU Architecture" whitepaper (2020), table 3, and the A100
#         datasheet (https://www.nvidia.com/en-us/data-center/a100/): 108 SMs, 1,410 MHz,
#         40 MB L2, 40 GB HBM2 at 1,555 GB/s or 80 GB HBM2e at 2,039 GB/s (SXM4);
#         312 TFLOP/s bf16 and 156 TFLOP/s TF32 dense.
#   H100: "NVIDIA H100 Tensor Core GPU Architecture" whitepaper (2022) and the H100 datasheet
#         (https://www.nvidia.com/en-us/data-center/h100/): SXM5 132 SMs, 1,980 MHz, 50 MB
#         L2, 80 GB HBM3 at 3.35 TB/s; 989 TFLOP/s bf16 and 495 TFLOP/s TF32 dense (the
#         datasheet's 1,979 and 989 are with sparsity).
#   H200: the H200 datasheet (https://www.nvidia.com/en-us/data-center/h200/): the H100 SXM's
#         chip with 141 GB HBM3e at 4.8 TB/s; same tensor-core peaks.
#   L4:   the L4 datasheet (https://www.nvidia.com/en-us/data-center/l4/) and the Ada
#         whitepaper ("NVIDIA Ada GPU Architecture", 2023): 58 SMs, 2,040 MHz, 48 MB L2,
#         24 GB GDDR6 at 300 GB/s; 121 TFLOP/s bf16 and 60 TFLOP/s TF32 dense (half the
#         datasheet's sparse 242 and 120).
#   B200: the HGX B200 / DGX B200 datasheets (https://www.nvidia.com/en-us/data-center/hgx/):
#         180 GB HBM3e at 8 TB/s per GPU; 2.25 PFLOP/s bf16 and 1.1 PFLOP/s TF32 dense (half
#         the sparse 36 and 18 PFLOP/s of eight GPUs, per GPU). SM count (148), clock (1,965
#         MHz) and L2 (126.5 MiB) as a B200 reports them (openxla/xla's recorded description
#         xla/backends/gpu/target_config/specs/b200.txtpb).
# Per-SM limits by compute capability: the CUDA C++ Programming Guide, "Technical
#   Specifications per Compute Capability": 8.0 164 KiB shared memory per SM, 163 KiB per
#   block opted in; 8.9 100/99 KiB and 1,536 threads per SM; 9.0 and 10.0 228/227 KiB;
#   64 Ki 32-bit registers per SM and per block; 2,048 threads per SM otherwise. FP32 lanes
#   per SM (whitepapers): 64 on A100, 128 on Ada, Hopper and Blackwell.
# Memory bytes: what the driver reports (cudaDeviceProp.totalGlobalMem), as recorded from real
#   devices in openxla/xla's target descriptions (xla/backends/gpu/target_config/specs/:
#   a100_sxm_40, a100_sxm_80, h100_sxm, h200, b200); L4: 23,034 MiB, the size nvidia-smi shows.
GPU_CARDS = {
    "a100-40gb": GpuCard(
        "NVIDIA A100-SXM4-40GB", sm_count=108, memory_bytes=42_331_013_120,
        memory_bandwidth=1555 * GB, l2_cache_bytes=40 << 20, clock_ghz=1.41,
        compute_capability=(8, 0), shared_memory_per_sm=164 << 10,
        shared_memory_per_block_optin=163 << 10, threads_per_sm=2048, fp32_units_per_sm=64,
        peak_bf16_flops=312 * TFLOPS, peak_tf32_flops=156 * TFLOPS),
    "a100-80gb": GpuCard(
        "NVIDIA A100-SXM4-80GB", sm_count=108, memory_bytes=85_100_068_864,
        memory_bandwidth=2039 * GB, l2_cache_bytes=40 << 20, clock_ghz=1.41,
        compute_capability=(8, 0), shared_memory_per_sm=164 << 10,
        shared_memory_per_block_optin=163 << 10, threads_per_sm=2048, fp32_units_per_sm=64,
        peak_bf16_flops=312 * TFLOPS, peak_tf32_flops=156 * TFLOPS),
    "h100": GpuCard(
        "NVIDIA H100 80GB HBM3", sm_count=132, memory_bytes=84_942_979_072,
        memory_bandwidth=3350 * GB, l2_cache_bytes=50 << 20, clock_ghz=1.98,
        compute_capability=(9, 0), shared_memory_per_sm=228 << 10,
        shared_memory_per_block_optin=227 << 10, threads_per_sm=2048, fp32_units_per_sm=128,
        peak_bf16_flops=989 * TFLOPS, peak_tf32_flops=495 * TFLOPS),
    "h200": GpuCard(
        "NVIDIA H200 141GB HBM3e", sm_count=132, memory_bytes=151_397_597_184,
        memory_bandwidth=4800 * GB, l2_cache_bytes=50 << 20, clock_ghz=1.98,
        compute_capability=(9, 0), shared_memory_per_sm=228 << 10,
        shared_memory_per_block_optin=227 << 10, threads_per_sm=2048, fp32_units_per_sm=128,
        peak_bf16_flops=989 * TFLOPS, peak_tf32_flops=495 * TFLOPS),
    "l4": GpuCard(
        "NVIDIA L4", sm_count=58, memory_bytes=23_034 << 20, memory_bandwidth=300 * GB,
        l2_cache_bytes=48 << 20, clock_ghz=2.04, compute_capability=(8, 9),
        shared_memory_per_sm=100 << 10, shared_memory_per_block_optin=99 << 10,
        threads_per_sm=1536, fp32_units_per_sm=128, peak_bf16_flops=121 * TFLOPS,
        peak_tf32_flops=60 * TFLOPS),
    "b200": GpuCard(
        "NVIDIA B200", sm_count=148, memory_bytes=191_514_411_008, memory_bandwidth=8000 * GB,
        l2_cache_bytes=132_644_864, clock_ghz=1.965, compute_capability=(10, 0),
        shared_memory_per_sm=228 << 10, shared_memory_per_block_optin=227 << 10,
        threads_per_sm=2048, fp32_units_per_sm=128, peak_bf16_flops=2250 * TFLOPS,
        peak_tf32_flops=1100 * TFLOPS),
}
