"""Where a compiled step's bytes and FLOPs go: its kernels grouped by what they compute.

XLA's `cost_analysis()` gives a compiled program's totals only. This module reads the
optimised HLO text (`compiled.as_text()`): every kernel the program launches (a fusion, a
copy, a collective, an unfused dot) moves its operands in and its result out of device
memory (bytes = operand sizes + output size, in the sizes the tiled layouts pad them to),
and does the FLOPs of the dots, convolutions and elementwise operations inside it. Each
operation carries the Python call stack that produced it (the module's stack-frame table),
so a kernel is assigned to the part of the model, loss or optimiser whose function made its
main operation (its matrix product if it has one).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterable

# The groups, in report order.
GROUPS = ("attention_keys", "attention_products", "attention_projections", "softmax", "mlp",
          "norm", "patch_embed", "decode_head", "head_and_loss", "optimizer", "copies",
          "collectives", "other")

# A function on an operation's call stack -> its group; the innermost listed one wins. The
# backward pass carries its forward operation's stack.
_FUNCTION_GROUPS = {
    # softmax(q k^T + bias) v and its hand-written backward (models/attention.py).
    "softmax_attention": "softmax", "_attend_forward": "softmax", "_attend_backward": "softmax",
    "attend": "softmax", "_contract_queries": "attention_products",
    # The keys and values of each window: rolls, windows, the ring, pooled levels, biases.
    "expand_windows": "attention_keys", "unfold_neighbourhood": "attention_keys",
    "windows_and_heads": "attention_keys", "position_bias": "attention_keys",
    "FocalTransformerBlock.pool": "attention_keys", "_roll_static": "attention_keys",
    "_slice_axis": "attention_keys", "window_partition": "attention_keys",
    "window_reverse": "attention_keys",
    "FocalWindowAttention.__call__": "attention_projections",
    "FocalFastAttention.__call__": "attention_projections",
    "Attention.__call__": "attention_projections",  # the ViT reference
    "Mlp.__call__": "mlp", "_gelu_linear": "mlp", "gelu": "mlp",
    "LayerNorm.__call__": "norm", "_normalize_last_axis_jvp": "norm",
    "_normalize_and_stats": "norm",
    "PatchEmbed.__call__": "patch_embed", "PatchEmbed.embed_patches": "patch_embed",
    "FocalTransformer.forward_head": "head_and_loss", "soft_cross_entropy": "head_and_loss",
    "softmax_cross_entropy": "head_and_loss", "smooth_one_hot": "head_and_loss",
    "mix_groups": "head_and_loss", "VitReference.forward_head": "head_and_loss",
    # Segmentation: UPerNet's heads (convolutions, BatchNorm, pooling, resizing), its loss.
    "UPerHead.__call__": "decode_head", "FCNHead.__call__": "decode_head",
    "pixel_cross_entropy": "head_and_loss",
}
# Functions on the training step's path to the model: below them, an operation that no
# function above names is the model's ("other"); outside them it is the optimiser's.
_MODEL_ROOTS = ("make_train_step.<locals>.loss_fn",)

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
# Kernels that move no data: names, tuples, control flow (their bodies are counted).
_NO_KERNEL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while",
              "call", "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
              "add-dependency", "all-reduce-done", "all-gather-done", "collective-permute-done",
              "copy-done", "async-done", "async-update", "send-done", "recv-done",
              "fusion-done"}
# A fused kernel: `fusion`, or XLA:GPU's asynchronous form (`fusion-start` runs the fused
# computation, e.g. a loop's dynamic slice; its `fusion-done` only waits).
_FUSIONS = ("fusion", "fusion-start")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_LAYOUT_ONLY = {"copy", "transpose", "bitcast", "reshape", "parameter", "copy-start",
                "broadcast", "constant", "tuple", "get-tuple-element"}
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs",
                "compare", "select", "and", "or", "xor", "not", "clamp", "remainder", "power",
                "shift-left", "shift-right-logical", "shift-right-arithmetic", "sign", "floor",
                "ceil", "round-nearest-even", "round-nearest-afz"}


@dataclasses.dataclass
class _Instruction:
  name: str
  opcode: str
  shape: str  # the result's type text
  operands: list[str]
  attributes: str
  frame: int | None


@dataclasses.dataclass
class GroupCost:
  """Bytes moved, FLOPs and kernel count of one group, per device and step."""

  bytes: float = 0.0
  flops: float = 0.0
  kernels: int = 0


def _split_top(text: str) -> list[str]:
  """`text` split at the commas outside brackets."""
  parts, depth, start = [], 0, 0
  for i, char in enumerate(text):
    if char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def _closing(text: str, start: int) -> int:
  """Index of the bracket that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i
  return len(text) - 1


