"""The benchmark's own framing: 4-byte big-endian length + one msgpack map.

Written here, not imported from ``pbt_server.protocol``: the floors and the broker probe
are baselines, and a baseline must not depend on the code it measures.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from typing import Any, Final

import msgpack

_HEADER: Final = struct.Struct(">I")
_LIMITS: Final = {"max_bin_len": 0, "max_ext_len": 0, "max_array_len": 64, "max_map_len": 64}


def frame(message: Mapping[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def take_frames(buffer: bytearray) -> list[dict[str, Any]]:
    """Remove every complete length-prefixed frame from the front of ``buffer``; unpack each."""
    messages = []
    offset = 0
    size = len(buffer)
    while size - offset >= _HEADER.size:
        (length,) = _HEADER.unpack_from(buffer, offset)
        end = offset + _HEADER.size + length
        if size < end:
            break
        with memoryview(buffer) as view, view[offset + _HEADER.size : end] as body:
            messages.append(msgpack.unpackb(body, raw=False, strict_map_key=True, **_LIMITS))
        offset = end
    if offset:
        del buffer[:offset]
    return messages


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
