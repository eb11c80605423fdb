"""gRPC client of the Jamba service (protos/jamba.proto).

Needs only grpcio, protobuf and the generated stubs in `protos`: no torch, Ray or numpy, so it
installs anywhere. `client.cli` is the `jamba client ...` command line.
"""

from .client import AsyncGenerateStream, AsyncJambaClient, GenerateStream, JambaClient, RetryPolicy
from .messages import Classification, Completion, Delta, JambaError, ModelInfo, ScoreResult, Stage

__all__ = [
    "JambaClient", "AsyncJambaClient", "JambaError", "RetryPolicy", "GenerateStream", "AsyncGenerateStream",
    "Completion", "Delta", "Classification", "ScoreResult", "ModelInfo", "Stage",
]
