/* CPU kernels for one MoE expert stored in moe-llm's compact quantized format.
 *
 * Weights are read in place from the expert's host buffer (see quant/compact.py and
 * quant/packing.py): packed 2/3/4-bit codes in the strided layout, 8-bit scale and zero per
 * group of `gs` input columns, float32 (scale_min, scale_step, zero_min, zero_step) per run of
 * 128 groups. Activations are quantized to int8 per block of 32 columns (one float scale per
 * block, like llama.cpp's Q8_0), so the inner loop is an integer dot product of codes x int8.
 *
 * Exact arithmetic (the same on the GPU: moe_llm/kernels/triton_gemv.py). A row's output is
 *   y = sum_b  rint(isum_b * (s_g d_b)) - rint((s_g z_g) * xs_b)      (times 2^-32)
 * over its blocks b of 32 columns (group g of block b), where isum_b is the exact integer dot
 * product of codes and int8 activations, d_b the block's scale and xs_b = sum(xq_b) d_b, both
 * kept times 2^32 (exact: a power of two). Every product is one float32 multiply (no fused
 * multiply-add anywhere: built with -ffp-contract=off), rounded to an integer, and the integers
 * are summed in float64, exactly (they stay far below 2^53). A sum of exact integers does not
 * depend on its order, so the result is the same bits for any thread count, vector width or
 * split of the blocks between two machines: the GPU and the CPU compute one expert alike, and
 * an expert shared between them (moe_llm/experts/split.py) adds up to the same bits. SiLU uses
 * `exp_det`, one fixed sequence of float32 operations that the GPU kernel repeats.
 *
 * Work items (16-32 rows) are handed out dynamically, so a core taken by another process delays
 * only the items it holds. Built with -fopenmp when available; without it everything runs
 * serially. The C API is pointer-based (no Python objects); see moe_llm/experts/cpu/__init__.py.
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MOE_SIMD 1
#else
#define MOE_SIMD 0
#endif

/* exact_sum_row expands a row's group scales inside the sum (one token, AVX-512) */
#if MOE_SIMD && defined(__AVX512F__)
#define INLINE_SCALES 1
#else
#define INLINE_SCALES 0
#endif

#define MOE_CPU_ABI 2
#define QB 32          /* activation columns per int8 block */
#define META_GROUP 128 /* groups per float32 meta row */
#define GRID 0x1p32f   /* block scales are kept times 2^32: products rounded to integers */
#define UNGRID 0x1p-32
/* tokens that share one decode of a row's codes */
#if defined(__AVX512F__)
#define TILE 4
#else
#define TILE 2
#endif
#define GU_CHUNK 32   /* gate/up rows per work item: one int8 block of h */
#define DOWN_CHUNK 16 /* down rows per work item */
/* Software prefetch into L2 (prefetcht2), every line of the code stream 8 KB ahead (about 1 us
   of decode work): the hardware prefetchers ramp up late on rows of 1-6 KB. Prefetching one
   line in eight, 2 KB ahead, left one thread of a Xeon at 5.7 GB/s on a 2-bit expert; every
   line 4-8 KB ahead gives 8.2-8.5 (benchmarks/results/devbox-cpu-kernel-prefetch.log). A 3-bit
   row is read as three interleaved streams, which they follow worse still (half speed from
   DRAM), so unpack3 prefetches the next row in address order, 96 bytes per 32-column step. */
#define PF2 8192
#define PF4 8192
#define SCALE_AHEAD 8 /* rows */
#define PREFETCH(P, D) __builtin_prefetch((const char *)(P) + (D), 0, 1)

enum {
  MOE_CPU_OK = 0,
  MOE_CPU_EBITS = -1,  /* bits not in {2, 3, 4} */
  MOE_CPU_ESHAPE = -2, /* columns not a multiple of 8, or group size does not divide them */
  MOE_CPU_ENOMEM = -3,
  MOE_CPU_EARG = -4, /* null pointer, or a count out of range */
};

typedef struct {
  int32_t bits, hidden, intermediate, gs_gate_up, gs_down, reserved;
  /* byte offsets in the expert buffer: gate_up_proj.{q, scale_q, zero_q, meta},
     down_proj.{q, scale_q, zero_q, meta} */
  int64_t off[8];
} moe_cpu_expert_layout;

typedef struct { /* one quantized matrix [rows, cols] */
  const uint8_t *q, *sq, *zq;
  const float *meta;
  int bits, rows, cols, gs, G, rowbytes, fast;
  int inline_scales; /* exact_sum_row expands the scales itself (one token, AVX-512, aligned meta runs) */
  int skip; /* leading blocks of each 2/4-bit plane whose activations are zero (a share); 3 bits: of
               each 2-bit plane, rows read packed only (`packed3_layout`) */
} qmat;

typedef struct { /* ntok activation rows of `cols`, int8 per QB block */
  int ntok, cols, nblk;
  const int8_t *xq; /* [ntok][cols] */
  const float *d;   /* [ntok][nblk] block scales, times 2^32 */
  const float *xs;  /* [ntok][nblk] sum of the block's xq times its d */
  const int8_t *xt; /* [ntok][cols] xq in runs of 16 blocks transposed (`transpose_act`), or NULL */
} qact;

typedef struct { /* per-thread scratch */
  float *s, *sz;  /* [G] group scale, scale * zero */
  int32_t *isum;  /* [TILE][nblk] exact integer dot product of each block */
  uint8_t *codes; /* [cols] one row's codes, unpacked */
} scratch;

int moe_cpu_abi_version(void) { return MOE_CPU_ABI; }

const char *moe_cpu_isa(void) {
#if MOE_SIMD && defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512-vnni";
#elif MOE_SIMD && defined(__AVXVNNI__)
  return "avx-vnni";
#elif MOE_SIMD
  return "avx2";
#else
  return "scalar";
#endif
}

int moe_cpu_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

const char *moe_cpu_strerror(int code) {
  switch (code) {
    case MOE_CPU_OK: return "ok";
    case MOE_CPU_EBITS: return "bits must be 2, 3 or 4";
    case MOE_CPU_ESHAPE: return "columns must be a multiple of 8 and of the group size";
    case MOE_CPU_ENOMEM: return "out of memory";
    case MOE_CPU_EARG: return "null pointer, or a count out of range";
    default: return "unknown error";
  }
}

static int imin(int a, int b) { return a < b ? a : b; }

static int check_mat(int bits, int rows, int cols, int gs) {
  if (bits != 2 && bits != 3 && bits != 4) return MOE_CPU_EBITS;
  if (rows < 1 || cols < 8 || cols % 8 || gs < 1 || cols % gs) return MOE_CPU_ESHAPE;
  return MOE_CPU_OK;
}

