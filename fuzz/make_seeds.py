#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz target into seeds/<target>/ (run once; the
files are committed). Tunnel seeds are gRPC-framed agent frames, encoded here by hand
(protobuf wire format) so no protobuf tooling is needed."""
import os, struct

HERE = os.path.dirname(os.path.abspath(__file__))

def write(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])

def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload

def ld(num, payload):
    return field(num, 2, payload if isinstance(payload, bytes) else payload.encode())

def header(name, value):
    return ld(1, name) + ld(2, value)

def response_head(status, headers=(), body=b"", end=False):
    m = field(1, 0, status)
    for h in headers:
        m += ld(2, header(*h))
    if body:
        m += ld(3, body)
    if end:
        m += field(4, 0, 1)
    return ld(2, m)  # AgentFrame.response_head

def data(b):
    return ld(3, ld(1, b))

def end():
    return ld(4, b"")

def error(code, msg):
    return ld(5, field(1, 0, code) + ld(2, msg))

def grpc(*frames):
    return b"".join(b"\x00" + struct.pack(">I", len(f)) + f for f in frames)

json_ct = [("content-type", "application/json")]
# The first byte selects the mode (odd: an upgrade); the rest are the agent's frames.
write("tunnel_frames", "inline", b"\x00" + grpc(response_head(200, json_ct, b'{"kind":"PodList"}', True)))
write("tunnel_frames", "streamed", b"\x00" + grpc(response_head(200, json_ct), data(b'{"type":"ADDED"}\n'), data(b"x" * 300), end()))
write("tunnel_frames", "error", b"\x00" + grpc(error(1, "cluster unreachable")))
write("tunnel_frames", "error_mid_body", b"\x00" + grpc(response_head(200), data(b"partial"), error(2, "upstream aborted")))
write("tunnel_frames", "upgrade", b"\x01" + grpc(response_head(101, [("upgrade", "websocket")]), data(b"\x82\x05hello"), end()))
write("tunnel_frames", "hello_instead", b"\x00" + grpc(ld(1, field(1, 0, 1))))
write("tunnel_frames", "truncated", b"\x00" + grpc(response_head(200))[:-3])

for i, t in enumerate([
    "Bearer ci:1:kasjob-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcd",
    "bearer   ci:18446744073709551615:x",
    "Bearer ci:007:token",
    "Bearer ci::token",
    "Basic dXNlcjpwYXNz",
    "Bearer ci:1:",
    "v5.channel.k8s.io, base64url.bearer.authorization.k8s.io.Y2k6MTprYXNqb2ItYWJj",
]):
    write("ci_token", f"seed{i}", t)

configs = {
    "seed003": """ci_access:
  projects:
    - id: path/to/project
      default_namespace: my-ns
      environments: [staging, review/*]
      access_as: {ci_job: {}}
  groups:
    - id: path/to/group/subgroup
      environments: [production]
""",
    "impersonate": """ci_access:
  projects:
    - id: acme/web/shop
      access_as:
        impersonate:
          username: gitlab-deployer
          uid: "1234"
          groups: [deployers, "system:authenticated"]
          extra:
            reason: [ci]
""",
    "agent_mode": "ci_access:\n  groups:\n    - id: acme\n      access_as: {agent: {}}\n",
    "service_access": "service_access:\n  - url: http://prometheus.monitoring.svc:9090/api/v1/\n",
    "empty": "",
    "misspelt": "ci_access:\n  project:\n    - id: x\n",
    "other_root": "ci_access:\n  projects:\n    - id: other/project\n",
}
for name, c in configs.items():
    write("agent_config", name, c)

requests = {
    "get": "GET\n/k8s-proxy/api/v1/namespaces/default/pods?watch=true\naccept: application/json\nauthorization: Bearer ci:1:x\n",
    "impersonate": "POST\n/k8s-proxy/apis/apps/v1/namespaces/x/deployments\nimpersonate-user: admin\nImpersonate-Group: system:masters\nimpersonate-extra-scopes: all\nconnection: keep-alive, x-secret\nx-secret: 1\n",
    "exec": "GET\n/k8s-proxy/api/v1/namespaces/x/pods/p/exec?command=sh\nconnection: Upgrade\nupgrade: websocket\nsec-websocket-protocol: v5.channel.k8s.io, base64url.bearer.authorization.k8s.io.Y2k6MTp4\n",
    "no_prefix": "GET\n/api\nhost: kas\ntransfer-encoding: chunked\nte: trailers\n",
    "prefix_only": "GET\n/k8s-proxy?timeout=1s\n",
    "lookalike": "GET\n/k8s-proxyx/api\n",
}
for name, r in requests.items():
    write("proxy_request", name, r)
