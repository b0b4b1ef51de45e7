"""Reading a wandb offline run file (``run-*.wandb``) back from disk, with no wandb reader."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

_BLOCK = 32 * 1024
_HEADER = 7  # crc32 (4), length (2, little endian), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[bytes]:
    """Records of a wandb ``.wandb`` file: a 7-byte file header (``:W&B``, magic, version),
    then LevelDB log framing in 32 KiB blocks; each record's crc32 covers its type and data."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records: list[bytes] = []
    pending = b""
    position = 7
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:  # block trailer padding
            position += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            position += left_in_block
            continue
        payload = data[position + _HEADER : position + _HEADER + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"bad crc at {position}"
        position += _HEADER + length
        if kind == _FULL:
            records.append(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            records.append(pending + payload)
        else:
            raise AssertionError(f"unknown record type {kind} at {position}")
    return records


def history_and_summary(run_file: Path) -> tuple[dict[int, dict], dict]:
    """History rows by ``_step`` and the summary of a wandb run file."""
    from wandb.proto import wandb_internal_pb2

    rows: dict[int, dict] = {}
    summary: dict = {}
    for raw in read_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            rows[row["_step"]] = {**rows.get(row["_step"], {}), **row}
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return rows, summary
