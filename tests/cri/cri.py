#!/usr/bin/env python3
"""A small Kubernetes CRI (runtime.v1) client for rtv's tests.

It speaks gRPC to a CRI server (containerd's CRI plugin) over a Unix socket,
using the messages of api.proto beside it. The Python classes are generated
from api.proto with protoc at first use into a cache directory
($RTV_CACHE_DIR/cri-py/<hash of api.proto>, default ~/.cache/rtv/...), so
editing api.proto takes effect on the next run. The gRPC stubs are not
generated: methods are called by their path (/runtime.v1.<Service>/<Method>),
which the service descriptors of api.proto give.

Needs Debian's python3-grpcio, python3-protobuf and protobuf-compiler
(scripts/install-deps.sh installs them).

Usage: cri.py [--address SOCKET] [--timeout SECONDS] COMMAND [ARGS]

  call SERVICE/METHOD [JSON]   any method of api.proto (e.g.
                               RuntimeService/Version), the request as JSON
  session                      JSON lines on stdin, one answer line each (for
                               programs: see below)
  version | runtime-status | list-pods | images
  list [--pod ID]              containers
  run-pod CONFIG_JSON [--handler NAME]
  pod-status ID | stop-pod ID | remove-pod ID
  create-container POD_ID CONFIG_JSON SANDBOX_CONFIG_JSON
  start ID | status ID | remove ID
  stop ID [--stop-timeout SECONDS]
  exec-sync ID [--exec-timeout SECONDS] CMD [ARG...]
  image-status REF | pull REF
  stubs                        generate the Python classes, print their dir

Requests are protobuf messages as JSON with api.proto's field names (enum
values by name). Answers are printed as JSON with every field of the
response: api.proto's field names, enums by name, 64-bit integers as
numbers, bytes as UTF-8 text (invalid bytes replaced), unset messages null.

`session` reads one request a line: {"method": "RuntimeService/Version",
"request": {...}, "timeout": 10} and answers each with one line:
{"ok": RESPONSE} or {"error": {"code": "NOT_FOUND", "message": "..."}}
(gRPC errors; a malformed request gets code "CLIENT"). It ends at EOF.

Errors of the other commands go to stderr, with exit status 1; usage
errors exit 2.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join(HERE, "api.proto")
PACKAGE = "runtime.v1"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"


def fail(msg, code=1):
    sys.stderr.write("cri.py: %s\n" % msg)
    sys.exit(code)


try:
    import grpc
    from google.protobuf import descriptor as _descriptor
    from google.protobuf import json_format
except ImportError as e:  # pragma: no cover - depends on the machine
    fail(
        "%s (%s): install Debian's python3-grpcio and python3-protobuf "
        "(scripts/install-deps.sh)" % (e, sys.executable)
    )


def cache_root():
    base = os.environ.get("RTV_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "rtv"
    )
    return os.path.join(base, "cri-py")


def generate(out_dir):
    """Runs protoc on api.proto into out_dir (api_pb2.py)."""
    protoc = shutil.which("protoc")
    if protoc:
        cmd = [protoc]
    else:
        try:
            import grpc_tools  # noqa: F401
        except ImportError:
            fail(
                "protoc not found: install Debian's protobuf-compiler "
                "(scripts/install-deps.sh)"
            )
        cmd = [sys.executable, "-m", "grpc_tools.protoc"]
    cmd += ["--proto_path", HERE, "--python_out", out_dir, PROTO]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        fail("%s failed:\n%s" % (" ".join(cmd), done.stderr))


def stubs_dir():
    """The directory holding api_pb2.py for this api.proto, made if needed
    (atomically: concurrent first uses each make a temporary one and the
    first rename wins)."""
    with open(PROTO, "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()[:16]
    root = cache_root()
    final = os.path.join(root, key)
    if os.path.exists(os.path.join(final, "api_pb2.py")):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        generate(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.exists(os.path.join(final, "api_pb2.py")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_api():
    path = os.path.join(stubs_dir(), "api_pb2.py")
    spec = importlib.util.spec_from_file_location("api_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Client:
    """Calls any method of api.proto's services over one gRPC channel."""

    def __init__(self, address, api):
        self.api = api
        target = address if address.startswith("unix:") else "unix:" + address
        self.channel = grpc.insecure_channel(target)
        self.methods = {}

    def method(self, name):
        """(callable, request class) of "Service/Method"."""
        if name in self.methods:
            return self.methods[name]
        service_name, _, method_name = name.partition("/")
        service = self.api.DESCRIPTOR.services_by_name.get(service_name)
        if service is None:
            raise ValueError("no service %r in api.proto" % service_name)
        m = service.methods_by_name.get(method_name)
        if m is None:
            raise ValueError("no method %r in %s" % (method_name, service_name))
        request = getattr(self.api, m.input_type.name)
        response = getattr(self.api, m.output_type.name)
        stub = self.channel.unary_unary(
            "/%s.%s/%s" % (PACKAGE, service_name, method_name),
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )
        self.methods[name] = (stub, request)
        return self.methods[name]

    def call(self, name, request, timeout):
        """Calls "Service/Method" with `request` (a dict); returns the
        response as a plain dict. Raises grpc.RpcError, or ValueError /
        json_format.ParseError for a bad request."""
        stub, cls = self.method(name)
        msg = json_format.ParseDict(request or {}, cls())
        return to_plain(stub(msg, timeout=timeout))


