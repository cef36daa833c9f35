"""Segmentation cost side by side in one run: training step and prediction time of every
segmentation method on DeepLabV3+ at CamVid's size, as ratios to a loop over 4 networks.

    python benchmarks/seg_speed.py [--width 16] [--batch 8] [--crop 128 160] [--steps 6]

Training step = forward of all members on a batch of random crops (each member sees the whole
batch), pixel cross-entropy (+ KL / N, + LP-BNN's VAE terms), backward, Adam update. Prediction =
``predict()`` of full 180x240 images with every member and sample (placement-aware inference on:
a decoder-only plan runs the backbone and ASPP once per image). "loop of 4" is the deep ensemble
(four separate networks run one after the other). Methods are interleaved round-robin and the
median over repeats is reported; the machine's other load shifts every method alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bnnkit.data import get_spec
from bnnkit.methods import ModelSpec, build_method
from bnnkit.train.lit import cross_entropy

DECODER_PLAN = {"layers": {"decoder.*": "batch_ensemble", "classifier": "batch_ensemble"},
                "members": 4}  # fmt: skip

HEAD_PLAN = {"layers": {"classifier": "batch_ensemble"}, "members": 4}

#: label -> (method, options); every ensemble has 4 members
METHODS = {
    "deterministic": ("deterministic", {}),
    "deep_ensemble (loop of 4)": ("deep_ensemble", {"members": 4, "data_order": "shared"}),
    "batch_ensemble": ("batch_ensemble", {"members": 4}),
    "rank1 (1 sample)": ("rank1", {"members": 4, "samples": 1}),
    "lpbnn (1 sample)": ("lpbnn", {"members": 4, "samples": 1}),
    "lpbnn latent 8 (1 sample)": ("lpbnn", {"members": 4, "samples": 1, "latent": 8}),
    "mc_dropout (8, whole net)": ("mc_dropout", {"p": 0.1, "samples": 8, "prefix_once": False}),
    "decoder-be (plan)": ("placement", {"plan": DECODER_PLAN}),
    "head-be (plan)": ("placement", {"plan": HEAD_PLAN}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, nargs=2, default=[128, 160])
    ap.add_argument("--images", type=int, default=4, help="full-size images per prediction")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    ds = get_spec("camvid")
    spec = ModelSpec("deeplabv3plus", ds.input_shape, 10, ds.mean, ds.std,
                     {"width": a.width}, task="segmentation")  # fmt: skip
    torch.manual_seed(0)
    models = {k: build_method(m, spec, o) for k, (m, o) in METHODS.items()}
    opts = {k: torch.optim.Adam(models[k].parameters(), 1e-3) for k in models}
    x = torch.rand(a.batch, 3, *a.crop)
    y = torch.randint(0, 10, (a.batch, *a.crop))
    xt = torch.rand(a.images, 3, *ds.input_shape[1:])

    def train_step(k):
        model, opt = models[k], opts[k]
        model.train()
        out = model(x)  # [S, B, C, H, W]
        loss = cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0], 1, 1))
        loss = loss + model.kl() / 367 + model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def predict(k):
        models[k].predict(xt)

    results = {}
    for what, fn in (("train", train_step), ("predict", predict)):
        for k in models:  # warm-up (and the placement split's first-call checks)
            fn(k)
        times = {k: [] for k in models}
        for _ in range(a.steps):
            for k in models:
                t0 = time.perf_counter()
                fn(k)
                times[k].append(time.perf_counter() - t0)
        results[what] = {k: statistics.median(v) for k, v in times.items()}
    base_t, base_p = results["train"]["deep_ensemble (loop of 4)"], results["predict"][
        "deep_ensemble (loop of 4)"]  # fmt: skip
    one = sum(p.numel() for p in models["deterministic"].parameters())
    print(f"DeepLabV3+ width {a.width}; train: batch {a.batch} crops {a.crop[0]}x{a.crop[1]}; "
          f"predict: {a.images} images {ds.input_shape[1]}x{ds.input_shape[2]}; "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    print(
        "| Method | train step s | / loop of 4 | predict ms/image | / loop of 4 | params | "
        "extra params vs one net |"
    )
    print("|---|---|---|---|---|---|---|")
    for k in models:
        t, p = results["train"][k], results["predict"][k]
        n = sum(q.numel() for q in models[k].parameters())
        print(f"| {k} | {t:.2f} | {t / base_t:.2f} | {1000 * p / a.images:.0f} | "
              f"{p / base_p:.2f} | {n:,} | {100 * (n - one) / one:+.1f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
