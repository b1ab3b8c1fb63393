from deep3m.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.IngestSpec
    def __init__(self, spec: _Optional[_Union[_common_pb2.IngestSpec, _Mapping]] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("volume", "shape", "dtype", "seconds", "bytes_written")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    volume: _common_pb2.VolumeRef
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    seconds: float
    bytes_written: int
    def __init__(self, volume: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., seconds: _Optional[float] = ..., bytes_written: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("volume", "histogram_bins")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_BINS_FIELD_NUMBER: _ClassVar[int]
    volume: _common_pb2.VolumeRef
    histogram_bins: int
    def __init__(self, volume: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., histogram_bins: _Optional[int] = ...) -> None: ...

class IntensityStatistics(_message.Message):
    __slots__ = ("min", "max", "mean", "std", "p01", "p50", "p99")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    P01_FIELD_NUMBER: _ClassVar[int]
    P50_FIELD_NUMBER: _ClassVar[int]
    P99_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    mean: float
    std: float
    p01: float
    p50: float
    p99: float
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., p01: _Optional[float] = ..., p50: _Optional[float] = ..., p99: _Optional[float] = ...) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("edges", "counts")
    EDGES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, edges: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class VolumeDescription(_message.Message):
    __slots__ = ("volume", "shape", "dtype", "voxel_size_nm", "chunk_shape", "shard_shape", "statistics", "histogram")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VOXEL_SIZE_NM_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHARD_SHAPE_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    volume: _common_pb2.VolumeRef
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    voxel_size_nm: _containers.RepeatedScalarFieldContainer[float]
    chunk_shape: _containers.RepeatedScalarFieldContainer[int]
    shard_shape: _containers.RepeatedScalarFieldContainer[int]
    statistics: IntensityStatistics
    histogram: Histogram
    def __init__(self, volume: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., voxel_size_nm: _Optional[_Iterable[float]] = ..., chunk_shape: _Optional[_Iterable[int]] = ..., shard_shape: _Optional[_Iterable[int]] = ..., statistics: _Optional[_Union[IntensityStatistics, _Mapping]] = ..., histogram: _Optional[_Union[Histogram, _Mapping]] = ...) -> None: ...

class PlanBlocksRequest(_message.Message):
    __slots__ = ("volume", "block_shape", "halo", "page_size", "page_token")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SHAPE_FIELD_NUMBER: _ClassVar[int]
    HALO_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    volume: _common_pb2.VolumeRef
    block_shape: _containers.RepeatedScalarFieldContainer[int]
    halo: _containers.RepeatedScalarFieldContainer[int]
    page_size: int
    page_token: str
    def __init__(self, volume: _Optional[_Union[_common_pb2.VolumeRef, _Mapping]] = ..., block_shape: _Optional[_Iterable[int]] = ..., halo: _Optional[_Iterable[int]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class PlanBlocksResponse(_message.Message):
    __slots__ = ("blocks", "total_blocks", "grid_shape", "next_page_token")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    GRID_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Block]
    total_blocks: int
    grid_shape: _containers.RepeatedScalarFieldContainer[int]
    next_page_token: str
    def __init__(self, blocks: _Optional[_Iterable[_Union[_common_pb2.Block, _Mapping]]] = ..., total_blocks: _Optional[int] = ..., grid_shape: _Optional[_Iterable[int]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
