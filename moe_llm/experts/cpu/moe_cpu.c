/* CPU kernels for one MoE expert stored in moe-llm's compact quantized format.
 *
 * Weights are read in place from the expert's host buffer (see quant/compact.py and
 * quant/packing.py): packed 2/3/4-bit codes in the strided layout, 8-bit scale and zero per
 * group of `gs` input columns, float32 (scale_min, scale_step, zero_min, zero_step) per run of
 * 128 groups. Activations are quantized to int8 per block of 32 columns (one float scale per
 * block, like llama.cpp's Q8_0), so the inner loop is an integer dot product of codes x int8:
 *   sum_g s_g * sum_{i in g} (q_i - z_g) x_i  ~  sum_blocks s_g d_b (q . xq)  -  sum_g s_g z_g X_g
 * where X_g is the sum of the int8 activation (times its block scales) over group g.
 *
 * Every output row is computed by one thread in a fixed order, so results do not depend on
 * the thread count or on which thread takes which rows; work items (16-32 rows) are handed
 * out dynamically, so a core taken by another process delays only the items it holds.
 * Built with -fopenmp when available; without it everything runs serially. The C API is
 * pointer-based (no Python objects); see moe_llm/experts/cpu/__init__.py.
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

#define MOE_CPU_ABI 1
#define QB 32          /* activation columns per int8 block */
#define META_GROUP 128 /* groups per float32 meta row */
/* tokens that share one decode of a row's codes: 4 tokens x 4 accumulators need the 32
   vector registers of AVX-512 */
#if defined(__AVX512F__)
#define TILE 4
#else
#define TILE 2
#endif
#define GU_CHUNK 32   /* gate/up rows per work item: one int8 block of h */
#define DOWN_CHUNK 16 /* down rows per work item */
/* Software prefetch, bytes ahead of the code stream (about 150 ns of decode work): the
   hardware prefetchers ramp up late on rows of 1-6 KB. A 3-bit row is read as three
   interleaved streams, which they follow worse still (half speed from DRAM), so unpack3
   prefetches the next row in address order, 96 bytes per 32-column step. */
#define PF2 2048
#define PF4 4096
#define PREFETCH(P, D) __builtin_prefetch((const char *)(P) + (D), 0, 3)

enum {
  MOE_CPU_OK = 0,
  MOE_CPU_EBITS = -1,  /* bits not in {2, 3, 4} */
  MOE_CPU_ESHAPE = -2, /* columns not a multiple of 8, or group size does not divide them */
  MOE_CPU_ENOMEM = -3,
  MOE_CPU_EARG = -4, /* null pointer or count < 1 */
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
} qmat;

typedef struct { /* ntok activation rows of `cols`, int8 per QB block */
  int ntok, cols, nblk, G;
  const int8_t *xq;   /* [ntok][cols] */
  const float *d;     /* [ntok][nblk] block scales */
  const float *gsum;  /* [ntok][G] sums of xq * d per weight group */
} qact;

typedef struct { /* per-thread scratch */
  float *s, *sz, *sd, *zt; /* group scales, scale * zero, block scales, zero terms */
  uint8_t *codes;
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
    case MOE_CPU_EARG: return "null pointer or count < 1";
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
}

/* x[0:n] -> xq = round(x * 127 / amax); returns the block scale amax / 127. A NaN or inf
   makes the scale NaN (and xq 0), so it reaches every output as in a float matmul. */
static float quantize_block(const float *x, int n, int8_t *xq) {
  float amax = 0.f;
  int finite = 1;
  for (int j = 0; j < n; j++) {
    const float v = fabsf(x[j]);
    finite &= v <= FLT_MAX;
    amax = v > amax ? v : amax; /* not fmaxf: that is a libm call */
  }
  const float id = finite && amax > 0.f ? 127.f / amax : 0.f;
  for (int j = 0; j < n; j++) xq[j] = (int8_t)nearbyintf(finite ? x[j] * id : 0.f);
  return finite ? amax / 127.f : NAN;
}

