from loupe.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelBinding(_message.Message):
    __slots__ = ("embedder", "dimension", "preprocessing", "detector", "collection")
    EMBEDDER_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    embedder: str
    dimension: int
    preprocessing: str
    detector: str
    collection: str
    def __init__(self, embedder: _Optional[str] = ..., dimension: _Optional[int] = ..., preprocessing: _Optional[str] = ..., detector: _Optional[str] = ..., collection: _Optional[str] = ...) -> None: ...

class CatalogRecord(_message.Message):
    __slots__ = ("catalog", "live", "next", "previous")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    live: ModelBinding
    next: ModelBinding
    previous: ModelBinding
    def __init__(self, catalog: _Optional[str] = ..., live: _Optional[_Union[ModelBinding, _Mapping]] = ..., next: _Optional[_Union[ModelBinding, _Mapping]] = ..., previous: _Optional[_Union[ModelBinding, _Mapping]] = ...) -> None: ...

class MigrateCatalogRequest(_message.Message):
    __slots__ = ("catalog", "action", "binding")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[MigrateCatalogRequest.Action]
        BEGIN: _ClassVar[MigrateCatalogRequest.Action]
        SWITCH: _ClassVar[MigrateCatalogRequest.Action]
        ROLLBACK: _ClassVar[MigrateCatalogRequest.Action]
        DROP_PREVIOUS: _ClassVar[MigrateCatalogRequest.Action]
        ABORT: _ClassVar[MigrateCatalogRequest.Action]
        STATUS: _ClassVar[MigrateCatalogRequest.Action]
    ACTION_UNSPECIFIED: MigrateCatalogRequest.Action
    BEGIN: MigrateCatalogRequest.Action
    SWITCH: MigrateCatalogRequest.Action
    ROLLBACK: MigrateCatalogRequest.Action
    DROP_PREVIOUS: MigrateCatalogRequest.Action
    ABORT: MigrateCatalogRequest.Action
    STATUS: MigrateCatalogRequest.Action
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    BINDING_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    action: MigrateCatalogRequest.Action
    binding: ModelBinding
    def __init__(self, catalog: _Optional[str] = ..., action: _Optional[_Union[MigrateCatalogRequest.Action, str]] = ..., binding: _Optional[_Union[ModelBinding, _Mapping]] = ...) -> None: ...

class ListItemsRequest(_message.Message):
    __slots__ = ("catalog", "model", "after_item_id", "limit")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AFTER_ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    model: str
    after_item_id: str
    limit: int
    def __init__(self, catalog: _Optional[str] = ..., model: _Optional[str] = ..., after_item_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListedItem(_message.Message):
    __slots__ = ("item_id", "content_hash", "source_uri", "metadata", "objects", "model_version")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Value, _Mapping]] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    content_hash: str
    source_uri: str
    metadata: _containers.MessageMap[str, _common_pb2.Value]
    objects: int
    model_version: str
    def __init__(self, item_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., source_uri: _Optional[str] = ..., metadata: _Optional[_Mapping[str, _common_pb2.Value]] = ..., objects: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class ListItemsResponse(_message.Message):
    __slots__ = ("items", "next_after_item_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ListedItem]
    next_after_item_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[ListedItem, _Mapping]]] = ..., next_after_item_id: _Optional[str] = ...) -> None: ...

class StoredObject(_message.Message):
    __slots__ = ("object_index", "box", "label", "detection_score", "vector")
    OBJECT_INDEX_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    DETECTION_SCORE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    object_index: int
    box: _common_pb2.Box
    label: str
    detection_score: float
    vector: _common_pb2.Vector
    def __init__(self, object_index: _Optional[int] = ..., box: _Optional[_Union[_common_pb2.Box, _Mapping]] = ..., label: _Optional[str] = ..., detection_score: _Optional[float] = ..., vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ...) -> None: ...

