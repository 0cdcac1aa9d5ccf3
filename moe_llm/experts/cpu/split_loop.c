/* The CPU side of the GPU/CPU split of a decode step (moe_llm/experts/split.py).
 *
 * One thread polls the mailbox rows in layer order. For row r, once the GPU's publish has
 * raised flags[r], it reads the step's routed positions (n, then ids, cuts and the hidden
 * state each reads: a lone token's k positions share one, B batched rows' B * k positions read
 * their row's), computes each missed position's CPU share from the expert's pinned host
 * buffer, writes float64 rows y[j][H] (exact sums, see moe_cpu.c), and raises dones[r]; the
 * GPU waits on that word (a captured stream wait) before its combine.
 *
 * The CPU share of an expert with cut c (0 <= c < PD, PD = bytes of the down plane) is the
 * intermediate neurons i with i % PD >= c: those rows of gate and up, and every down row
 * against h that is zero outside the share. The GPU computes the complement, so the two
 * sums add up to the whole expert, to the bit: every row is an exact sum of per-block integers,
 * which the GPU adds to its own share in float64. Built as one unit with moe_cpu.c (its static
 * kernels).
 */
#include "moe_cpu.c"

#include <pthread.h>
#include <sched.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

#define SPLIT_ABI 4
#define WORD_STRIDE 16 /* uint32 words per flag: one cache line each */
#define MAX_POSITIONS 1024 /* routed positions of one step the loop serves (max_batch * top_k) */
#define MAX_THREADS 1024 /* threads of the serving team */

typedef struct {
  int32_t rows, positions, experts, pd, threads, tokens; /* positions, tokens: a row's room (P, T) */
  int64_t row_bytes, x_off, y_off;
  volatile uint32_t *flags;
  volatile uint32_t *dones;
  uint8_t *box;
  const uint64_t *addr; /* [rows * experts] host address of each expert's buffer */
  volatile int32_t *stop;
  int64_t *stats; /* calls, bytes, ns */
  volatile int32_t *started; /* set once: 1 when the loop serves, or the negative MOE_CPU_* code it stopped on */
  moe_cpu_expert_layout layout;
} moe_split_ctx;

int moe_split_abi_version(void) { return SPLIT_ABI; }

/* A team of threads that stays awake between the layers of a decode step.
 *
 * A decode step hands the CPU a share every layer or two, 0.1-1 ms apart. An OpenMP team from
 * the process's libgomp (torch's) parks its threads in the kernel between regions, and waking
 * them in a virtual machine cost about 1 ms per decoded token on the H200 host (60.18 against
 * 56.64 tok/s at 12 GiB with GOMP_SPINCOUNT raised: docs/benchmarks.md). These workers spin on a
 * generation word for POOL_SPIN_S after their last job, then sleep on a condition variable:
 * awake through a decode, parked between requests. The caller is worker 0 and works too; items
 * are handed out one at a time (an atomic counter), so a core taken by another process delays
 * only the item it holds. Each item writes its own output rows, so the results do not depend
 * on which worker ran it. */
#define POOL_SPIN_S 5e-3

typedef void (*pool_fn)(void *arg, int item, int worker);

typedef struct {
  int n; /* threads, the caller included */
  pthread_t *tid;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  uint32_t gen;  /* bumped (seq_cst) to start a job */
  int32_t next;  /* the job's next item */
  int32_t left;  /* workers (not the caller) still in the job */
  int32_t sleepers;
  int32_t stop;
  pool_fn fn;
  void *arg;
  int items;
} pool;

typedef struct {
  pool *p;
  int w;
} pool_slot;

static void pool_work(pool *p, int w) {
  for (;;) {
    const int i = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED);
    if (i >= p->items) return;
    p->fn(p->arg, i, w);
  }
}

