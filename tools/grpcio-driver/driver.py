"""grpcio-driver: a grpcio (gRPC C-core) CRI client for dockhand's integration tests.

The same line protocol as tools/cri-driver: it connects to one CRI socket and runs the calls it
reads on stdin (one JSON object a line: method name, request as base64 protobuf bytes), printing
one JSON result a line (code, message, response bytes) in order. No generated stubs: methods are
called by path with raw bytes. The channel keeps grpcio's defaults, its `:authority` included
(the percent-encoded socket path), as any C-core client on a node would send.
"""

import base64
import json
import sys
import threading
import time

import grpc

SERVICE = "/runtime.v1.RuntimeService/"
MAX_MESSAGE = 16 << 20


def result(code, message, **extra):
    out = {"code": code, "message": message}
    out.update(extra)
    return out


def from_error(error):
    return result(error.code().value[0], error.details() or "")


class Stream:
    def __init__(self, call):
        self.call = call
        self.responses = []
        self.outcome = result(0, "")
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        try:
            for message in self.call:
                self.responses.append(base64.b64encode(message).decode())
        except grpc.RpcError as error:
            self.outcome = from_error(error)

    def end(self):
        self.call.cancel()
        self.thread.join()
        return dict(self.outcome, responses=self.responses)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: driver.py <socket> < calls.jsonl")
    channel = grpc.insecure_channel(
        "unix:" + sys.argv[1],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    streams = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        start = time.monotonic()
        call = json.loads(line)
        op = call.get("op") or "call"
        request = base64.b64decode(call.get("request") or "")
        timeout = (call.get("timeout_ms") or 30000) / 1000
        path = SERVICE + call.get("method", "")
        if op == "call":
            method = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            try:
                response = method(request, timeout=timeout)
                out = result(0, "", response=base64.b64encode(response).decode())
            except grpc.RpcError as error:
                out = from_error(error)
        elif op == "stream_start":
            method = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            streams[call["name"]] = Stream(method(request, timeout=timeout))
            out = result(0, "")
        elif op == "stream_end":
            out = streams.pop(call["name"]).end()
        else:
            out = {"code": 0, "message": "", "error": "unknown op %r" % op}
        out["elapsed_ms"] = int((time.monotonic() - start) * 1000)
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
