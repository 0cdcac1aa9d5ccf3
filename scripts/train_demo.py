"""Train the shipped demo MoE: transformers' own `MixtralForCausalLM`, from scratch.

Needs only torch, transformers, safetensors and numpy, so it runs on a bare GPU
machine. Input is the token directory written by ``scripts/build_corpus.py``
(``train.bin``, ``heldout.bin``, ``meta.json``); the tokenizer is attached
afterwards on the machine that built it.

* bf16 weights and activations on the GPU, fp32 master weights in AdamW
  (the grads are copied up, the step runs in fp32, the weights copied back);
* the router's load-balancing loss via ``output_router_logits=True`` and
  ``router_aux_loss_coef``;
* a fixed seed for init and for the batch sampler;
* the last 1% of the training tokens is a validation slice; the best
  validation checkpoint is written to ``OUT/model`` (``save_pretrained``,
  shards of at most 16 MB) each time it improves, so a run cut short still
  leaves a usable model; ``OUT/train_log.json`` has the loss curve.

``--steps 0`` picks the step count from the time budget: it times the first
steps, then fixes the schedule once (and logs it); pass that number back as
``--steps`` to repeat the run with the same schedule.

Usage: ``python scripts/train_demo.py --data build/demo_corpus/tokens --out OUT [--steps 0 --time-budget 380]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

PRESETS = {
    # ~21M parameters, ~42 MB in bf16: the shipped demo
    "demo": dict(
        hidden_size=256, intermediate_size=320, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, seq_len=2048, batch=16,
    ),
    # seconds on a CPU: checks the script end to end
    "smoke": dict(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, seq_len=64, batch=4,
    ),
}  # fmt: skip


def log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(meta: dict, preset: dict, seed: int, aux_coef: float):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=meta["vocab_size"],
        hidden_size=preset["hidden_size"],
        intermediate_size=preset["intermediate_size"],
        num_hidden_layers=preset["num_hidden_layers"],
        num_attention_heads=preset["num_attention_heads"],
        num_key_value_heads=preset["num_key_value_heads"],
        num_local_experts=preset["num_local_experts"],
        num_experts_per_tok=preset["num_experts_per_tok"],
        max_position_embeddings=4096,
        bos_token_id=meta["bos_token_id"],
        eos_token_id=meta["eos_token_id"],
        pad_token_id=meta["pad_token_id"],
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=aux_coef,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg)  # fp32 init on the CPU: deterministic for a seed


class Batches:
    """Random windows of seq_len tokens from one token stream, sampled with a seeded generator."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch: int, seed: int):
        self.tokens, self.seq_len, self.batch = tokens, seq_len, batch
        self.gen = torch.Generator(device=tokens.device).manual_seed(seed)
        self.offsets = torch.arange(seq_len, device=tokens.device)

    def next(self) -> torch.Tensor:  # [B, T]
        high = self.tokens.numel() - self.seq_len
        starts = torch.randint(0, high, (self.batch, 1), generator=self.gen, device=self.tokens.device)
        return self.tokens[starts + self.offsets]


