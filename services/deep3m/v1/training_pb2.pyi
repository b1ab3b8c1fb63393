from deep3m.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainMemberRequest(_message.Message):
    __slots__ = ("spec", "member")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.TrainSpec
    member: str
    def __init__(self, spec: _Optional[_Union[_common_pb2.TrainSpec, _Mapping]] = ..., member: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("store_url", "model")
    STORE_URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    store_url: str
    model: str
    def __init__(self, store_url: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("store_url",)
    STORE_URL_FIELD_NUMBER: _ClassVar[int]
    store_url: str
    def __init__(self, store_url: _Optional[str] = ...) -> None: ...

class ModelCard(_message.Message):
    __slots__ = ("id", "architecture", "width", "members", "card_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    architecture: str
    width: float
    members: _containers.RepeatedScalarFieldContainer[str]
    card_json: str
    def __init__(self, id: _Optional[str] = ..., architecture: _Optional[str] = ..., width: _Optional[float] = ..., members: _Optional[_Iterable[str]] = ..., card_json: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelCard]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelCard, _Mapping]]] = ...) -> None: ...
