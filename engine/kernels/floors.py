"""Prints the byte and FLOP floors of whet's CUDA kernels at the issue's two shapes (NOTES.md's tables):
python3 engine/kernels/floors.py. The shapes are ../shared/tools/torch_train_bench.py's presets."""
PEAK, BW = 989e12, 4.8e12
B2, F4 = 2, 4
def fmt_b(x): return f"{x/1e9:.2f} GB" if x >= 1e8 else f"{x/1e6:.1f} MB"
def fmt_f(x): return f"{x/1e12:.2f} TFLOP" if x >= 1e11 else f"{x/1e9:.1f} GFLOP"
def floor(f, b): return max(f / PEAK, b / BW) * 1e6
shapes = {
 "qwen3-0.6b (batch 8 x 2048)": dict(b=8, s=2048, H=1024, nh=16, nkv=8, hd=128, I=3072, V=151936, L=28, moe=None, params=None),
 "qwen3-30b-a3b-4l (batch 4 x 2048)": dict(b=4, s=2048, H=2048, nh=32, nkv=4, hd=128, I=768, V=151936, L=4, moe=(128, 8)),
}
for name, c in shapes.items():
    b, s, H, nh, nkv, hd, I, V, L = (c[k] for k in "b s H nh nkv hd I V L".split())
    T = b * s
    rows = []
    att_f = 2 * b * nh * s * s * hd  # causal: half of 4 b nh s^2 hd
    qkv = (T * nh * hd + 2 * T * nkv * hd) * B2
    o = T * nh * hd * B2
    rows.append(("attention fwd", att_f, qkv + o + T * nh * F4))
    rows.append(("attention bwd", 2.5 * att_f, qkv + 2 * o + 2 * T * nh * F4 + qkv))
    x = T * H * B2
    rows.append(("add_rms_norm fwd", 5 * T * H, 4 * x))
    rows.append(("add_rms_norm bwd", 10 * T * H, 5 * x + 2 * x))
    qk = T * hd * (nh + nkv)
    rows.append(("rms_norm q/k fwd", 4 * qk, 2 * qk * B2))
    rows.append(("rms_norm q/k bwd", 8 * qk, 3 * qk * B2 + 2 * qk * B2))
    rows.append(("rope q+k fwd (or bwd)", 3 * qk, 2 * qk * B2))
    if c["moe"]:
        E, k = c["moe"]
        act = T * k * I
    else:
        act = T * I
    rows.append(("swiglu fwd", 5 * act, 3 * act * B2))
    rows.append(("swiglu bwd", 10 * act, 5 * act * B2))
    if c["moe"]:
        E, k = c["moe"]
        w = E * 3 * I * H * B2
        mm = 2 * T * k * H * I * 3
        a = (T * k * H * 2 + T * k * I * 3) * B2
        rows.append(("grouped expert matmuls fwd (gate+up+down)", mm, w + a))
        rows.append(("grouped expert matmuls bwd (dx+dW)", 2 * mm, 2 * w + 2 * a))
    rows.append(("embedding bwd (atomics, f32 table grad)", T * H, x + V * H * F4 * 3 + T * H * F4))
    head_f = 6 * T * H * V
    logits = T * V * B2
    chunks = -(-T // (2**28 // V))
    rows.append(("head loss fwd+bwd (chunked)", head_f, 6 * logits + H * V * B2 * 3 * chunks + V * H * F4 * 3 * chunks + 3 * x))
    rows.append(("", 0, 0))
    # parameters
    att_p = H * (nh * hd) * 2 + H * (nkv * hd) * 2 + 2 * hd
    if c["moe"]:
        E, k = c["moe"]
        mlp_p = E * 3 * H * I + H * E
    else:
        mlp_p = 3 * H * I
    params = L * (att_p + mlp_p + 2 * H) + V * H + H + (0 if not c["moe"] else V * H)
    rows[-1] = ("AdamW, multi-tensor (all f32 params)", 12 * params, 28 * params)
    rows.append(("grad norm, multi-tensor", 2 * params, 4 * params))
    print(f"\n### {name}: {T} tokens, {params/1e6:.0f} M parameters\n")
    print("| kernel (one call) | FLOPs | bytes | floor on H200 | calls per step | measured |")
    print("|---|---|---|---|---|---|")
    for r, f, by in rows:
        per = L if any(r.startswith(w) for w in ["attention", "add_rms", "rms_norm", "rope", "swiglu", "grouped"]) else 1
        if "rms_norm q/k" in r: per = L
        if "add_rms_norm" in r: per = L
        print(f"| {r} | {fmt_f(f)} | {fmt_b(by)} | {floor(f, by):.0f} µs | {per} | not yet (no device lent) |")