/* Spin until the generation word leaves `seen` (or stop) for up to POOL_SPIN_S, then sleep. */
static void pool_wait(pool *p, uint32_t seen) {
  const double t0 = now_s();
  unsigned spins = 0;
  while (__atomic_load_n(&p->gen, __ATOMIC_SEQ_CST) == seen && !__atomic_load_n(&p->stop, __ATOMIC_SEQ_CST)) {
    if ((++spins & 255) || now_s() - t0 < POOL_SPIN_S) {
      CPU_RELAX();
      continue;
    }
    pthread_mutex_lock(&p->mu);
    __atomic_fetch_add(&p->sleepers, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&p->gen, __ATOMIC_SEQ_CST) == seen && !__atomic_load_n(&p->stop, __ATOMIC_SEQ_CST))
      pthread_cond_wait(&p->cv, &p->mu);
    __atomic_fetch_sub(&p->sleepers, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&p->mu);
  }
}

static void *pool_main(void *arg) {
  pool_slot *slot = (pool_slot *)arg;
  pool *p = slot->p;
  const int w = slot->w;
  free(slot);
  uint32_t seen = 0;
  for (;;) {
    pool_wait(p, seen);
    if (__atomic_load_n(&p->stop, __ATOMIC_SEQ_CST)) return NULL;
    seen = __atomic_load_n(&p->gen, __ATOMIC_SEQ_CST);
    pool_work(p, w);
    __atomic_fetch_sub(&p->left, 1, __ATOMIC_RELEASE);
  }
}

/* A team of n threads: the caller and n - 1 workers, fewer if threads cannot be made (down to the
   caller alone, which still does every item: the GPU waiting on the split never waits forever). */
static void pool_start(pool *p, int n) {
  memset(p, 0, sizeof *p);
  p->n = 1;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->cv, NULL);
  p->tid = (pthread_t *)calloc(n > 1 ? (size_t)n - 1 : 1, sizeof(pthread_t));
  for (int w = 1; w < n && p->tid; w++) {
    pool_slot *slot = (pool_slot *)malloc(sizeof *slot);
    if (!slot) break;
    slot->p = p, slot->w = w;
    if (pthread_create(&p->tid[w - 1], NULL, pool_main, slot)) {
      free(slot);
      break;
    }
    p->n = w + 1;
  }
}

static void pool_stop(pool *p) {
  pthread_mutex_lock(&p->mu);
  __atomic_store_n(&p->stop, 1, __ATOMIC_SEQ_CST);
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  for (int w = 1; w < p->n; w++) pthread_join(p->tid[w - 1], NULL);
  free(p->tid);
  pthread_cond_destroy(&p->cv);
  pthread_mutex_destroy(&p->mu);
}

/* fn(arg, item, worker) for item = 0 .. items - 1 over the team; returns when all are done. */
static void pool_run(pool *p, pool_fn fn, void *arg, int items) {
  if (items <= 0) return;
  p->fn = fn, p->arg = arg, p->items = items;
  __atomic_store_n(&p->next, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&p->left, p->n - 1, __ATOMIC_RELAXED);
  __atomic_fetch_add(&p->gen, 1, __ATOMIC_SEQ_CST); /* publishes the stores above */
  if (__atomic_load_n(&p->sleepers, __ATOMIC_SEQ_CST)) {
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
  }
  pool_work(p, 0);
  while (__atomic_load_n(&p->left, __ATOMIC_ACQUIRE)) CPU_RELAX();
}

/* One missed expert's working rows: its tokens' int8 x, gate/up, h and its int8 blocks, and the
   down sums of a share of several tokens. */
typedef struct {
  int8_t *xq, *hq, *xt, *ht; /* int8 activations, and transposed (`transpose_act`): [ntok][cols] */
  float *xd, *xs, *gu, *h, *hd, *hs;
  double *yd; /* [ntok][H] */
  int32_t *blocks; /* [nbi] the h blocks that hold rows of the share */
} group_ws;

/* MAX_GROUPS experts' working rows and the team's scratch. */
#define MAX_GROUPS 4 /* missed experts of one step computed as one job (top-2: a token's two) */
typedef struct {
  group_ws g[MAX_GROUPS];
  uint8_t *scr;
  size_t per_thread;
  int ntok; /* tokens one expert's share may take */
} share_ws;

