from loupe.v1 import common_pb2 as _common_pb2
from loupe.v1 import detection_pb2 as _detection_pb2
from loupe.v1 import retrieval_pb2 as _retrieval_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IndexRequest(_message.Message):
    __slots__ = ("item_id", "image", "metadata", "detect", "skip_duplicates", "catalog", "source_uri", "keep_original", "model", "if_live_content_hash")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Value, _Mapping]] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DETECT_FIELD_NUMBER: _ClassVar[int]
    SKIP_DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    KEEP_ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IF_LIVE_CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    image: bytes
    metadata: _containers.MessageMap[str, _common_pb2.Value]
    detect: bool
    skip_duplicates: bool
    catalog: str
    source_uri: str
    keep_original: bool
    model: str
    if_live_content_hash: str
    def __init__(self, item_id: _Optional[str] = ..., image: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, _common_pb2.Value]] = ..., detect: _Optional[bool] = ..., skip_duplicates: _Optional[bool] = ..., catalog: _Optional[str] = ..., source_uri: _Optional[str] = ..., keep_original: _Optional[bool] = ..., model: _Optional[str] = ..., if_live_content_hash: _Optional[str] = ...) -> None: ...

class Duplicate(_message.Message):
    __slots__ = ("item_id", "kind", "similarity")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Duplicate.Kind]
        EXACT: _ClassVar[Duplicate.Kind]
        NEAR: _ClassVar[Duplicate.Kind]
    KIND_UNSPECIFIED: Duplicate.Kind
    EXACT: Duplicate.Kind
    NEAR: Duplicate.Kind
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    kind: Duplicate.Kind
    similarity: float
    def __init__(self, item_id: _Optional[str] = ..., kind: _Optional[_Union[Duplicate.Kind, str]] = ..., similarity: _Optional[float] = ...) -> None: ...

class IndexResponse(_message.Message):
    __slots__ = ("item_id", "content_hash", "indexed", "objects", "duplicates", "embedding_cached", "model_version", "unchanged", "skipped")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_CACHED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    content_hash: str
    indexed: bool
    objects: _containers.RepeatedCompositeFieldContainer[_common_pb2.Detection]
    duplicates: _containers.RepeatedCompositeFieldContainer[Duplicate]
    embedding_cached: bool
    model_version: str
    unchanged: bool
    skipped: str
    def __init__(self, item_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., indexed: _Optional[bool] = ..., objects: _Optional[_Iterable[_Union[_common_pb2.Detection, _Mapping]]] = ..., duplicates: _Optional[_Iterable[_Union[Duplicate, _Mapping]]] = ..., embedding_cached: _Optional[bool] = ..., model_version: _Optional[str] = ..., unchanged: _Optional[bool] = ..., skipped: _Optional[str] = ...) -> None: ...

class IndexResult(_message.Message):
    __slots__ = ("item_id", "code", "error", "response")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    code: int
    error: str
    response: IndexResponse
    def __init__(self, item_id: _Optional[str] = ..., code: _Optional[int] = ..., error: _Optional[str] = ..., response: _Optional[_Union[IndexResponse, _Mapping]] = ...) -> None: ...

