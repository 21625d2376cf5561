/* Prefill kernels: a layer's routed experts over many tokens, and sink attention for long slices, each as one call
 * whose work the pool (pool.c) splits into coarse tasks.
 *
 * Why: at prefill sizes (hundreds of rows) the products are compute-bound, and on a small model each one is small.
 * torch splits every op over the threads through OpenMP; with OMP_WAIT_POLICY=PASSIVE (what mimoflash runs with,
 * cli.py) its threads sleep between ops and every op pays their wake-up, so a second thread gained nothing. Here a
 * task is a whole (expert, block of tokens) SwiGLU chain or a whole (sequence, kv head, block of queries)
 * attention, claimed dynamically by the pool's threads, which spin between the tasks of one call.
 *
 * One product shape serves both: C (rows x cols) = A (rows x K, row-major) . B (K x cols, k-major), in tiles of
 * 6 rows x 32 columns: per k, two 16-float vectors of B and one broadcast of A per row, 12 FMAs into 12 AVX-512
 * accumulators. Each output sums k in order in one FMA chain, so a token's result does not depend on which other
 * tokens share its block. The experts run transposed, so their bf16 weights are the A side (rows converted to
 * fp32 once per task, exactly) and the tokens the B side: h^T = [gate; up] . x^T, a^T = silu(g^T) * u^T,
 * y^T = down . a^T; no weight is repacked. Attention: S = Q . K^T (B = the gathered keys, transposed), then
 * O = P . V (B = the gathered values as they are).
 *
 * AVX-512F is chosen at run time; elsewhere the same loops run in portable C (correct, slow: the Python side then
 * keeps torch's path, kernels/prefill.py). Tested against the torch references in tests/test_prefill_kernels.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mimoflash_kernels.h"

#define MR 6                 /* rows of a tile */
#define NR 32                /* columns of a tile */
#define EXPERT_TOKENS 64     /* tokens per expert task: the weight rows' conversion is paid once per 64 tokens */
#define QUERY_ROWS 30        /* query rows per attention task (5 tiles of 6) */

static inline float bf16f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ------------------------------------------------------------------------------------------------ the tile */