def _parse_instruction(line: str) -> _Instruction | None:
  match = _INSTRUCTION.match(line)
  if match is None:
    return None
  rest = line[match.end():]
  if rest.startswith("("):  # a tuple type
    end = _closing(rest, 0)
    shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  opcode, paren, rest = rest.partition("(")
  if not paren:
    return None
  end = _closing("(" + rest, 0) - 1
  operands = [o.split()[-1].lstrip("%") for o in _split_top(rest[:end]) if o.split()]
  attributes = rest[end + 1:]
  frame = re.search(r"stack_frame_id=(\d+)", attributes)
  return _Instruction(match.group(1), opcode.strip(), shape, operands, attributes,
                      int(frame.group(1)) if frame else None)


def array_bytes(shape: str) -> float:
  """Bytes of the arrays in a type text, each padded to its layout's first tile."""
  total = 0.0
  for dtype, dims_text, layout in _ARRAY.findall(shape):
    dims = [int(d) for d in dims_text.split(",") if d]
    tile = re.search(r":T\(([\d,]+)\)", layout or "")
    order = re.match(r"\{([\d,]*)", layout or "")
    if tile and order and order.group(1):
      minor_to_major = [int(d) for d in order.group(1).split(",")]
      for size, dim in zip(reversed([int(t) for t in tile.group(1).split(",")]), minor_to_major):
        dims[dim] = -(-dims[dim] // size) * size
    total += math.prod(dims) * _DTYPE_BYTES.get(dtype, 4)
  return total


def _elements(shape: str) -> int:
  return sum(math.prod(int(d) for d in dims.split(",") if d)
             for _, dims, _ in _ARRAY.findall(shape))


class HloModule:
  """The optimised HLO text of a compiled program, parsed for its kernels' costs."""

  def __init__(self, text: str):
    self.computations: dict[str, list[_Instruction]] = {}
    self.entry = ""
    self.frames: dict[int, tuple[str, int]] = {}  # frame -> (function, parent frame or 0)
    self._parse(text)
    self.shapes = {i.name: i.shape for body in self.computations.values() for i in body}

  def _parse(self, text: str) -> None:
    functions, locations, section, current = {}, {}, None, None
    for line in text.splitlines():
      if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
        section = line
        continue
      if section and line and line[0].isdigit():
        number, _, value = line.partition(" ")
        if section == "FunctionNames":
          functions[int(number)] = value.strip('"')
        elif section == "FileLocations":
          locations[int(number)] = int(re.search(r"function_name_id=(\d+)", value).group(1))
        elif section == "StackFrames":
          location = int(re.search(r"file_location_id=(\d+)", value).group(1))
          parent = int(re.search(r"parent_frame_id=(\d+)", value).group(1))
          # The text numbers frames from 1 and writes a parent as its number + 1 (1: none).
          self.frames[int(number)] = (functions.get(locations.get(location), ""), parent - 1)
        continue
      section = None
      header = _HEADER.match(line)
      if header and not line.startswith(" "):
        current = header.group(2)
        self.computations[current] = []
        if header.group(1):
          self.entry = current
      elif line.strip() == "}":
        current = None
      elif current is not None:
        instruction = _parse_instruction(line)
        if instruction is not None:
          self.computations[current].append(instruction)

  def stack(self, frame: int | None) -> list[str]:
    """Function names of a frame's call stack, innermost first."""
    names, seen = [], set()
    while frame and frame in self.frames and frame not in seen:
      seen.add(frame)
      name, frame = self.frames[frame]
      names.append(name)
    return names

  def group_of_frame(self, frame: int | None) -> str:
    stack = self.stack(frame)
    for name in stack:
      if name in _FUNCTION_GROUPS:
        return _FUNCTION_GROUPS[name]
    if any(name in _MODEL_ROOTS for name in stack):
      return "other"
    return "optimizer" if stack else "other"

  def _called(self, instruction: _Instruction) -> list[str]:
    names = re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?([^,}\s]+"
                       r"(?:,\s*%[\w.\-]+)*)", instruction.attributes)
    return [n.strip().lstrip("%") for group in names for n in group.split(",")]

  def _flops(self, computation: str, depth: int = 0) -> float:
    """FLOPs of one run of a fused computation: dots, convolutions, elementwise, reduces."""
    flops = 0.0
    for ins in self.computations.get(computation, []):
      if ins.opcode == "dot":
        lhs = self.shapes.get(ins.operands[0], "")
        dims = [int(d) for d in (_ARRAY.search(lhs).group(2) if _ARRAY.search(lhs) else "")
                .split(",") if d]
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attributes)
        k = math.prod(dims[int(c)] for c in contracting.group(1).split(",") if c) \
            if contracting and dims else 1
        flops += 2.0 * _elements(ins.shape) * k
      elif ins.opcode == "convolution":
        flops += self._convolution_flops(ins)
      elif ins.opcode in _ELEMENTWISE:
        flops += _elements(ins.shape)
      elif ins.opcode in ("reduce", "reduce-window") and ins.operands:
        flops += _elements(self.shapes.get(ins.operands[0], ""))
      elif ins.opcode in _FUSIONS and depth < 8:
        flops += sum(self._flops(c, depth + 1) for c in self._called(ins))
    return flops

  def _convolution_flops(self, ins: _Instruction) -> float:
    """2 x outputs x input features x the window taps that meet real (not padded, not
    dilated-in) inputs, per output on average: XLA:TPU writes batched matrix products as
    convolutions whose window runs over a batch axis, dilated or padded so that one tap
    per output meets an input."""
    lhs = _ARRAY.search(self.shapes.get(ins.operands[0], "")) if ins.operands else None
    rhs = _ARRAY.search(self.shapes.get(ins.operands[1], "")) if len(ins.operands) > 1 else None
    out = _ARRAY.search(ins.shape)
    labels = re.search(r"dim_labels=(\w+?)_(\w+?)->(\w+)", ins.attributes)
    if not (lhs and rhs and out and labels):
      return 0.0
    dims = [[int(d) for d in m.group(2).split(",") if d] for m in (lhs, rhs, out)]
    lhs_labels, rhs_labels, out_labels = labels.groups()
    in_features = dims[1][rhs_labels.index("i")]
    window = re.search(r"window=\{([^}]*)\}", ins.attributes)
    fields = dict(re.findall(r"(\w+)=([\dx_-]+)", window.group(1))) if window else {}
    spatial = sum(c.isdigit() for c in lhs_labels)

    def field(name: str, default: str) -> list[str]:
      return fields.get(name, "x".join([default] * spatial)).split("x") if spatial else []

    taps_per_output = 1.0
    for j, (k, stride, pad, lhs_dilation, rhs_dilation) in enumerate(zip(
        field("size", "1"), field("stride", "1"), field("pad", "0_0"), field("lhs_dilate", "1"),
        field("rhs_dilate", "1"))):
      if str(j) not in lhs_labels or str(j) not in out_labels:
        raise ValueError(f"{ins.name}: {labels.group(0)} with {spatial} window dims")
      n, m = dims[0][lhs_labels.index(str(j))], dims[2][out_labels.index(str(j))]
      k, stride, lo = int(k), int(stride), int(pad.split("_")[0])
      lhs_dilation, rhs_dilation = int(lhs_dilation), int(rhs_dilation)
      hits = 0
      for o in range(m):
        for t in range(k):
          position = o * stride + t * rhs_dilation - lo
          if 0 <= position <= (n - 1) * lhs_dilation and position % lhs_dilation == 0:
            hits += 1
      taps_per_output *= hits / max(m, 1)
    return 2.0 * _elements(ins.shape) * in_features * taps_per_output

  def _main_frame(self, computation: str) -> int | None:
    """The stack frame that names a fused computation: its first dot or convolution's,
    else the most common among its computing operations."""
    body = self.computations.get(computation, [])
    for ins in body:
      if ins.opcode in ("dot", "convolution") and ins.frame:
        return ins.frame
      if ins.opcode in _FUSIONS:
        for called in self._called(ins):
          frame = self._main_frame(called)
          if frame and any(i.opcode in ("dot", "convolution")
                           for i in self.computations.get(called, [])):
            return frame
    frames = collections.Counter(i.frame for i in body
                                 if i.frame and i.opcode not in _LAYOUT_ONLY)
    if not frames:
      frames = collections.Counter(i.frame for i in body if i.frame)
    return frames.most_common(1)[0][0] if frames else None

  def _has_product(self, called: list[str], instruction: _Instruction) -> bool:
    if instruction.opcode in ("dot", "convolution"):
      return True
    return any(i.opcode in ("dot", "convolution") or
               (i.opcode in _FUSIONS and self._has_product(self._called(i), i))
               for c in called for i in self.computations.get(c, []))

  def _layout_only(self, computation: str) -> bool:
    return all(i.opcode in _LAYOUT_ONLY for i in self.computations.get(computation, []))

  def _operand_bytes(self, instruction: _Instruction) -> float:
    """Bytes a kernel reads: its operands, or only the slices a fusion takes of them."""
    called = self._called(instruction) if instruction.opcode in _FUSIONS else []
    body = self.computations.get(called[0], []) if called else []
    parameters = {}
    for ins in body:
      if ins.opcode == "parameter":
        number = re.match(r"\s*(\d+)", ins.operands[0] if ins.operands else "")
        if number:
          parameters[int(number.group(1))] = ins.name
    users = collections.defaultdict(list)
    for ins in body:
      for operand in ins.operands:
        users[operand].append(ins)
    def sliced(name: str, depth: int = 0) -> float | None:
      """Bytes of the slices a fused value is read through (across bitcasts and reshapes),
      None when some use reads all of it."""
      uses = users.get(name, [])
      if not uses or depth > 8:
        return None
      total = 0.0
      for use in uses:
        if use.opcode in ("slice", "dynamic-slice"):
          total += array_bytes(use.shape)
        elif use.opcode in ("bitcast", "reshape"):
          inner = sliced(use.name, depth + 1)
          if inner is None:
            return None
          total += inner
        else:
          return None
      return total

    total = 0.0
    for index, operand in enumerate(instruction.operands):
      size = array_bytes(self.shapes.get(operand, ""))
      parameter = parameters.get(index, "")
      uses = users.get(parameter, [])
      if uses and all(u.opcode == "dynamic-update-slice" and u.operands[0] == parameter
                      for u in uses):
        size = 0.0  # updated in place: only the update is written (counted as output)
      elif (part := sliced(parameter)) is not None:
        size = min(size, part)
      total += size
    return total

  def _output_bytes(self, instruction: _Instruction) -> float:
    called = self._called(instruction) if instruction.opcode in _FUSIONS else []
    body = self.computations.get(called[0], []) if called else []
    root = body[-1] if body else None
    if root is not None and root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
      return array_bytes(self.shapes.get(root.operands[1], ""))
    if root is not None and instruction.opcode == "fusion-start":
      return array_bytes(root.shape)  # its shape is (operands, result, context): the result
    return array_bytes(instruction.shape)

  def _runs(self) -> dict[str, int]:
    """How many times each control-flow computation runs per step (loops' trip counts)."""
    runs = {self.entry: 1}
    pending = [self.entry]
    while pending:
      computation = pending.pop()
      for ins in self.computations.get(computation, []):
        if ins.opcode not in ("while", "call", "conditional", "async-start"):
          continue
        trips = re.search(r'known_trip_count"?[=:]\{"?n"?:"?(\d+)', ins.attributes)
        times = runs[computation] * (int(trips.group(1)) if trips and ins.opcode == "while"
                                     else 1)
        for called in self._called(ins):
          if called in self.computations and called not in runs:
            runs[called] = times
            pending.append(called)
    return runs

  def kernels(self) -> Iterable[tuple[str, float, float]]:
    """(group, bytes, FLOPs) of every kernel the step runs, loops unrolled."""
    for computation, times in self._runs().items():
      for ins in self.computations.get(computation, []):
        opcode = ins.opcode.removesuffix("-start")
        if ins.opcode in _NO_KERNEL:
          continue
        called = self._called(ins) if ins.opcode in _FUSIONS else []
        if opcode in _COLLECTIVES:
          group = "collectives"
        elif opcode in ("copy", "transpose") or (called and self._layout_only(called[0])):
          group = "copies"
        else:
          group = self.group_of_frame(self._main_frame(called[0]) if called else ins.frame)
          has_product = self._has_product(called or [], ins)
          if group == "softmax" and has_product:
            group = "attention_products"  # the products inside the attention functions
          elif group == "attention_projections" and not has_product:
            group = "attention_keys"  # the attention module's own layout and assembly work
        flops = sum(self._flops(c) for c in called) if called else \
            self._flops_of_single(ins)
        yield (group, times * (self._operand_bytes(ins) + self._output_bytes(ins)),
               times * flops)

  def _flops_of_single(self, instruction: _Instruction) -> float:
    """FLOPs of an unfused kernel, computed as its own one-instruction computation."""
    self.computations["__single__"] = [instruction]
    try:
      return self._flops("__single__")
    finally:
      del self.computations["__single__"]

  def groups(self) -> dict[str, GroupCost]:
    """Bytes, FLOPs and kernels per group (every group of GROUPS, zero when empty)."""
    costs = {name: GroupCost() for name in GROUPS}
    for group, nbytes, flops in self.kernels():
      costs[group].bytes += nbytes
      costs[group].flops += flops
      costs[group].kernels += 1
    return costs


