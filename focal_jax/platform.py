"""Which JAX platforms this process starts: no TPU start-up on a host without a TPU.

`jax[tpu]` brings libtpu, and JAX tries it on every host: without a TPU its start-up
prints about ten lines of errors (`TPU initialization failed: No jellyfish device found`,
`E0000 ... unexpected worker hostname`) before the CPU takes over. Imported first by
`focal_jax` (and so by every entry point), `quiet_tpu_start()` sets JAX_PLATFORMS to "cpu"
when the user has not set it, the host shows no sign of a TPU (no /dev/accel* or
/dev/vfio device, no Google TPU on the PCI bus, no TPU_* / COLAB_TPU_ADDR / JAX_FORCE_TPU_INIT variable) and no
other accelerator plugin (a GPU's) is installed. A TPU host, a GPU host and an explicit
JAX_PLATFORMS are left as they are. Compiling for a TPU topology on a CPU host
(`focal_jax.aot`) loads libtpu by itself and works either way.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

# Google's PCI vendor id and the TPU chips' device ids (v3 to v6e and later: as JAX lists them).
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076",
                    "0x0083", "0x007c"}
# Set by TPU VMs, Colab or the user (not TPU_SKIP_MDS_QUERY: importing jax sets it on every host).
_TPU_ENV_VARS = ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID",
                 "TPU_CHIPS_PER_HOST_BOUNDS", "TPU_PROCESS_BOUNDS", "CLOUD_TPU_TASK_ID",
                 "COLAB_TPU_ADDR", "JAX_FORCE_TPU_INIT")


def host_has_tpu(root: str = "/") -> bool:
  """True when the host shows any sign of a TPU (devices, PCI ids, TPU variables)."""
  if any(os.environ.get(name) for name in _TPU_ENV_VARS):
    return True
  if glob.glob(os.path.join(root, "dev/accel*")):
    return True
  if any(name.isdigit() for name in _listdir(os.path.join(root, "dev/vfio"))):
    return True
  for vendor_path in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
    device_path = os.path.join(os.path.dirname(vendor_path), "device")
    if (_read(vendor_path) == _GOOGLE_PCI_VENDOR and _read(device_path) in _TPU_PCI_DEVICES):
      return True
  return False


def other_accelerator_plugin() -> bool:
  """True when a JAX plugin other than libtpu is installed (CUDA, ROCm, ...): JAX's own
  choice of platforms is kept for it."""
  if importlib.util.find_spec("jax_plugins") is not None:
    import jax_plugins  # noqa: PLC0415  (a namespace package: the installed plugins)
    if any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
      return True
  return bool(importlib.metadata.entry_points(group="jax_plugins"))


def quiet_tpu_start() -> str | None:
  """Sets JAX_PLATFORMS=cpu on a host without a TPU or another accelerator, unless it is
  set already; returns the value set (None when nothing changed)."""
  if "JAX_PLATFORMS" in os.environ or host_has_tpu() or other_accelerator_plugin():
    return None
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # imported before focal_jax: JAX read the variable already
    jax = sys.modules["jax"]
    if getattr(jax, "config", None) is not None and jax.config.jax_platforms is None:
      jax.config.update("jax_platforms", "cpu")
  return "cpu"


def _listdir(path: str) -> list[str]:
  try:
    return os.listdir(path)
  except OSError:
    return []


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""