static void make_mat(qmat *m, const uint8_t *q, const uint8_t *sq, const uint8_t *zq, const float *meta,
                     int bits, int rows, int cols, int gs) {
  m->q = q, m->sq = sq, m->zq = zq, m->meta = meta;
  m->bits = bits, m->rows = rows, m->cols = cols, m->gs = gs, m->G = cols / gs;
  m->rowbytes = bits == 3 ? cols / 4 + cols / 8 : cols * bits / 8;
  /* the SIMD path needs every 32-byte load of one bit plane to cover 32 columns of one group */
  int plane = bits == 2 ? cols / 4 : bits == 4 ? cols / 2 : cols / 8;
  m->fast = MOE_SIMD && gs % QB == 0 && plane % 32 == 0;
  m->skip = 0;
  /* sixteen blocks are 16 / (gs / QB) groups; they share one meta run when every row starts on
     a multiple of that many groups (128 is). Not for 3 bits: on the development box a 3-bit
     Mixtral expert ran at 12.7 GB/s on one thread with it against 13.7 without (2 bits: 14.5
     against 13.9) */
  const int bpg = gs / QB, per16 = bpg ? 16 / bpg : 0;
  m->inline_scales = INLINE_SCALES && m->fast && bits != 3 && (bpg == 1 || bpg == 2) && m->G % per16 == 0;
}

/* x[0:n] -> xq = rint(x * (127 / amax)); returns the block scale (amax / 127) * 2^32 and
   writes xs = sum(xq) * scale. A NaN or inf makes the scale NaN (and xq 0), so it reaches
   every output as in a float matmul. */
static float quantize_block(const float *x, int n, int8_t *xq, float *xs) {
  float amax = 0.f;
  int finite = 1;
  for (int j = 0; j < n; j++) {
    const float v = fabsf(x[j]);
    finite &= v <= FLT_MAX;
    amax = v > amax ? v : amax; /* not fmaxf: that is a libm call */
  }
  const float id = finite && amax > 0.f ? 127.f / amax : 0.f;
  int32_t sum = 0;
  for (int j = 0; j < n; j++) {
    xq[j] = (int8_t)nearbyintf(finite ? x[j] * id : 0.f);
    sum += xq[j];
  }
  const float d = finite ? amax / 127.f * GRID : NAN;
  *xs = (float)sum * d;
  return d;
}

/* int8 per block of QB: codes, scales and block sums. */
static void quantize_act(const float *x, int cols, int8_t *xq, float *d, float *xs) {
  for (int j0 = 0; j0 < cols; j0 += QB) d[j0 / QB] = quantize_block(x + j0, imin(QB, cols - j0), xq + j0, xs + j0 / QB);
}

/* Blocks per transposed run: one 32-bit lane per block of a 512-bit (16) or 256-bit (8) vector. */
#if MOE_SIMD && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define RUN 16
#else
#define RUN 8
#endif

/* xq [cols] -> xt: each run of RUN blocks (32 RUN bytes) as 8 vectors of RUN dwords, vector i
   lane j holding dword i of block j (what `block_dots` multiplies the transposed codes with); a
   tail of fewer than RUN blocks is not written (that path reads it from xq). */
static void transpose_act(const int8_t *xq, int cols, int8_t *xt) {
  for (int q = 0; q + 32 * RUN <= cols; q += 32 * RUN)
    for (int i = 0; i < 8; i++)
      for (int j = 0; j < RUN; j++) memcpy(xt + q + 4 * RUN * i + 4 * j, xq + q + 32 * j + 4 * i, 4);
}

/* e^x in a fixed sequence of float32 operations (no libm: the GPU repeats them, see
   kernels/triton_gemv.py `_exp_det`): 2^n e^r with n = rint(x log2 e), r = x - n ln 2 in two
   parts, and e^r by Horner's rule. Inputs are clamped to [-87, 88], where 2^n is a normal float. */
static float exp_det(float x) {
  if (x != x) return x;
  x = x < -87.f ? -87.f : x;
  x = x > 88.f ? 88.f : x;
  const float n = nearbyintf(x * 0x1.715476p+0f);
  float r = x - n * 0x1.62e4p-1f;
  r = r - n * 0x1.7f7d1cp-20f;
  float p = 0x1.6c16c2p-10f;
  p = p * r + 0x1.111112p-7f;
  p = p * r + 0x1.555556p-5f;
  p = p * r + 0x1.555556p-3f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float s;
  memcpy(&s, &bits, sizeof s);
  return p * s;
}

static inline float silu(float v) { return v / (1.f + exp_det(-v)); }

/* Float scale s and scale * zero of each group of row r (plain multiplies and adds). */
static void row_scales(const qmat *m, int r, float *restrict s, float *restrict sz) {
  const size_t f = (size_t)r * m->G;
  const uint8_t *sq = m->sq + f, *zq = m->zq + f;
  for (int g = 0; g < m->G;) {
    const size_t mi = (f + g) / META_GROUP;
    const int end = imin(m->G, (int)((mi + 1) * META_GROUP - f));
    const float *mm = m->meta + 4 * mi;
    const float s0 = mm[0], s1 = mm[1], z0 = mm[2], z1 = mm[3];
    for (; g < end; g++) { /* vectorised by the compiler; contraction is off */
      const float sg = (float)sq[g] * s1 + s0;
      s[g] = sg;
      sz[g] = sg * ((float)zq[g] * z1 + z0);
    }
  }
}

#if MOE_SIMD && defined(__AVX512F__)
/* Sixteen blocks' terms rint(isum (s d)) - rint((s z) xs), added exactly in float64 to a0 (blocks
   0-7) and a1 (8-15). */
static inline __attribute__((always_inline)) void sum16(const int32_t *isum, __m512 sg, __m512 szg, const float *d,
                                                        const float *xs, __m512d *a0, __m512d *a1) {
  const int rm = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 fi = _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)isum));
  const __m512 p = _mm512_roundscale_ps(_mm512_mul_ps(fi, _mm512_mul_ps(sg, _mm512_loadu_ps(d))), rm);
  const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(szg, _mm512_loadu_ps(xs)), rm);
  const __m256 phi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1));
  const __m256 qhi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(q), 1));
  *a0 = _mm512_add_pd(*a0, _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(p)),
                                         _mm512_cvtps_pd(_mm512_castps512_ps256(q))));
  *a1 = _mm512_add_pd(*a1, _mm512_sub_pd(_mm512_cvtps_pd(phi), _mm512_cvtps_pd(qhi)));
}
#endif

/* sum_b rint(isum_b * (s_g d_b)) - rint((s z)_g * xs_b), exactly (see the top of this file), for
   one row (group scales s, s * z) and one token (block scales d, block sums xs); g = b / bpg. */
static double exact_sum(const int32_t *isum, const float *s, const float *sz, const float *d, const float *xs,
                        int nblk, int bpg) {
  int b = 0;
  double acc = 0.0;
#if MOE_SIMD && defined(__AVX512F__)
  if (bpg <= 2) { /* sixteen blocks at a time */
    const __m512i dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    for (; b + 16 <= nblk; b += 16) {
      __m512 sg, szg;
      if (bpg == 1) {
        sg = _mm512_loadu_ps(s + b), szg = _mm512_loadu_ps(sz + b);
      } else { /* each group's values for its two blocks */
        sg = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(s + b / 2)));
        szg = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(sz + b / 2)));
      }
      sum16(isum + b, sg, szg, d + b, xs + b, &a0, &a1);
    }
    acc = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
  }
