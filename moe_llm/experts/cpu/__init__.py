"""A CPU kernel for experts in the compact quantized format, read in place from host RAM.

One expert's MLP, y = down(silu(gate x) * (up x)), runs straight from the expert's uint8
host buffer (`ExpertStore.buffer`): activations are quantized to int8 per block of 32 columns
and multiplied with the 2/3/4-bit codes by integer dot products (AVX-512 VNNI, AVX-VNNI or
AVX2; a portable C loop elsewhere, and for shapes whose bit planes are not 32-column aligned).
Rows are split over OpenMP threads; every row is summed in a fixed order, so outputs are
bit-identical for any thread count. `moe_cpu.c` is compiled on first use with the system C
compiler (`build`); if that fails, `CpuKernelUnavailable` says why in one line and callers fall
back to torch (`moe_llm.kernels.expert_mlp`).

Accuracy: int8 activations add about 0.5% (of the output norm) per projection against fp32
dequantize-then-matmul, about 1-1.5% for the whole MLP (the int8 h included).

Threads: default `default_threads()` (physical cores in the affinity mask). Rows are handed
out dynamically, but each call ends with a join: a worker whose core another thread holds
delays the call until it is scheduled (4-8 ms steps on a loaded 2-core box). Called beside a
busy main thread, pass one thread fewer than the free cores.

C API (`moe_cpu.c`; link the built library or call through ctypes; all pointers host memory;
every function returns 0 or a negative code, text from `moe_cpu_strerror`):

    typedef struct {
      int32_t bits, hidden, intermediate;  // bits 2, 3 or 4; H; I
      int32_t gs_gate_up, gs_down, reserved;  // group sizes along H (gate_up) and I (down)
      int64_t off[8];  // byte offsets in the expert buffer of gate_up_proj.{q, scale_q,
                       // zero_q, meta} then down_proj.{q, scale_q, zero_q, meta}
    } moe_cpu_expert_layout;

    int moe_cpu_expert_mlp(const uint8_t *base, const moe_cpu_expert_layout *layout,
                           const float *x /* [ntok][H] */, int ntok,
                           float *y /* [ntok][H] */, int threads);
    int moe_cpu_experts_mlp(const uint8_t *const *bases /* [nexp] */, const float *weights,
                            int nexp, const moe_cpu_expert_layout *layout,
                            const float *x /* [H], one token */,
                            float *out /* [nexp][H], row e = weights[e] * expert_e(x) */,
                            int threads);
    int moe_cpu_qlinear(const uint8_t *q, const uint8_t *scale_q, const uint8_t *zero_q,
                        const float *meta, int bits, int rows, int cols, int group_size,
                        const float *x /* [ntok][cols] */, int ntok,
                        float *y /* [ntok][rows] */, int threads);
    double moe_cpu_read_bandwidth(size_t nbytes, int threads, int reps);  // GB/s, < 0 on ENOMEM
    const char *moe_cpu_isa(void);   // "avx512-vnni", "avx-vnni", "avx2" or "scalar"
    int moe_cpu_openmp(void);        // 1 if built with OpenMP
    int moe_cpu_abi_version(void);   // 1
    const char *moe_cpu_strerror(int code);

Only SiLU gating is built in (Mixtral, Qwen-MoE, OLMoE). x must be row-major float32; a NaN
or inf in a token makes that token's whole output NaN. The functions allocate their own
scratch (malloc, freed before return), hold no global state and are reentrant: two threads
may call them at once (each call forks its own OpenMP team, whose idle threads spin briefly
per libgomp's OMP_WAIT_POLICY / GOMP_SPINCOUNT). The library path comes from
`build.library_path()`.
"""

from .bandwidth import measure_read_bandwidth
from .build import CpuKernelUnavailable, library_path
from .kernel import default_threads, expert_mlp, experts_mlp, isa, layout_struct, qlinear

__all__ = [
    "CpuKernelUnavailable",
    "default_threads",
    "expert_mlp",
    "experts_mlp",
    "isa",
    "layout_struct",
    "library_path",
    "measure_read_bandwidth",
    "qlinear",
]