static int share_ws_alloc(const moe_cpu_expert_layout *L, int threads, int ntok, share_ws *w, void **mem) {
  const int H = L->hidden, I = L->intermediate, Ggu = H / L->gs_gate_up, Gdn = I / L->gs_down;
  const int nbh = (H + QB - 1) / QB, nbi = (I + QB - 1) / QB;
  const int maxcols = H > I ? H : I, maxG = Ggu > Gdn ? Ggu : Gdn;
  const size_t T = ntok < 1 ? 1 : (size_t)ntok;
  w->ntok = (int)T;
  w->per_thread = (scratch_bytes(maxG, maxcols) + 63) / 64 * 64;
  const size_t fl = sizeof(float);
  const size_t group = T * (2 * ((size_t)H + (size_t)I) + fl * (2 * (size_t)nbh + 3 * (size_t)I + 2 * (size_t)nbi) +
                            sizeof(double) * (size_t)H) +
                       sizeof(int32_t) * (size_t)nbi + 16 * 64;
  uint8_t *p = (uint8_t *)malloc(MAX_GROUPS * group + (size_t)threads * w->per_thread + 64);
  if (!p) return MOE_CPU_ENOMEM;
  *mem = p;
#define TAKE(T_, N) ((T_ *)(p = (uint8_t *)(((uintptr_t)p + 63) & ~(uintptr_t)63), p += (N) * sizeof(T_), p - (N) * sizeof(T_)))
  for (int k = 0; k < MAX_GROUPS; k++) {
    group_ws *g = &w->g[k];
    g->xq = TAKE(int8_t, T * H);
    g->xt = TAKE(int8_t, T * H);
    g->xd = TAKE(float, T * nbh);
    g->xs = TAKE(float, T * nbh);
    g->gu = TAKE(float, T * 2 * I);
    g->h = TAKE(float, T * I);
    g->hq = TAKE(int8_t, T * I);
    g->ht = TAKE(int8_t, T * I);
    g->hd = TAKE(float, T * nbi);
    g->hs = TAKE(float, T * nbi);
    g->yd = TAKE(double, T * H);
    g->blocks = TAKE(int32_t, (size_t)nbi);
  }
  w->scr = TAKE(uint8_t, (size_t)threads * w->per_thread);
#undef TAKE
  return MOE_CPU_OK;
}

/* One expert's share in a job: y[t][H] = the share (i % pd >= cut) of expert `base` for x[t]. */
typedef struct {
  const uint8_t *base;
  const float *const *x;
  double *const *y;
  int nt, cut;
} share_req;

typedef struct {
  qmat mg, md;
  qact ax, ah;
  group_ws *w;
  double *yd;
  int nt, cut, n_gu, first; /* gate_up items (h blocks with share rows); the job's first item of them */
  int32_t gu_left;          /* gate_up items not finished: down waits for 0 */
} share_group;

/* A job: the shares of ng experts, as the pool's items see it: every group's gate_up items (one h
   block each: its share rows of gate and up, then h and h's int8 block), then every group's down
   row chunks. A group's down items wait for its own gate_up items only, so one expert's down runs
   while the next one's gate_up is still being read: one tail a job, not two an expert. */
typedef struct {
  const moe_cpu_expert_layout *L;
  share_group g[MAX_GROUPS];
  share_ws *w;
  int ng, pd, n_gu, n_dn, maxG, maxcols;
} share_job;

static scratch job_scratch(const share_job *j, int worker) {
  return scratch_at(j->w->scr + (size_t)worker * j->w->per_thread, j->maxG, j->maxcols);
}

/* xq's block b into its place in xt (`transpose_act`: a tail of fewer than RUN blocks stays in xq). */
static void transpose_block(const int8_t *xq, int cols, int b, int8_t *xt) {
  const int q = b / RUN * 32 * RUN, j = b % RUN;
  if (q + 32 * RUN > cols) return;
  for (int i = 0; i < 8; i++) memcpy(xt + q + 4 * RUN * i + 4 * j, xq + 32 * b + 4 * i, 4);
}

/* h block b of group g: the share's rows of gate and up in it, h = silu(gate) * up over them (the
   block's other rows stay zero), then the block's int8 codes, scale and sum, and their transpose. */