/* Sums of the dequantized int8 activation per weight group: with them the zero-point term
   carries the same quantized x as the code term, so the error is sum_i w_i (xq_i d - x_i),
   as for dense weights times int8 x, however far the zeros are from the codes' middle. */
static void group_sums(const int8_t *xq, const float *d, int cols, int gs, float *gsum) {
  for (int g = 0; g < cols / gs; g++) {
    float s = 0.f;
    for (int j0 = g * gs, j1; j0 < (g + 1) * gs; j0 = j1) {
      j1 = imin((j0 / QB + 1) * QB, (g + 1) * gs);
      int32_t isum = 0;
      for (int j = j0; j < j1; j++) isum += xq[j];
      s += d[j0 / QB] * (float)isum;
    }
    gsum[g] = s;
  }
}

/* int8 per block of QB, and the group sums of the result. */
static void quantize_act(const float *x, int cols, int gs, int8_t *xq, float *d, float *gsum) {
  for (int j0 = 0; j0 < cols; j0 += QB) d[j0 / QB] = quantize_block(x + j0, imin(QB, cols - j0), xq + j0);
  group_sums(xq, d, cols, gs, gsum);
}

/* Float scale s and scale * zero of each group of row r. */
static void row_scales(const qmat *m, int r, float *restrict s, float *restrict sz) {
  const size_t f = (size_t)r * m->G;
  const uint8_t *sq = m->sq + f, *zq = m->zq + f;
  int g = 0;
  while (g < m->G) {
    size_t mi = (f + g) / META_GROUP;
    int end = (int)((mi + 1) * META_GROUP - f);
    if (end > m->G) end = m->G;
    const float *mm = m->meta + 4 * mi;
    const float s0 = mm[0], s1 = mm[1], z0 = mm[2], z1 = mm[3];
    for (; g < end; g++) {
      const float sg = (float)sq[g] * s1 + s0;
      s[g] = sg;
      sz[g] = sg * ((float)zq[g] * z1 + z0);
    }
  }
}

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