#endif
#if MOE_SIMD
  if (bpg <= 2 && b + 8 <= nblk) {
    const int rm = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    for (; b + 8 <= nblk; b += 8) {
      __m256 sg, szg;
      if (bpg == 1) {
        sg = _mm256_loadu_ps(s + b), szg = _mm256_loadu_ps(sz + b);
      } else { /* each group's values for its two blocks */
        sg = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + b / 2)), dup);
        szg = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sz + b / 2)), dup);
      }
      const __m256 fi = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(isum + b)));
      const __m256 p = _mm256_round_ps(_mm256_mul_ps(fi, _mm256_mul_ps(sg, _mm256_loadu_ps(d + b))), rm);
      const __m256 q = _mm256_round_ps(_mm256_mul_ps(szg, _mm256_loadu_ps(xs + b)), rm);
      a0 = _mm256_add_pd(a0, _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(p)),
                                           _mm256_cvtps_pd(_mm256_castps256_ps128(q))));
      a1 = _mm256_add_pd(a1, _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(p, 1)),
                                           _mm256_cvtps_pd(_mm256_extractf128_ps(q, 1))));
    }
    double part[4];
    _mm256_storeu_pd(part, _mm256_add_pd(a0, a1));
    acc += (part[0] + part[1]) + (part[2] + part[3]);
  }
#endif
  for (; b < nblk; b++) {
    const int g = b / bpg;
    acc += (double)nearbyintf((float)isum[b] * (s[g] * d[b])) - (double)nearbyintf(sz[g] * xs[b]);
  }
  return acc;
}

#if INLINE_SCALES
/* exact_sum for row r of m with the group scales expanded here, sixteen blocks at a time, from the
   scale and zero bytes and the meta run: the same operations as `row_scales` (a multiply and an
   add, each rounded; then s * (z1 zq + z0)), so the same bits, without writing the scales out and
   reading them back. Needs m->inline_scales (gs / QB in {1, 2}, whole meta runs per 16 blocks). */
static double exact_sum_row(const int32_t *isum, const qmat *m, int r, const float *d, const float *xs, int nblk) {
  const int bpg = m->gs / QB;
  const size_t f = (size_t)r * m->G;
  const uint8_t *sq = m->sq + f, *zq = m->zq + f;
  const __m512i dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
  int b = 0;
  for (; b + 16 <= nblk; b += 16) {
    const int g = b / bpg;
    const float *mm = m->meta + 4 * ((f + g) / META_GROUP);
    __m512 sg, szg;
    if (bpg == 1) {
      const __m512 sf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sq + g))));
      const __m512 zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zq + g))));
      sg = _mm512_add_ps(_mm512_mul_ps(sf, _mm512_set1_ps(mm[1])), _mm512_set1_ps(mm[0]));
      szg = _mm512_mul_ps(sg, _mm512_add_ps(_mm512_mul_ps(zf, _mm512_set1_ps(mm[3])), _mm512_set1_ps(mm[2])));
    } else { /* eight groups, each value for its two blocks */
      const __m256 sf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sq + g))));
      const __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zq + g))));
      const __m256 s8 = _mm256_add_ps(_mm256_mul_ps(sf, _mm256_set1_ps(mm[1])), _mm256_set1_ps(mm[0]));
      const __m256 sz8 = _mm256_mul_ps(s8, _mm256_add_ps(_mm256_mul_ps(zf, _mm256_set1_ps(mm[3])), _mm256_set1_ps(mm[2])));
      sg = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(s8));
      szg = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(sz8));
    }
    sum16(isum + b, sg, szg, d + b, xs + b, &a0, &a1);
  }
  double acc = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
  for (; b < nblk; b++) { /* a tail of fewer than 16 blocks: row_scales' arithmetic, one group */
    const int g = b / bpg;
    const float *mm = m->meta + 4 * ((f + g) / META_GROUP);
    const float sg = (float)sq[g] * mm[1] + mm[0];
    const float szg = sg * ((float)zq[g] * mm[3] + mm[2]);
    acc += (double)nearbyintf((float)isum[b] * (sg * d[b])) - (double)nearbyintf(szg * xs[b]);
  }
  return acc;
}
#endif

/* Whether a 3-bit row is read packed (its 2-bit plane of whole 16-block runs through
   block_dots_t with x transposed, its 1-bit plane likewise or through `high_bits`) rather than
   unpacked to a byte per code first. */
static inline int packed3_layout(const qmat *m) { return MOE_SIMD && m->bits == 3 && m->cols % 2048 == 0; }

static inline int packed3(const qmat *m, const int8_t *xt) { return xt && packed3_layout(m); }

static void unpack_row(const uint8_t *rq, int bits, int cols, uint8_t *codes) {
  if (bits == 3) {
    const int s4 = cols / 4, s8 = cols / 8;
    const uint8_t *hi = rq + s4;
    for (int p = 0; p < 4; p++)
      for (int c = 0; c < s4; c++) codes[p * s4 + c] = (rq[c] >> (2 * p)) & 3;
    for (int p = 0; p < 8; p++)
      for (int c = 0; c < s8; c++) codes[p * s8 + c] |= ((hi[c] >> p) & 1) << 2;
    return;
  }
  const int per = 8 / bits, step = cols / per, mask = (1 << bits) - 1;
  for (int p = 0; p < per; p++)
    for (int c = 0; c < step; c++) codes[p * step + c] = (rq[c] >> (bits * p)) & mask;
}

/* Portable path, any shape: the same terms over segments that lie in one group and one block
   (a whole block when the group size is a multiple of QB, as on the fast path). */
static double generic_row(const qmat *m, const uint8_t *codes, const float *s, const float *sz, const qact *a,
                          int t) {
  const int8_t *xq = a->xq + (size_t)t * a->cols;
  const float *d = a->d + (size_t)t * a->nblk;
  double acc = 0.0;
  for (int j0 = 0, j1; j0 < m->cols; j0 = j1) {
    const int nb = (j0 / QB + 1) * QB, ng = (j0 / m->gs + 1) * m->gs;
    j1 = imin(imin(nb, ng), m->cols);
    int32_t isum = 0, qsum = 0;
    for (int j = j0; j < j1; j++) isum += (int32_t)codes[j] * xq[j], qsum += xq[j];
    const float db = d[j0 / QB], sg = s[j0 / m->gs], xs = (float)qsum * db;
    acc += (double)nearbyintf((float)isum * (sg * db)) - (double)nearbyintf(sz[j0 / m->gs] * xs);
  }
  return acc;
}

#if MOE_SIMD
static inline __m256i dot_u8s8(__m256i u, __m256i v) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, v);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, v);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, v), _mm256_set1_epi16(1));
#endif
}

/* [sum of the 8 lanes of v0, ..., of v7]: a transposing tree of horizontal adds. */
static inline __m256i hsum8x8(const __m256i *v) {
  const __m256i b0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i b1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
}

