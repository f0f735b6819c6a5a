"""One Arrow type per logical type, for the ids and kept columns of every part.

A nightly manifest is rewritten by whatever tool is at hand: pyarrow writes `string` and keeps
`int32`, polars writes `large_string` and `int64`, pandas writes nanosecond timestamps where
polars writes microseconds, a categorical comes back dictionary-encoded. Parts that copied those
types as they came gave two schemas in one output, and readers and the resume refused it
(issue 12: "Schema at index 1 was different: id: string vs id: large_string"). So the manifest is
cast once, when it is read, to the canonical type of each column, and the writer casts back to it.

    strings (string, large_string, string_view, dictionary of them)  → large_string
    binary (binary, large_binary, binary_view, fixed_size_binary)   → large_binary
    signed and unsigned integers up to 32 bits, int64              → int64
    uint64                                                          → uint64 (its values need not fit int64)
    floats (16, 32, 64 bits)                                        → float64
    date32, date64                                                  → date32
    timestamp[any unit, tz]                                         → timestamp[us, tz]
    time32, time64                                                  → time64[us]
    duration[any unit]                                              → duration[us]
    decimal32/64/128(p, s)                                          → decimal128(p, s)
    list, large_list, list_view                                     → large_list<canonical item>
    fixed_size_list<t, n>, struct, map                              → the same, with canonical children
    null (a column with no value yet)                               → large_string (see below)

A cast that would lose data (a timestamp with nanoseconds, a date64 that is not a whole day) is
refused when the manifest is read, naming the column.
"""

from __future__ import annotations

import pyarrow as pa

_US = "us"  # the unit of canonical timestamps, times and durations: polars' default, and pyarrow's for datetime objects


def canonical_type(t: pa.DataType) -> pa.DataType:
    """The type every part gives a manifest column of type `t`."""
    if pa.types.is_dictionary(t):
        return canonical_type(t.value_type)
    if pa.types.is_null(t):
        # No value yet, so no type: the commonest optional field is text, and a typed column
        # tomorrow would otherwise always differ from tonight's `null` (read.py warns about it).
        return pa.large_string()
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.large_string()
    if (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
            or pa.types.is_fixed_size_binary(t)):
        return pa.large_binary()
    if pa.types.is_integer(t):
        return pa.uint64() if t == pa.uint64() else pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    if pa.types.is_date(t):
        return pa.date32()
    if pa.types.is_timestamp(t):
        return pa.timestamp(_US, t.tz)
    if pa.types.is_time(t):
        return pa.time64(_US)
    if pa.types.is_duration(t):
        return pa.duration(_US)
    if pa.types.is_decimal(t) and t.bit_width < 128:
        return pa.decimal128(t.precision, t.scale)
    if pa.types.is_map(t):
        return pa.map_(canonical_type(t.key_type), canonical_type(t.item_type))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(canonical_type(t.value_type), t.list_size)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return pa.large_list(canonical_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(t.field(i).name, canonical_type(t.field(i).type)) for i in range(t.num_fields)])
    return t


def to_canonical(values: pa.Array | pa.ChunkedArray, t: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """`values` cast to `t` (a canonical type); pa.ArrowInvalid if that would lose data."""
    if values.type == t:
        return values
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode() if isinstance(values, pa.Array) else pa.chunked_array(
            [c.dictionary_decode() for c in values.chunks], type=values.type.value_type)
    return values.cast(t)
