from loupe.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedRequest(_message.Message):
    __slots__ = ("image", "whole_image", "regions", "model")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    WHOLE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    whole_image: bool
    regions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Box]
    model: str
    def __init__(self, image: _Optional[bytes] = ..., whole_image: _Optional[bool] = ..., regions: _Optional[_Iterable[_Union[_common_pb2.Box, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("whole_image", "regions", "image_width", "image_height", "model_name", "model_version")
    WHOLE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    whole_image: _common_pb2.Vector
    regions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Vector]
    image_width: int
    image_height: int
    model_name: str
    model_version: str
    def __init__(self, whole_image: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., regions: _Optional[_Iterable[_Union[_common_pb2.Vector, _Mapping]]] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...
