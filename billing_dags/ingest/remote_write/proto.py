"""Prometheus remote-write 1.0 and remote-read messages (prometheus/prompb types.proto + remote.proto), built at
import time from a descriptor with the protobuf runtime: no generated code, no hand-rolled decoder.

Only the fields the receiver reads are declared; any other field (native-histogram buckets,
reserved fields, fields added by newer senders) is skipped by the protobuf parser as unknown.
The messages live in a private descriptor pool so they cannot clash with another copy of prompb.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_REPEATED, _OPTIONAL = _F.LABEL_REPEATED, _F.LABEL_OPTIONAL


def _field(name: str, number: int, ftype: int, label: int = _OPTIONAL, type_name: str | None = None) -> _F:
    f = _F(name=name, number=number, type=ftype, label=label)
    if type_name:
        f.type_name = type_name
    return f


def _file() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="billing_dags/prompb_remote.proto", package="prometheus", syntax="proto3")

    def message(name: str, *fields: _F) -> descriptor_pb2.DescriptorProto:
        m = fd.message_type.add(name=name)
        m.field.extend(fields)
        return m

    message("Label", _field("name", 1, _F.TYPE_STRING), _field("value", 2, _F.TYPE_STRING))
    message("Sample", _field("value", 1, _F.TYPE_DOUBLE), _field("timestamp", 2, _F.TYPE_INT64))
    message(
        "Exemplar",
        _field("labels", 1, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.Label"),
        _field("value", 2, _F.TYPE_DOUBLE),
        _field("timestamp", 3, _F.TYPE_INT64),
    )
    # native histograms are not usage samples: only their timestamp is read, to count them
    message("Histogram", _field("timestamp", 15, _F.TYPE_INT64))
    message(
        "TimeSeries",
        _field("labels", 1, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.Label"),
        _field("samples", 2, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.Sample"),
        _field("exemplars", 3, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.Exemplar"),
        _field("histograms", 4, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.Histogram"),
    )
    meta = message(
        "MetricMetadata",
        _field("type", 1, _F.TYPE_ENUM, type_name=".prometheus.MetricMetadata.MetricType"),
        _field("metric_family_name", 2, _F.TYPE_STRING),
        _field("help", 4, _F.TYPE_STRING),
        _field("unit", 5, _F.TYPE_STRING),
    )
    enum = meta.enum_type.add(name="MetricType")
    for number, name in enumerate(["UNKNOWN", "COUNTER", "GAUGE", "HISTOGRAM", "GAUGEHISTOGRAM", "SUMMARY", "INFO", "STATESET"]):
        enum.value.add(name=name, number=number)
    message(
        "WriteRequest",
        _field("timeseries", 1, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.TimeSeries"),
        _field("metadata", 3, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.MetricMetadata"),
    )
    # The same wire format, read with each Label kept as its encoded bytes: a length-delimited
    # message field and a bytes field are encoded identically. The receiver uses the tuple of
    # encoded labels as its series-cache key (one C call per series instead of two Python
    # attribute reads per label) and parses the Label messages only on a cache miss.
    message(
        "TimeSeriesKeyed",
        _field("labels", 1, _F.TYPE_BYTES, _REPEATED),
        _field("samples", 2, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.Sample"),
        _field("exemplars", 3, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.Exemplar"),
        _field("histograms", 4, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.Histogram"),
    )
    message(
        "WriteRequestKeyed",
        _field("timeseries", 1, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.TimeSeriesKeyed"),
        _field("metadata", 3, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.MetricMetadata"),
    )
    # Remote read (the client side of /api/v1/read, billing_dags.ingest.prometheus): the request, and the
    # response of the SAMPLES response type, whose QueryResult holds TimeSeries like a WriteRequest
    matcher = message(
        "LabelMatcher",
        _field("type", 1, _F.TYPE_ENUM, type_name=".prometheus.LabelMatcher.Type"),
        _field("name", 2, _F.TYPE_STRING),
        _field("value", 3, _F.TYPE_STRING),
    )
    mtype = matcher.enum_type.add(name="Type")
    for number, name in enumerate(["EQ", "NEQ", "RE", "NRE"]):
        mtype.value.add(name=name, number=number)
    message(
        "Query",
        _field("start_timestamp_ms", 1, _F.TYPE_INT64),
        _field("end_timestamp_ms", 2, _F.TYPE_INT64),
        _field("matchers", 3, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.LabelMatcher"),
    )
    read = message(
        "ReadRequest",
        _field("queries", 1, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.Query"),
        _field("accepted_response_types", 2, _F.TYPE_ENUM, _REPEATED, ".prometheus.ReadRequest.ResponseType"),
    )
    rtype = read.enum_type.add(name="ResponseType")
    for number, name in enumerate(["SAMPLES", "STREAMED_XOR_CHUNKS"]):
        rtype.value.add(name=name, number=number)
    message("QueryResult", _field("timeseries", 1, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.TimeSeries"))
    message("ReadResponse", _field("results", 1, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.QueryResult"))
    # the frames of a STREAMED_XOR_CHUNKS response (the chunk encoding is an enum upstream, read as int)
    message(
        "Chunk",
        _field("min_time_ms", 1, _F.TYPE_INT64),
        _field("max_time_ms", 2, _F.TYPE_INT64),
        _field("type", 3, _F.TYPE_INT32),
        _field("data", 4, _F.TYPE_BYTES),
    )
    message(
        "ChunkedSeries",
        _field("labels", 1, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.Label"),
        _field("chunks", 2, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.Chunk"),
    )
    message(
        "ChunkedReadResponse",
        _field("chunked_series", 1, _F.TYPE_MESSAGE, _REPEATED, ".prometheus.ChunkedSeries"),
        _field("query_index", 2, _F.TYPE_INT64),
    )
    return fd


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())


def _cls(name: str):
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"prometheus.{name}"))


WriteRequest = _cls("WriteRequest")
TimeSeries = _cls("TimeSeries")
Label = _cls("Label")
Sample = _cls("Sample")
MetricMetadata = _cls("MetricMetadata")
WriteRequestKeyed = _cls("WriteRequestKeyed")
TimeSeriesKeyed = _cls("TimeSeriesKeyed")
LabelMatcher = _cls("LabelMatcher")
ReadRequest = _cls("ReadRequest")
ReadResponse = _cls("ReadResponse")
QueryResultMessage = _cls("QueryResult")
ChunkedReadResponse = _cls("ChunkedReadResponse")
