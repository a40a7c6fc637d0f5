"""XLA's CUDA compiler, loaded into one process only, to compile for NVIDIA GPUs without one.

The CUDA PJRT plugin (`jax-cuda13-plugin`, `jax-cuda13-pjrt`) with NVIDIA's compiler
packages (`nvidia-cuda-nvcc`, `nvidia-nvvm`) compiles for a GPU described by text
(`accelerators.GpuCard.target_config`); no driver or GPU is needed. Installed where jax looks
for plugins, it would make every `import jax` on a host without a GPU print a traceback, so
the `gpu-plan` extra is installed apart, in `<environment>/gpu-plan` (setup.sh does it), and
only the process that plans puts it on its path and registers the plugin, with CPU kept as
its default backend.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys
from typing import Any

# Where setup.sh installs the `gpu-plan` extra; FOCAL_JAX_GPU_PLAN_DIR overrides it.
ENV_DIR = "FOCAL_JAX_GPU_PLAN_DIR"
PLUGIN_MODULE = "jax_plugins.xla_cuda13"


class CudaCompilerMissing(RuntimeError):
  """The `gpu-plan` packages are not installed; the message says how to install them."""


def plan_dir() -> pathlib.Path:
  """The directory that holds the `gpu-plan` packages, apart from the environment's."""
  return pathlib.Path(os.environ.get(ENV_DIR) or pathlib.Path(sys.prefix) / "gpu-plan")


def install_command() -> str:
  """The command that installs the `gpu-plan` extra where this module looks for it."""
  import jax  # noqa: PLC0415
  version = jax.__version__
  return (f"pip install --no-deps --target {plan_dir()} jax-cuda13-plugin=={version} "
          f"jax-cuda13-pjrt=={version} nvidia-cuda-nvcc nvidia-nvvm  (./setup.sh does it; "
          "the `gpu-plan` extra of pyproject.toml lists them)")


def cuda_data_dir() -> str | None:
  """The CUDA directory (bin/ptxas, nvvm/libdevice) of the nvcc package, for XLA."""
  for base in (plan_dir(), *map(pathlib.Path, sys.path)):
    candidate = base / "nvidia" / "cu13"
    if (candidate / "bin" / "ptxas").exists():
      return str(candidate)
  return None


def load() -> None:
  """Registers the CUDA plugin in this process (CPU stays the default backend); raises
  CudaCompilerMissing, naming the install command, when its packages are absent."""
  import jax  # noqa: PLC0415
  from jax._src import xla_bridge  # noqa: PLC0415
  if "cuda" in xla_bridge._backend_factories:  # noqa: SLF001  registered already
    return
  directory = str(plan_dir())
  if not xla_bridge.backends_are_initialized():
    # Without a GPU the plugin's backend cannot start; this process keeps computing on CPU.
    jax.config.update("jax_platforms", "cpu")
  # Backends start (and jax looks for plugins, once) before the directory joins the path,
  # so the plugin is initialised here only.
  jax.devices()
  if os.path.isdir(directory) and directory not in sys.path:
    sys.path.append(directory)
    importlib.invalidate_caches()
  if importlib.util.find_spec("jax_plugins") is None or \
     importlib.util.find_spec(PLUGIN_MODULE) is None or cuda_data_dir() is None:
    raise CudaCompilerMissing(
        f"Compiling for NVIDIA GPUs needs the `gpu-plan` packages (the CUDA PJRT plugin and "
        f"NVIDIA's compiler), which are not in {directory}. Install them with: "
        f"{install_command()}")
  # The plugin checks the CUDA runtime libraries unless told to compile only.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  importlib.import_module(PLUGIN_MODULE).initialize()


def gpu_devices(target_config: str, hosts: int, gpus_per_host: int) -> list[Any]:
  """Compile-only devices of `hosts` hosts with `gpus_per_host` GPUs each, of the card
  `target_config` describes."""
  load()
  from jax.experimental import topologies  # noqa: PLC0415
  description = topologies.get_topology_desc(
      platform="cuda", target_config=target_config, topology=f"1x{hosts}x{gpus_per_host}")
  return list(description.devices)


def compiler_options() -> dict[str, str]:
  """XLA options for a GPU compile: the nvcc package's ptxas and libdevice."""
  data_dir = cuda_data_dir()
  return {"xla_gpu_cuda_data_dir": data_dir} if data_dir else {}


def device_target_config() -> str:
  """The description XLA reads from this host's GPUs (run on a machine with one), to check
  a card's entry in `accelerators.GPU_CARDS` against."""
  import jax  # noqa: PLC0415
  from jax._src.lib import xla_client  # noqa: PLC0415
  return str(xla_client.get_topology_for_devices(jax.devices()).target_config)


if __name__ == "__main__":
  # python -m focal_jax.cuda_compiler  (on a GPU machine): the device's own description.
  print(device_target_config())