static inline int32_t hsum1(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

/* The codes of plane `p` of the 32 packed bytes at `at` (2 or 4 bits per code). */
static inline __m256i plane_codes(const uint8_t *at, int bits, int p) {
  const __m256i v = _mm256_loadu_si256((const __m256i *)at);
  if (bits == 2) return _mm256_and_si256(_mm256_srli_epi16(v, 2 * p), _mm256_set1_epi8(3));
  return _mm256_and_si256(_mm256_srli_epi16(v, 4 * p), _mm256_set1_epi8(15));
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define MOE_ZMM 1
/* The codes of plane `p` of the 64 packed bytes at `at` (two blocks; 2 or 4 bits per code),
   left where they lie: code * 2^(bits p), one AND and no shift. The dot products then come out
   times 2^(bits p), exactly (at most 255 * 128 * 32, far inside int32), and one arithmetic shift
   of the block sums (`hsum16x8`) takes the factor out again. */
static inline __m512i plane_bits64(const uint8_t *at, int bits, int p) {
  const __m512i v = _mm512_loadu_si512((const void *)at);
  return _mm512_and_si512(v, _mm512_set1_epi8((char)(((1 << bits) - 1) << (bits * p))));
}

/* z[i] holds blocks 2i (lanes 0-7) and 2i+1 (lanes 8-15): the 16 block sums, in block order. A
   transposing tree: 32-bit then 64-bit unpacks add lanes within 128-bit chunks, a chunk shuffle
   adds the two chunks of each block, a permute puts the blocks in order. */
static inline __m512i hsum16x8(const __m512i *z) {
  __m512i t[4], u[2];
  for (int i = 0; i < 4; i++)
    t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(z[2 * i], z[2 * i + 1]), _mm512_unpackhi_epi32(z[2 * i], z[2 * i + 1]));
  for (int i = 0; i < 2; i++)
    u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]), _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
  const __m512i w = _mm512_add_epi32(_mm512_shuffle_i64x2(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_i64x2(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
  return _mm512_permutexvar_epi32(order, w);
}
#else
#define MOE_ZMM 0
#endif

#if MOE_ZMM
/* The 512 packed bytes of 16 consecutive blocks of a plane (block j at 32 j) transposed: T[i]
   lane j = dword i of block j, as `transpose_act` lays out x, so lane j of a dot product is
   block j. Three rounds of two-source permutes (24 in all): z[k] holds blocks 2k and 2k+1;
   round 1 pairs z[k] with z[k+4] into dwords 0-3 (a) and 4-7 (b) of blocks 2k, 2k+1, 2k+8,
   2k+9, four lanes each; round 2 pairs a[k] with a[k+2] (and b alike) into two dwords of eight
   blocks, two lanes each, in the block orders noted below; round 3 takes one dword of all 16
   blocks from each pair, in block order. tests/test_cpu_kernel.py checks every lane. */
static inline void transpose_codes(const uint8_t *at, __m512i *T) {
  const __m512i s1a = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i s1b = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const __m512i s2a = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
  const __m512i s2b = _mm512_setr_epi32(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  const __m512i s3a = _mm512_setr_epi32(0, 2, 16, 18, 8, 10, 24, 26, 4, 6, 20, 22, 12, 14, 28, 30);
  const __m512i s3b = _mm512_setr_epi32(1, 3, 17, 19, 9, 11, 25, 27, 5, 7, 21, 23, 13, 15, 29, 31);
  __m512i z[8], a[4], b[4], c[8];
  for (int k = 0; k < 8; k++) z[k] = _mm512_loadu_si512((const void *)(at + 64 * k)); /* blocks 2k, 2k+1 */
  for (int k = 0; k < 4; k++) {
    a[k] = _mm512_permutex2var_epi32(z[k], s1a, z[k + 4]); /* blocks 2k, 2k+1, 2k+8, 2k+9: dwords 0-3 */
    b[k] = _mm512_permutex2var_epi32(z[k], s1b, z[k + 4]); /* ... dwords 4-7 */
  }
  for (int k = 0; k < 2; k++) { /* blocks {0,1,8,9,4,5,12,13} (k 0) or {2,3,10,11,6,7,14,15} (k 1) */
    c[k] = _mm512_permutex2var_epi32(a[k], s2a, a[k + 2]);     /* dwords 0, 1 */
    c[2 + k] = _mm512_permutex2var_epi32(a[k], s2b, a[k + 2]); /* dwords 2, 3 */
    c[4 + k] = _mm512_permutex2var_epi32(b[k], s2a, b[k + 2]); /* dwords 4, 5 */
    c[6 + k] = _mm512_permutex2var_epi32(b[k], s2b, b[k + 2]); /* dwords 6, 7 */
  }
  for (int i = 0; i < 4; i++) {
    T[2 * i] = _mm512_permutex2var_epi32(c[2 * i], s3a, c[2 * i + 1]);
    T[2 * i + 1] = _mm512_permutex2var_epi32(c[2 * i], s3b, c[2 * i + 1]);
  }
}

/* Blocks [c0, bpp) of every plane of a row's 1-, 2- or 4-bit codes (c0 and bpp multiples of
   16), 16 at a time: the packed bytes, shared by the PER planes, are transposed once
   (`transpose_codes`); each plane's codes are then one AND away (times 2^(bits p)), and its dot
   products with x laid out alike (`transpose_act`) accumulate block j in lane j: no horizontal
   sums. ADD: add four times the sums to isum (a 3-bit row's high bits) instead of storing them. */
static inline __attribute__((always_inline)) void block_dots_t(const uint8_t *rq, const int8_t *xt, int cols,
                                                               int nblk, int bpp, int c0, int32_t *isum,
                                                               const int NT, const int BITS, const int ADD) {
  const int PER = 8 / BITS;
  for (int c = c0; c + 16 <= bpp; c += 16) {
    for (int l = 0; l < 512; l += 64) PREFETCH(rq + 32 * c + l, BITS == 4 ? PF4 : PF2);
    __m512i T[8];
    transpose_codes(rq + 32 * c, T);
    for (int t = 0; t < NT; t++) {
      __m512i acc[8];
      for (int p = 0; p < PER; p++) acc[p] = _mm512_setzero_si512();
      for (int i = 0; i < 8; i++)
        for (int p = 0; p < PER; p++) {
          const int8_t *xp = xt + (size_t)t * cols + 32 * (p * bpp + c) + 64 * i;
          const __m512i codes = _mm512_and_si512(T[i], _mm512_set1_epi8((char)(((1 << BITS) - 1) << (BITS * p))));
          acc[p] = _mm512_dpbusd_epi32(acc[p], codes, _mm512_loadu_si512((const void *)xp));
        }
      for (int p = 0; p < PER; p++) {
        int32_t *dst = isum + (size_t)t * nblk + p * bpp + c;
        const __m512i v = _mm512_srai_epi32(acc[p], BITS * p);
        _mm512_storeu_si512((void *)dst, ADD ? _mm512_add_epi32(_mm512_loadu_si512((const void *)dst),
                                                                _mm512_slli_epi32(v, 2))
                                             : v);
      }
    }
  }
}
#endif

#if MOE_SIMD && !MOE_ZMM
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define MOE_DPBUSD 1 /* u8 x s8 dot products into int32 lanes, no saturation */
#else
#define MOE_DPBUSD 0 /* maddubs: pairs saturate in int16, so codes must stay small (shifted down) */
#endif

/* The 256 packed bytes of 8 consecutive blocks of a plane (block j at 32 j) transposed: T[i]
   lane j = dword i of block j (an 8 x 8 dword transpose: unpacks of 32 and 64 bits, then 128-bit
   lane swaps), as `transpose_act` lays out x. */
static inline void transpose_codes8(const uint8_t *at, __m256i *T) {
  __m256i r[8], t[8], u[8];
  for (int j = 0; j < 8; j++) r[j] = _mm256_loadu_si256((const __m256i *)(at + 32 * j));
  for (int j = 0; j < 8; j += 2) {
    t[j] = _mm256_unpacklo_epi32(r[j], r[j + 1]);
    t[j + 1] = _mm256_unpackhi_epi32(r[j], r[j + 1]);
  }
  for (int j = 0; j < 8; j += 4) {
    u[j] = _mm256_unpacklo_epi64(t[j], t[j + 2]);
    u[j + 1] = _mm256_unpackhi_epi64(t[j], t[j + 2]);
    u[j + 2] = _mm256_unpacklo_epi64(t[j + 1], t[j + 3]);
    u[j + 3] = _mm256_unpackhi_epi64(t[j + 1], t[j + 3]);
  }
  for (int i = 0; i < 4; i++) {
    T[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    T[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

/* `block_dots_t` with 256-bit vectors and runs of 8 blocks. Without VNNI the codes are shifted
   down before the (saturating) maddubs, so no factor is taken out afterwards. */
static inline __attribute__((always_inline)) void block_dots_t(const uint8_t *rq, const int8_t *xt, int cols,
                                                               int nblk, int bpp, int c0, int32_t *isum,
                                                               const int NT, const int BITS, const int ADD) {
  const int PER = 8 / BITS;
  const __m256i ones = _mm256_set1_epi16(1);
  (void)ones;
  for (int c = c0; c + 8 <= bpp; c += 8) {
    for (int l = 0; l < 256; l += 64) PREFETCH(rq + 32 * c + l, BITS == 4 ? PF4 : PF2);
    __m256i T[8];
    transpose_codes8(rq + 32 * c, T);
    for (int t = 0; t < NT; t++) {
      __m256i acc[8];
      for (int p = 0; p < PER; p++) acc[p] = _mm256_setzero_si256();
      for (int i = 0; i < 8; i++)
        for (int p = 0; p < PER; p++) {
          const __m256i x = _mm256_loadu_si256((const __m256i *)(xt + (size_t)t * cols + 32 * (p * bpp + c) + 32 * i));
#if MOE_DPBUSD
          const __m256i codes = _mm256_and_si256(T[i], _mm256_set1_epi8((char)(((1 << BITS) - 1) << (BITS * p))));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
          acc[p] = _mm256_dpbusd_epi32(acc[p], codes, x);
#else
          acc[p] = _mm256_dpbusd_avx_epi32(acc[p], codes, x);
#endif
#else
          const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(T[i], BITS * p), _mm256_set1_epi8((char)((1 << BITS) - 1)));
          acc[p] = _mm256_add_epi32(acc[p], _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), ones));
#endif
        }
      for (int p = 0; p < PER; p++) {
        int32_t *dst = isum + (size_t)t * nblk + p * bpp + c;
        const __m256i v = _mm256_srai_epi32(acc[p], MOE_DPBUSD ? BITS * p : 0);
        _mm256_storeu_si256((__m256i *)dst, ADD ? _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)dst),
                                                                   _mm256_slli_epi32(v, 2))
                                                : v);
      }
    }
  }
}
#endif

/* The first block of bit plane p of a 3-bit row's 1-bit plane (bpp blocks per plane) whose
   columns are in a share that skips `skip` blocks of each 2-bit plane: 1-bit planes 2q and 2q+1
   cover the first and second half of 2-bit plane q's columns. */
static inline int high_start(int skip, int bpp, int p) {
  return p % 2 ? (skip > bpp ? skip - bpp : 0) : (skip < bpp ? skip : bpp);
}

#if MOE_ZMM
/* isum[t][b] += 4 x the dot products of the high bits of a 3-bit row (`hi`: its 1-bit plane,
   bpp blocks of 32 columns per bit plane, block c of plane p at bytes 32 c, bit p) with x in
   its plain layout, for planes that do not start on whole runs of 16 blocks: 16 blocks at a
   time with horizontal sums (`hsum16x8`), then 8 (`hsum8x8`); `packed3` makes bpp a multiple
   of 8. */
static inline __attribute__((always_inline)) void high_bits(const uint8_t *hi, const int8_t *xq, int cols, int nblk,
                                                            int bpp, int skip, int32_t *isum, const int NT) {
  for (int p = 0; p < 8; p++) {
    const __m512i m512 = _mm512_set1_epi8((char)(1 << p));
    const __m256i m256 = _mm256_set1_epi8((char)(1 << p));
    int c = high_start(skip, bpp, p) / 8 * 8;
    for (; c + 16 <= bpp; c += 16) {
      const int b0 = p * bpp + c;
      if (p == 0)
        for (int l = 0; l < 512; l += 64) PREFETCH(hi + 32 * c + l, PF2);
      for (int t = 0; t < NT; t++) {
        const int8_t *xt = xq + (size_t)t * cols + QB * b0;
        __m512i z[8];
        for (int i = 0; i < 8; i++)
          z[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(),
                                     _mm512_and_si512(_mm512_loadu_si512((const void *)(hi + 32 * (c + 2 * i))), m512),
                                     _mm512_loadu_si512((const void *)(xt + 64 * i)));
        int32_t *dst = isum + (size_t)t * nblk + b0;
        const __m512i v = _mm512_srai_epi32(hsum16x8(z), p);
        _mm512_storeu_si512((void *)dst, _mm512_add_epi32(_mm512_loadu_si512((const void *)dst), _mm512_slli_epi32(v, 2)));
      }
    }
    for (; c + 8 <= bpp; c += 8) {
      const int b0 = p * bpp + c;
      for (int t = 0; t < NT; t++) {
        const int8_t *xt = xq + (size_t)t * cols + QB * b0;
        __m256i v[8];
        for (int i = 0; i < 8; i++)
          v[i] = dot_u8s8(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)(hi + 32 * (c + i))), m256),
                          _mm256_loadu_si256((const __m256i *)(xt + QB * i)));
        int32_t *dst = isum + (size_t)t * nblk + b0;
        const __m256i w = _mm256_srai_epi32(hsum8x8(v), p);
        _mm256_storeu_si256((__m256i *)dst, _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)dst), _mm256_slli_epi32(w, 2)));
      }
    }
  }
}
#endif

