from loupe.v1 import common_pb2 as _common_pb2
from loupe.v1 import retrieval_pb2 as _retrieval_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankingInfo(_message.Message):
    __slots__ = ("metadata_fields",)
    METADATA_FIELDS_FIELD_NUMBER: _ClassVar[int]
    metadata_fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, metadata_fields: _Optional[_Iterable[str]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("query", "candidates", "top_k", "query_metadata", "vectors", "query_label")
    class QueryMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Value, _Mapping]] = ...) -> None: ...
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    QUERY_METADATA_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    QUERY_LABEL_FIELD_NUMBER: _ClassVar[int]
    query: _common_pb2.Vector
    candidates: _containers.RepeatedCompositeFieldContainer[_retrieval_pb2.Candidate]
    top_k: int
    query_metadata: _containers.MessageMap[str, _common_pb2.Value]
    vectors: _common_pb2.PackedVectors
    query_label: str
    def __init__(self, query: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[_retrieval_pb2.Candidate, _Mapping]]] = ..., top_k: _Optional[int] = ..., query_metadata: _Optional[_Mapping[str, _common_pb2.Value]] = ..., vectors: _Optional[_Union[_common_pb2.PackedVectors, _Mapping]] = ..., query_label: _Optional[str] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hit]
    def __init__(self, hits: _Optional[_Iterable[_Union[_common_pb2.Hit, _Mapping]]] = ...) -> None: ...
