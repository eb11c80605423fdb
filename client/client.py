"""Clients of the JambaService (protos/jamba.proto): `JambaClient` (blocking) and
`AsyncJambaClient` (grpc.aio).

    with JambaClient("localhost:9000", application="jamba") as c:
        [done] = c.generate(["The weather today is"], max_new_tokens=8)
        with c.generate_stream("Once upon a time", max_new_tokens=32) as stream:
            for delta in stream:
                print(delta.text, end="", flush=True)
        print(stream.completion.finish_reason)

Both clients take the same options and have the same methods; every failed RPC raises
`JambaError` (code + message). Transport concerns live in the channel, not in the methods:
- retries: gRPC's own retry policy, set in the channel's service config, retries an RPC that
  fails with UNAVAILABLE before the server answered at all (the proxy is down or restarting; 4
  attempts in all, exponential backoff). Generation has no side effects, so retrying is safe.
  gRPC commits a call once response headers arrive, and Ray Serve's proxy sends headers before
  any status it reports itself, so errors from the service are never retried by gRPC.
- backpressure: a full server answers RESOURCE_EXHAUSTED with a retry hint
  (`JambaError.retry_after`); `wait_when_busy=S` makes calls and streams wait out such refusals
  for up to S seconds, pausing as hinted.
- deadlines: `timeout` seconds per call (client default, overridable per call). For a stream the
  deadline covers the whole stream.
- routing: `application` is sent as the `application` metadata key, which Ray Serve uses to pick
  one of several applications served on the same port.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Union

import grpc
import grpc.aio

from protos import jamba_pb2 as pb
from protos import jamba_pb2_grpc as pb_grpc

from .messages import (Classification, Completion, Delta, JambaError, ModelInfo, PromptLike, ScoreResult,
                       classification_from_pb, classify_request, completion_from_pb, delta_from_pb,
                       generate_request, generate_stream_request, model_info_from_pb, sampling_params,
                       score_request, score_result_from_pb)

SERVICE = "jamba.v1.JambaService"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # generous: a 256-prompt batch with logprobs is a few MiB

PemSource = Union[bytes, str, PathLike]  # PEM bytes, or the path of a PEM file
Metadata = Union[Mapping[str, str], Sequence[tuple[str, str]]]


# ---- channel setup ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's built-in retry policy (https://github.com/grpc/proposal/blob/master/A6-client-retries.md).

    Backoff before attempt n+1 is random in [0, min(initial_backoff * multiplier**(n-1),
    max_backoff)] seconds. gRPC caps max_attempts at 5, so larger values are refused here rather
    than silently lowered. gRPC only retries a call that failed before response headers came
    back, which in practice means the connection or the proxy failed; to wait out a busy server
    (RESOURCE_EXHAUSTED), use the client's wait_when_busy instead.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE",)

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be in [2, 5] (gRPC's limit), got {self.max_attempts}")
        if self.initial_backoff <= 0 or self.max_backoff <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("initial_backoff, max_backoff and backoff_multiplier must be > 0")
        for code in self.retryable_codes:
            if code not in grpc.StatusCode.__members__ or code == "OK":
                raise ValueError(f"unknown status code {code!r} in retryable_codes")

    def service_config(self) -> str:
        """The channel's service config JSON, applying this policy to every JambaService method."""
        return json.dumps({"methodConfig": [{
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff:.9f}s",
                "maxBackoff": f"{self.max_backoff:.9f}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": list(self.retryable_codes),
            },
        }]})


def channel_options(retry: RetryPolicy | None, max_message_bytes: int = MAX_MESSAGE_BYTES,
                    tls_server_name: str | None = None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1 if retry else 0),
    ]
    if retry:
        options.append(("grpc.service_config", retry.service_config()))
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options