class IndexStreamResponse(_message.Message):
    __slots__ = ("results", "indexed", "failed")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[IndexResult]
    indexed: int
    failed: int
    def __init__(self, results: _Optional[_Iterable[_Union[IndexResult, _Mapping]]] = ..., indexed: _Optional[int] = ..., failed: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("item_id", "catalog")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    catalog: str
    def __init__(self, item_id: _Optional[str] = ..., catalog: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("item_id", "catalog")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    catalog: str
    def __init__(self, item_id: _Optional[str] = ..., catalog: _Optional[str] = ...) -> None: ...

class ItemObject(_message.Message):
    __slots__ = ("object_index", "box", "label", "score")
    OBJECT_INDEX_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    object_index: int
    box: _common_pb2.Box
    label: str
    score: float
    def __init__(self, object_index: _Optional[int] = ..., box: _Optional[_Union[_common_pb2.Box, _Mapping]] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("item_id", "content_hash", "model_version", "metadata", "image_width", "image_height", "objects")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Value, _Mapping]] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    content_hash: str
    model_version: str
    metadata: _containers.MessageMap[str, _common_pb2.Value]
    image_width: int
    image_height: int
    objects: _containers.RepeatedCompositeFieldContainer[ItemObject]
    def __init__(self, item_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., model_version: _Optional[str] = ..., metadata: _Optional[_Mapping[str, _common_pb2.Value]] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., objects: _Optional[_Iterable[_Union[ItemObject, _Mapping]]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("image", "item_id", "crop", "top_k", "filter", "objects", "context_metadata", "catalog", "candidates")
    class ContextMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Value, _Mapping]] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_METADATA_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    item_id: str
    crop: _common_pb2.Box
    top_k: int
    filter: _common_pb2.Filter
    objects: bool
    context_metadata: _containers.MessageMap[str, _common_pb2.Value]
    catalog: str
    candidates: int
    def __init__(self, image: _Optional[bytes] = ..., item_id: _Optional[str] = ..., crop: _Optional[_Union[_common_pb2.Box, _Mapping]] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ..., objects: _Optional[bool] = ..., context_metadata: _Optional[_Mapping[str, _common_pb2.Value]] = ..., catalog: _Optional[str] = ..., candidates: _Optional[int] = ...) -> None: ...

class ObjectResults(_message.Message):
    __slots__ = ("detection", "results")
    DETECTION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    detection: _common_pb2.Detection
    results: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hit]
    def __init__(self, detection: _Optional[_Union[_common_pb2.Detection, _Mapping]] = ..., results: _Optional[_Iterable[_Union[_common_pb2.Hit, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "objects", "cached", "model_version", "degraded", "degraded_reasons")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASONS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hit]
    objects: _containers.RepeatedCompositeFieldContainer[ObjectResults]
    cached: bool
    model_version: str
    degraded: bool
    degraded_reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, results: _Optional[_Iterable[_Union[_common_pb2.Hit, _Mapping]]] = ..., objects: _Optional[_Iterable[_Union[ObjectResults, _Mapping]]] = ..., cached: _Optional[bool] = ..., model_version: _Optional[str] = ..., degraded: _Optional[bool] = ..., degraded_reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class Catalog(_message.Message):
    __slots__ = ("name", "items", "rows", "dimension", "index_type", "candidate_code", "code_bytes", "full_vector_bytes", "dba_neighbours", "code", "vector_store", "stored_vector_bytes", "oversampling", "indexed_rows", "embedder", "preprocessing", "detector", "next_embedder", "previous_embedder", "next_items")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FULL_VECTOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    DBA_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_STORE_FIELD_NUMBER: _ClassVar[int]
    STORED_VECTOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    OVERSAMPLING_FIELD_NUMBER: _ClassVar[int]
    INDEXED_ROWS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    NEXT_EMBEDDER_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_EMBEDDER_FIELD_NUMBER: _ClassVar[int]
    NEXT_ITEMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    items: int
    rows: int
    dimension: int
    index_type: str
    candidate_code: str
    code_bytes: int
    full_vector_bytes: int
    dba_neighbours: int
    code: str
    vector_store: str
    stored_vector_bytes: int
    oversampling: int
    indexed_rows: int
    embedder: str
    preprocessing: str
    detector: str
    next_embedder: str
    previous_embedder: str
    next_items: int
    def __init__(self, name: _Optional[str] = ..., items: _Optional[int] = ..., rows: _Optional[int] = ..., dimension: _Optional[int] = ..., index_type: _Optional[str] = ..., candidate_code: _Optional[str] = ..., code_bytes: _Optional[int] = ..., full_vector_bytes: _Optional[int] = ..., dba_neighbours: _Optional[int] = ..., code: _Optional[str] = ..., vector_store: _Optional[str] = ..., stored_vector_bytes: _Optional[int] = ..., oversampling: _Optional[int] = ..., indexed_rows: _Optional[int] = ..., embedder: _Optional[str] = ..., preprocessing: _Optional[str] = ..., detector: _Optional[str] = ..., next_embedder: _Optional[str] = ..., previous_embedder: _Optional[str] = ..., next_items: _Optional[int] = ...) -> None: ...

class ListCatalogsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCatalogsResponse(_message.Message):
    __slots__ = ("catalogs",)
    CATALOGS_FIELD_NUMBER: _ClassVar[int]
    catalogs: _containers.RepeatedCompositeFieldContainer[Catalog]
    def __init__(self, catalogs: _Optional[_Iterable[_Union[Catalog, _Mapping]]] = ...) -> None: ...

class DropCatalogRequest(_message.Message):
    __slots__ = ("catalog",)
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    def __init__(self, catalog: _Optional[str] = ...) -> None: ...

class DropCatalogResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...

class AugmentCatalogRequest(_message.Message):
    __slots__ = ("catalog", "neighbours", "alpha")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    neighbours: int
    alpha: float
    def __init__(self, catalog: _Optional[str] = ..., neighbours: _Optional[int] = ..., alpha: _Optional[float] = ...) -> None: ...

class AugmentCatalogResponse(_message.Message):
    __slots__ = ("items", "seconds")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    items: int
    seconds: float
    def __init__(self, items: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...