_INT64 = {
    _descriptor.FieldDescriptor.TYPE_INT64,
    _descriptor.FieldDescriptor.TYPE_UINT64,
    _descriptor.FieldDescriptor.TYPE_SINT64,
    _descriptor.FieldDescriptor.TYPE_FIXED64,
    _descriptor.FieldDescriptor.TYPE_SFIXED64,
}


def _value(field, v):
    t = field.type
    if t == _descriptor.FieldDescriptor.TYPE_MESSAGE:
        return to_plain(v)
    if t == _descriptor.FieldDescriptor.TYPE_ENUM:
        named = field.enum_type.values_by_number.get(v)
        return named.name if named is not None else v
    if t == _descriptor.FieldDescriptor.TYPE_BYTES:
        return bytes(v).decode("utf-8", "replace")
    if t in _INT64:
        return int(v)
    return v


def to_plain(msg):
    """A message as a dict with every field (see the module's doc)."""
    out = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        mt = field.message_type
        if mt is not None and mt.GetOptions().map_entry:
            vf = mt.fields_by_name["value"]
            out[field.name] = {k: _value(vf, value[k]) for k in sorted(value)}
        elif field.label == _descriptor.FieldDescriptor.LABEL_REPEATED:
            out[field.name] = [_value(field, v) for v in value]
        elif mt is not None:
            out[field.name] = to_plain(value) if msg.HasField(field.name) else None
        else:
            out[field.name] = _value(field, value)
    return out


def rpc_error(e):
    code = e.code() if hasattr(e, "code") else None
    return {
        "code": code.name if code is not None else "UNKNOWN",
        "message": e.details() if hasattr(e, "details") else str(e),
    }


def session(client, default_timeout):
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            timeout = float(req.get("timeout") or default_timeout)
            answer = {"ok": client.call(req["method"], req.get("request"), timeout)}
        except grpc.RpcError as e:
            answer = {"error": rpc_error(e)}
        except (ValueError, KeyError, TypeError, json_format.ParseError) as e:
            answer = {"error": {"code": "CLIENT", "message": str(e)}}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def parse_json(text, what):
    try:
        return json.loads(text)
    except ValueError as e:
        fail("%s is not JSON: %s" % (what, e), 2)


