from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PENDING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PENDING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class VolumeRef(_message.Message):
    __slots__ = ("store_url", "path", "array")
    STORE_URL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    store_url: str
    path: str
    array: str
    def __init__(self, store_url: _Optional[str] = ..., path: _Optional[str] = ..., array: _Optional[str] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("start", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: _containers.RepeatedScalarFieldContainer[int]
    stop: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, start: _Optional[_Iterable[int]] = ..., stop: _Optional[_Iterable[int]] = ...) -> None: ...

class Block(_message.Message):
    __slots__ = ("core", "read")
    CORE_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    core: Box
    read: Box
    def __init__(self, core: _Optional[_Union[Box, _Mapping]] = ..., read: _Optional[_Union[Box, _Mapping]] = ...) -> None: ...

class IngestSpec(_message.Message):
    __slots__ = ("source", "output", "voxel_size_nm", "chunk_shape", "shard_shape", "slices_per_task", "overwrite")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    VOXEL_SIZE_NM_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHARD_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SLICES_PER_TASK_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    source: str
    output: VolumeRef
    voxel_size_nm: _containers.RepeatedScalarFieldContainer[float]
    chunk_shape: _containers.RepeatedScalarFieldContainer[int]
    shard_shape: _containers.RepeatedScalarFieldContainer[int]
    slices_per_task: int
    overwrite: bool
    def __init__(self, source: _Optional[str] = ..., output: _Optional[_Union[VolumeRef, _Mapping]] = ..., voxel_size_nm: _Optional[_Iterable[float]] = ..., chunk_shape: _Optional[_Iterable[int]] = ..., shard_shape: _Optional[_Iterable[int]] = ..., slices_per_task: _Optional[int] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class PredictSpec(_message.Message):
    __slots__ = ("input", "model", "output", "tta_level", "members", "block_shape", "halo", "postprocess", "threshold", "labelling", "overwrite")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TTA_LEVEL_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SHAPE_FIELD_NUMBER: _ClassVar[int]
    HALO_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LABELLING_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    input: VolumeRef
    model: str
    output: VolumeRef
    tta_level: int
    members: _containers.RepeatedScalarFieldContainer[str]
    block_shape: _containers.RepeatedScalarFieldContainer[int]
    halo: _containers.RepeatedScalarFieldContainer[int]
    postprocess: bool
    threshold: float
    labelling: LabelSpec
    overwrite: bool
    def __init__(self, input: _Optional[_Union[VolumeRef, _Mapping]] = ..., model: _Optional[str] = ..., output: _Optional[_Union[VolumeRef, _Mapping]] = ..., tta_level: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., block_shape: _Optional[_Iterable[int]] = ..., halo: _Optional[_Iterable[int]] = ..., postprocess: _Optional[bool] = ..., threshold: _Optional[float] = ..., labelling: _Optional[_Union[LabelSpec, _Mapping]] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class TrainSpec(_message.Message):
    __slots__ = ("images", "labels", "validation_images", "validation_labels", "model", "architecture", "width", "members", "iterations", "base_model", "add_iterations", "batch_size", "patch_shape", "validate_every", "snapshot_every", "intensity_augmentations", "learning_rate", "accumulate_gradients", "voxel_size_nm", "num_classes", "seed", "recipe", "max_minutes", "optimizer", "loss", "schedule", "input_scale", "foreground_fraction", "snapshot_every_minutes", "adapt_to", "adaptation", "select_by", "adaptation_iterations", "adaptation_checkpoints", "match_histogram_at_predict")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_IMAGES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LABELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADD_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PATCH_SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_EVERY_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_EVERY_FIELD_NUMBER: _ClassVar[int]
    INTENSITY_AUGMENTATIONS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATE_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    VOXEL_SIZE_NM_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    MAX_MINUTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCALE_FIELD_NUMBER: _ClassVar[int]
    FOREGROUND_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_EVERY_MINUTES_FIELD_NUMBER: _ClassVar[int]
    ADAPT_TO_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_FIELD_NUMBER: _ClassVar[int]
    SELECT_BY_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    MATCH_HISTOGRAM_AT_PREDICT_FIELD_NUMBER: _ClassVar[int]
    images: VolumeRef
    labels: VolumeRef
    validation_images: VolumeRef
    validation_labels: VolumeRef
    model: str
    architecture: str
    width: float
    members: _containers.RepeatedScalarFieldContainer[str]
    iterations: int
    base_model: str
    add_iterations: int
    batch_size: int
    patch_shape: _containers.RepeatedScalarFieldContainer[int]
    validate_every: int
    snapshot_every: int
    intensity_augmentations: _containers.RepeatedScalarFieldContainer[str]
    learning_rate: float
    accumulate_gradients: int
    voxel_size_nm: _containers.RepeatedScalarFieldContainer[float]
    num_classes: int
    seed: int
    recipe: str
    max_minutes: float
    optimizer: str
    loss: str
    schedule: str
    input_scale: int
    foreground_fraction: float
    snapshot_every_minutes: float
    adapt_to: VolumeRef
    adaptation: str
    select_by: str
    adaptation_iterations: int
    adaptation_checkpoints: int
    match_histogram_at_predict: bool
    def __init__(self, images: _Optional[_Union[VolumeRef, _Mapping]] = ..., labels: _Optional[_Union[VolumeRef, _Mapping]] = ..., validation_images: _Optional[_Union[VolumeRef, _Mapping]] = ..., validation_labels: _Optional[_Union[VolumeRef, _Mapping]] = ..., model: _Optional[str] = ..., architecture: _Optional[str] = ..., width: _Optional[float] = ..., members: _Optional[_Iterable[str]] = ..., iterations: _Optional[int] = ..., base_model: _Optional[str] = ..., add_iterations: _Optional[int] = ..., batch_size: _Optional[int] = ..., patch_shape: _Optional[_Iterable[int]] = ..., validate_every: _Optional[int] = ..., snapshot_every: _Optional[int] = ..., intensity_augmentations: _Optional[_Iterable[str]] = ..., learning_rate: _Optional[float] = ..., accumulate_gradients: _Optional[int] = ..., voxel_size_nm: _Optional[_Iterable[float]] = ..., num_classes: _Optional[int] = ..., seed: _Optional[int] = ..., recipe: _Optional[str] = ..., max_minutes: _Optional[float] = ..., optimizer: _Optional[str] = ..., loss: _Optional[str] = ..., schedule: _Optional[str] = ..., input_scale: _Optional[int] = ..., foreground_fraction: _Optional[float] = ..., snapshot_every_minutes: _Optional[float] = ..., adapt_to: _Optional[_Union[VolumeRef, _Mapping]] = ..., adaptation: _Optional[str] = ..., select_by: _Optional[str] = ..., adaptation_iterations: _Optional[int] = ..., adaptation_checkpoints: _Optional[int] = ..., match_histogram_at_predict: _Optional[bool] = ...) -> None: ...

class LabelSpec(_message.Message):
    __slots__ = ("input", "output", "threshold", "connectivity", "min_size_voxels", "watershed", "name", "block_shape", "table_shards", "ground_truth", "exclusion_zone_voxels")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CONNECTIVITY_FIELD_NUMBER: _ClassVar[int]
    MIN_SIZE_VOXELS_FIELD_NUMBER: _ClassVar[int]
    WATERSHED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TABLE_SHARDS_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    EXCLUSION_ZONE_VOXELS_FIELD_NUMBER: _ClassVar[int]
    input: VolumeRef
    output: VolumeRef
    threshold: float
    connectivity: int
    min_size_voxels: int
    watershed: bool
    name: str
    block_shape: _containers.RepeatedScalarFieldContainer[int]
    table_shards: int
    ground_truth: VolumeRef
    exclusion_zone_voxels: int
    def __init__(self, input: _Optional[_Union[VolumeRef, _Mapping]] = ..., output: _Optional[_Union[VolumeRef, _Mapping]] = ..., threshold: _Optional[float] = ..., connectivity: _Optional[int] = ..., min_size_voxels: _Optional[int] = ..., watershed: _Optional[bool] = ..., name: _Optional[str] = ..., block_shape: _Optional[_Iterable[int]] = ..., table_shards: _Optional[int] = ..., ground_truth: _Optional[_Union[VolumeRef, _Mapping]] = ..., exclusion_zone_voxels: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "predict", "train", "ingest", "label", "max_attempts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PREDICT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    INGEST_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    predict: PredictSpec
    train: TrainSpec
    ingest: IngestSpec
    label: LabelSpec
    max_attempts: int
    def __init__(self, name: _Optional[str] = ..., predict: _Optional[_Union[PredictSpec, _Mapping]] = ..., train: _Optional[_Union[TrainSpec, _Mapping]] = ..., ingest: _Optional[_Union[IngestSpec, _Mapping]] = ..., label: _Optional[_Union[LabelSpec, _Mapping]] = ..., max_attempts: _Optional[int] = ...) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("name", "role", "tasks_total", "tasks_done", "tasks_leased", "tasks_quarantined")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TASKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    TASKS_LEASED_FIELD_NUMBER: _ClassVar[int]
    TASKS_QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    tasks_total: int
    tasks_done: int
    tasks_leased: int
    tasks_quarantined: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., tasks_total: _Optional[int] = ..., tasks_done: _Optional[int] = ..., tasks_leased: _Optional[int] = ..., tasks_quarantined: _Optional[int] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("code", "message", "field", "task_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    field: str
    task_id: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "spec", "state", "stages", "created_unix_s", "updated_unix_s", "errors", "outputs", "metrics", "notes")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: JobSpec
    state: JobState
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    created_unix_s: float
    updated_unix_s: float
    errors: _containers.RepeatedCompositeFieldContainer[ErrorDetail]
    outputs: _containers.ScalarMap[str, str]
    metrics: _containers.ScalarMap[str, float]
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ..., created_unix_s: _Optional[float] = ..., updated_unix_s: _Optional[float] = ..., errors: _Optional[_Iterable[_Union[ErrorDetail, _Mapping]]] = ..., outputs: _Optional[_Mapping[str, str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("job_id", "time_unix_s", "state", "stage", "tasks_done", "tasks_total", "voxels_per_second", "eta_seconds", "message", "metrics", "error", "task_id")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    TASKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    VOXELS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    time_unix_s: float
    state: JobState
    stage: str
    tasks_done: int
    tasks_total: int
    voxels_per_second: float
    eta_seconds: float
    message: str
    metrics: _containers.ScalarMap[str, float]
    error: ErrorDetail
    task_id: str
    def __init__(self, job_id: _Optional[str] = ..., time_unix_s: _Optional[float] = ..., state: _Optional[_Union[JobState, str]] = ..., stage: _Optional[str] = ..., tasks_done: _Optional[int] = ..., tasks_total: _Optional[int] = ..., voxels_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., message: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., error: _Optional[_Union[ErrorDetail, _Mapping]] = ..., task_id: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("id", "job_id", "stage", "role", "attempt", "block", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    id: str
    job_id: str
    stage: str
    role: str
    attempt: int
    block: Block
    params: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., job_id: _Optional[str] = ..., stage: _Optional[str] = ..., role: _Optional[str] = ..., attempt: _Optional[int] = ..., block: _Optional[_Union[Block, _Mapping]] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ResolvedVolume(_message.Message):
    __slots__ = ("store_url", "path", "array", "shape", "dtype", "grid", "voxel_size_nm")
    STORE_URL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    VOXEL_SIZE_NM_FIELD_NUMBER: _ClassVar[int]
    store_url: str
    path: str
    array: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    grid: _containers.RepeatedScalarFieldContainer[int]
    voxel_size_nm: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, store_url: _Optional[str] = ..., path: _Optional[str] = ..., array: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., grid: _Optional[_Iterable[int]] = ..., voxel_size_nm: _Optional[_Iterable[float]] = ...) -> None: ...

class TaskLease(_message.Message):
    __slots__ = ("task", "spec", "lease_id", "deadline_unix_s", "volumes")
    class VolumesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ResolvedVolume
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ResolvedVolume, _Mapping]] = ...) -> None: ...
    TASK_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    task: Task
    spec: JobSpec
    lease_id: str
    deadline_unix_s: float
    volumes: _containers.MessageMap[str, ResolvedVolume]
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., lease_id: _Optional[str] = ..., deadline_unix_s: _Optional[float] = ..., volumes: _Optional[_Mapping[str, ResolvedVolume]] = ...) -> None: ...