/* isum[t][b]: the exact integer dot product of every block of one row with NT tokens. The
   codes of block b lie in plane b / (step / 32) at packed bytes 32 * (b % (step / 32)) (2 and 4
   bits; 3 bits: `rq` holds the codes unpacked, block b at 32 b); eight consecutive blocks of a
   plane are reduced together (their packed bytes are re-read from L1 for each plane). */
static inline __attribute__((always_inline)) void block_dots(const qmat *m, const uint8_t *rq, const int8_t *xq,
                                                             const int8_t *xt, int nblk, int32_t *isum,
                                                             const int NT) {
  const int cols = m->cols, bits = m->bits;
#if MOE_SIMD
  if (packed3(m, xt)) { /* codes = low 2 bits + 4 x high bit: the 2-bit plane, then the 1-bit one */
    /* a share (skip) starts at its run: the blocks before it in the run hold zero activations */
    const int sk = m->skip, bhi = nblk / 8;
    block_dots_t(rq, xt, cols, nblk, nblk / 4, sk / RUN * RUN, isum, NT, 2, 0);
#if MOE_ZMM
    if (bhi % RUN) { /* 1-bit planes that do not start on whole runs */
      high_bits(rq + cols / 4, xq, cols, nblk, bhi, sk, isum, NT);
      return;
    }
#endif
    /* every 1-bit plane from the odd planes' start (the earlier one; an even plane's blocks
       before its own start add zeros) */
    block_dots_t(rq + cols / 4, xt, cols, nblk, bhi, high_start(sk, bhi, 1) / RUN * RUN, isum, NT, 1, 1);
    return;
  }
#endif
  const int per = bits == 3 ? 1 : 8 / bits, bpp = nblk / per; /* planes; blocks per plane */
  int end = bpp; /* blocks [end, bpp) of each plane go through block_dots_t */
#if MOE_SIMD
  if (xt && bits != 3 && bpp % RUN == 0) end = imin(bpp, (m->skip + RUN - 1) / RUN * RUN);
#endif
  for (int p = 0; p < per; p++) {
    int c = m->skip; /* block of this plane; those before hold zero activations */
#if MOE_ZMM /* sixteen blocks at a time, two per 64-byte vector */
    for (; c + 16 <= end; c += 16) {
      const int b0 = p * bpp + c;
      if (bits != 3 && p == 0) /* every line of the 512 bytes this step reads, PF bytes ahead */
        for (int l = 0; l < 512; l += 64) PREFETCH(rq + 32 * c + l, bits == 2 ? PF2 : PF4);
      for (int t = 0; t < NT; t++) {
        const int8_t *xt = xq + (size_t)t * cols + QB * b0;
        __m512i z[8];
        for (int i = 0; i < 8; i++) {
          const __m512i codes = bits == 3 ? _mm512_loadu_si512((const void *)(rq + QB * (b0 + 2 * i)))
                                          : plane_bits64(rq + 32 * (c + 2 * i), bits, p);
          z[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512((const void *)(xt + 64 * i)));
        }
        const int shift = bits == 3 ? 0 : bits * p; /* plane_bits64's factor 2^(bits p) */
        _mm512_storeu_si512((void *)(isum + (size_t)t * nblk + b0), _mm512_srai_epi32(hsum16x8(z), shift));
      }
    }
#endif
    for (; c + 8 <= end; c += 8) {
      const int b0 = p * bpp + c;
      if (bits != 3 && p == 0)
        for (int l = 0; l < 256; l += 64) PREFETCH(rq + 32 * c + l, bits == 2 ? PF2 : PF4);
      for (int t = 0; t < NT; t++) {
        const int8_t *xt = xq + (size_t)t * cols + QB * b0;
        __m256i v[8];
        for (int i = 0; i < 8; i++) {
          const __m256i codes = bits == 3 ? _mm256_loadu_si256((const __m256i *)(rq + QB * (b0 + i)))
                                          : plane_codes(rq + 32 * (c + i), bits, p);
          v[i] = dot_u8s8(codes, _mm256_loadu_si256((const __m256i *)(xt + QB * i)));
        }
        _mm256_storeu_si256((__m256i *)(isum + (size_t)t * nblk + b0), hsum8x8(v));
      }
    }
    for (; c < end; c++) {
      const int b = p * bpp + c;
      const __m256i codes = bits == 3 ? _mm256_loadu_si256((const __m256i *)(rq + QB * b)) : plane_codes(rq + 32 * c, bits, p);
      for (int t = 0; t < NT; t++)
        isum[(size_t)t * nblk + b] = hsum1(dot_u8s8(codes, _mm256_loadu_si256((const __m256i *)(xq + (size_t)t * cols + QB * b))));
    }
  }
#if MOE_SIMD
  if (end < bpp) {
    if (bits == 2)
      block_dots_t(rq, xt, cols, nblk, bpp, end, isum, NT, 2, 0);
    else
      block_dots_t(rq, xt, cols, nblk, bpp, end, isum, NT, 4, 0);
  }
#endif
}