def main(argv):
    p = argparse.ArgumentParser(
        prog="cri.py",
        description="A small CRI runtime.v1 client (see the module's doc).",
    )
    p.add_argument(
        "--address",
        default=os.environ.get("CONTAINER_RUNTIME_ENDPOINT", DEFAULT_ADDRESS),
        help="the CRI server's Unix socket (default: $CONTAINER_RUNTIME_ENDPOINT "
        "or %s)" % DEFAULT_ADDRESS,
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per call (default 60)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("call")
    c.add_argument("method")
    c.add_argument("request", nargs="?", default="{}")
    sub.add_parser("session")
    sub.add_parser("stubs")
    for name in ["version", "runtime-status", "list-pods", "images"]:
        sub.add_parser(name)
    c = sub.add_parser("list")
    c.add_argument("--pod", default="")
    c = sub.add_parser("run-pod")
    c.add_argument("config")
    c.add_argument("--handler", default="")
    for name in ["pod-status", "stop-pod", "remove-pod", "start", "status", "remove"]:
        sub.add_parser(name).add_argument("id")
    c = sub.add_parser("create-container")
    c.add_argument("pod_id")
    c.add_argument("config")
    c.add_argument("sandbox_config")
    c = sub.add_parser("stop")
    c.add_argument("id")
    c.add_argument("--stop-timeout", type=int, default=10)
    c = sub.add_parser("exec-sync")
    c.add_argument("--exec-timeout", type=int, default=0)
    c.add_argument("id")
    c.add_argument("cmd", nargs=argparse.REMAINDER)
    for name in ["image-status", "pull"]:
        sub.add_parser(name).add_argument("ref")
    a = p.parse_args(argv)

    if a.command == "stubs":
        print(stubs_dir())
        return 0
    client = Client(a.address, load_api())
    if a.command == "session":
        session(client, a.timeout)
        return 0

    rt, im = "RuntimeService/", "ImageService/"
    calls = {
        "call": lambda: (a.method, parse_json(a.request, "the request")),
        "version": lambda: (rt + "Version", {"version": "v1"}),
        "runtime-status": lambda: (rt + "Status", {"verbose": False}),
        "list-pods": lambda: (rt + "ListPodSandbox", {}),
        "images": lambda: (im + "ListImages", {}),
        "list": lambda: (
            rt + "ListContainers",
            {"filter": {"pod_sandbox_id": a.pod}} if a.pod else {},
        ),
        "run-pod": lambda: (
            rt + "RunPodSandbox",
            {
                "config": parse_json(a.config, "the pod config"),
                "runtime_handler": a.handler,
            },
        ),
        "pod-status": lambda: (
            rt + "PodSandboxStatus",
            {"pod_sandbox_id": a.id, "verbose": True},
        ),
        "stop-pod": lambda: (rt + "StopPodSandbox", {"pod_sandbox_id": a.id}),
        "remove-pod": lambda: (rt + "RemovePodSandbox", {"pod_sandbox_id": a.id}),
        "create-container": lambda: (
            rt + "CreateContainer",
            {
                "pod_sandbox_id": a.pod_id,
                "config": parse_json(a.config, "the container config"),
                "sandbox_config": parse_json(a.sandbox_config, "the pod config"),
            },
        ),
        "start": lambda: (rt + "StartContainer", {"container_id": a.id}),
        "status": lambda: (
            rt + "ContainerStatus",
            {"container_id": a.id, "verbose": True},
        ),
        "remove": lambda: (rt + "RemoveContainer", {"container_id": a.id}),
        "stop": lambda: (
            rt + "StopContainer",
            {"container_id": a.id, "timeout": a.stop_timeout},
        ),
        "exec-sync": lambda: (
            rt + "ExecSync",
            {"container_id": a.id, "cmd": a.cmd, "timeout": a.exec_timeout},
        ),
        "image-status": lambda: (im + "ImageStatus", {"image": {"image": a.ref}}),
        "pull": lambda: (im + "PullImage", {"image": {"image": a.ref}}),
    }
    method, request = calls[a.command]()
    try:
        answer = client.call(method, request, a.timeout)
    except grpc.RpcError as e:
        err = rpc_error(e)
        fail("%s: %s: %s" % (method, err["code"], err["message"]))
    except (ValueError, json_format.ParseError) as e:
        fail("%s: bad request: %s" % (method, e), 2)
    print(json.dumps(answer, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