static void share_gate_up(share_job *j, share_group *g, int b, scratch *ws) {
  group_ws *w = g->w;
  const int I = j->L->intermediate, nbi = (I + QB - 1) / QB, pd = j->pd;
  const int lo = b * QB, hi = imin(lo + QB, I);
  for (int q = lo / pd; q * pd < hi; q++) {
    const int r0 = q * pd + g->cut > lo ? q * pd + g->cut : lo, r1 = imin(hi, (q + 1) * pd);
    if (r0 >= r1) continue;
    mat_rows(&g->mg, r0, r1, &g->ax, w->gu, NULL, 2 * (size_t)I, ws);
    mat_rows(&g->mg, I + r0, I + r1, &g->ax, w->gu, NULL, 2 * (size_t)I, ws);
    for (int t = 0; t < g->nt; t++) {
      const float *gu = w->gu + (size_t)t * 2 * I;
      for (int r = r0; r < r1; r++) w->h[(size_t)t * I + r] = silu(gu[r]) * gu[I + r];
    }
  }
  for (int t = 0; t < g->nt; t++) {
    const size_t at = (size_t)t * I;
    w->hd[(size_t)t * nbi + b] = quantize_block(w->h + at + lo, hi - lo, w->hq + at + lo, w->hs + (size_t)t * nbi + b);
    transpose_block(w->hq + at, I, b, w->ht + at);
  }
}

static void share_item(void *arg, int item, int worker) {
  share_job *j = (share_job *)arg;
  scratch ws = job_scratch(j, worker);
  if (item < j->n_gu) {
    int k = 0;
    while (item >= j->g[k].first + j->g[k].n_gu) k++;
    share_group *g = &j->g[k];
    share_gate_up(j, g, g->w->blocks[item - g->first], &ws);
    __atomic_fetch_sub(&g->gu_left, 1, __ATOMIC_RELEASE);
    return;
  }
  item -= j->n_gu;
  share_group *g = &j->g[item / j->n_dn];
  /* every gate_up item was handed out before this one: their workers are running them */
  while (__atomic_load_n(&g->gu_left, __ATOMIC_ACQUIRE)) CPU_RELAX();
  const int H = j->L->hidden, r0 = item % j->n_dn * DOWN_CHUNK, r1 = imin(r0 + DOWN_CHUNK, H);
  mat_rows(&g->md, r0, r1, &g->ah, NULL, g->yd, (size_t)H, &ws);
}

/* The shares of n <= MAX_GROUPS experts (each nt <= w->ntok tokens, read from the expert's bytes
   once) as exact float64 sums (multiples of 2^-32): the GPU adds its complement to them without
   rounding. Each token's sums are those of its share alone: the integer dot products of one row
   do not depend on the other tokens, nor on the other experts of the job. The team `p` (at most
   the threads `w` has scratch for) runs the items. */
