"""The naive offloading baseline: transformers + accelerate ``device_map="auto"``.

This is what users try first: the bf16 model dispatched by accelerate under the
same GPU budget; layers that do not fit stay in (pageable) host RAM and are
copied to the GPU for every forward pass. The full 32-layer bf16 Mixtral (93 GB)
does not fit the benchmark machine's RAM next to everything else, so a
reduced-depth model of full width is measured and its time per token is scaled
by the number of offloaded layers. Its storage is allocated with ``to_empty`` and the big
matrices filled with a constant: for speed the values do not matter, random
initialisation of full-width layers on the CPU takes minutes, and untouched
pages would all alias the kernel's zero page, which copies faster than real RAM.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import logging
import time

import torch

from .synthetic import Geometry

log = logging.getLogger(__name__)


def _offloaded_layers(model) -> list[int]:
    """Decoder layers whose weights live off the GPU between forwards (accelerate leaves
    their parameters on the meta device, or on the CPU, and copies them in per call)."""
    return [
        i
        for i, layer in enumerate(model.model.layers)
        if any(p.device.type in ("meta", "cpu") for p in layer.parameters())
    ]


def accelerate_baseline(
    geometry: Geometry,
    device: torch.device,
    gpu_budget: int,
    layers: int = 6,
    prompt_tokens: int = 16,
    new_tokens: int = 3,
    host_budget: int = 100 << 30,
) -> dict:
    """Decode time per token of the accelerate-dispatched bf16 model, scaled to `geometry.layers`."""
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import AutoModelForCausalLM, DynamicCache

    small = dataclasses.replace(geometry, layers=layers)
    cfg = small.hf_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device="cpu")  # uninitialised storage: no random init of full-width layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif ".experts." not in name and "proj" not in name:
                p.normal_(0.0, 0.02)  # small tensors get sane values so activations stay finite
            else:
                # a constant fill is memset-cheap; it makes the pages real, so the per-token
                # pageable copies read DRAM, not the kernel's one shared zero page
                p.fill_(1e-3)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    model.eval()
    index = device.index if device.index is not None else torch.cuda.current_device()
    device_map = infer_auto_device_map(
        model,
        max_memory={index: gpu_budget, "cpu": host_budget},
        no_split_module_classes=list(model._no_split_modules or []),
        dtype=torch.bfloat16,
    )
    model = dispatch_model(model, device_map=device_map)
    offloaded = len(_offloaded_layers(model))
    on_gpu = layers - offloaded
    if not offloaded:
        raise ValueError(f"all {layers} bf16 layers fit in the budget: nothing to measure; use more layers")

    kv_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_tokens), generator=g).to(device)
    kv = DynamicCache(config=cfg)
    times = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kv_arg: kv})
        torch.cuda.synchronize(device)
        prefill_s = time.perf_counter() - t0
        for _ in range(new_tokens):
            nxt = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            out = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{kv_arg: kv})
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    measured = sorted(times)[len(times) // 2]  # median decode step
    offloaded_full = geometry.layers - on_gpu
    per_layer = measured / offloaded if offloaded else float("nan")
    projected = measured * offloaded_full / offloaded if offloaded else measured
    del model, out, kv
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "method": "transformers + accelerate dispatch_model(infer_auto_device_map(max_memory)), bf16",
        "measured_layers": layers,
        "layers_on_gpu": on_gpu,
        "layers_offloaded": offloaded,
        "gpu_budget_bytes": gpu_budget,
        "device_map": {k: str(v) for k, v in device_map.items()},
        "prefill_s": prefill_s,
        "decode_step_s": times,
        "measured_s_per_token": measured,
        "s_per_offloaded_layer": per_layer,
        "projected_layers_offloaded": offloaded_full,
        "projected_s_per_token": projected,
        "projected_tok_s": 1.0 / projected,
        "scaling": (
            f"reduced depth ({layers} of {geometry.layers} layers, full width); time per token scaled by "
            f"offloaded layers ({offloaded} measured -> {offloaded_full}); the GPU-resident layers' own "
            "time (a few ms) is scaled with the offloaded ones, a slight overestimate of the baseline's time"
        ),
    }