/* 3-bit row -> one code per byte in column order, one store per 32 codes. Hi plane p covers
   columns p*s8 + c; their low bits sit in lo plane p/2 at byte (p%2)*s8 + c. (Decoding inside
   the dot loop needs 8 activation streams per step, more than the registers hold.) */
static void unpack3(const uint8_t *rq, int cols, uint8_t *codes) {
  const int s8 = cols / 8;
  const uint8_t *hq = rq + cols / 4;
  const __m256i m1 = _mm256_set1_epi8(1), m3 = _mm256_set1_epi8(3);
  for (int c = 0; c < s8; c += 32) {
    const __m256i lo0 = _mm256_loadu_si256((const __m256i *)(rq + c));
    const __m256i lo1 = _mm256_loadu_si256((const __m256i *)(rq + s8 + c));
    const __m256i hi = _mm256_loadu_si256((const __m256i *)(hq + c));
    PREFETCH(rq + 3 * c, 3 * s8), PREFETCH(rq + 3 * c, 3 * s8 + 64); /* the next row, in order */
#define CODE3(P, LO)                                                                               \
  _mm256_storeu_si256(                                                                             \
      (__m256i *)(codes + (P) * s8 + c),                                                           \
      _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16((LO), 2 * ((P) / 2)), m3),               \
                      _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, (P)), m1), 2)))
    CODE3(0, lo0); CODE3(1, lo1); CODE3(2, lo0); CODE3(3, lo1);
    CODE3(4, lo0); CODE3(5, lo1); CODE3(6, lo0); CODE3(7, lo1);
#undef CODE3
  }
}

static void fast_tile(const qmat *m, const uint8_t *rq, const int8_t *xq, const int8_t *xt, int nblk, int32_t *isum,
                      int nt) {
  switch (nt) {
    case 1: block_dots(m, rq, xq, xt, nblk, isum, 1); break;
#if TILE > 2
    case 2: block_dots(m, rq, xq, xt, nblk, isum, 2); break;
    case 3: block_dots(m, rq, xq, xt, nblk, isum, 3); break;
    default: block_dots(m, rq, xq, xt, nblk, isum, 4); break;
#else
    default: block_dots(m, rq, xq, xt, nblk, isum, 2); break;
#endif
  }
}
#endif