static void tile_portable(const float *A, long lda, int mr, const float *B, long ldb, long K, float *C, long ldc,
                          int nc) {
    float acc[MR][NR];
    memset(acc, 0, sizeof acc);
    for (long k = 0; k < K; k++)
        for (int r = 0; r < mr; r++) {
            float a = A[r * lda + k];
            for (int j = 0; j < nc; j++) acc[r][j] += a * B[k * ldb + j];
        }
    for (int r = 0; r < mr; r++) memcpy(C + r * ldc, acc[r], sizeof(float) * (size_t)nc);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f")))

static int have_avx512(void) {
    static int v = -1;
    if (v < 0) {
        const char *o = getenv("MIMOFLASH_PREFILL_PORTABLE");   /* tests: run the portable loops on any machine */
        v = (o && *o && *o != '0') ? 0 : __builtin_cpu_supports("avx512f") ? 1 : 0;
    }
    return v;
}

/* C[r][0..nc) = sum_k A[r][k] B[k][0..nc), r < mr <= 6, nc <= 32. Rows past mr repeat row 0 (their sums are
 * dropped), columns past nc are masked off, so every tile shape is the same loop. */
AVX512 static void tile_avx512(const float *A, long lda, int mr, const float *B, long ldb, long K, float *C,
                               long ldc, int nc) {
    __mmask16 m0 = nc >= 16 ? 0xFFFF : (__mmask16)((1u << nc) - 1);
    __mmask16 m1 = nc >= 32 ? 0xFFFF : nc <= 16 ? 0 : (__mmask16)((1u << (nc - 16)) - 1);
    const float *a0 = A, *a1 = mr > 1 ? A + lda : A, *a2 = mr > 2 ? A + 2 * lda : A;
    const float *a3 = mr > 3 ? A + 3 * lda : A, *a4 = mr > 4 ? A + 4 * lda : A, *a5 = mr > 5 ? A + 5 * lda : A;
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (long k = 0; k < K; k++) {
        const float *b = B + k * ldb;
        __m512 b0 = _mm512_maskz_loadu_ps(m0, b), b1 = _mm512_maskz_loadu_ps(m1, b + 16);
        __m512 a = _mm512_set1_ps(a0[k]);
        c00 = _mm512_fmadd_ps(a, b0, c00), c01 = _mm512_fmadd_ps(a, b1, c01);
        a = _mm512_set1_ps(a1[k]);
        c10 = _mm512_fmadd_ps(a, b0, c10), c11 = _mm512_fmadd_ps(a, b1, c11);
        a = _mm512_set1_ps(a2[k]);
        c20 = _mm512_fmadd_ps(a, b0, c20), c21 = _mm512_fmadd_ps(a, b1, c21);
        a = _mm512_set1_ps(a3[k]);
        c30 = _mm512_fmadd_ps(a, b0, c30), c31 = _mm512_fmadd_ps(a, b1, c31);
        a = _mm512_set1_ps(a4[k]);
        c40 = _mm512_fmadd_ps(a, b0, c40), c41 = _mm512_fmadd_ps(a, b1, c41);
        a = _mm512_set1_ps(a5[k]);
        c50 = _mm512_fmadd_ps(a, b0, c50), c51 = _mm512_fmadd_ps(a, b1, c51);
    }
    __m512 cs[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int r = 0; r < mr; r++) {
        _mm512_mask_storeu_ps(C + r * ldc, m0, cs[r][0]);
        _mm512_mask_storeu_ps(C + r * ldc + 16, m1, cs[r][1]);
    }
}

/* exp(x) for 16 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, p of degree 6 (relative error ~2e-7); x below
 * -87.3 gives 0, as expf does for the softmax's masked scores. */
AVX512 static __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.33654f);
    __mmask16 zero = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.72283f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(~zero, _mm512_scalef_ps(p, n));
}

/* y[i] = exp(x[i] - m), returns the sum (n floats). */
AVX512 static float exp_sub_sum_avx512(float *x, long n, float m) {
    __m512 s = _mm512_setzero_ps(), mv = _mm512_set1_ps(m);
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv));
        _mm512_storeu_ps(x + i, e);
        s = _mm512_add_ps(s, e);
    }
    if (i < n) {
        __mmask16 t = (__mmask16)((1u << (n - i)) - 1);
        __m512 e = _mm512_maskz_mov_ps(t, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, x + i), mv)));
        _mm512_mask_storeu_ps(x + i, t, e);
        s = _mm512_add_ps(s, e);
    }
    return _mm512_reduce_add_ps(s);
}

/* g[i] = silu(g[i]) * u[i] over n floats: g / (1 + exp(-g)) * u, the tail masked (the same arithmetic for every
 * token, wherever it sits in its block). */
AVX512 static void silu_mul_avx512(float *g, const float *u, long n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (long i = 0; i < n; i += 16) {
        __mmask16 t = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 x = _mm512_maskz_loadu_ps(t, g + i);
        __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        _mm512_mask_storeu_ps(g + i, t, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(t, u + i)));
    }
}
AVX512 static void to_f32_avx512(const uint16_t *w, long n, float *out) {
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + i)));
        _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)));
    }
    for (; i < n; i++) out[i] = bf16f(w[i]);
}
#else
static int have_avx512(void) { return 0; }
#endif

static void tile(const float *A, long lda, int mr, const float *B, long ldb, long K, float *C, long ldc, int nc) {
#ifdef AVX512
    if (have_avx512()) {
        tile_avx512(A, lda, mr, B, ldb, K, C, ldc, nc);
        return;
    }
#endif
    tile_portable(A, lda, mr, B, ldb, K, C, ldc, nc);
}

