"""llamaq client: submit generation requests to a queue and stream back their events."""

from .client import (
    Client,
    Completion,
    MessageLike,
    RequestFailed,
    RequestHandle,
    RequestOptions,
    SamplingKwargs,
)
from .sync_client import SyncClient

__all__ = [
    "Client",
    "Completion",
    "MessageLike",
    "RequestFailed",
    "RequestHandle",
    "RequestOptions",
    "SamplingKwargs",
    "SyncClient",
]
