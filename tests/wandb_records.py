"""Reading W&B offline run files back (tests only)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


# wandb 0.31 has no Python reader for its transaction log any more (the old
# wandb.sdk.internal.datastore.DataStore is gone; wandb-core, in Go, reads it for `wandb sync`).
# The format is unchanged: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB log
# records in 32 KiB blocks (https://github.com/google/leveldb/blob/main/doc/log_format.md), each a
# serialized wandb.proto.wandb_internal_pb2.Record, with W&B's checksum crc32(type byte + data).
def read_wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block_len, header_len = 32768, 7
    pos, pending, payloads = 7, None, []
    while pos + header_len <= len(data):
        if block_len - pos % block_len < header_len:  # zero-filled block trailer
            pos += block_len - pos % block_len
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + header_len])
        chunk = data[pos + header_len:pos + header_len + length]
        pos += header_len + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"bad checksum at {pos}"
        if kind == 1:  # FULL
            payloads.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            payloads.append(pending + chunk)
            pending = None
        else:
            raise AssertionError(f"unknown record type {kind}")
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _nest(items) -> dict:
    out: dict = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def history_by_step(records) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.setdefault(record.history.step.num, {}).update(_nest(record.history.item))
    return rows


def run_record(records):
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 1
    return runs[0]


def offline_run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
