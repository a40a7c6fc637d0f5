"""A minimal TensorBoard event-file writer for scalars, with no dependencies.

TensorBoard reads `events.out.tfevents.*` files: TFRecords (length, masked CRC-32C,
payload, masked CRC-32C) whose payloads are `Event` protocol buffers. Only the few fields
scalars need are encoded here by hand, so neither TensorFlow, tensorboard nor
tensorboardX (which imports PyTorch when it is installed) is needed to write them.
"""

from __future__ import annotations

import os
import socket
import struct
import time

_CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (_CRC32C_POLY if crc & 1 else 0)
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    low, value = value & 0x7F, value >> 7
    if value:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  key = _varint(number << 3 | wire_type)
  if wire_type == 2:  # length-delimited
    return key + _varint(len(payload)) + payload
  return key + payload


def _event(step: int, wall_time: float, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
  """Event{wall_time=1: double, step=2: int64, file_version=3: string, summary=5: Summary}."""
  data = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    data += _field(3, 2, file_version.encode())
  if scalars:
    values = b"".join(  # Summary.value=1: Value{tag=1: string, simple_value=2: float}
        _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
        for tag, value in scalars.items())
    data += _field(5, 2, values)
  return data


def _record(payload: bytes) -> bytes:
  length = struct.pack("<Q", len(payload))
  return (length + struct.pack("<I", _masked_crc(length)) + payload
          + struct.pack("<I", _masked_crc(payload)))


class ScalarWriter:
  """Appends scalar summaries to a new event file in `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._file.write(_record(_event(0, time.time(), file_version="brain.Event:2")))
    self._file.flush()

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self._file.write(_record(_event(int(step), time.time(), scalars=scalars)))
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()