/* Portable path, any shape: sum over segments that lie in one group and one block. */
static float generic_dot(const qmat *m, const uint8_t *codes, const float *s, const qact *a, int t) {
  const int8_t *xq = a->xq + (size_t)t * a->cols;
  const float *d = a->d + (size_t)t * a->nblk;
  float acc = 0.f;
  for (int j0 = 0, j1; j0 < m->cols; j0 = j1) {
    int nb = (j0 / QB + 1) * QB, ng = (j0 / m->gs + 1) * m->gs;
    j1 = imin(imin(nb, ng), m->cols);
    int32_t isum = 0;
    for (int j = j0; j < j1; j++) isum += (int32_t)codes[j] * xq[j];
    acc += s[j0 / m->gs] * d[j0 / QB] * (float)isum;
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

static inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

/* acc[t][chain] += (codes . xq[t][col:col+32]) * sd[t][col/32]; NT and CH are constants after
   inlining, so the accumulators stay in registers; CH independent chains hide FMA latency. */
#define BLOCK(CODES, COL, P)                                                                       \
  do {                                                                                             \
    const int col_ = (COL), b_ = col_ / QB;                                                        \
    for (int t = 0; t < NT; t++) {                                                                 \
      __m256i x_ = _mm256_loadu_si256((const __m256i *)(xq + (size_t)t * cols + col_));            \
      __m256 f_ = _mm256_cvtepi32_ps(dot_u8s8((CODES), x_));                                       \
      acc[t][(P) & (CH - 1)] = _mm256_fmadd_ps(f_, _mm256_broadcast_ss(sd + t * nblk + b_),         \
                                               acc[t][(P) & (CH - 1)]);                           \
    }                                                                                              \
  } while (0)

static inline __attribute__((always_inline)) void fast_dot(const qmat *m, const uint8_t *rq,
                                                           const int8_t *xq, const float *sd,
                                                           int nblk, float *out, const int NT,
                                                           const int CH) {
  const int cols = m->cols;
  __m256 acc[TILE][4];
  for (int t = 0; t < NT; t++)
    for (int k = 0; k < CH; k++) acc[t][k] = _mm256_setzero_ps();
  const __m256i m3 = _mm256_set1_epi8(3), m15 = _mm256_set1_epi8(15);
  if (m->bits == 2) {
    const int step = cols / 4;
    for (int c = 0; c < step; c += 32) {
      const __m256i v = _mm256_loadu_si256((const __m256i *)(rq + c));
      PREFETCH(rq + c, PF2);
      BLOCK(_mm256_and_si256(v, m3), c, 0);
      BLOCK(_mm256_and_si256(_mm256_srli_epi16(v, 2), m3), step + c, 1);
      BLOCK(_mm256_and_si256(_mm256_srli_epi16(v, 4), m3), 2 * step + c, 2);
      BLOCK(_mm256_and_si256(_mm256_srli_epi16(v, 6), m3), 3 * step + c, 3);
    }
  } else if (m->bits == 4) {
    const int step = cols / 2;
    int c = 0;
    for (; c + 64 <= step; c += 64) {
      const __m256i v = _mm256_loadu_si256((const __m256i *)(rq + c));
      const __m256i w = _mm256_loadu_si256((const __m256i *)(rq + c + 32));
      PREFETCH(rq + c, PF4);
      BLOCK(_mm256_and_si256(v, m15), c, 0);
      BLOCK(_mm256_and_si256(_mm256_srli_epi16(v, 4), m15), step + c, 1);
      BLOCK(_mm256_and_si256(w, m15), c + 32, 2);
      BLOCK(_mm256_and_si256(_mm256_srli_epi16(w, 4), m15), step + c + 32, 3);
    }
    if (c < step) {
      const __m256i v = _mm256_loadu_si256((const __m256i *)(rq + c));
      BLOCK(_mm256_and_si256(v, m15), c, 0);
      BLOCK(_mm256_and_si256(_mm256_srli_epi16(v, 4), m15), step + c, 1);
    }
  } else { /* 3-bit: `rq` holds the row's codes unpacked to column order (unpack3) */
    int b = 0;
    for (; b + 4 <= nblk; b += 4) {
      BLOCK(_mm256_loadu_si256((const __m256i *)(rq + QB * b)), QB * b, 0);
      BLOCK(_mm256_loadu_si256((const __m256i *)(rq + QB * b + 32)), QB * b + 32, 1);
      BLOCK(_mm256_loadu_si256((const __m256i *)(rq + QB * b + 64)), QB * b + 64, 2);
      BLOCK(_mm256_loadu_si256((const __m256i *)(rq + QB * b + 96)), QB * b + 96, 3);
    }
    for (; b < nblk; b++) BLOCK(_mm256_loadu_si256((const __m256i *)(rq + QB * b)), QB * b, 0);
  }
  for (int t = 0; t < NT; t++) {
    __m256 v = acc[t][0];
    for (int k = 1; k < CH; k++) v = _mm256_add_ps(v, acc[t][k]);
    out[t] = hsum8(v);
  }
}
#undef BLOCK

static inline __m256 cvt8(const uint8_t *p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Row r's 8-bit meta for tokens t0..t0+nt: sd[t][b] = s_g * d[t][b] and the zero terms
   zt[t] = sum_g s_g z_g X[t][g] (one pass per token keeps the accumulator in a register). */
static void fast_prologue(const qmat *m, int r, const qact *a, int t0, int nt, float *restrict sd, float *zt) {
  const int G = m->G, nblk = a->nblk, bpg = m->gs / QB;
  const size_t f = (size_t)r * G;
  const uint8_t *sq = m->sq + f, *zq = m->zq + f;
  for (int t = 0; t < nt; t++) {
    const float *d = a->d + (size_t)(t0 + t) * nblk, *gsum = a->gsum + (size_t)(t0 + t) * G;
    float *o = sd + (size_t)t * nblk, ztail = 0.f, sbuf[8];
    __m256 zacc = _mm256_setzero_ps();
    for (int g = 0; g < G;) {
      const size_t mi = (f + g) / META_GROUP;
      const int end = imin(G, (int)((mi + 1) * META_GROUP - f));
      const float *mm = m->meta + 4 * mi;
      const __m256 s0 = _mm256_set1_ps(mm[0]), s1 = _mm256_set1_ps(mm[1]);
      const __m256 z0 = _mm256_set1_ps(mm[2]), z1 = _mm256_set1_ps(mm[3]);
      for (; g + 8 <= end; g += 8) {
        const __m256 sg = _mm256_fmadd_ps(cvt8(sq + g), s1, s0);
        const __m256 szg = _mm256_mul_ps(sg, _mm256_fmadd_ps(cvt8(zq + g), z1, z0));
        zacc = _mm256_fmadd_ps(szg, _mm256_loadu_ps(gsum + g), zacc);
        if (bpg == 1) {
          _mm256_storeu_ps(o + g, _mm256_mul_ps(sg, _mm256_loadu_ps(d + g)));
        } else if (bpg == 2) { /* [s0 s0 s1 s1 ...]: each group's scale for its two blocks */
          const __m256 lo = _mm256_unpacklo_ps(sg, sg), hi = _mm256_unpackhi_ps(sg, sg);
          const __m256 a0 = _mm256_permute2f128_ps(lo, hi, 0x20), a1 = _mm256_permute2f128_ps(lo, hi, 0x31);
          _mm256_storeu_ps(o + 2 * g, _mm256_mul_ps(a0, _mm256_loadu_ps(d + 2 * g)));
          _mm256_storeu_ps(o + 2 * g + 8, _mm256_mul_ps(a1, _mm256_loadu_ps(d + 2 * g + 8)));
        } else {
          _mm256_storeu_ps(sbuf, sg);
          for (int k = 0; k < 8; k++)
            for (int q = 0, b = (g + k) * bpg; q < bpg; q++, b++) o[b] = sbuf[k] * d[b];
        }
      }
      for (; g < end; g++) {
        const float sg = (float)sq[g] * mm[1] + mm[0];
        ztail += sg * ((float)zq[g] * mm[3] + mm[2]) * gsum[g];
        for (int q = 0, b = g * bpg; q < bpg; q++, b++) o[b] = sg * d[b];
      }
    }
    zt[t] = hsum8(zacc) + ztail;
  }
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

static void fast_tile(const qmat *m, const uint8_t *rq, const int8_t *xq, const float *sd, int nblk,
                      float *out, int nt) {
  switch (nt) {
    /* 4 chains for every tile width: a token's sum order never depends on its neighbours */
    case 1: fast_dot(m, rq, xq, sd, nblk, out, 1, 4); break;
#if TILE > 2
    case 2: fast_dot(m, rq, xq, sd, nblk, out, 2, 4); break;
    case 3: fast_dot(m, rq, xq, sd, nblk, out, 3, 4); break;
    default: fast_dot(m, rq, xq, sd, nblk, out, 4, 4); break;
#else
    default: fast_dot(m, rq, xq, sd, nblk, out, 2, 4); break;
#endif
  }
}
#endif

/* sum_i a[i] b[i] in 8 interleaved partial sums (vectorisable, same order every call). */
static float dot8(const float *restrict a, const float *restrict b, int n) {
  float part[8] = {0.f};
  int i = 0;
#if MOE_SIMD
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  _mm256_storeu_ps(part, acc);
#else
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; k++) part[k] += a[i + k] * b[i + k];
#endif
  for (int k = 0; i < n; i++, k++) part[k] += a[i] * b[i];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

/* y[t * ldy + r] = (W x_t)[r] for rows r in [r0, r1) and every token t. */
static void mat_rows(const qmat *m, int r0, int r1, const qact *a, float *y, size_t ldy, scratch *ws) {
  const int G = m->G;
  for (int r = r0; r < r1; r++) {
    const uint8_t *rq = m->q + (size_t)r * m->rowbytes;
    if (!m->fast) {
      row_scales(m, r, ws->s, ws->sz);
      for (int t = 0; t < a->ntok; t++) ws->zt[t] = dot8(ws->sz, a->gsum + (size_t)t * G, G);
      unpack_row(rq, m->bits, m->cols, ws->codes);
    }
    for (int t0 = 0; t0 < a->ntok; t0 += TILE) {
      const int nt = imin(TILE, a->ntok - t0);
      float dots[TILE];
      if (m->fast) {
#if MOE_SIMD
        if (m->bits == 3 && t0 == 0) unpack3(rq, m->cols, ws->codes);
        fast_prologue(m, r, a, t0, nt, ws->sd, ws->zt + t0);
        fast_tile(m, m->bits == 3 ? ws->codes : rq, a->xq + (size_t)t0 * a->cols, ws->sd, a->nblk, dots, nt);
#endif
      } else {
        for (int t = 0; t < nt; t++) dots[t] = generic_dot(m, ws->codes, ws->s, a, t0 + t);
      }
      for (int t = 0; t < nt; t++) y[(size_t)(t0 + t) * ldy + r] = dots[t] - ws->zt[t0 + t];
    }
  }
}

static size_t scratch_bytes(int maxG, int maxcols, int ntok) {
  int nblk = (maxcols + QB - 1) / QB;
  return sizeof(float) * (2 * (size_t)maxG + (size_t)TILE * nblk + ntok) + (size_t)maxcols + 64;
}

static scratch scratch_at(uint8_t *base, int maxG, int maxcols, int ntok) {
  scratch s;
  int nblk = (maxcols + QB - 1) / QB;
  s.s = (float *)base;
  s.sz = s.s + maxG;
  s.sd = s.sz + maxG;
  s.zt = s.sd + (size_t)TILE * nblk;
  s.codes = (uint8_t *)(s.zt + ntok);
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

static inline float silu(float v) { return v / (1.f + expf(-v)); }

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
  const size_t per_thread = (scratch_bytes(maxG, maxcols, ntok) + 63) / 64 * 64;
  const size_t fl = sizeof(float);
  size_t total = (size_t)ntok * H + (size_t)ntok * nbh * fl + (size_t)ntok * Ggu * fl /* x */
                 + (size_t)nrows * 2 * I * fl                                       /* gate, up */
                 + (size_t)nrows * I + (size_t)nrows * nbi * fl + (size_t)nrows * Gdn * fl /* h */
                 + (size_t)threads * per_thread + 8 * 64;
  uint8_t *mem = (uint8_t *)malloc(total);
  if (!mem) return MOE_CPU_ENOMEM;
  uint8_t *p = mem;
  int8_t *xq = take(&p, (size_t)ntok * H);
  float *xd = take(&p, (size_t)ntok * nbh * fl), *xg = take(&p, (size_t)ntok * Ggu * fl);
  float *gu = take(&p, (size_t)nrows * 2 * I * fl); /* [nrows][2I]: gate then up; h over gate */
  int8_t *hq = take(&p, (size_t)nrows * I);
  float *hd = take(&p, (size_t)nrows * nbi * fl), *hg = take(&p, (size_t)nrows * Gdn * fl);
  uint8_t *scr = take(&p, (size_t)threads * per_thread);
  for (int t = 0; t < ntok; t++)
    quantize_act(x + (size_t)t * H, H, L->gs_gate_up, xq + (size_t)t * H, xd + (size_t)t * nbh,
                 xg + (size_t)t * Ggu);
  const qact ax = {ntok, H, nbh, Ggu, xq, xd, xg};
  const int ngu = (I + GU_CHUNK - 1) / GU_CHUNK, ndn = (H + DOWN_CHUNK - 1) / DOWN_CHUNK;

#pragma omp parallel num_threads(threads)
  {
    scratch ws = scratch_at(scr + (size_t)omp_get_thread_num() * per_thread, maxG, maxcols, ntok);
#pragma omp for schedule(dynamic)
    for (int item = 0; item < nexp * ngu; item++) {
      const int e = item / ngu, r0 = (item % ngu) * GU_CHUNK, r1 = imin(r0 + GU_CHUNK, I);
      qmat mg, md;
      expert_mats(L, bases[e], &mg, &md);
      float *ge = gu + (size_t)e * ntok * 2 * I;
      mat_rows(&mg, r0, r1, &ax, ge, 2 * (size_t)I, &ws);
      mat_rows(&mg, I + r0, I + r1, &ax, ge, 2 * (size_t)I, &ws);
      for (int t = 0; t < ntok; t++) { /* h = silu(gate) * up, then its int8 block r0 / QB */
        float *g = ge + (size_t)t * 2 * I, *u = g + I;
        for (int r = r0; r < r1; r++) g[r] = silu(g[r]) * u[r];
        const size_t row = (size_t)e * ntok + t;
        hd[row * nbi + r0 / QB] = quantize_block(g + r0, r1 - r0, hq + row * I + r0);
      }
    }
#pragma omp for schedule(static)
    for (int row = 0; row < nrows; row++)
      group_sums(hq + (size_t)row * I, hd + (size_t)row * nbi, I, L->gs_down, hg + (size_t)row * Gdn);
#pragma omp for schedule(dynamic)
    for (int item = 0; item < nexp * ndn; item++) {
      const int e = item / ndn, r0 = (item % ndn) * DOWN_CHUNK, r1 = imin(r0 + DOWN_CHUNK, H);
      qmat mg, md;
      expert_mats(L, bases[e], &mg, &md);
      const size_t row = (size_t)e * ntok;
      const qact ah = {ntok, I, nbi, Gdn, hq + row * I, hd + row * nbi, hg + row * Gdn};
      float *ye = out + row * H;
      mat_rows(&md, r0, r1, &ah, ye, (size_t)H, &ws);
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
  const size_t per_thread = (scratch_bytes(m.G, cols, ntok) + 63) / 64 * 64;
  const size_t act = (size_t)ntok * cols + sizeof(float) * (size_t)ntok * (nblk + m.G);
  uint8_t *mem = (uint8_t *)malloc((size_t)threads * per_thread + act + 128);
  if (!mem) return MOE_CPU_ENOMEM;
  uint8_t *scr = mem, *ap = mem + (size_t)threads * per_thread;
  float *d = (float *)ap, *gsum = d + (size_t)ntok * nblk;
  int8_t *xq = (int8_t *)(gsum + (size_t)ntok * m.G);
  for (int t = 0; t < ntok; t++)
    quantize_act(x + (size_t)t * cols, cols, group_size, xq + (size_t)t * cols, d + (size_t)t * nblk,
                 gsum + (size_t)t * m.G);
  const qact a = {ntok, cols, nblk, m.G, xq, d, gsum};
  const int n = (rows + DOWN_CHUNK - 1) / DOWN_CHUNK;
#pragma omp parallel num_threads(threads)
  {
    scratch ws = scratch_at(scr + (size_t)omp_get_thread_num() * per_thread, m.G, cols, ntok);
#pragma omp for schedule(dynamic)
    for (int item = 0; item < n; item++)
      mat_rows(&m, item * DOWN_CHUNK, imin((item + 1) * DOWN_CHUNK, rows), &a, y, (size_t)rows, &ws);
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