def cost_by_group(hlo_text: str) -> dict[str, dict[str, float]]:
  """{group: {"bytes", "flops", "kernels"}} of a compiled program's optimised HLO text."""
  return {name: {"bytes": cost.bytes, "flops": cost.flops, "kernels": cost.kernels}
          for name, cost in HloModule(hlo_text).groups().items()}


def main(argv: list[str] | None = None) -> None:
  """python -m focal_jax.hlo_cost FILE.hlo: the groups of a dumped program (aot --dump-hlo)."""
  import sys  # noqa: PLC0415
  paths = sys.argv[1:] if argv is None else argv
  for path in paths:
    with open(path) as f:
      groups = cost_by_group(f.read())
    total = sum(g["bytes"] for g in groups.values()) or 1.0
    print(f"{path}: {total / 1e9:.2f} GB, "
          f"{sum(g['flops'] for g in groups.values()) / 1e12:.3f} TFLOP per device and step")
    for name, g in sorted(groups.items(), key=lambda item: -item[1]["bytes"]):
      print(f"  {name:22s} {g['bytes'] / 1e9:9.2f} GB {100 * g['bytes'] / total:5.1f} % "
            f"{g['flops'] / 1e12:9.3f} TFLOP {g['kernels']:6d} kernels")


if __name__ == "__main__":
  main()
