"""gRPC client of the Jamba service (protos/jamba.proto).

Needs only grpcio, protobuf and the generated stubs in `protos`: no torch, Ray or numpy, so it
installs anywhere, as a distribution of its own (client/pyproject.toml: `pip install ./client`).
`client.cli` is the `jamba client ...` command line (`jamba-client` when installed alone), and
`client.rows` the JSON Lines row contract it shares with `jamba generate|score|classify`.
"""

from .client import AsyncGenerateStream, AsyncJambaClient, GenerateStream, JambaClient, RetryPolicy
from .messages import Classification, Completion, Delta, JambaError, ModelInfo, ScoreResult, Stage, TopLogprob

__all__ = [
    "JambaClient", "AsyncJambaClient", "JambaError", "RetryPolicy", "GenerateStream", "AsyncGenerateStream",
    "Completion", "Delta", "TopLogprob", "Classification", "ScoreResult", "ModelInfo", "Stage",
]
