"""A TLS-terminating TCP proxy for tests: what Envoy (k8s/gateway-grpc-tls.yaml), a cloud load
balancer's TLS listener or stunnel does in front of Ray Serve's plaintext gRPC port. Outside it
speaks TLS (ALPN h2, optionally requiring a client certificate); inside it forwards the same
HTTP/2 bytes to the backend. Runs its own event loop in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
import threading
from pathlib import Path


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.contextmanager
def tls_terminator(backend: str, cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None = None):
    """Serve TLS on 127.0.0.1 (a port the OS picks) in front of `backend` ("host:port"); yields
    "127.0.0.1:PORT". With client_ca_pem, clients must present a certificate signed by it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as d:  # load_cert_chain reads files only
        (Path(d) / "cert.pem").write_bytes(cert_pem)
        (Path(d) / "key.pem").write_bytes(key_pem)
        ctx.load_cert_chain(Path(d) / "cert.pem", Path(d) / "key.pem")
    ctx.set_alpn_protocols(["h2"])  # gRPC clients insist on h2 being negotiated
    if client_ca_pem is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=client_ca_pem.decode())
    host, port = backend.rsplit(":", 1)

    async def handle(client_r, client_w):
        try:
            backend_r, backend_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, backend_w), _pipe(backend_r, client_w))

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="tls-terminator", daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx), loop).result()
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
