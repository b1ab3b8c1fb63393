from deep3m.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRegionRequest(_message.Message):
    __slots__ = ("input", "region", "model", "tta_level", "members")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TTA_LEVEL_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    input: _common_pb2.VolumeRef
    region: _common_pb2.Box
    model: str
    tta_level: int
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, input: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., region: _Optional[_Union[_common_pb2.Box, _Mapping]] = ..., model: _Optional[str] = ..., tta_level: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class PredictRegionResponse(_message.Message):
    __slots__ = ("shape", "probabilities")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    probabilities: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., probabilities: _Optional[bytes] = ...) -> None: ...