def _pem(source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def channel_credentials(root_certificates: PemSource | None = None, private_key: PemSource | None = None,
                        certificate_chain: PemSource | None = None) -> grpc.ChannelCredentials:
    """TLS credentials. Without root_certificates the system's trust store is used; a client key
    and certificate (mutual TLS) go together."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("mutual TLS needs both private_key and certificate_chain")
    return grpc.ssl_channel_credentials(root_certificates=_pem(root_certificates), private_key=_pem(private_key),
                                        certificate_chain=_pem(certificate_chain))


def _metadata_pairs(metadata: Metadata | None) -> tuple[tuple[str, str], ...]:
    """Metadata as gRPC wants it: a tuple of pairs with lowercase keys (HTTP/2 header names are
    case-insensitive and gRPC refuses uppercase ones)."""
    if not metadata:
        return ()
    pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
    return tuple((str(k).lower(), v) for k, v in pairs)


class _Settings:
    """What both clients share: the channel recipe and each call's deadline and metadata."""

    def __init__(self, address: str, application: str | None, metadata: Metadata | None, timeout: float | None,
                 tls: bool, root_certificates: PemSource | None, private_key: PemSource | None,
                 certificate_chain: PemSource | None, tls_server_name: str | None, retry: RetryPolicy | None,
                 max_message_bytes: int, wait_when_busy: float = 0.0) -> None:
        if wait_when_busy < 0:
            raise ValueError(f"wait_when_busy must be >= 0 seconds, got {wait_when_busy}")
        if not tls and (root_certificates or private_key or certificate_chain or tls_server_name):
            raise ValueError("root_certificates, private_key, certificate_chain and tls_server_name need tls=True")
        self.address = address
        self.timeout = timeout
        self.wait_when_busy = wait_when_busy
        self.metadata = (("application", application),) if application else ()
        self.metadata += _metadata_pairs(metadata)
        self.options = channel_options(retry, max_message_bytes, tls_server_name)
        self.credentials = (channel_credentials(root_certificates, private_key, certificate_chain) if tls else None)

    def channel(self, module):
        """A channel from `module`, which is `grpc` or `grpc.aio` (same factory signatures)."""
        if self.credentials is not None:
            return module.secure_channel(self.address, self.credentials, options=self.options)
        return module.insecure_channel(self.address, options=self.options)

    def call_kwargs(self, timeout: float | None, metadata: Metadata | None) -> dict[str, Any]:
        timeout = self.timeout if timeout is None else timeout
        if timeout is not None and timeout <= 0:  # 0: explicitly none
            timeout = None
        extra: tuple[tuple[str, str], ...] = ()
        if timeout is not None:
            # The deadline also travels as metadata: Ray Serve's proxy does not pass gRPC's own
            # deadline to the replica, whose scheduler drops a request once it has passed.
            extra = (("jamba-deadline", f"{time.time() + timeout:.3f}"),)
        return {"timeout": timeout, "metadata": self.metadata + _metadata_pairs(metadata) + extra}

    def busy_pause(self, error: JambaError, give_up: float) -> float | None:
        """How long to wait before retrying a call the server refused as busy (RESOURCE_EXHAUSTED
        with a retry hint), or None to raise: not busy, no hint, or past wait_when_busy."""
        if error.code != grpc.StatusCode.RESOURCE_EXHAUSTED or error.retry_after is None:
            return None
        return error.retry_after if time.monotonic() + error.retry_after <= give_up else None


_NO_FINAL = "the stream ended without its final message"


def _first_message_late(timeout: float) -> JambaError:
    return JambaError(grpc.StatusCode.DEADLINE_EXCEEDED,
                      f"no first message within {timeout:g}s (first_message_timeout); the stream was cancelled")
_CLOSED = "the stream was closed before its final message"


# ---- streams ----------------------------------------------------------------------------------
class GenerateStream:
    """A running GenerateStream RPC: iterate it for `Delta`s; afterwards `completion` holds the
    final `Completion` (full output_ids, text cut at a stop string, finish_reason, usage).

    Stopping early cancels the RPC, so the server frees the request's slots at once: leave a
    `with` block, call `close()`, or just drop the stream (breaking out of `for d in
    client.generate_stream(...)` drops it). Errors raise JambaError from the iteration.
    """

    def __init__(self, start, params: pb.SamplingParams, settings: "_Settings",
                 first_message_timeout: float | None = None) -> None:
        self._start, self._settings = start, settings  # start() begins (or restarts) the RPC
        self._give_up = time.monotonic() + settings.wait_when_busy
        self._first_timeout = first_message_timeout
        self._expired = False
        self._call = start()
        self._logprobs, self._top = params.logprobs, params.top_logprobs > 0  # what the call asked for
        self._finished = self._received = False
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        if self._finished:
            raise StopIteration
        msg = self._read()
        if msg is None:
            self._finished = True
            raise JambaError(grpc.StatusCode.INTERNAL, _NO_FINAL)
        if msg.WhichOneof("event") == "final":
            self.completion = completion_from_pb(msg.final, self._logprobs, self._top)
            while self._read() is not None:  # the server closes after the final message;
                pass  # reading on surfaces a trailing error status
            self._finished = True
            raise StopIteration
        return delta_from_pb(msg.delta, self._logprobs, self._top)

    def _read(self) -> pb.GenerateStreamResponse | None:
        while True:
            timer = None
            if not self._received and self._first_timeout is not None:
                # No gRPC deadline covers only the first message: a timer cancels the call.
                timer = threading.Timer(self._first_timeout, self._expire, args=(self._call,))
                timer.daemon = True
                timer.start()
            try:
                msg = next(self._call)
                self._received = True
                return msg
            except StopIteration:
                return None
            except grpc.RpcError as e:
                if self._expired:
                    self._finished = True
                    raise _first_message_late(self._first_timeout) from e
                error = JambaError.from_rpc_error(e)
                # A busy server refuses a stream before its first message: then it can start over.
                pause = None if self._received else self._settings.busy_pause(error, self._give_up)
                if pause is None:
                    self._finished = True
                    raise error from e
            finally:
                if timer is not None:
                    timer.cancel()
            time.sleep(pause)
            self._call = self._start()

    def _expire(self, call) -> None:
        if not self._received:
            self._expired = True
            call.cancel()

    def result(self) -> Completion:
        """Read the rest of the stream and return the final Completion."""
        for _ in self:
            pass
        if self.completion is None:
            raise JambaError(grpc.StatusCode.CANCELLED, _CLOSED)
        return self.completion

    def close(self) -> None:
        """Cancel the RPC if it is still running (a no-op once the stream has finished)."""
        if not self._finished:
            self._finished = True
            self._call.cancel()

    cancel = close

    def __enter__(self) -> "GenerateStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a dropped stream cancels its RPC, as a dropped grpc call does
        try:
            self.close()
        except Exception:  # e.g. at interpreter exit, when grpc may be half torn down
            pass


class AsyncGenerateStream:
    """The grpc.aio counterpart of GenerateStream: `async for delta in stream`, then
    `stream.completion`. Stop early with `async with`, `close()` or `cancel()`."""

    def __init__(self, start, params: pb.SamplingParams, settings: "_Settings",
                 first_message_timeout: float | None = None) -> None:
        self._start, self._settings = start, settings
        self._give_up = time.monotonic() + settings.wait_when_busy
        self._first_timeout = first_message_timeout
        self._call = start()
        self._logprobs, self._top = params.logprobs, params.top_logprobs > 0  # what the call asked for
        self._finished = self._received = False
        self.completion: Completion | None = None

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self

    async def __anext__(self) -> Delta:
        if self._finished:
            raise StopAsyncIteration
        msg = await self._read()
        if msg is None:
            self._finished = True
            raise JambaError(grpc.StatusCode.INTERNAL, _NO_FINAL)
        if msg.WhichOneof("event") == "final":
            self.completion = completion_from_pb(msg.final, self._logprobs, self._top)
            while await self._read() is not None:
                pass
            self._finished = True
            raise StopAsyncIteration
        return delta_from_pb(msg.delta, self._logprobs, self._top)

    async def _read(self) -> pb.GenerateStreamResponse | None:
        while True:
            try:
                if self._received or self._first_timeout is None:
                    msg = await self._call.read()
                else:
                    try:
                        msg = await asyncio.wait_for(self._call.read(), self._first_timeout)
                    except asyncio.TimeoutError:
                        self._call.cancel()
                        self._finished = True
                        raise _first_message_late(self._first_timeout) from None
                self._received = True
                return None if msg is grpc.aio.EOF else msg
            except grpc.RpcError as e:
                error = JambaError.from_rpc_error(e)
                pause = None if self._received else self._settings.busy_pause(error, self._give_up)
                if pause is None:
                    self._finished = True
                    raise error from e
            await asyncio.sleep(pause)
            self._call = self._start()

    async def result(self) -> Completion:
        async for _ in self:
            pass
        if self.completion is None:
            raise JambaError(grpc.StatusCode.CANCELLED, _CLOSED)
        return self.completion

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self._call.cancel()

    cancel = close

    async def __aenter__(self) -> "AsyncGenerateStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


# ---- clients ----------------------------------------------------------------------------------
class JambaClient:
    """Blocking client. Thread-safe: one client (one channel) can serve many threads.

    address: "host:port" of the server (Ray Serve's gRPC port).
    application: Serve application to route to (the `application` metadata key).
    metadata: extra metadata sent with every call (dict or (key, value) pairs).
    timeout: default deadline of each call in seconds (None: no deadline); every method also
        takes timeout= (None there means this default, 0 no deadline) and metadata= (added to these).
    tls: use TLS; root_certificates (the CA; default: the system's), private_key and
        certificate_chain (mutual TLS) are PEM bytes or file paths. tls_server_name overrides
        the name the server's certificate is checked against.
    retry: RetryPolicy for the channel, or None for no retries.
    wait_when_busy: seconds a call may spend waiting out a busy server: a call (or a stream,
        before its first message) refused with RESOURCE_EXHAUSTED and a retry hint is sent again
        after the hinted pause, until this budget is spent (default 0: raise at once). Each
        attempt has its own deadline.
    max_message_bytes: largest message sent or received.
    """

    def __init__(self, address: str, *, application: str | None = None, metadata: Metadata | None = None,
                 timeout: float | None = None, tls: bool = False, root_certificates: PemSource | None = None,
                 private_key: PemSource | None = None, certificate_chain: PemSource | None = None,
                 tls_server_name: str | None = None, retry: RetryPolicy | None = RetryPolicy(),
                 wait_when_busy: float = 0.0, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._settings = _Settings(address, application, metadata, timeout, tls, root_certificates, private_key,
                                   certificate_chain, tls_server_name, retry, max_message_bytes, wait_when_busy)
        self._channel = self._settings.channel(grpc)
        self._stub = pb_grpc.JambaServiceStub(self._channel)

    def _call(self, method, request, timeout: float | None, metadata: Metadata | None):
        give_up = time.monotonic() + self._settings.wait_when_busy
        while True:
            try:
                return method(request, **self._settings.call_kwargs(timeout, metadata))
            except grpc.RpcError as e:
                error = JambaError.from_rpc_error(e)
                pause = self._settings.busy_pause(error, give_up)
                if pause is None:
                    raise error from e
            time.sleep(pause)

    def generate(self, prompts: Sequence[PromptLike], *, timeout: float | None = None,
                 metadata: Metadata | None = None, **params) -> list[Completion]:
        """Complete a batch of prompts with the same sampling params (one RPC); results in order.

        params: max_new_tokens, temperature, top_k, top_p, seed, stop (str or list),
        stop_token_ids, logprobs, ignore_eos, top_logprobs, logit_bias, min_tokens,
        repetition_penalty, frequency_penalty, presence_penalty, and at most one structure:
        json_schema (a dict or JSON text), json_object=True, regex or grammar (Lark); see
        messages.sampling_params. Unset ones take the server's defaults.
        """
        p = sampling_params(**params)
        resp = self._call(self._stub.Generate, generate_request(prompts, p), timeout, metadata)
        return [completion_from_pb(c, p.logprobs, p.top_logprobs > 0) for c in resp.completions]

    def generate_stream(self, prompt: PromptLike, *, timeout: float | None = None, metadata: Metadata | None = None,
                        first_message_timeout: float | None = None, **params) -> GenerateStream:
        """Start streaming one completion: iterate the returned stream for Deltas, then read
        `stream.completion`. Closing the stream early cancels the RPC. `timeout` covers the
        whole stream; `first_message_timeout` only the wait for its first message (a server
        whose application never comes up), after which the stream has no deadline but timeout's."""
        p = sampling_params(**params)
        request = generate_stream_request(prompt, p)
        return GenerateStream(
            lambda: self._stub.GenerateStream(request, **self._settings.call_kwargs(timeout, metadata)),
            p, self._settings, first_message_timeout)

    def chat(self, messages: Sequence[Mapping[str, str]], *, timeout: float | None = None,
             metadata: Metadata | None = None, **params) -> Completion:
        """Reply to one conversation (rendered with the checkpoint's chat template)."""
        return self.generate([messages], timeout=timeout, metadata=metadata, **params)[0]

    def classify(self, inputs: Sequence[PromptLike], *, timeout: float | None = None,
                 metadata: Metadata | None = None) -> list[Classification]:
        resp = self._call(self._stub.Classify, classify_request(inputs), timeout, metadata)
        return [classification_from_pb(r) for r in resp.results]

    def score(self, inputs: Sequence[PromptLike], *, timeout: float | None = None,
              metadata: Metadata | None = None) -> list[ScoreResult]:
        resp = self._call(self._stub.Score, score_request(inputs), timeout, metadata)
        return [score_result_from_pb(r) for r in resp.results]

    def model_info(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> ModelInfo:
        return model_info_from_pb(self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout, metadata))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "JambaClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncJambaClient:
    """grpc.aio client with JambaClient's options and methods; create it inside the event loop
    that uses it. `generate_stream` is a plain method returning an AsyncGenerateStream (iterate
    it with `async for`); every other method is awaited."""

    def __init__(self, address: str, *, application: str | None = None, metadata: Metadata | None = None,
                 timeout: float | None = None, tls: bool = False, root_certificates: PemSource | None = None,
                 private_key: PemSource | None = None, certificate_chain: PemSource | None = None,
                 tls_server_name: str | None = None, retry: RetryPolicy | None = RetryPolicy(),
                 wait_when_busy: float = 0.0, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._settings = _Settings(address, application, metadata, timeout, tls, root_certificates, private_key,
                                   certificate_chain, tls_server_name, retry, max_message_bytes, wait_when_busy)
        self._channel = self._settings.channel(grpc.aio)
        self._stub = pb_grpc.JambaServiceStub(self._channel)

    async def _call(self, method, request, timeout: float | None, metadata: Metadata | None):
        give_up = time.monotonic() + self._settings.wait_when_busy
        while True:
            try:
                return await method(request, **self._settings.call_kwargs(timeout, metadata))
            except grpc.RpcError as e:
                error = JambaError.from_rpc_error(e)
                pause = self._settings.busy_pause(error, give_up)
                if pause is None:
                    raise error from e
            await asyncio.sleep(pause)

    async def generate(self, prompts: Sequence[PromptLike], *, timeout: float | None = None,
                       metadata: Metadata | None = None, **params) -> list[Completion]:
        """See JambaClient.generate."""
        p = sampling_params(**params)
        resp = await self._call(self._stub.Generate, generate_request(prompts, p), timeout, metadata)
        return [completion_from_pb(c, p.logprobs, p.top_logprobs > 0) for c in resp.completions]

    def generate_stream(self, prompt: PromptLike, *, timeout: float | None = None, metadata: Metadata | None = None,
                        first_message_timeout: float | None = None, **params) -> AsyncGenerateStream:
        """See JambaClient.generate_stream; iterate with `async for`."""
        p = sampling_params(**params)
        request = generate_stream_request(prompt, p)
        return AsyncGenerateStream(
            lambda: self._stub.GenerateStream(request, **self._settings.call_kwargs(timeout, metadata)),
            p, self._settings, first_message_timeout)

    async def chat(self, messages: Sequence[Mapping[str, str]], *, timeout: float | None = None,
                   metadata: Metadata | None = None, **params) -> Completion:
        return (await self.generate([messages], timeout=timeout, metadata=metadata, **params))[0]

    async def classify(self, inputs: Sequence[PromptLike], *, timeout: float | None = None,
                       metadata: Metadata | None = None) -> list[Classification]:
        resp = await self._call(self._stub.Classify, classify_request(inputs), timeout, metadata)
        return [classification_from_pb(r) for r in resp.results]

    async def score(self, inputs: Sequence[PromptLike], *, timeout: float | None = None,
                    metadata: Metadata | None = None) -> list[ScoreResult]:
        resp = await self._call(self._stub.Score, score_request(inputs), timeout, metadata)
        return [score_result_from_pb(r) for r in resp.results]

    async def model_info(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> ModelInfo:
        return model_info_from_pb(await self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout, metadata))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncJambaClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