static void expert_shares(const share_req *req, int n, const moe_cpu_expert_layout *L, int pd, pool *p, share_ws *w) {
  const int H = L->hidden, I = L->intermediate, Ggu = H / L->gs_gate_up, Gdn = I / L->gs_down;
  const int nbh = (H + QB - 1) / QB, nbi = (I + QB - 1) / QB;
  share_job j = {.L = L, .w = w, .ng = n, .pd = pd, .n_dn = (H + DOWN_CHUNK - 1) / DOWN_CHUNK};
  j.maxcols = H > I ? H : I, j.maxG = Ggu > Gdn ? Ggu : Gdn;
  for (int k = 0; k < n; k++) {
    share_group *g = &j.g[k];
    group_ws *gw = g->w = &w->g[k];
    const share_req *r = &req[k];
    g->nt = r->nt, g->cut = r->cut;
    expert_mats(L, r->base, &g->mg, &g->md);
    if (L->bits != 3 || packed3_layout(&g->md)) g->md.skip = r->cut / QB; /* h is zero outside the share: read down's bytes [cut, pd) only */
    /* the same tokens as the group before (a token's top-k experts): its int8 x */
    const int same = k > 0 && r->nt == req[k - 1].nt && !memcmp(r->x, req[k - 1].x, sizeof(*r->x) * (size_t)r->nt);
    if (same) {
      g->ax = j.g[k - 1].ax;
    } else {
      for (int t = 0; t < r->nt; t++) {
        quantize_act(r->x[t], H, gw->xq + (size_t)t * H, gw->xd + (size_t)t * nbh, gw->xs + (size_t)t * nbh);
        transpose_act(gw->xq + (size_t)t * H, H, gw->xt + (size_t)t * H);
      }
      g->ax = (qact){r->nt, H, nbh, gw->xq, gw->xd, gw->xs, gw->xt};
    }
    g->ah = (qact){r->nt, I, nbi, gw->hq, gw->hd, gw->hs, gw->ht};
    g->yd = r->nt == 1 ? r->y[0] : gw->yd; /* one token: straight into its row */
    g->n_gu = 0;
    for (int b = 0; b < nbi; b++) { /* blocks holding a row i with i % pd >= cut */
      const int lo = b * QB, last = imin(lo + QB, I) - 1; /* a block across two planes holds a plane's end */
      if (r->cut < pd && (lo / pd != last / pd || last % pd >= r->cut)) gw->blocks[g->n_gu++] = b;
    }
    if (r->cut > 0) { /* rows and blocks outside the share are zero activations */
      memset(gw->h, 0, sizeof(float) * (size_t)r->nt * I);
      memset(gw->hq, 0, (size_t)r->nt * I);
      memset(gw->ht, 0, (size_t)r->nt * I);
      memset(gw->hd, 0, sizeof(float) * (size_t)r->nt * nbi);
      memset(gw->hs, 0, sizeof(float) * (size_t)r->nt * nbi);
    }
    g->first = j.n_gu;
    g->gu_left = g->n_gu;
    j.n_gu += g->n_gu;
  }
  pool_run(p, share_item, &j, j.n_gu + n * j.n_dn);
  for (int k = 0; k < n; k++)
    if (req[k].nt > 1)
      for (int t = 0; t < req[k].nt; t++) memcpy(req[k].y[t], j.g[k].yd + (size_t)t * H, sizeof(double) * (size_t)H);
}

/* One expert's CPU share outside the serving loop (tests), on a team of `threads` made for it. */
int moe_split_expert_share(const uint8_t *base, const moe_cpu_expert_layout *L, const float *x, int cut, int pd,
                           double *y, int threads) {
  int rc = check_layout(L);
  if (rc) return rc;
  if (!base || !x || !y || pd < 1 || cut < 0 || cut > pd || L->intermediate % pd) return MOE_CPU_EARG;
  if (threads < 1) threads = 1;
  share_ws w;
  void *mem = NULL;
  rc = share_ws_alloc(L, threads, 1, &w, &mem);
  if (rc) return rc;
  pool p;
  pool_start(&p, threads);
  const share_req req = {base, &x, &y, 1, cut};
  expert_shares(&req, 1, L, pd, &p, &w);
  pool_stop(&p);
  free(mem);
  return MOE_CPU_OK;
}

/* The serving thread between flags: spin (a decode step raises one every 0.1-1 ms) for up to
   POOL_SPIN_S since the last one, then nap 20 us; past IDLE_S (between requests) nap 1 ms, so an
   idle engine costs about nothing (20 us naps kept a fifth of a core busy) and the first layer
   of the next request waits at most about a millisecond. */
#define IDLE_S 0.1
static void idle_wait(double since) {
  const double idle = now_s() - since;
  if (idle < POOL_SPIN_S) {
    CPU_RELAX();
  } else {
    struct timespec ts = {0, idle < IDLE_S ? 20000 : 1000000};
    nanosleep(&ts, NULL);
  }
}

/* Serve the mailbox until *stop is set. Returns 0, or a negative MOE_CPU_* code at start, which
   it also writes to *started (1 once it serves): the caller waits for that word before any GPU
   step can wait on this loop, so a loop that cannot start is an error there, never a hang. */
static int serve_start(const moe_split_ctx *c, int threads, share_ws *w, void **mem) {
  int rc = check_layout(&c->layout);
  if (rc) return rc;
  if (c->rows < 1 || c->positions < 1 || c->positions > MAX_POSITIONS || c->tokens < 1 || c->pd < 1 ||
      threads > MAX_THREADS || c->layout.intermediate % c->pd)
    return MOE_CPU_EARG;
  return share_ws_alloc(&c->layout, threads, c->tokens, w, mem);
}