/* Rows [r0, r1) of W x_t for every token t: y[t * ldy + r] in float32 or, with `yd`, the exact
   float64 sum (a multiple of 2^-32: shares of one row computed apart add up exactly). */
static void mat_rows(const qmat *m, int r0, int r1, const qact *a, float *y, double *yd, size_t ldy, scratch *ws) {
  if (m->skip) /* skipped blocks are never written: their (zero-activation) terms are exactly 0 */
    memset(ws->isum, 0, sizeof(int32_t) * TILE * (size_t)a->nblk);
  for (int r = r0; r < r1; r++) {
    const uint8_t *rq = m->q + (size_t)r * m->rowbytes;
    /* the scale and zero bytes of a row a few rows on: a thin stream the hardware misses */
    for (int l = 0; l < m->G; l += 64)
      PREFETCH(m->sq + (size_t)(r + SCALE_AHEAD) * m->G + l, 0), PREFETCH(m->zq + (size_t)(r + SCALE_AHEAD) * m->G + l, 0);
    const int inline_scales = m->inline_scales && a->ntok == 1;
    if (!inline_scales) row_scales(m, r, ws->s, ws->sz);
    if (!m->fast) unpack_row(rq, m->bits, m->cols, ws->codes);
    for (int t0 = 0; t0 < a->ntok; t0 += TILE) {
      const int nt = imin(TILE, a->ntok - t0);
      double sums[TILE];
      if (m->fast) {
#if MOE_SIMD
        const int8_t *xt = a->xt ? a->xt + (size_t)t0 * a->cols : NULL;
        const int unpacked = m->bits == 3 && !packed3(m, xt);
        if (unpacked && t0 == 0) unpack3(rq, m->cols, ws->codes);
        fast_tile(m, unpacked ? ws->codes : rq, a->xq + (size_t)t0 * a->cols, xt, a->nblk, ws->isum, nt);
#if INLINE_SCALES
        if (inline_scales)
          sums[0] = exact_sum_row(ws->isum, m, r, a->d, a->xs, a->nblk);
        else
#endif
          for (int t = 0; t < nt; t++)
            sums[t] = exact_sum(ws->isum + (size_t)t * a->nblk, ws->s, ws->sz, a->d + (size_t)(t0 + t) * a->nblk,
                                a->xs + (size_t)(t0 + t) * a->nblk, a->nblk, m->gs / QB);
#endif
      } else {
        for (int t = 0; t < nt; t++) sums[t] = generic_row(m, ws->codes, ws->s, ws->sz, a, t0 + t);
      }
      for (int t = 0; t < nt; t++) {
        const size_t at = (size_t)(t0 + t) * ldy + r;
        if (yd)
          yd[at] = sums[t] * UNGRID;
        else
          y[at] = (float)(sums[t] * UNGRID);
      }
    }
  }
}

static size_t scratch_bytes(int maxG, int maxcols) {
  const size_t nblk = (size_t)(maxcols + QB - 1) / QB;
  return sizeof(float) * 2 * (size_t)maxG + sizeof(int32_t) * TILE * nblk + (size_t)maxcols + 5 * 64;
}

static scratch scratch_at(uint8_t *base, int maxG, int maxcols) {
  scratch s;
  const size_t nblk = (size_t)(maxcols + QB - 1) / QB;
  uint8_t *p = base;
#define NEXT(T, N) ((T *)(p = (uint8_t *)(((uintptr_t)p + 63) & ~(uintptr_t)63), p += (N) * sizeof(T), p - (N) * sizeof(T)))
  s.s = NEXT(float, (size_t)maxG);
  s.sz = NEXT(float, (size_t)maxG);
  s.isum = NEXT(int32_t, TILE * nblk);
  s.codes = NEXT(uint8_t, (size_t)maxcols);
#undef NEXT
  return s;
}

static int check_layout(const moe_cpu_expert_layout *L) {
  if (!L) return MOE_CPU_EARG;
  int rc = check_mat(L->bits, 2 * L->intermediate, L->hidden, L->gs_gate_up);
  return rc ? rc : check_mat(L->bits, L->hidden, L->intermediate, L->gs_down);
}

static void expert_mats(const moe_cpu_expert_layout *L, const uint8_t *base, qmat *gu, qmat *dn) {
  const int64_t *o = L->off;
  make_mat(gu, base + o[0], base + o[1], base + o[2], (const float *)(base + o[3]), L->bits,
           2 * L->intermediate, L->hidden, L->gs_gate_up);
  make_mat(dn, base + o[4], base + o[5], base + o[6], (const float *)(base + o[7]), L->bits, L->hidden,
           L->intermediate, L->gs_down);
}

/* The next 64-byte aligned `bytes` of an arena. */
static void *take(uint8_t **p, size_t bytes) {
  uint8_t *at = (uint8_t *)(((uintptr_t)*p + 63) & ~(uintptr_t)63);
  *p = at + bytes;
  return at;
}

