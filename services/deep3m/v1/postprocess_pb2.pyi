from deep3m.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LabelRequest(_message.Message):
    __slots__ = ("probabilities", "output", "threshold", "watershed", "min_size_voxels", "name")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WATERSHED_FIELD_NUMBER: _ClassVar[int]
    MIN_SIZE_VOXELS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    probabilities: _common_pb2.VolumeRef
    output: _common_pb2.VolumeRef
    threshold: float
    watershed: bool
    min_size_voxels: int
    name: str
    def __init__(self, probabilities: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., output: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., threshold: _Optional[float] = ..., watershed: _Optional[bool] = ..., min_size_voxels: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class ObjectRow(_message.Message):
    __slots__ = ("label", "volume_voxels", "centroid", "bbox")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    VOLUME_VOXELS_FIELD_NUMBER: _ClassVar[int]
    CENTROID_FIELD_NUMBER: _ClassVar[int]
    BBOX_FIELD_NUMBER: _ClassVar[int]
    label: int
    volume_voxels: int
    centroid: _containers.RepeatedScalarFieldContainer[float]
    bbox: _common_pb2.Box
    def __init__(self, label: _Optional[int] = ..., volume_voxels: _Optional[int] = ..., centroid: _Optional[_Iterable[float]] = ..., bbox: _Optional[_Union[_common_pb2.Box, _Mapping]] = ...) -> None: ...

class LabelResponse(_message.Message):
    __slots__ = ("labels", "object_count", "objects", "tables")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OBJECT_COUNT_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    labels: _common_pb2.VolumeRef
    object_count: int
    objects: _containers.RepeatedCompositeFieldContainer[ObjectRow]
    tables: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, labels: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., object_count: _Optional[int] = ..., objects: _Optional[_Iterable[_Union[ObjectRow, _Mapping]]] = ..., tables: _Optional[_Iterable[str]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("prediction", "ground_truth", "threshold", "exclusion_zone_voxels", "min_size_voxels", "overlays", "image", "overlay_slices")
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EXCLUSION_ZONE_VOXELS_FIELD_NUMBER: _ClassVar[int]
    MIN_SIZE_VOXELS_FIELD_NUMBER: _ClassVar[int]
    OVERLAYS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_SLICES_FIELD_NUMBER: _ClassVar[int]
    prediction: _common_pb2.VolumeRef
    ground_truth: _common_pb2.VolumeRef
    threshold: float
    exclusion_zone_voxels: int
    min_size_voxels: int
    overlays: str
    image: _common_pb2.VolumeRef
    overlay_slices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prediction: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., ground_truth: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., threshold: _Optional[float] = ..., exclusion_zone_voxels: _Optional[int] = ..., min_size_voxels: _Optional[int] = ..., overlays: _Optional[str] = ..., image: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., overlay_slices: _Optional[_Iterable[int]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("precision", "recall", "f1", "jaccard", "true_positives", "false_positives", "false_negatives", "true_negatives", "object_true_positives", "object_false_positives", "object_false_negatives", "object_precision", "object_recall", "object_f1", "overlays")
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    JACCARD_FIELD_NUMBER: _ClassVar[int]
    TRUE_POSITIVES_FIELD_NUMBER: _ClassVar[int]
    FALSE_POSITIVES_FIELD_NUMBER: _ClassVar[int]
    FALSE_NEGATIVES_FIELD_NUMBER: _ClassVar[int]
    TRUE_NEGATIVES_FIELD_NUMBER: _ClassVar[int]
    OBJECT_TRUE_POSITIVES_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FALSE_POSITIVES_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FALSE_NEGATIVES_FIELD_NUMBER: _ClassVar[int]
    OBJECT_PRECISION_FIELD_NUMBER: _ClassVar[int]
    OBJECT_RECALL_FIELD_NUMBER: _ClassVar[int]
    OBJECT_F1_FIELD_NUMBER: _ClassVar[int]
    OVERLAYS_FIELD_NUMBER: _ClassVar[int]
    precision: float
    recall: float
    f1: float
    jaccard: float
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int
    object_true_positives: int
    object_false_positives: int
    object_false_negatives: int
    object_precision: float
    object_recall: float
    object_f1: float
    overlays: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, precision: _Optional[float] = ..., recall: _Optional[float] = ..., f1: _Optional[float] = ..., jaccard: _Optional[float] = ..., true_positives: _Optional[int] = ..., false_positives: _Optional[int] = ..., false_negatives: _Optional[int] = ..., true_negatives: _Optional[int] = ..., object_true_positives: _Optional[int] = ..., object_false_positives: _Optional[int] = ..., object_false_negatives: _Optional[int] = ..., object_precision: _Optional[float] = ..., object_recall: _Optional[float] = ..., object_f1: _Optional[float] = ..., overlays: _Optional[_Iterable[str]] = ...) -> None: ...

class BuildPyramidRequest(_message.Message):
    __slots__ = ("volume", "levels")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    volume: _common_pb2.VolumeRef
    levels: int
    def __init__(self, volume: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., levels: _Optional[int] = ...) -> None: ...

class BuildPyramidResponse(_message.Message):
    __slots__ = ("arrays",)
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    arrays: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, arrays: _Optional[_Iterable[str]] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("volume", "destination", "format", "image", "slices", "overwrite")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    volume: _common_pb2.VolumeRef
    destination: str
    format: str
    image: _common_pb2.VolumeRef
    slices: _containers.RepeatedScalarFieldContainer[int]
    overwrite: bool
    def __init__(self, volume: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., destination: _Optional[str] = ..., format: _Optional[str] = ..., image: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., slices: _Optional[_Iterable[int]] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, files: _Optional[_Iterable[str]] = ...) -> None: ...