/* C (M x N) = A (M x K) . B (K x N), all fp32, in 6 x 32 tiles. */
static void product(const float *A, long lda, long M, const float *B, long ldb, long K, float *C, long ldc, long N) {
    for (long i = 0; i < M; i += MR)
        for (long j = 0; j < N; j += NR)
            tile(A + i * lda, lda, M - i < MR ? (int)(M - i) : MR, B + j, ldb, K, C + i * ldc + j, ldc,
                 N - j < NR ? (int)(N - j) : NR);
}

/* out[i] = w[i] as fp32 (exact), n values */
static void to_f32(const uint16_t *w, long n, float *out) {
#ifdef AVX512
    if (have_avx512()) {
        to_f32_avx512(w, n, out);
        return;
    }
#endif
    for (long i = 0; i < n; i++) out[i] = bf16f(w[i]);
}

/* C (N x cols) = W (N x K, bf16 row-major) . B (K x cols): 6 weight rows converted to fp32 at a time (buf). */
static void weight_product(const uint16_t *W, long N, long K, const float *B, long ldb, float *C, long ldc,
                           long cols, float *buf) {
    for (long i = 0; i < N; i += MR) {
        long mr = N - i < MR ? N - i : MR;
        to_f32(W + i * K, mr * K, buf);
        for (long j = 0; j < cols; j += NR)
            tile(buf, K, (int)mr, B + j, ldb, K, C + i * ldc + j, ldc, cols - j < NR ? (int)(cols - j) : NR);
    }
}

static float exp_sub_sum(float *x, long n, float m) {
#ifdef AVX512
    if (have_avx512()) return exp_sub_sum_avx512(x, n, m);
#endif
    float s = 0.f;
    for (long i = 0; i < n; i++) s += x[i] = expf(x[i] - m);
    return s;
}

