"""The llamaq wire protocol: message types, msgpack codecs, validation and key names. Pure data, no I/O."""

from .codec import (
    EVENT_FIELD,
    REQUEST_FIELD,
    decode_event,
    decode_request,
    encode_event,
    encode_request,
    identify_request,
)
from .conversation import History, decode_history, encode_history
from .errors import ErrorCode, ProtocolError
from .keys import DEFAULT_PREFIX, DEFAULT_QUEUE, Keys, is_valid_id
from .limits import Limits
from .messages import (
    PROTOCOL_VERSION,
    ChatMessage,
    ConversationCommand,
    ConversationOp,
    DoneEvent,
    ErrorEvent,
    Event,
    FinalEvent,
    FinishReason,
    Request,
    RequestKind,
    ResultEvent,
    SamplingParams,
    Timings,
    TokenEvent,
    Usage,
)

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_QUEUE",
    "EVENT_FIELD",
    "PROTOCOL_VERSION",
    "REQUEST_FIELD",
    "ChatMessage",
    "ConversationCommand",
    "ConversationOp",
    "DoneEvent",
    "ErrorCode",
    "ErrorEvent",
    "Event",
    "FinalEvent",
    "FinishReason",
    "History",
    "Keys",
    "Limits",
    "ProtocolError",
    "Request",
    "RequestKind",
    "ResultEvent",
    "SamplingParams",
    "Timings",
    "TokenEvent",
    "Usage",
    "decode_event",
    "decode_history",
    "decode_request",
    "encode_event",
    "encode_history",
    "encode_request",
    "identify_request",
    "is_valid_id",
]
