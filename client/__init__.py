"""llamaq client: submit generation requests to a queue and stream back their events."""

from .client import Client
from .errors import RequestFailed
from .options import MessageLike, RequestOptions, SamplingKwargs
from .request_handle import Completion, RequestHandle
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