class StoredItem(_message.Message):
    __slots__ = ("item_id", "content_hash", "model_version", "metadata", "image_width", "image_height", "objects", "source_uri")
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
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    content_hash: str
    model_version: str
    metadata: _containers.MessageMap[str, _common_pb2.Value]
    image_width: int
    image_height: int
    objects: _containers.RepeatedCompositeFieldContainer[StoredObject]
    source_uri: str
    def __init__(self, item_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., model_version: _Optional[str] = ..., metadata: _Optional[_Mapping[str, _common_pb2.Value]] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., objects: _Optional[_Iterable[_Union[StoredObject, _Mapping]]] = ..., source_uri: _Optional[str] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("item", "catalog", "near_duplicate_threshold", "skip_duplicates", "binding", "if_live_content_hash")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    NEAR_DUPLICATE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SKIP_DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    BINDING_FIELD_NUMBER: _ClassVar[int]
    IF_LIVE_CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    item: StoredItem
    catalog: str
    near_duplicate_threshold: float
    skip_duplicates: bool
    binding: ModelBinding
    if_live_content_hash: str
    def __init__(self, item: _Optional[_Union[StoredItem, _Mapping]] = ..., catalog: _Optional[str] = ..., near_duplicate_threshold: _Optional[float] = ..., skip_duplicates: _Optional[bool] = ..., binding: _Optional[_Union[ModelBinding, _Mapping]] = ..., if_live_content_hash: _Optional[str] = ...) -> None: ...

class DuplicateItem(_message.Message):
    __slots__ = ("item_id", "exact", "similarity")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    exact: bool
    similarity: float
    def __init__(self, item_id: _Optional[str] = ..., exact: _Optional[bool] = ..., similarity: _Optional[float] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("rows", "replaced", "duplicates", "written", "same_content", "skipped")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SAME_CONTENT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    rows: int
    replaced: bool
    duplicates: _containers.RepeatedCompositeFieldContainer[DuplicateItem]
    written: bool
    same_content: bool
    skipped: str
    def __init__(self, rows: _Optional[int] = ..., replaced: _Optional[bool] = ..., duplicates: _Optional[_Iterable[_Union[DuplicateItem, _Mapping]]] = ..., written: _Optional[bool] = ..., same_content: _Optional[bool] = ..., skipped: _Optional[str] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[UpsertRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[UpsertRequest, _Mapping]]] = ...) -> None: ...

class UpsertItemResult(_message.Message):
    __slots__ = ("code", "error", "response")
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    code: int
    error: str
    response: UpsertResponse
    def __init__(self, code: _Optional[int] = ..., error: _Optional[str] = ..., response: _Optional[_Union[UpsertResponse, _Mapping]] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[UpsertItemResult]
    def __init__(self, results: _Optional[_Iterable[_Union[UpsertItemResult, _Mapping]]] = ...) -> None: ...

class UpdateItemRequest(_message.Message):
    __slots__ = ("item_id", "catalog", "metadata", "source_uri")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Value, _Mapping]] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    catalog: str
    metadata: _containers.MessageMap[str, _common_pb2.Value]
    source_uri: str
    def __init__(self, item_id: _Optional[str] = ..., catalog: _Optional[str] = ..., metadata: _Optional[_Mapping[str, _common_pb2.Value]] = ..., source_uri: _Optional[str] = ...) -> None: ...

class UpdateItemResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class DeleteItemRequest(_message.Message):
    __slots__ = ("item_id", "catalog")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    catalog: str
    def __init__(self, item_id: _Optional[str] = ..., catalog: _Optional[str] = ...) -> None: ...

class DeleteItemResponse(_message.Message):
    __slots__ = ("rows_deleted",)
    ROWS_DELETED_FIELD_NUMBER: _ClassVar[int]
    rows_deleted: int
    def __init__(self, rows_deleted: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("item_id", "content_hash", "item_ids", "include_vectors", "limit", "catalog", "model")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    content_hash: str
    item_ids: ItemIds
    include_vectors: bool
    limit: int
    catalog: str
    model: str
    def __init__(self, item_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., item_ids: _Optional[_Union[ItemIds, _Mapping]] = ..., include_vectors: _Optional[bool] = ..., limit: _Optional[int] = ..., catalog: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class ItemIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StoredItem]
    def __init__(self, items: _Optional[_Iterable[_Union[StoredItem, _Mapping]]] = ...) -> None: ...

class RetrievalSearchRequest(_message.Message):
    __slots__ = ("query", "limit", "filter", "exclude_item_ids", "include_vectors", "whole_images_only", "catalog", "distinct_items", "raw_vectors", "model")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    WHOLE_IMAGES_ONLY_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_ITEMS_FIELD_NUMBER: _ClassVar[int]
    RAW_VECTORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    query: _common_pb2.Vector
    limit: int
    filter: _common_pb2.Filter
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    include_vectors: bool
    whole_images_only: bool
    catalog: str
    distinct_items: bool
    raw_vectors: bool
    model: str
    def __init__(self, query: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., limit: _Optional[int] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., include_vectors: _Optional[bool] = ..., whole_images_only: _Optional[bool] = ..., catalog: _Optional[str] = ..., distinct_items: _Optional[bool] = ..., raw_vectors: _Optional[bool] = ..., model: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("item_id", "object_index", "box", "label", "ann_score", "vector", "metadata", "content_hash", "item_labels")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Value, _Mapping]] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_INDEX_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ANN_SCORE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    ITEM_LABELS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    object_index: int
    box: _common_pb2.Box
    label: str
    ann_score: float
    vector: _common_pb2.Vector
    metadata: _containers.MessageMap[str, _common_pb2.Value]
    content_hash: str
    item_labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_id: _Optional[str] = ..., object_index: _Optional[int] = ..., box: _Optional[_Union[_common_pb2.Box, _Mapping]] = ..., label: _Optional[str] = ..., ann_score: _Optional[float] = ..., vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., metadata: _Optional[_Mapping[str, _common_pb2.Value]] = ..., content_hash: _Optional[str] = ..., item_labels: _Optional[_Iterable[str]] = ...) -> None: ...