/* A job of the serving loop, its time counted (stats[2]). */
static void run_job(const share_req *req, int n, const moe_split_ctx *c, pool *team, share_ws *w) {
  if (n < 1) return;
  const double t0 = now_s();
  expert_shares(req, n, &c->layout, c->pd, team, w);
  c->stats[2] += (int64_t)((now_s() - t0) * 1e9);
}

int moe_split_serve(const moe_split_ctx *c) {
  const int threads = c->threads < 1 ? 1 : c->threads, H = c->layout.hidden, P = c->positions;
  share_ws w;
  void *mem = NULL;
  int rc = serve_start(c, threads, &w, &mem);
  if (rc) {
    *c->started = rc;
    return rc;
  }
  pool team;
  pool_start(&team, threads);
  *c->started = 1;
  const int64_t gu_bytes = c->layout.off[4] - c->layout.off[0], dn_bytes = c->layout.off[7] - c->layout.off[4];
  int r = 0;
  double last = now_s(); /* when the last flag was served */
  while (!*c->stop) {
    /* rows come in layer order, but scan them all: a forward that stopped half-way (an
       exception between two layers) must not leave this loop waiting on the wrong row */
    for (;;) {
      int found = -1;
      for (int i = 0; i < c->rows; i++) {
        const int q = (r + i) % c->rows;
        if (c->flags[(size_t)q * WORD_STRIDE] == 1) {
          found = q;
          break;
        }
      }
      if (found >= 0) {
        r = found;
        break;
      }
      if (*c->stop) goto out;
      idle_wait(last);
    }
    c->flags[(size_t)r * WORD_STRIDE] = 0;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    uint8_t *row = c->box + (size_t)r * c->row_bytes;
    const int32_t *head = (const int32_t *)row; /* n, ids [P], cuts [P], tokens [P] */
    const int n = head[0] < 0 ? 0 : (head[0] > P ? P : head[0]);
    const int32_t *ids = head + 1, *cuts = head + 1 + P, *toks = head + 1 + 2 * P;
    const float *xs = (const float *)(row + c->x_off);
    double *y = (double *)(row + c->y_off);
    /* the positions of one missed expert (one per row that routes to it, all with the layer's
       cut) are computed together: the expert's bytes are read once for all of them */
    uint8_t taken[MAX_POSITIONS] = {0}; /* n <= P <= MAX_POSITIONS */
    const float *xs_of[MAX_POSITIONS];
    double *ys_of[MAX_POSITIONS];
    share_req req[MAX_GROUPS];
    int ng = 0, used = 0; /* experts in the job, positions they hold */
    for (int j = 0; j < n; j++) {
      const int cut = cuts[j];
      if (taken[j] || cut >= c->pd) continue;
      const int e = ids[j];
      /* cannot happen: the GPU wrote them */
      if (e < 0 || e >= c->experts || cut < 0) continue;
      int nt = 0;
      for (int q = j; q < n && nt < w.ntok; q++) {
        if (taken[q] || ids[q] != e || cuts[q] != cut || toks[q] < 0 || toks[q] >= c->tokens) continue;
        taken[q] = 1;
        xs_of[used + nt] = xs + (size_t)toks[q] * H;
        ys_of[used + nt++] = y + (size_t)q * H;
      }
      if (!nt) continue;
      const uint8_t *base = (const uint8_t *)(uintptr_t)c->addr[(size_t)r * c->experts + e];
      req[ng++] = (share_req){base, xs_of + used, ys_of + used, nt, cut};
      used += nt;
      c->stats[0] += 1;
      c->stats[1] += (gu_bytes + (c->layout.bits != 3 ? dn_bytes : 0)) * (c->pd - cut) / c->pd +
                     (c->layout.bits != 3 ? 0 : dn_bytes);
      if (ng == MAX_GROUPS) {
        run_job(req, ng, c, &team, &w);
        ng = used = 0;
      }
    }
    run_job(req, ng, c, &team, &w);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    c->dones[(size_t)r * WORD_STRIDE] = 1;
    r = (r + 1) % c->rows;
    last = now_s();
  }
out:
  pool_stop(&team);
  free(mem);
  return MOE_CPU_OK;
}