static void silu_mul(float *g, const float *u, long n) {
#ifdef AVX512
    if (have_avx512()) {
        silu_mul_avx512(g, u, n);
        return;
    }
#endif
    for (long i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

int mf_prefill_simd(void) { return have_avx512() ? 512 : 0; }

/* ------------------------------------------------------------------------------------------------ experts */

typedef struct {
    const float *x;              /* (T, D) */
    const long *pair_tok;        /* (P,) token of each pair, pairs grouped by expert, tokens ascending */
    const long *first, *count;   /* (E,) */
    const long *task_e, *task_lo;
    long D, F;
    const uint16_t *gate_up, *down;
    float *y;                    /* (P, D): pair p's expert output, unweighted */
    _Atomic int failed;          /* a task found no scratch */
} experts_job;

static size_t expert_scratch(long D, long F) {
    return sizeof(float) * (size_t)(2 * D * EXPERT_TOKENS + 2 * F * EXPERT_TOKENS + MR * (D > F ? D : F));
}

/* Task: expert e on its pairs [lo, lo + n), n <= EXPERT_TOKENS, through the whole SwiGLU, transposed. */
static void expert_task(void *p, long t) {
    experts_job *j = (experts_job *)p;
    long e = j->task_e[t], lo = j->task_lo[t], D = j->D, F = j->F;
    long n = j->first[e] + j->count[e] - lo;
    if (n > EXPERT_TOKENS) n = EXPERT_TOKENS;
    const long L = EXPERT_TOKENS;
    float *xT = (float *)mf_scratch(0, expert_scratch(D, F));
    if (!xT) {
        j->failed = 1;
        return;
    }
    float *hT = xT + D * L, *yT = hT + 2 * F * L, *buf = yT + D * L;
    for (long c = 0; c < n; c++) {
        const float *xr = j->x + j->pair_tok[lo + c] * D;
        for (long d = 0; d < D; d++) xT[d * L + c] = xr[d];
    }
    weight_product(j->gate_up + e * 2 * F * D, 2 * F, D, xT, L, hT, L, n, buf);         /* (2F, n) */
    for (long i = 0; i < F; i++) silu_mul(hT + i * L, hT + (F + i) * L, n);            /* a^T in hT[0:F] */
    weight_product(j->down + e * D * F, D, F, hT, L, yT, L, n, buf);                    /* (D, n) */
    for (long c = 0; c < n; c++) {
        float *yr = j->y + (lo + c) * D;
        for (long d = 0; d < D; d++) yr[d] = yT[d * L + c];
    }
}

typedef struct {
    const float *y, *w;          /* (P, D), (T, K) */
    const long *pos;             /* (T, K): the pair index of (t, k) */
    const long *idx;             /* (T, K) expert ids */
    long K, D;
    float *out;
} mix_job;

/* out[t] = sum over t's experts in increasing id of w * y (the order in which Experts.forward's index_add_ adds
 * them: pairs sorted by expert, stably). */
static void mix_range(void *p, long t0, long t1) {
    const mix_job *j = (const mix_job *)p;
    long K = j->K, D = j->D;
    for (long t = t0; t < t1; t++) {
        float *o = j->out + t * D;
        for (long d = 0; d < D; d++) o[d] = 0.f;
        long done = 0;                                   /* bit k set: pair k added */
        for (long s = 0; s < K; s++) {
            long best = -1;
            for (long k = 0; k < K; k++)
                if (!(done >> k & 1) && (best < 0 || j->idx[t * K + k] < j->idx[t * K + best])) best = k;
            done |= 1L << best;
            const float *y = j->y + j->pos[t * K + best] * D;
            float w = j->w[t * K + best];
            for (long d = 0; d < D; d++) o[d] += w * y[d];
        }
    }
}

int mf_prefill_experts(const float *x, long T, long D, const long *topk_idx, const float *topk_w, long K, long E,
                       long F, const unsigned short *gate_up, const unsigned short *down, float *y_PD, float *out) {
    if (K < 1 || K > 63) return -2;
    long P = T * K, ntask = 0;
    long *mem = (long *)mf_scratch(1, sizeof(long) * (size_t)(3 * E + 2 * P + 2 * (P / EXPERT_TOKENS + E + 1)));
    if (!mem) return -1;
    long *count = mem, *first = count + E, *fill = first + E, *pair_tok = fill + E, *pos = pair_tok + P;
    long *task_e = pos + P, *task_lo = task_e + P / EXPERT_TOKENS + E + 1;
    for (long e = 0; e < E; e++) count[e] = 0;
    for (long i = 0; i < P; i++) {
        if (topk_idx[i] < 0 || topk_idx[i] >= E) return -2;
        count[topk_idx[i]]++;
    }
    for (long e = 0, acc = 0; e < E; e++) {
        first[e] = fill[e] = acc;
        acc += count[e];
        for (long lo = first[e]; lo < acc; lo += EXPERT_TOKENS) task_e[ntask] = e, task_lo[ntask++] = lo;
    }
    for (long i = 0; i < P; i++) {                       /* tokens ascending within each expert */
        long s = fill[topk_idx[i]]++;
        pair_tok[s] = i / K;
        pos[i] = s;
    }
    experts_job j = {x, pair_tok, first, count, task_e, task_lo, D, F, (const uint16_t *)gate_up,
                     (const uint16_t *)down, y_PD, 0};
    mf_parallel(ntask, expert_task, &j);
    if (j.failed) return -1;
    mix_job m = {y_PD, topk_w, pos, topk_idx, K, D, out};
    mf_parallel_ranges(T, 1, mix_range, &m);
    return 0;
}

/* ------------------------------------------------------------------------------------------------ panels */

#define PANEL_ROWS 32        /* rows of x per task of mf_prefill_panels */
#define PANEL_GROUP 8        /* panels (of 16 outputs) per task */

typedef struct {
    const float *x;
    const uint16_t *wp;
    float *y;
    long ldx, ldy, M, N, K, nb;
} panels_job;

static void panels_task(void *p, long t) {
    const panels_job *j = (const panels_job *)p;
    long m0 = (t % j->nb) * PANEL_ROWS, p0 = (t / j->nb) * PANEL_GROUP;
    long m = j->M - m0 < PANEL_ROWS ? j->M - m0 : PANEL_ROWS;
    long n = j->N - p0 * 16 < PANEL_GROUP * 16 ? j->N - p0 * 16 : PANEL_GROUP * 16;
    mf_gemm_bf16p(j->x + m0 * j->ldx, j->ldx, j->wp + p0 * j->K * 16, j->y + m0 * j->ldy + p0 * 16, j->ldy, m, n,
                  j->K);                                            /* nested in a pool task: runs on this thread */
}

/* mf_gemm_bf16p for many rows: tasks of 32 rows x 8 panels. mf_gemm_bf16p splits by panels only, and not a
 * product of fewer than 2^16 weights (o_proj of a small model), which prefill then ran on one thread. Each
 * output is the panel kernel's, computed the same way whatever the split (rows are independent). */
void mf_prefill_panels(const float *x, long ldx, const unsigned short *wp, float *y, long ldy, long M, long N,
                       long K) {
    long nb = (M + PANEL_ROWS - 1) / PANEL_ROWS, np = (N + 15) / 16;
    panels_job j = {x, (const uint16_t *)wp, y, ldx, ldy, M, N, K, nb};
    mf_parallel(nb * ((np + PANEL_GROUP - 1) / PANEL_GROUP), panels_task, &j);
}

/* ------------------------------------------------------------------------------------------------ attention */

/* One query row's scores s (n) against keys at positions kp (floats, exact below 2^24; < 0: not a key) -> its
 * softmax with the sink logit in the denominator, in place: keys the row may not see (later, or window or more
 * positions back) get 0. */
#ifdef AVX512
AVX512 static float mask_scale_max_avx512(float *s, const float *kp, long n, float qp, float lo, float scale) {
    __m512 m = _mm512_set1_ps(-INFINITY), q = _mm512_set1_ps(qp), l = _mm512_set1_ps(lo);
    __m512 sc = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY), zero = _mm512_setzero_ps();
    for (long i = 0; i < n; i += 16) {
        __mmask16 t = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 k = _mm512_maskz_loadu_ps(t, kp + i);
        __mmask16 ok = _mm512_cmp_ps_mask(k, zero, _CMP_GE_OQ) & _mm512_cmp_ps_mask(k, q, _CMP_LE_OQ)
                       & _mm512_cmp_ps_mask(k, l, _CMP_GT_OQ) & t;
        __m512 v = _mm512_mask_mul_ps(ninf, ok, _mm512_maskz_loadu_ps(t, s + i), sc);
        _mm512_mask_storeu_ps(s + i, t, v);
        m = _mm512_max_ps(m, v);
    }
    return _mm512_reduce_max_ps(m);
}

AVX512 static void scale_avx512(float *s, long n, float f) {
    __m512 fv = _mm512_set1_ps(f);
    for (long i = 0; i < n; i += 16) {
        __mmask16 t = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(s + i, t, _mm512_mul_ps(_mm512_maskz_loadu_ps(t, s + i), fv));
    }
}
#endif

static void row_softmax(float *s, const float *kp, long n, float qp, float window, float scale, const float *sink) {
    float lo = qp - window, m;                               /* key p visible iff 0 <= p <= qp and p > qp - window */
#ifdef AVX512
    if (have_avx512()) {
        m = mask_scale_max_avx512(s, kp, n, qp, lo, scale);
    } else
#endif
    {
        m = -INFINITY;
        for (long i = 0; i < n; i++) {
            s[i] = kp[i] >= 0 && kp[i] <= qp && kp[i] > lo ? s[i] * scale : -INFINITY;
            m = s[i] > m ? s[i] : m;
        }
    }
    if (sink && *sink > m) m = *sink;
    float sum = exp_sub_sum(s, n, m);
    if (sink) sum += expf(*sink - m);
    float inv = 1.0f / sum;
#ifdef AVX512
    if (have_avx512()) {
        scale_avx512(s, n, inv);
        return;
    }
#endif
    for (long i = 0; i < n; i++) s[i] *= inv;
}

typedef struct {
    const float *q, *k, *v;      /* new rows: q (N, nq, d), k (N, h, d), v (N, h, dv) with row strides */
    long q_sr, k_sr, v_sr;
    const long *pos;             /* (N,) positions of the new rows */
    const long *seq_lo;          /* (B + 1,) flat row ranges of the sequences */
    const void *k_pool, *v_pool;    /* (h, S, d), (h, S, dv), fp32 or (kv_bf16) bf16 */
    long S;
    int kv_bf16;
    const long *read_slots, *past_pos;   /* (B, P): cached keys' slots and positions (-1: not a key) */
    long P, nq, h, d, dv;
    float window;                /* INFINITY: no window */
    const float *sinks;          /* (nq,) or NULL */
    float scale;
    float *out;                  /* (N, nq, dv) */
    const long *task_b, *task_lo, *key_off;   /* key_off (B + 1,): sequence b's keys start at key_off[b] */
    float *keys, *kpos;          /* per (b, g): K^T (d, Kb) then V (Kb, dv), Kb = P + rows of b; key positions */
    long maxk;
    _Atomic int failed;          /* a task found no scratch */
} attn_job;

/* Sequence b's keys (its P cached slots, then its new rows) for kv head g, gathered once for all its query
 * blocks: K transposed (the B side of S = Q . K^T), V as is. */
static float *keys_of(const attn_job *j, long b, long g) {
    long Kb = j->key_off[b + 1] - j->key_off[b];
    return j->keys + (j->key_off[b] * j->h + g * Kb) * (j->d + j->dv);
}

static void gather_task(void *p, long t) {
    const attn_job *j = (const attn_job *)p;
    long b = t / j->h, g = t % j->h, d = j->d, dv = j->dv, P = j->P;
    long Kb = j->key_off[b + 1] - j->key_off[b];
    float *kT = keys_of(j, b, g), *vv = kT + Kb * d;
    for (long c = 0; c < Kb; c++) {
        const float *kr, *vr;
        if (c < P && j->kv_bf16) {                       /* bf16 cache: exact fp32 values, straight into place */
            long slot = j->read_slots[b * P + c];
            const uint16_t *k16 = (const uint16_t *)j->k_pool + (g * j->S + slot) * d;
            for (long i = 0; i < d; i++) kT[i * Kb + c] = bf16f(k16[i]);
            to_f32((const uint16_t *)j->v_pool + (g * j->S + slot) * dv, dv, vv + c * dv);
            continue;
        }
        if (c < P) {
            long slot = j->read_slots[b * P + c];
            kr = (const float *)j->k_pool + (g * j->S + slot) * d;
            vr = (const float *)j->v_pool + (g * j->S + slot) * dv;
        } else {
            long r = j->seq_lo[b] + c - P;
            kr = j->k + r * j->k_sr + g * d;
            vr = j->v + r * j->v_sr + g * dv;
        }
        for (long i = 0; i < d; i++) kT[i * Kb + c] = kr[i];
        memcpy(vv + c * dv, vr, sizeof(float) * (size_t)dv);
    }
}

/* Task: query rows [lo, lo + QUERY_ROWS) of sequence b, every head, over the key columns [c0, c1) that some row
 * of the block may see: per query head S = Q . K^T, masked softmax with the sink, O = P . V. */
static void attn_task(void *p, long t) {
    attn_job *j = (attn_job *)p;
    long b = j->task_b[t], lo = j->task_lo[t], hi = j->seq_lo[b + 1];
    if (hi > lo + QUERY_ROWS) hi = lo + QUERY_ROWS;
    long R = hi - lo, d = j->d, dv = j->dv, h = j->h, G = j->nq / h;
    long Kb = j->key_off[b + 1] - j->key_off[b];
    const float *kp = j->kpos + j->key_off[b];
    float qmin = (float)j->pos[lo], qmax = qmin;
    for (long r = lo; r < hi; r++) {
        qmin = j->pos[r] < qmin ? (float)j->pos[r] : qmin;
        qmax = j->pos[r] > qmax ? (float)j->pos[r] : qmax;
    }
    long c0 = Kb, c1 = 0;
    for (long c = 0; c < Kb; c++)
        if (kp[c] >= 0 && kp[c] <= qmax && kp[c] > qmin - j->window) {
            c0 = c < c0 ? c : c0;
            c1 = c + 1;
        }
    float *s = (float *)mf_scratch(0, sizeof(float) * (size_t)(QUERY_ROWS * j->maxk));
    if (!s) {
        j->failed = 1;
        return;
    }
    long n = c1 > c0 ? c1 - c0 : 0;
    for (long g = 0; g < h; g++) {
        const float *kT = keys_of(j, b, g), *vv = kT + Kb * d;
        for (long hq = g * G; hq < (g + 1) * G; hq++) {
            float *o = j->out + (lo * j->nq + hq) * dv;
            if (n == 0) {                                    /* no key (cannot happen for a real row): zeros */
                for (long r = 0; r < R; r++) memset(o + r * j->nq * dv, 0, sizeof(float) * (size_t)dv);
                continue;
            }
            product(j->q + lo * j->q_sr + hq * d, j->q_sr, R, kT + c0, Kb, d, s, n, n);       /* (R, n) */
            for (long r = 0; r < R; r++)
                row_softmax(s + r * n, kp + c0, n, (float)j->pos[lo + r], j->window, j->scale,
                            j->sinks ? j->sinks + hq : NULL);
            product(s, n, R, vv + c0 * dv, dv, n, o, j->nq * dv, dv);                           /* (R, dv) */
        }
    }
}

int mf_prefill_attn(const float *q, long q_sr, const float *k, long k_sr, const float *v, long v_sr, const long *pos,
                    const long *seq_lo, long B, const void *k_pool, const void *v_pool, long S, int kv_bf16,
                    const long *read_slots, const long *past_pos, long P, long nq, long h, long d, long dv,
                    long window, const float *sinks, float scale, float *out) {
    if (h < 1 || nq % h || B < 0 || P < 0) return -2;
    long n = 0, maxk = 1;
    for (long b = 0; b < B; b++) {
        long len = seq_lo[b + 1] - seq_lo[b];
        if (len < 0) return -2;
        n += (len + QUERY_ROWS - 1) / QUERY_ROWS;
        maxk = P + len > maxk ? P + len : maxk;
    }
    long nkeys = B * P + (seq_lo[B] - seq_lo[0]);
    char *mem = (char *)mf_scratch(1, sizeof(long) * (size_t)(2 * n + B + 1) +
                                          sizeof(float) * (size_t)(nkeys * (1 + h * (d + dv))));
    if (!mem) return -1;
    long *task_b = (long *)mem, *task_lo = task_b + n, *key_off = task_lo + n, t = 0;
    float *kpos = (float *)(key_off + B + 1), *keys = kpos + nkeys;
    key_off[0] = 0;
    for (long b = 0; b < B; b++) {
        key_off[b + 1] = key_off[b] + P + seq_lo[b + 1] - seq_lo[b];
        for (long c = 0; c < P; c++) kpos[key_off[b] + c] = (float)past_pos[b * P + c];
        for (long r = seq_lo[b]; r < seq_lo[b + 1]; r++) kpos[key_off[b] + P + r - seq_lo[b]] = (float)pos[r];
        for (long lo = seq_lo[b]; lo < seq_lo[b + 1]; lo += QUERY_ROWS) task_b[t] = b, task_lo[t++] = lo;
    }
    attn_job j = {q, k, v, q_sr, k_sr, v_sr, pos, seq_lo, k_pool, v_pool, S, kv_bf16, read_slots, past_pos, P, nq, h, d, dv,
                  window > 0 ? (float)window : INFINITY, sinks, scale, out, task_b, task_lo, key_off, keys, kpos,
                  maxk, 0};
    mf_parallel(B * h, gather_task, &j);
    mf_parallel(n, attn_task, &j);
    return j.failed ? -1 : 0;
}