class RetrievalSearchResponse(_message.Message):
    __slots__ = ("candidates", "vectors")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    vectors: _common_pb2.PackedVectors
    def __init__(self, candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., vectors: _Optional[_Union[_common_pb2.PackedVectors, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("catalog",)
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    def __init__(self, catalog: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("rows", "collection", "dimension", "index_type", "exact_scores", "catalog", "items", "candidate_code", "code_bytes", "full_vector_bytes", "dba_neighbours", "code", "vector_store", "stored_vector_bytes", "oversampling", "indexed_rows", "record", "next_items")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXACT_SCORES_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FULL_VECTOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    DBA_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_STORE_FIELD_NUMBER: _ClassVar[int]
    STORED_VECTOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    OVERSAMPLING_FIELD_NUMBER: _ClassVar[int]
    INDEXED_ROWS_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    NEXT_ITEMS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    collection: str
    dimension: int
    index_type: str
    exact_scores: bool
    catalog: str
    items: int
    candidate_code: str
    code_bytes: int
    full_vector_bytes: int
    dba_neighbours: int
    code: str
    vector_store: str
    stored_vector_bytes: int
    oversampling: int
    indexed_rows: int
    record: CatalogRecord
    next_items: int
    def __init__(self, rows: _Optional[int] = ..., collection: _Optional[str] = ..., dimension: _Optional[int] = ..., index_type: _Optional[str] = ..., exact_scores: _Optional[bool] = ..., catalog: _Optional[str] = ..., items: _Optional[int] = ..., candidate_code: _Optional[str] = ..., code_bytes: _Optional[int] = ..., full_vector_bytes: _Optional[int] = ..., dba_neighbours: _Optional[int] = ..., code: _Optional[str] = ..., vector_store: _Optional[str] = ..., stored_vector_bytes: _Optional[int] = ..., oversampling: _Optional[int] = ..., indexed_rows: _Optional[int] = ..., record: _Optional[_Union[CatalogRecord, _Mapping]] = ..., next_items: _Optional[int] = ...) -> None: ...

class RetrievalListCatalogsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RetrievalListCatalogsResponse(_message.Message):
    __slots__ = ("catalogs",)
    CATALOGS_FIELD_NUMBER: _ClassVar[int]
    catalogs: _containers.RepeatedCompositeFieldContainer[StatsResponse]
    def __init__(self, catalogs: _Optional[_Iterable[_Union[StatsResponse, _Mapping]]] = ...) -> None: ...

class RetrievalDropCatalogRequest(_message.Message):
    __slots__ = ("catalog",)
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    def __init__(self, catalog: _Optional[str] = ...) -> None: ...

class RetrievalDropCatalogResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...

class AugmentRequest(_message.Message):
    __slots__ = ("catalog", "neighbours", "alpha")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    neighbours: int
    alpha: float
    def __init__(self, catalog: _Optional[str] = ..., neighbours: _Optional[int] = ..., alpha: _Optional[float] = ...) -> None: ...

class AugmentResponse(_message.Message):
    __slots__ = ("items", "seconds")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    items: int
    seconds: float
    def __init__(self, items: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...
