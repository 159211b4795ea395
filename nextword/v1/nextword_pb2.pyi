from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionRequest(_message.Message):
    __slots__ = ("session_id", "text", "reset", "k", "model", "strip", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STRIP_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    reset: bool
    k: int
    model: str
    strip: Strip
    model_version: str
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., reset: _Optional[bool] = ..., k: _Optional[int] = ..., model: _Optional[str] = ..., strip: _Optional[_Union[Strip, _Mapping]] = ..., model_version: _Optional[str] = ...) -> None: ...

class Strip(_message.Message):
    __slots__ = ("policy", "no_repeat", "learn")
    class Policy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        POLICY_UNSPECIFIED: _ClassVar[Strip.Policy]
        POLICY_PROBABILITY: _ClassVar[Strip.Policy]
        POLICY_KEYSTROKES: _ClassVar[Strip.Policy]
    POLICY_UNSPECIFIED: Strip.Policy
    POLICY_PROBABILITY: Strip.Policy
    POLICY_KEYSTROKES: Strip.Policy
    POLICY_FIELD_NUMBER: _ClassVar[int]
    NO_REPEAT_FIELD_NUMBER: _ClassVar[int]
    LEARN_FIELD_NUMBER: _ClassVar[int]
    policy: Strip.Policy
    no_repeat: bool
    learn: bool
    def __init__(self, policy: _Optional[_Union[Strip.Policy, str]] = ..., no_repeat: _Optional[bool] = ..., learn: _Optional[bool] = ...) -> None: ...

class SessionReply(_message.Message):
    __slots__ = ("session_id", "prediction", "seq", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prediction: Prediction
    seq: int
    model_version: str
    def __init__(self, session_id: _Optional[str] = ..., prediction: _Optional[_Union[Prediction, _Mapping]] = ..., seq: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("text", "k", "model", "strip", "model_version")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STRIP_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    text: str
    k: int
    model: str
    strip: Strip
    model_version: str
    def __init__(self, text: _Optional[str] = ..., k: _Optional[int] = ..., model: _Optional[str] = ..., strip: _Optional[_Union[Strip, _Mapping]] = ..., model_version: _Optional[str] = ...) -> None: ...

class PredictReply(_message.Message):
    __slots__ = ("prediction", "model_version")
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    prediction: Prediction
    model_version: str
    def __init__(self, prediction: _Optional[_Union[Prediction, _Mapping]] = ..., model_version: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("suggestions", "completions", "partial", "context_tokens")
    SUGGESTIONS_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    suggestions: _containers.RepeatedCompositeFieldContainer[Suggestion]
    completions: _containers.RepeatedCompositeFieldContainer[Suggestion]
    partial: str
    context_tokens: int
    def __init__(self, suggestions: _Optional[_Iterable[_Union[Suggestion, _Mapping]]] = ..., completions: _Optional[_Iterable[_Union[Suggestion, _Mapping]]] = ..., partial: _Optional[str] = ..., context_tokens: _Optional[int] = ...) -> None: ...

class Suggestion(_message.Message):
    __slots__ = ("word", "prob")
    WORD_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    word: str
    prob: float
    def __init__(self, word: _Optional[str] = ..., prob: _Optional[float] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("model", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "cell", "vocab_size", "provider", "manifest_json", "max_k", "max_text_chars", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    cell: str
    vocab_size: int
    provider: str
    manifest_json: str
    max_k: int
    max_text_chars: int
    version: str
    def __init__(self, name: _Optional[str] = ..., cell: _Optional[str] = ..., vocab_size: _Optional[int] = ..., provider: _Optional[str] = ..., manifest_json: _Optional[str] = ..., max_k: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...
