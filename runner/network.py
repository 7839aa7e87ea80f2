"""What a plan with RPC workers asks of the network: each host's share and the bytes per token.

llama.cpp runs the layers in order, device after device, and its scheduler moves every tensor a
device needs from wherever it was computed (ggml-backend's sched copies the inputs of each split).
An RPC device is a socket, so per decoded token each worker receives the hidden state (n_embd F32)
and the graph inputs its layers read (the position; per kind of attention layer it holds, an F16
mask row as long as the cache cells in use and the cells the new K and V go to), and sends back the hidden state, or the logits (n_vocab
F32) when it holds the output layer, as it does when this machine has no GPU (llama.cpp puts the
output layer on the last device). A layer whose experts stay in this machine's RAM (`--n-cpu-moe`)
while its attention is on a worker sends the hidden state here and back once more. Unchanged decode
graphs are not sent again (GRAPH_RECOMPUTE), so graph commands are a few bytes. Each worker is one
round trip per token: the hidden state must come back before the next device can start.

bench/bench_rpc.py measures the bytes that cross loopback per token against `token_traffic`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ossgguf.gguf.tensors import pad

from .plan import Plan

LOCAL = "this machine"
DEFAULT_LINK_GBIT = 1.0  # plan --link: gigabit Ethernet, the common case at home
ROUND_TRIP_S = 0.2e-3  # one LAN round trip (switch + two kernels); loopback has ~0.02 ms


@dataclass(frozen=True)
class HostShare:
    host: str  # "this machine" or a worker's HOST:PORT
    devices: tuple[str, ...]
    layers: tuple[int, ...]  # llama.cpp layers (n_layer: the output layer)
    weights: int  # bytes of model buffers: what loading sends to a worker (its --cache keeps them)
    kv: int
    compute: int
    token_bytes: int = 0  # network bytes per decoded token, both directions (0 for this machine)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


def remote(p: Plan) -> list[int]:
    """Indexes of the plan's devices that are RPC workers holding layers."""
    if p.placement == "cpu":
        return []
    return [i for i, g in enumerate(p.devices.gpus) if g.kind == "rpc" and len(p.layers_of(i))]


def _cells(p: Plan, depth: int) -> tuple[int, int]:
    """Cache cells a decode step at `depth` attends over (llama.cpp pads n_kv to 256): full, sliding."""
    m = p.model
    full = min(pad(max(depth + 1, 1), 256), pad(p.n_ctx, 256))
    return full, min(full, pad(m.n_swa + 1, 256))


# ggml-rpc.cpp's framing: a command byte and a 64-bit size; SET_TENSOR then carries the tensor's
# description (rpc_tensor, 296 bytes), a cache flag and an offset; GET_TENSOR an offset and a size,
# and its reply a size before the data
RPC_TENSOR = 296
SET = 1 + 8 + RPC_TENSOR + 1 + 8
GET = 1 + 8 + RPC_TENSOR + 16 + 8
RECOMPUTE = 1 + 8 + 4  # the unchanged graph is run again by its id


def device_traffic(p: Plan, i: int, depth: int = 0) -> int:
    """Bytes device i's socket carries for one decoded token at `depth` cached tokens."""
    m = p.model
    layers = p.layers_of(i)
    blocks = [il for il in layers if il < m.n_layer]
    full, swa = _cells(p, depth)
    mask = 2 if p.flash_attn else 4  # llama.cpp's KQ mask is F16 with flash attention, else F32
    # the cells the new K and V go to (I64); V transposed without flash attention: one per value
    v_idxs = 8 if p.flash_attn else 8 * m.n_head_kv * m.head_dim_v
    hidden = m.n_embd * 4
    n = RECOMPUTE + SET + hidden + SET + 4  # run the graph; the hidden state in, the position
    for cells, kind in ((full, False), (swa, True)):  # each kind of attention layer it holds has its inputs
        if any(m.swa_layers[il] == kind for il in blocks):
            n += SET + cells * mask + SET + 8 + SET + v_idxs
    # the logits back (and the ids of the rows wanted), or the hidden state for the next device
    n += SET + 4 + GET + m.n_vocab * 4 if m.n_layer in layers else GET + hidden
    # experts kept here for a worker's layer: the hidden state, the chosen ids and weights, and back
    n += sum(2 * (GET + SET + hidden) + 2 * (GET + m.n_expert_used * 4) for il in blocks if il < p.n_cpu_moe)
    return n


