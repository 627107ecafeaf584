"""A loopback stand-in for NDIF that speaks nnsight 0.8's remote protocol, for offline tests.

The client side is nnsight's own ``RemoteBackend``, unchanged. What it does, read from
``nnsight/intervention/backends/remote.py`` and ``nnsight/schema``:

1. open a websocket on ``{host}/subscribe``; the server's first text frame is ``{"session_id": ...}``;
2. ``POST {host}/request`` as multipart form: field ``data`` is the ``RequestModel`` JSON envelope
   (model key, session id, compress flag, env), file ``blob`` the serialized trace
   (``RequestModel.serialize``: source + captured values, cloudpickled, zstd-compressed);
   the HTTP answer is a ``ResponseModel`` JSON (status RECEIVED);
3. status updates arrive on the websocket as ``ResponseModel`` JSON text frames; COMPLETED comes
   as a binary frame (``ResponseModel.pickle()``) whose ``data`` is the result blob:
   ``torch.save({name: saved value})``, zstd-compressed when the request was.

The server side does what NDIF does with a request: ``RequestModel.deserialize`` against the
model's persistent objects (the model itself never travels), apply the request's env, execute
the tracer, and return the values the block saved. It runs in a separate worker process whose
``sae_lens``, ``transformer_lens`` and ``qscope_plugins`` imports fail, like a server that has
none of them installed, so only code shipped by value (``nnsight.register``) can run there.

Binds 127.0.0.1 on a free port; nothing here reaches any other address.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

#: Packages an NDIF server does not have: importing them in the worker raises ModuleNotFoundError.
ABSENT_ON_SERVER = ("sae_lens", "transformer_lens", "qscope_plugins")

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TEXT, _BINARY, _CLOSE = 0x1, 0x2, 0x8


def model_key(checkpoint: str | os.PathLike) -> str:
    """The key nnsight's ``TransformersModel`` would send for a local checkpoint.

    ``to_model_key()`` canonicalises repo ids through the Hub API (a network call), so tests
    build it directly: wrapper class import path, then the repo id / revision / task JSON.
    """
    from nnsight.modeling.transformers import TransformersModel
    from nnsight.util import to_import_path

    payload = {"repo_id": str(checkpoint), "revision": None, "task": "text-generation"}
    return f"{to_import_path(TransformersModel)}:{json.dumps(payload)}"


# ---------------------------------------------------------------- websocket framing (RFC 6455)
def _ws_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 2**16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return header + payload


def _ws_read(stream) -> tuple[int, bytes]:
    """One client frame (clients always mask); returns ``(opcode, payload)``."""
    head = stream.read(2)
    if len(head) < 2:  # the client hung up without a close frame
        return _CLOSE, b""
    first, second = head
    n = second & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", stream.read(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", stream.read(8))
    mask = stream.read(4) if second & 0x80 else b"\0\0\0\0"
    data = stream.read(n)
    return first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def _multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """Fields of a ``multipart/form-data`` body, by name (what httpx sends for ``data=`` + ``files=``)."""
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    fields = {}
    for part in body.split(b"--" + boundary)[1:-1]:
        head, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        name = head.split(b'name="')[1].split(b'"')[0].decode()
        fields[name] = content.removesuffix(b"\r\n")
    return fields


# ---------------------------------------------------------------- the worker process
def _send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("!Q", len(data)) + data)
    stream.flush()


def _receive(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (n,) = struct.unpack("!Q", header)
    return pickle.loads(stream.read(n))


def _execute(models: dict, job: dict) -> bytes:
    """Run one request the way NDIF does and return the result blob."""
    import torch
    from nnsight.modeling.mixins.remotable import Remotable
    from nnsight.schema.request import RequestModel
    from nnsight.tracing import tracer as tracing

    key = job["model_key"]
    if key not in models:
        model = Remotable.from_model_key(key, dispatch=True)
        model._module.requires_grad_(False)
        models[key] = model
    model = models[key]
    model._remoteable_set_env(job["env"])
    tracer = RequestModel.deserialize(job["blob"], model._remoteable_persistent_objects(), job["compress"])
    tracing.inc()
    try:
        tracer.execute(tracer.info.code)
        saved = tracing._saves()
        saves = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saved}
    finally:
        tracing.dec()
    buffer = io.BytesIO()
    torch.save(saves, buffer)
    result = buffer.getvalue()
    if job["compress"]:
        import zstandard

        result = zstandard.ZstdCompressor().compress(result)
    return result


def worker_main() -> None:
    """Serve jobs from stdin until it closes; stdout carries only framed replies."""
    for name in ABSENT_ON_SERVER:
        sys.modules[name] = None  # `import name` now raises ModuleNotFoundError
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the reply stream
    import nnsight.modeling.transformers  # noqa: F401 - warm up while the client prepares its first request
    requests = sys.stdin.buffer
    models: dict = {}
    while (job := _receive(requests)) is not None:
        try:
            _send(replies, ("ok", _execute(models, job)))
        except Exception:  # noqa: BLE001 - reported to the client, like NDIF's ERROR status
            _send(replies, ("error", traceback.format_exc()))


# ---------------------------------------------------------------- the HTTP + websocket server
class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # a websocket upgrade needs an HTTP/1.1 status line

    def log_message(self, format, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        if self.path != "/subscribe" or "websocket" not in self.headers.get("Upgrade", "").lower():
            self.send_error(404)
            return
        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + _WS_GUID).encode()).digest())
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.end_headers()
        self.close_connection = True
        session_id = uuid.uuid4().hex
        outbox: queue.Queue = queue.Queue()
        self.server.mock.sessions[session_id] = outbox
        self.wfile.write(_ws_frame(_TEXT, json.dumps({"session_id": session_id}).encode()))
        while True:
            opcode, payload, final = outbox.get()
            self.wfile.write(_ws_frame(opcode, payload))
            if final:
                break
        if _ws_read(self.rfile)[0] == _CLOSE:
            self.wfile.write(_ws_frame(_CLOSE, b""))

    def do_POST(self) -> None:
        if self.path != "/request":
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers["Content-Length"]))
        fields = _multipart(body, self.headers["Content-Type"])
        envelope = json.loads(fields["data"])
        job_id = uuid.uuid4().hex
        self.server.mock.received.append({"envelope": envelope, "blob": fields["blob"], "headers": dict(self.headers)})
        from nnsight.schema.response import ResponseModel, Status

        answer = ResponseModel(id=job_id, status=Status.RECEIVED, description="received").model_dump_json().encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        threading.Thread(target=self.server.mock.run_job, args=(job_id, envelope, fields["blob"]), daemon=True).start()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    mock: MockNDIF


class MockNDIF:
    """Context manager: a loopback NDIF (``.host``) backed by one sandboxed worker process.

    ``received`` lists every request as it arrived (envelope, blob, headers).
    """

    def __init__(self) -> None:
        self.sessions: dict[str, queue.Queue] = {}
        self.received: list[dict] = []
        self._lock = threading.Lock()

    def __enter__(self) -> MockNDIF:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self._worker = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.mock = self
        self.host = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._worker.stdin.close()
        self._worker.wait(timeout=30)
        self._worker.stdout.close()

    def run_job(self, job_id: str, envelope: dict, blob: bytes) -> None:
        from nnsight.schema.response import ResponseModel, Status

        outbox = self.sessions.pop(envelope["session_id"])
        running = ResponseModel(id=job_id, status=Status.RUNNING, description="running")
        outbox.put((_TEXT, running.model_dump_json().encode(), False))
        job = {"model_key": envelope["model_key"], "env": envelope.get("env", {}),
               "compress": envelope["compress"], "blob": blob}
        with self._lock:  # one worker, one job at a time (NDIF runs a model's jobs in sequence too)
            _send(self._worker.stdin, job)
            reply = _receive(self._worker.stdout)
        if reply is None:
            reply = ("error", "the worker process died")
        status, payload = reply
        if status == "ok":
            done = ResponseModel(id=job_id, status=Status.COMPLETED, description="done", data=payload)
            outbox.put((_BINARY, done.pickle(), True))
        else:
            failed = ResponseModel(id=job_id, status=Status.ERROR, description=payload)
            outbox.put((_TEXT, failed.model_dump_json().encode(), True))


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()
