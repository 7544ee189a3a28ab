"""TFRecord files and ``tf.train.Example`` messages without TensorFlow.

A TFRecord file is a sequence of records, each framed as ``uint64 length`` (little-endian),
``uint32 masked_crc32c(length bytes)``, ``length`` bytes of data, ``uint32
masked_crc32c(data)``. ``tf.train.Example`` (``tensorflow/core/example/example.proto``,
``feature.proto``) is built here from a descriptor with the same field numbers, so the
``protobuf`` package parses and writes it byte for byte as TensorFlow does.

The length checksum of every record is verified (pure Python: 8 bytes); the data checksum only
when ``google_crc32c`` is importable (the ``data`` extra; a pure-Python CRC of images is too
slow), else corruption inside a record shows when its contents are parsed or decoded.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from vla_ray.data.rllib_format import DataError

_HEADER = 12  # uint64 length + uint32 crc
_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reversed


@lru_cache(maxsize=1)
def _table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


def crc32c(data: bytes) -> int:
    fast = _fast_crc()
    if fast is not None:
        return fast(data)
    table, c = _table(), 0xFFFFFFFF
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


@lru_cache(maxsize=1)
def _fast_crc() -> Any:
    try:
        import google_crc32c
    except ImportError:
        return None
    return lambda data: int(google_crc32c.value(data))


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """``(offset, data)`` of each record of a TFRecord file; a DataError naming the file and the
    record for a truncated or corrupt frame."""
    path = Path(path)
    check_data = _fast_crc() is not None
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError as err:
        raise DataError(f"data: {path} does not exist") from err
    with f:
        index = 0
        while True:
            offset = f.tell()
            header = f.read(_HEADER)
            if not header:
                return
            where = f"{path} record {index} (byte {offset})"
            if len(header) < _HEADER:
                raise DataError(f"{where}: truncated record header (file cut short?)")
            length_bytes, (crc,) = header[:8], struct.unpack("<I", header[8:])
            if masked_crc(length_bytes) != crc:
                raise DataError(f"{where}: length checksum mismatch (corrupt or not a TFRecord)")
            (length,) = struct.unpack("<Q", length_bytes)
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                raise DataError(
                    f"{where}: truncated record ({len(data)} of {length} bytes; file cut short?)"
                )
            if check_data and masked_crc(data) != struct.unpack("<I", footer)[0]:
                raise DataError(f"{where}: data checksum mismatch (corrupt record)")
            yield offset, data
            index += 1


def read_record(path: str | os.PathLike, offset: int) -> bytes:
    """The record starting at byte ``offset`` (as :func:`iter_records` gave it)."""
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError as err:
        raise DataError(f"data: {path} does not exist") from err
    with f:
        f.seek(offset)
        header = f.read(_HEADER)
        where = f"{path} record at byte {offset}"
        if len(header) < _HEADER or masked_crc(header[:8]) != struct.unpack("<I", header[8:])[0]:
            raise DataError(f"{where}: no valid record header (file changed or cut short?)")
        (length,) = struct.unpack("<Q", header[:8])
        data = f.read(length)
        if len(data) < length:
            raise DataError(f"{where}: truncated record ({len(data)} of {length} bytes)")
        return data


def write_records(path: str | os.PathLike, records: Iterable[bytes]) -> None:
    """A TFRecord file of ``records`` (uncompressed)."""
    with open(path, "wb") as f:
        for data in records:
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", masked_crc(length)))
            f.write(data + struct.pack("<I", masked_crc(data)))


@lru_cache(maxsize=1)
def example_class() -> Any:
    """The ``tf.train.Example`` message class (package ``tensorflow``, same field numbers)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(
        name="vla_ray_tf_example.proto", package="tensorflow", syntax="proto3"
    )
    label_rep = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    label_opt = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    types = descriptor_pb2.FieldDescriptorProto

    def message(name: str, fields: list[tuple[str, int, int, int, str | None]]) -> Any:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
        return m

    message("BytesList", [("value", 1, types.TYPE_BYTES, label_rep, None)])
    message("FloatList", [("value", 1, types.TYPE_FLOAT, label_rep, None)])
    message("Int64List", [("value", 1, types.TYPE_INT64, label_rep, None)])
    feature = message(
        "Feature",
        [
            ("bytes_list", 1, types.TYPE_MESSAGE, label_opt, ".tensorflow.BytesList"),
            ("float_list", 2, types.TYPE_MESSAGE, label_opt, ".tensorflow.FloatList"),
            ("int64_list", 3, types.TYPE_MESSAGE, label_opt, ".tensorflow.Int64List"),
        ],
    )
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    features = message(
        "Features",
        [("feature", 1, types.TYPE_MESSAGE, label_rep, ".tensorflow.Features.FeatureEntry")],
    )
    entry = features.nested_type.add(name="FeatureEntry")
    entry.field.add(name="key", number=1, type=types.TYPE_STRING, label=label_opt)
    entry.field.add(
        name="value",
        number=2,
        type=types.TYPE_MESSAGE,
        label=label_opt,
        type_name=".tensorflow.Feature",
    )
    entry.options.map_entry = True
    message("Example", [("features", 1, types.TYPE_MESSAGE, label_opt, ".tensorflow.Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def parse_example(data: bytes, where: str) -> dict[str, list[Any]]:
    """``{feature name: list of values}`` of a serialised ``tf.train.Example``."""
    from google.protobuf.message import DecodeError

    msg = example_class()()
    try:
        msg.ParseFromString(data)
    except DecodeError as err:
        raise DataError(f"{where}: not a tf.train.Example ({err})") from err
    out: dict[str, list[Any]] = {}
    for key, feat in msg.features.feature.items():
        kind = feat.WhichOneof("kind")
        out[key] = list(getattr(feat, kind).value) if kind else []
    return out


def make_example(features: dict[str, list[Any]]) -> bytes:
    """A serialised ``tf.train.Example`` of ``{name: list of bytes | float | int | bool}``
    (the kind follows the first value: bytes, float, else int64)."""
    msg = example_class()()
    for key, values in features.items():
        feat = msg.features.feature[key]
        first = values[0] if len(values) else 0.0
        if isinstance(first, (bytes, str)):
            feat.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
        elif isinstance(first, float):
            feat.float_list.value.extend(float(v) for v in values)
        else:
            feat.int64_list.value.extend(int(v) for v in values)
    return msg.SerializeToString()