def token_traffic(p: Plan, depth: int = 0) -> dict[str, int]:
    """Network bytes per decoded token by worker host (empty without workers)."""
    out: dict[str, int] = {}
    for i in remote(p):
        host = p.devices.gpus[i].host or p.devices.gpus[i].name
        out[host] = out.get(host, 0) + device_traffic(p, i, depth)
    return out


def network_seconds(p: Plan, depth: int = 0, gbit: float = DEFAULT_LINK_GBIT,
                    round_trip: float = ROUND_TRIP_S) -> float:
    """Seconds per decoded token spent on the network: bytes over the link plus a round trip per worker."""
    return sum(token_traffic(p, depth).values()) * 8 / (gbit * 1e9) + len(remote(p)) * round_trip


def hosts(p: Plan) -> list[HostShare]:
    """This machine (RAM and local GPUs) and each worker host: layers, bytes, network bytes per token."""
    shares: dict[str, dict] = {}

    def share(host: str) -> dict:
        return shares.setdefault(host, {"devices": [], "layers": [], "model": 0, "kv": 0, "compute": 0})

    local = share(LOCAL)
    local["devices"].append("RAM")
    for b in p.buffers:
        if b.device == "cpu":
            local[b.kind] += b.bytes
    traffic = token_traffic(p)
    if p.placement != "cpu":
        for i, g in enumerate(p.devices.gpus):
            s = share((g.host or g.name) if g.kind == "rpc" else LOCAL)
            s["devices"].append(g.name)
            s["layers"] += list(p.layers_of(i))
            for b in p.buffers:
                if b.device == "gpu" and b.gpu == i:
                    s[b.kind] += b.bytes
    return [HostShare(h, tuple(s["devices"]), tuple(s["layers"]), s["model"], s["kv"], s["compute"],
                      traffic.get(h, 0)) for h, s in shares.items()]


def _layers(layers: tuple[int, ...], n_layer: int) -> str:
    if not layers:
        return "-"
    blocks = [x for x in layers if x < n_layer]
    text = (f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])) if blocks else ""
    return ", ".join(x for x in (text, "output" if n_layer in layers else "") if x)


def format_hosts(p: Plan, gbit: float = DEFAULT_LINK_GBIT) -> str:
    """The per-host table of a plan with workers, and the network's cost per token."""
    rows = [("host", "devices", "layers", "weights", "KV", "total", "net/token")]
    shares = hosts(p)
    for h in shares:
        rows.append((h.host, ",".join(h.devices), _layers(h.layers, p.model.n_layer), f"{h.weights / 1e9:.2f} GB",
                     f"{h.kv / 1e9:.2f} GB", f"{h.total / 1e9:.2f} GB",
                     f"{h.token_bytes / 1e3:.1f} kB" if h.host != LOCAL else "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(r[c].ljust(widths[c]) if c < 3 else r[c].rjust(widths[c]) for c in range(len(r)))
             for r in rows]
    total = sum(h.token_bytes for h in shares)
    at = ", ".join(f"{network_seconds(p, 0, g) * 1e3:.1f} ms at {g:g} Gbit/s" for g in sorted({gbit, 1.0, 10.0}))
    lines.append(f"network per decoded token: {total / 1e3:.1f} kB and {len(remote(p))} round trip(s): {at}"
                 f" (with {ROUND_TRIP_S * 1e3:.1f} ms per round trip)")
    if any(p.model.n_layer in h.layers for h in shares if h.host != LOCAL):
        lines.append(f"  the output layer is on a worker, so the logits ({p.model.n_vocab * 4 / 1e3:.0f} kB) "
                     "cross the network for every token")
    if any(il < p.n_cpu_moe for i in remote(p) for il in p.layers_of(i)):
        lines.append("  experts of workers' layers stay in this machine's RAM (--n-cpu-moe): each such layer "
                     "sends the hidden state here and back")
    return "\n".join(lines)


def to_json(p: Plan, gbit: float = DEFAULT_LINK_GBIT) -> dict:
    return {"hosts": [{"host": h.host, "devices": list(h.devices), "layers": list(h.layers), "weights": h.weights,
                       "kv": h.kv, "compute": h.compute, "network_bytes_per_token": h.token_bytes} for h in hosts(p)],
            "network_bytes_per_token": sum(token_traffic(p).values()),
            "network_seconds_per_token": {f"{g:g}gbit": network_seconds(p, 0, g) for g in sorted({gbit, 1.0, 10.0})}}
