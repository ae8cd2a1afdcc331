"""RWKV-4 in ONNX: the (aa, bb, pp) recurrence as a Scan body. Layer state: wkv [B, 3, A] (aa, bb, pp)."""

from __future__ import annotations

from ...arch.v4 import VERSIONS as VERSIONS
from ...arch.v4 import prepare_layer as prepare_layer
from .emit import Emitter


def _step(E: Emitter, w: str, u: str):
    def step(g, states, slices):
        aa, bb, pp = states
        k, v = slices
        ww = g.op("Add", u, k)
        p = g.op("Max", pp, ww)
        e1, e2 = g.op("Exp", g.op("Sub", pp, p)), g.op("Exp", g.op("Sub", ww, p))
        out = g.op("Div", g.op("Add", g.op("Mul", e1, aa), g.op("Mul", e2, v)), g.op("Add", g.op("Mul", e1, bb), e2))
        ww = g.op("Add", w, pp)
        p = g.op("Max", ww, k)
        e1, e2 = g.op("Exp", g.op("Sub", ww, p)), g.op("Exp", g.op("Sub", k, p))
        aa = g.op("Add", g.op("Mul", e1, aa), g.op("Mul", e2, v))
        bb = g.op("Add", g.op("Mul", e1, bb), e2)
        return [aa, bb, p], [out]
    return step


def time_mix(E: Emitter, spec, lw: dict, prefix: str, x: str, last: str, wkv: str, ctx: dict):
    g = E.g
    a = prefix + "att."
    sx = E.shifted(x, last)
    kx, vx, rx = (E.lerp(x, sx, a + f"time_mix_{n}", lw[f"att.time_mix_{n}"]) for n in "kvr")
    r = g.op("Sigmoid", E.linear(rx, a + "receptance.weight", lw["att.receptance.weight"]))
    k = E.to_f32(E.linear(kx, a + "key.weight", lw["att.key.weight"]))
    v = E.to_f32(E.linear(vx, a + "value.weight", lw["att.value.weight"]))
    w = E.param(a + "time_decay", lw["att.time_decay"], fp32=True)
    u = E.param(a + "time_first", lw["att.time_first"], fp32=True)
    states = [g.gather(wkv, j, 1) for j in range(3)]
    new, (out,) = g.recurrence(_step(E, w, u), states, [k, v], [E.F32] * 6, 1)
    new_wkv = g.op("Concat", *(g.unsqueeze(s, 1) for s in new), axis=1)
    y = E.linear(g.op("Mul", r, E.to_act(out)), a + "output.weight", lw["att.output.weight"])
    return y, new_wkv


def channel_mix(E: Emitter, spec, lw: dict, prefix: str, x: str, last: str, ctx: dict) -> str:
    sx = E.shifted(x, last)
    f = prefix + "ffn."
    kx, rx = (E.lerp(x, sx, f + f"time_mix_{n}", lw[f"ffn.time_mix_{n}"]) for n in "kr")
    return E.gated_ffn(kx, rx, prefix, lw)