/* Shared core: nexp experts (one token) or one expert (ntok tokens). out[e or t][H]. */
static int run_experts(const uint8_t *const *bases, const float *weights, int nexp,
                       const moe_cpu_expert_layout *L, const float *x, int ntok, float *out,
                       int threads) {
  if (!bases || !x || !out || nexp < 1 || ntok < 1) return MOE_CPU_EARG;
  int rc = check_layout(L);
  if (rc) return rc;
  for (int e = 0; e < nexp; e++)
    if (!bases[e]) return MOE_CPU_EARG;
  if (threads < 1) threads = 1;
  const int H = L->hidden, I = L->intermediate, Ggu = H / L->gs_gate_up, Gdn = I / L->gs_down;
  const int nbh = (H + QB - 1) / QB, nbi = (I + QB - 1) / QB;
  const int nrows = nexp * ntok; /* activation rows of h: one per (expert, token) */
  const int maxcols = H > I ? H : I, maxG = Ggu > Gdn ? Ggu : Gdn;
  const size_t per_thread = (scratch_bytes(maxG, maxcols) + 63) / 64 * 64;
  const size_t fl = sizeof(float);
  size_t total = 2 * (size_t)ntok * H + 2 * (size_t)ntok * nbh * fl /* x */
                 + (size_t)nrows * 2 * I * fl                       /* gate, up */
                 + 2 * (size_t)nrows * I + 2 * (size_t)nrows * nbi * fl /* h */
                 + (size_t)threads * per_thread + 8 * 64;
  uint8_t *mem = (uint8_t *)malloc(total);
  if (!mem) return MOE_CPU_ENOMEM;
  uint8_t *p = mem;
  int8_t *xq = take(&p, (size_t)ntok * H), *xt = take(&p, (size_t)ntok * H);
  float *xd = take(&p, (size_t)ntok * nbh * fl), *xs = take(&p, (size_t)ntok * nbh * fl);
  float *gu = take(&p, (size_t)nrows * 2 * I * fl); /* [nrows][2I]: gate then up; h over gate */
  int8_t *hq = take(&p, (size_t)nrows * I), *ht = take(&p, (size_t)nrows * I);
  float *hd = take(&p, (size_t)nrows * nbi * fl), *hs = take(&p, (size_t)nrows * nbi * fl);
  uint8_t *scr = take(&p, (size_t)threads * per_thread);
  for (int t = 0; t < ntok; t++) {
    quantize_act(x + (size_t)t * H, H, xq + (size_t)t * H, xd + (size_t)t * nbh, xs + (size_t)t * nbh);
    transpose_act(xq + (size_t)t * H, H, xt + (size_t)t * H);
  }
  const qact ax = {ntok, H, nbh, xq, xd, xs, xt};
  const int ngu = (I + GU_CHUNK - 1) / GU_CHUNK, ndn = (H + DOWN_CHUNK - 1) / DOWN_CHUNK;

#pragma omp parallel num_threads(threads)
  {
    scratch ws = scratch_at(scr + (size_t)omp_get_thread_num() * per_thread, maxG, maxcols);
#pragma omp for schedule(dynamic)
    for (int item = 0; item < nexp * ngu; item++) {
      const int e = item / ngu, r0 = (item % ngu) * GU_CHUNK, r1 = imin(r0 + GU_CHUNK, I);
      qmat mg, md;
      expert_mats(L, bases[e], &mg, &md);
      float *ge = gu + (size_t)e * ntok * 2 * I;
      mat_rows(&mg, r0, r1, &ax, ge, NULL, 2 * (size_t)I, &ws);
      mat_rows(&mg, I + r0, I + r1, &ax, ge, NULL, 2 * (size_t)I, &ws);
      for (int t = 0; t < ntok; t++) { /* h = silu(gate) * up, then its int8 block r0 / QB */
        float *g = ge + (size_t)t * 2 * I, *u = g + I;
        for (int r = r0; r < r1; r++) g[r] = silu(g[r]) * u[r];
        const size_t row = (size_t)e * ntok + t;
        hd[row * nbi + r0 / QB] = quantize_block(g + r0, r1 - r0, hq + row * I + r0, hs + row * nbi + r0 / QB);
      }
    }
#pragma omp for
    for (int row = 0; row < nrows; row++) transpose_act(hq + (size_t)row * I, I, ht + (size_t)row * I);
#pragma omp for schedule(dynamic)
    for (int item = 0; item < nexp * ndn; item++) {
      const int e = item / ndn, r0 = (item % ndn) * DOWN_CHUNK, r1 = imin(r0 + DOWN_CHUNK, H);
      qmat mg, md;
      expert_mats(L, bases[e], &mg, &md);
      const size_t row = (size_t)e * ntok;
      const qact ah = {ntok, I, nbi, hq + row * I, hd + row * nbi, hs + row * nbi, ht + row * I};
      float *ye = out + row * H;
      mat_rows(&md, r0, r1, &ah, ye, NULL, (size_t)H, &ws);
      if (weights)
        for (int t = 0; t < ntok; t++)
          for (int r = r0; r < r1; r++) ye[(size_t)t * H + r] *= weights[e];
    }
  }
  free(mem);
  return MOE_CPU_OK;
}

int moe_cpu_expert_mlp(const uint8_t *base, const moe_cpu_expert_layout *layout, const float *x, int ntok,
                       float *y, int threads) {
  return run_experts(&base, NULL, 1, layout, x, ntok, y, threads);
}

int moe_cpu_experts_mlp(const uint8_t *const *bases, const float *weights, int nexp,
                        const moe_cpu_expert_layout *layout, const float *x, float *out, int threads) {
  if (!weights) return MOE_CPU_EARG;
  return run_experts(bases, weights, nexp, layout, x, 1, out, threads);
}

int moe_cpu_qlinear(const uint8_t *q, const uint8_t *scale_q, const uint8_t *zero_q, const float *meta, int bits,
                    int rows, int cols, int group_size, const float *x, int ntok, float *y, int threads) {
  if (!q || !scale_q || !zero_q || !meta || !x || !y || ntok < 1) return MOE_CPU_EARG;
  int rc = check_mat(bits, rows, cols, group_size);
  if (rc) return rc;
  if (threads < 1) threads = 1;
  qmat m;
  make_mat(&m, q, scale_q, zero_q, meta, bits, rows, cols, group_size);
  const int nblk = (cols + QB - 1) / QB;
  const size_t per_thread = (scratch_bytes(m.G, cols) + 63) / 64 * 64;
  const size_t act = 2 * (size_t)ntok * cols + sizeof(float) * (size_t)ntok * 2 * nblk;
  uint8_t *mem = (uint8_t *)malloc((size_t)threads * per_thread + act + 128);
  if (!mem) return MOE_CPU_ENOMEM;
  uint8_t *scr = mem, *ap = mem + (size_t)threads * per_thread;
  float *d = (float *)ap, *xs = d + (size_t)ntok * nblk;
  int8_t *xq = (int8_t *)(xs + (size_t)ntok * nblk), *xt = xq + (size_t)ntok * cols;
  for (int t = 0; t < ntok; t++) {
    quantize_act(x + (size_t)t * cols, cols, xq + (size_t)t * cols, d + (size_t)t * nblk, xs + (size_t)t * nblk);
    transpose_act(xq + (size_t)t * cols, cols, xt + (size_t)t * cols);
  }
  const qact a = {ntok, cols, nblk, xq, d, xs, xt};
  const int n = (rows + DOWN_CHUNK - 1) / DOWN_CHUNK;
#pragma omp parallel num_threads(threads)
  {
    scratch ws = scratch_at(scr + (size_t)omp_get_thread_num() * per_thread, m.G, cols);
#pragma omp for schedule(dynamic)
    for (int item = 0; item < n; item++)
      mat_rows(&m, item * DOWN_CHUNK, imin((item + 1) * DOWN_CHUNK, rows), &a, y, NULL, (size_t)rows, &ws);
  }
  free(mem);
  return MOE_CPU_OK;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Best of `reps` multi-threaded sums over a buffer of `nbytes`, in GB/s (1e9 bytes/s). */
double moe_cpu_read_bandwidth(size_t nbytes, int threads, int reps) {
  if (threads < 1) threads = 1;
  if (reps < 1) reps = 1;
  const size_t n = nbytes / sizeof(uint64_t);
  if (n == 0) return -1.0;
  uint64_t *buf = (uint64_t *)aligned_alloc(64, (n * sizeof(uint64_t) + 63) / 64 * 64);
  if (!buf) return -1.0;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (size_t i = 0; i < n; i++) buf[i] = i; /* first touch with the partition that reads */
  double best = 0.0;
  volatile uint64_t sink = 0;
  for (int rep = 0; rep < reps; rep++) {
    uint64_t s = 0;
    const double t0 = now_s();
#pragma omp parallel for simd num_threads(threads) schedule(static) reduction(+ : s)
    for (size_t i = 0; i < n; i++) s += buf[i];
    const double dt = now_s() - t0;
    sink += s;
    if (dt > 0 && n * sizeof(uint64_t) / dt > best) best = n * sizeof(uint64_t) / dt;
  }
  (void)sink;
  free(buf);
  return best / 1e9;
}