@torch.no_grad()
def mean_loss(model, tokens: torch.Tensor, seq_len: int, batch: int, autocast) -> float:
    """Mean next-token cross-entropy over non-overlapping windows (language-model loss only)."""
    n = (tokens.numel() - 1) // seq_len
    windows = tokens[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    model.eval()
    for i in range(0, n, batch):
        x = windows[i : i + batch]
        with autocast():
            out = model(input_ids=x, labels=x, output_router_logits=False, use_cache=False)
        k = x.numel() - x.shape[0]
        total += out.loss.float().item() * k
        count += k
    model.train()
    return total / max(count, 1)


def per_layer_aux(router_logits: tuple[torch.Tensor, ...], preset: dict) -> torch.Tensor:
    """transformers' load-balancing loss, applied to each layer's router logits separately, averaged."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    e, k = preset["num_local_experts"], preset["num_experts_per_tok"]
    return torch.stack([load_balancing_loss_func((g,), e, k) for g in router_logits]).mean()


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def save(model, out: Path) -> None:
    model.config.output_router_logits = False
    model.save_pretrained(out, max_shard_size="16MB")
    model.config.output_router_logits = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("build/demo_corpus/tokens"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--steps", type=int, default=0, help="0: fit the time budget")
    ap.add_argument("--time-budget", type=float, default=380.0, help="seconds of training when --steps 0")
    ap.add_argument("--max-epochs", type=float, default=16.0, help="cap on passes over the training tokens")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument(
        "--aux-per-layer",
        action="store_true",
        help="balance every layer on its own (transformers' loss pools all layers, which lets single layers collapse)",
    )
    ap.add_argument("--evals", type=int, default=12, help="validation checks over the run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    t0 = time.perf_counter()
    preset = PRESETS[args.preset]
    dev = torch.device(args.device)
    meta = json.loads((args.data / "meta.json").read_text())
    train_np = np.fromfile(args.data / "train.bin", dtype=np.uint16).astype(np.int64)
    heldout_np = np.fromfile(args.data / "heldout.bin", dtype=np.uint16).astype(np.int64)
    n_val = max(preset["seq_len"] * 4, train_np.size // 100)
    train = torch.from_numpy(train_np[:-n_val]).to(dev)
    val = torch.from_numpy(train_np[-n_val:]).to(dev)
    heldout = torch.from_numpy(heldout_np).to(dev)
    if args.preset == "smoke":
        val, heldout = val[: preset["seq_len"] * 8], heldout[: preset["seq_len"] * 8]

    model = build_model(meta, preset, args.seed, args.aux_coef)
    n_params = sum(p.numel() for p in model.parameters())
    master = [p.detach().clone().to(dev).requires_grad_(True) for p in model.parameters()]  # fp32
    model = model.to(dev, dtype=torch.bfloat16).train()
    params = list(model.parameters())
    decay = [m for m in master if m.dim() >= 2]
    no_decay = [m for m in master if m.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda",
    )  # fmt: skip
    tokens_per_step = preset["seq_len"] * preset["batch"]
    epoch_steps = int(args.max_epochs * train.numel() / tokens_per_step)
    experts_impl = (
        model.config._experts_implementation_internal
        if hasattr(model.config, "_experts_implementation_internal")
        else None
    )
    log(f"{n_params / 1e6:.2f}M params, experts={experts_impl}, {train.numel()} train tokens, device {dev}")

    def autocast():  # weights are already bf16; autocast only keeps the odd fp32 op in bf16 on the GPU
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    batches = Batches(train, preset["seq_len"], preset["batch"], args.seed)
    total = args.steps or epoch_steps
    eval_every = max(1, total // args.evals)
    history: list[dict] = []
    evals: list[dict] = []
    best = (float("inf"), -1)
    probe = (10, 40)  # steps timed to fix the schedule when --steps 0
    t_train = time.perf_counter()
    t_probe = None
    step = 0
    while step < total:
        if not args.steps and step == probe[0]:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_probe = time.perf_counter()
        if not args.steps and step == probe[1]:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - t_probe) / (probe[1] - probe[0])
            left = args.time_budget - (time.perf_counter() - t_train)
            total = max(step + 1, min(epoch_steps, step + int(0.9 * left / per_step)))  # 10% for checks and saves
            eval_every = max(1, total // args.evals)
            log(f"{per_step * 1000:.1f} ms/step, {tokens_per_step / per_step:,.0f} tok/s -> {total} steps")
        lr = lr_at(step, total, args.lr, args.warmup, 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batches.next()
        with autocast():
            out = model(input_ids=x, labels=x, use_cache=False)
            loss = out.loss
            if args.aux_per_layer:  # lm loss + coef * mean over layers of each layer's own balance loss
                loss = loss - args.aux_coef * out.aux_loss + args.aux_coef * per_layer_aux(out.router_logits, preset)
        loss.backward()
        for m, p in zip(master, params, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
        gnorm = torch.nn.utils.clip_grad_norm_(master, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(params, master)
        step += 1
        # a hard stop if the timing probe was too optimistic: end the run here (final check and save)
        if not args.steps and time.perf_counter() - t_train > args.time_budget:
            log(f"time budget spent at step {step} of {total}")
            total = step
        if step % 10 == 0 or step == total:
            aux = float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0
            lm = float(out.loss.detach()) - args.aux_coef * aux
            history.append({"step": step, "loss": round(lm, 4), "aux_loss": round(aux, 4), "lr": lr,
                            "grad_norm": round(float(gnorm), 3), "elapsed_s": round(time.perf_counter() - t_train, 1)})  # fmt: skip
        if step % eval_every == 0 or step == total:
            v = mean_loss(model, val, preset["seq_len"], preset["batch"], autocast)
            evals.append({"step": step, "val_loss": round(v, 4), "elapsed_s": round(time.perf_counter() - t_train, 1)})
            log(f"step {step}/{total} loss {float(out.loss.detach()):.3f} val {v:.3f} lr {lr:.2e}")
            if v < best[0]:
                best = (v, step)
                save(model, args.out / "model")
            _write_log(args, preset, n_params, meta, experts_impl, total, tokens_per_step, history, evals, best, t0)

    from transformers import AutoModelForCausalLM

    best_model = AutoModelForCausalLM.from_pretrained(args.out / "model", dtype=torch.bfloat16).to(dev)
    held = mean_loss(best_model, heldout, preset["seq_len"], preset["batch"], autocast)
    log(f"best step {best[1]} val {best[0]:.3f}; held-out loss {held:.3f} (ppl {math.exp(held):.2f})")
    _write_log(args, preset, n_params, meta, experts_impl, total, tokens_per_step, history, evals, best, t0, held)


def _write_log(args, preset, n_params, meta, experts_impl, total, tps, history, evals, best, t0, held=None) -> None:
    doc = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "preset": preset,
        "params": n_params,
        "vocab_size": meta["vocab_size"],
        "experts_implementation": experts_impl,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "steps": total,
        "tokens_per_step": tps,
        "best_step": best[1],
        "best_val_loss": best[0],
        "heldout_loss_gpu": held,
        "wall_s": round(time.perf_counter() - t0, 1),
        "history": history,
        "evals": evals,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_log.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
