/* One decoder layer for one decoded token in a single call, from the kernels of wgemm.c and ops.c: the engine's
 * single-request decode step makes one call per layer instead of ~40 torch/ctypes calls, whose fixed cost (~3-15 us
 * each here) was as large as the layer's weight reads. Same math and order as DecoderLayer.forward on the engine's
 * decode path (engine/cpu_layout.py + runner.PagedAttention): pre-norm, fused q|k|v, RoPE on q|k, value scale,
 * K/V stored into the cache slot, sink attention over the paged cache, o_proj, residual, post-norm, dense SwiGLU or
 * routed MoE, residual. The torch path stays the reference (tests/test_kernels.py compares them token by token).
 */
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>

#include "mimoflash_kernels.h"          /* mf_layer and every kernel's prototype */

/* Opt-in phase timers for benchmarks/profile_decode_step.py (kernels.decode_phase_timing): where a decode layer's
 * time goes inside this one call, which a Python-side timer cannot see. Off by default (one branch per phase);
 * on, wall-clock seconds per phase are summed across calls. Single-caller use only (the profile script). */
enum { PH_QKV, PH_ROPE_STORE, PH_ATTN, PH_O, PH_EXPERTS, PH_DENSE, PH_N };
static int g_timing;
static double g_phase_s[PH_N];

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* on: 1 starts (and zeroes) the timers, 0 stops them; out (PH_N doubles) receives the sums when not NULL. */
void mf_decode_timing(int on, double *out) {
    if (out)
        for (int i = 0; i < PH_N; i++) out[i] = g_phase_s[i];
    if (on)
        for (int i = 0; i < PH_N; i++) g_phase_s[i] = 0.0;
    g_timing = on;
}

#define PHASE_END(ph)                                                                                                 \
    if (g_timing) {                                                                                                   \
        double t_ = now_s();                                                                                          \
        g_phase_s[ph] += t_ - t0;                                                                                     \
        t0 = t_;                                                                                                      \
    }

/* n floats -> bf16 at dst, rounded to nearest even as torch's .to(torch.bfloat16) does (NaN as 0x7fc0), so the
 * cache holds the same bits whichever path stored a token. */
static void store_bf16(unsigned short *dst, const float *src, long n) {
    for (long i = 0; i < n; i++) {
        unsigned u;
        memcpy(&u, src + i, sizeof u);
        if ((u & 0x7fffffffu) > 0x7f800000u) dst[i] = 0x7fc0;                 /* NaN: torch stores 0x7fc0 */
        else dst[i] = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

/* The routed experts of n listed experts over their rows: rows[i] rows of x (P, D), sorted by expert, go through
 * expert ex[i] into y (P, D), unweighted: down(silu(gate x) * up x) per row. Two parallel regions for all of them
 * (mf_gemm_group): every expert's gate|up product (its weights read once for all its rows), then, after the SiLU,
 * every expert's down product; one region per product (as before) cost a thread hand-off per expert and product.
 * h: 2 F P floats of scratch (a row's gate | up, then its activation in place). -> 0, or -1 out of memory (FP8). */
int mf_experts_rows(const mf_expert *ex, long n, const long *rows, const float *x, long ldx, long D, long F,
                    long br, long bc, float *h, float *y, long ldy) {
    mf_product p[2 * (n > 0 ? n : 1)];
    long np = 0, P = 0, Dc = bc > 0 ? (D + bc - 1) / bc : 0, Fc = bc > 0 ? (F + bc - 1) / bc : 0;
    for (long i = 0; i < n; P += rows[i], i++) {
        if (!rows[i]) continue;
        const float *xi = x + P * ldx;
        float *hi = h + P * 2 * F;
        if (ex[i].gate_s) {
            p[np++] = (mf_product){MF_FP8, xi, ldx, ex[i].gate, ex[i].gate_s, Dc, br, bc, hi, 2 * F, rows[i], F, D};
            p[np++] = (mf_product){MF_FP8, xi, ldx, ex[i].up, ex[i].up_s, Dc, br, bc, hi + F, 2 * F, rows[i], F, D};
        } else {
            p[np++] = (mf_product){MF_BF16, xi, ldx, ex[i].gate, NULL, 0, 0, 0, hi, 2 * F, rows[i], 2 * F, D};
        }
    }
    if (mf_gemm_group(p, np)) return -1;
    mf_silu_mul(h, 2 * F, h, 2 * F, P, F);                 /* in place: each element reads only its own inputs */
    np = 0;
    for (long i = 0, lo = 0; i < n; lo += rows[i], i++)
        if (rows[i])
            p[np++] = (mf_product){ex[i].gate_s ? MF_FP8 : MF_BF16, h + lo * 2 * F, 2 * F, ex[i].down, ex[i].down_s,
                                   Fc, br, bc, y + lo * ldy, ldy, rows[i], D, F};
    return mf_gemm_group(p, np) ? -1 : 0;
}

/* Experts 0..El-1 of the layer's weights on their expert-sorted rows x_PD (P, H), counts[e] rows for expert e, into
 * y_PD (P, H), unweighted: the experts with rows, bf16 (gate_up / down) or FP8 (L->experts_fp8, six addresses per
 * expert), through mf_experts_rows. ffn: 2 F P floats. -> 0; -2 out of memory. */
static int run_experts(const mf_layer *L, const float *x_PD, const long *counts, long El, float *y_PD, float *ffn) {
    long n = 0, H = L->H, F = L->F_moe;
    long rows[El];
    mf_expert ex[El];
    for (long e = 0; e < El; e++)
        if (counts[e]) {
            rows[n] = counts[e];
            if (L->experts_fp8) {
                const int64_t *q = L->experts_fp8 + 6 * e;
                ex[n] = (mf_expert){(const void *)(intptr_t)q[0], (const void *)(intptr_t)q[2],
                                    (const void *)(intptr_t)q[4], (const float *)(intptr_t)q[1],
                                    (const float *)(intptr_t)q[3], (const float *)(intptr_t)q[5]};
            } else {
                ex[n] = (mf_expert){L->gate_up + e * 2 * F * H, NULL, L->down + e * H * F, NULL, NULL, NULL};
            }
            n++;
        }
    return mf_experts_rows(ex, n, rows, x_PD, H, H, F, L->fp8_br, L->fp8_bc, ffn, y_PD, H) ? -2 : 0;
}

/* The layer's product y (M, N) = x (M, K) @ w^T as mf_gemm_group takes it: w E4M3 bytes with their scale grid s (s
 * not NULL), else bf16 row-major or in panels as the layer's weights are. */
static mf_product layer_product(const mf_layer *L, const float *x, long ldx, const void *w, const float *s, float *y,
                                long ldy, long M, long N, long K) {
    if (s)
        return (mf_product){MF_FP8, x, ldx, w, s, (K + L->fp8_bc - 1) / L->fp8_bc,
                            s == L->qkv_s ? L->qkv_br : L->fp8_br, L->fp8_bc, y, ldy, M, N, K};
    return (mf_product){L->panels ? MF_PANELS : MF_BF16, x, ldx, w, NULL, 0, 0, 0, y, ldy, M, N, K};
}

/* One product of the layer. -> 0, or -2 out of memory (fp8.c's scratch). */
static int layer_gemm(const mf_layer *L, const float *x, long ldx, const void *w, const float *s, float *y,
                      long ldy, long M, long N, long K) {
    mf_product p = layer_product(L, x, ldx, w, s, y, ldy, M, N, K);
    return mf_gemm_group(&p, 1) ? -2 : 0;
}

/* B tokens (one per sequence) through the routed experts [e_lo, e_hi) of the router's E: route each row over all E
 * (chosen gets each row's full top-k), group the pairs whose expert is in the range by expert (counting sort), run
 * every expert once on its rows (run_experts: each expert's weights read once for the batch), and add the weighted
 * rows back; y (B, H) is overwritten. One process passes [0, E); a tensor-parallel rank holds only its experts
 * (L->gate_up / L->down, local id e - e_lo), and y is its share, completed by the caller's reduction over ranks. */
static int moe_rows(const mf_layer *L, const float *xn, long B, float *y, long *chosen, long e_lo, long e_hi) {
    long H = L->H, E = L->E, El = e_hi - e_lo, k = L->top_k, F = L->F_moe, P = B * k;
    size_t nf = (size_t)(E + P + 2 * P * H + 3 * F * P + 1) & ~(size_t)1;    /* even: the longs stay aligned */
    char *mem = (char *)mf_scratch(1, sizeof(float) * nf + sizeof(long) * (size_t)(2 * El + 1 + P));
    if (!mem) return -2;
    float *scores = (float *)mem;
    long *counts = (long *)(mem + sizeof(float) * nf), *order = counts + El + 1, *pos = order + P;
    memset(counts, 0, sizeof(long) * (size_t)(El + 1 + P));
    float *w = scores + E, *x_PD = w + P, *y_PD = x_PD + P * H, *ffn = y_PD + P * H;
    for (long b = 0; b < B; b++) {
        mf_route_row(xn + b * H, H, L->router_w, L->router_bias, E, k, L->norm_topk, L->scaling, scores,
                     chosen + b * k, w + b * k);
        for (long j = 0; j < k; j++)
            if (chosen[b * k + j] >= e_lo && chosen[b * k + j] < e_hi) counts[chosen[b * k + j] - e_lo]++;
    }
    long n = 0;                                         /* local pairs */
    for (long e = 0; e < El; e++) { pos[e] = n; n += counts[e]; }
    for (long p = 0; p < P; p++) {                      /* stable: pairs of one expert keep token order */
        long e = chosen[p] - e_lo;
        if (e < 0 || e >= El) continue;
        long dst = pos[e]++;
        order[dst] = p;
        memcpy(x_PD + dst * H, xn + (p / k) * H, sizeof(float) * H);
    }
    int rc = run_experts(L, x_PD, counts, El, y_PD, ffn);
    if (rc) return rc;
    memset(y, 0, sizeof(float) * (size_t)(B * H));
    for (long q = 0; q < n; q++) {
        long p = order[q];
        float wp = w[p], *yr = y + (p / k) * H;
        const float *src = y_PD + q * H;
        for (long i = 0; i < H; i++) yr[i] += wp * src[i];
    }
    return 0;
}

/* Exported: one token x (1, D) through a routed MoE with bf16 experts gate_up (E, 2F, D), down (E, D, F): routing
 * (mf_route_row) and the experts exactly as the fused decode step's MoE layers run them (moe_rows), so the module
 * path that calls this (engine/cpu_layout.py) and the fused step agree bit for bit. y (1, D); chosen: top_k ids
 * out. -> 0, or -2 out of memory. */
int mf_moe_token_bf16(const float *x, long D, const float *router_w, const float *bias, long E, long top_k,
                      int norm_topk, float scaling, const unsigned short *gate_up, const unsigned short *down, long F,
                      float *y, long *chosen) {
    mf_layer L;
    memset(&L, 0, sizeof L);
    L.H = D;
    L.moe = 1;
    L.router_w = router_w;
    L.router_bias = bias;
    L.E = E;
    L.top_k = top_k;
    L.norm_topk = norm_topk;
    L.scaling = scaling;
    L.gate_up = gate_up;
    L.down = down;
    L.F_moe = F;
    return moe_rows(&L, x, 1, y, chosen, 0, E);
}

/* Scratch floats of each half (below), for B rows and K keys. */
static size_t attn_floats(const mf_layer *L, long B, long K) {
    long W = (L->nq + L->nkv) * L->d + L->nkv * L->dv;
    return (size_t)(B * (L->H + W + L->nq * L->dv) + (K > 0 ? K : 1));
}

static size_t ffn_floats(const mf_layer *L, long B) {
    long F = L->moe ? L->F_moe : L->F_dense;
    return (size_t)(B * L->H + B * 3 * F + (L->moe ? L->E + L->H : 0));
}

/* The attention half; buf: attn_floats of scratch. Every row's K/V is stored; rows from `from` on attend and get
 * their y rows (y holds B - from rows): the others only store their K/V (an MTP draft pass's earlier rows; with
 * from = B, all of them: an MTP block's catch-up). */
static int attn_half(const mf_layer *L, const float *x, long B, long from, const float *cos_, const float *sin_,
                     const long *rope_rows, const long *table, long n_chunks, long chunk, long K, const long *slots,
                     const float *bias, float *y, float *buf) {
    long H = L->H, nq = L->nq, nkv = L->nkv, d = L->d, dv = L->dv, S = L->pool_slots;
    long Wq = (nq + nkv) * d, W = Wq + nkv * dv;
    for (long b = 0; b < B; b++)
        if (slots[b] < 0 || slots[b] >= S) return -1;
    float *xn = buf, *qkv = xn + B * H, *o = qkv + B * W, *scores = o + B * nq * dv;

    double t0 = g_timing ? now_s() : 0.0;
    int rc;
    mf_rms_norm(x, H, L->in_norm, xn, H, B, H, L->eps_in);
    if ((rc = layer_gemm(L, xn, H, L->qkv_w, L->qkv_s, qkv, W, B, W, H))) return rc;
    PHASE_END(PH_QKV)
    if (rope_rows)                                    /* cos/sin: tables indexed by each token's position */
        for (long b = 0; b < B; b++)
            mf_qkv_rope(qkv + b * W, W, 1, nq + nkv, d, L->rd, cos_ + rope_rows[b] * L->rd,
                        sin_ + rope_rows[b] * L->rd, Wq, nkv * dv, L->v_scale);
    else
        mf_qkv_rope(qkv, W, B, nq + nkv, d, L->rd, cos_, sin_, Wq, nkv * dv, L->v_scale);
    /* Rows, not sequences: a sequence verifying k drafts has k + 1 rows here, each with its own position, slot,
     * table row (the sequence's, repeated) and mask row. Every row is stored before any row attends, so a row sees
     * its sequence's earlier rows of this step through the cache, and later ones are masked by its bias row; a ring
     * of swa_keys + max_draft slots holds all k + 1 <= 1 + max_draft of them without evicting a key a row needs. */
    for (long b = 0; b < B; b++)                      /* store first: the ring has room for this token's key */
        for (long hh = 0; hh < nkv; hh++) {
            const float *kn = qkv + b * W + nq * d + hh * d, *vn = qkv + b * W + Wq + hh * dv;
            long ks = (hh * S + slots[b]) * d, vs = (hh * S + slots[b]) * dv;
            if (L->kv_bf16) {
                store_bf16((unsigned short *)L->k_pool + ks, kn, d);
                store_bf16((unsigned short *)L->v_pool + vs, vn, dv);
            } else {
                memcpy((float *)L->k_pool + ks, kn, sizeof(float) * d);
                memcpy((float *)L->v_pool + vs, vn, sizeof(float) * dv);
            }
        }
    PHASE_END(PH_ROPE_STORE)
    long R = B - from;
    if (R == 0) return 0;
    rc = mf_attn_decode(qkv + from * W, W, L->k_pool, S * d, L->v_pool, S * dv, bias ? bias + from * K : NULL,
                        L->sinks, o, R, nq, nkv, K, d, dv, L->scale, scores, table + from * n_chunks, n_chunks,
                        chunk, S / chunk, L->kv_bf16);
    if (rc) return rc;
    PHASE_END(PH_ATTN)
    if ((rc = layer_gemm(L, o, nq * dv, L->o_w, L->o_s, y, H, R, H, nq * dv))) return rc;
    PHASE_END(PH_O)
    return 0;
}

/* The FFN half; buf: ffn_floats of scratch. */
static int ffn_half(const mf_layer *L, const float *x, long B, float *y, long *chosen, long e_lo, long e_hi,
                    float *buf) {
    long H = L->H, F = L->moe ? L->F_moe : L->F_dense;
    float *xn = buf, *ffn = xn + B * H;
    int rc;
    double t0 = g_timing ? now_s() : 0.0;
    mf_rms_norm(x, H, L->post_norm, xn, H, B, H, L->eps_post);
    PHASE_END(PH_O)
    if (L->moe) {
        if ((rc = moe_rows(L, xn, B, y, chosen, e_lo, e_hi))) return rc;
    } else {                        /* gate and up in one parallel region, then the down product */
        float *gu = ffn, *act = ffn + 2 * B * F;
        mf_product p[2] = {layer_product(L, xn, H, L->gate_w, L->gate_s, gu, 2 * F, B, F, H),
                           layer_product(L, xn, H, L->up_w, L->up_s, gu + F, 2 * F, B, F, H)};
        if (mf_gemm_group(p, 2)) return -2;
        mf_silu_mul(gu, 2 * F, act, F, B, F);
        if ((rc = layer_gemm(L, act, F, L->down_w, L->down_s, y, H, B, H, F))) return rc;
    }
    PHASE_END(L->moe ? PH_EXPERTS : PH_DENSE)
    return 0;
}

/* The attention half of a layer: x (B, H) fp32 (not modified) -> y (B, H) = o_proj(attention(in_norm(x))), the
 * tokens' K/V stored into the cache (arguments as mf_decode_layer's). Under tensor parallelism a rank's heads give
 * a partial sum of y, added over the ranks before the residual add (parallel/fused.py). */
int mf_decode_attn(const mf_layer *L, const float *x, long B, const float *cos_, const float *sin_,
                   const long *rope_rows, const long *table, long n_chunks, long chunk, long K, const long *slots,
                   const float *bias, float *y) {
    float *buf = (float *)mf_scratch(0, sizeof(float) * attn_floats(L, B, K));
    if (!buf) return -2;
    return attn_half(L, x, B, 0, cos_, sin_, rope_rows, table, n_chunks, chunk, K, slots, bias, y, buf);
}

/* The FFN half of a layer: x (B, H) fp32 (not modified) -> y (B, H) = the dense SwiGLU or routed experts of
 * post_norm(x); chosen (B, top_k) expert ids out (MoE). The layer's weights hold experts [e_lo, e_hi) of the
 * router's E: [0, E) in one process; a rank's range under expert parallelism, whose y is then that rank's share. */
int mf_decode_ffn(const mf_layer *L, const float *x, long B, float *y, long *chosen, long e_lo, long e_hi) {
    if (L->moe && (e_lo < 0 || e_lo >= e_hi || e_hi > L->E)) return -1;
    float *buf = (float *)mf_scratch(0, sizeof(float) * ffn_floats(L, B));
    if (!buf) return -2;
    return ffn_half(L, x, B, y, chosen, e_lo, e_hi, buf);
}

/* x (B, H) fp32, one decoded token per sequence, updated in place: both halves with their residual adds. cos/sin:
 * (B, rd) rows of the tokens' positions for the layer's attention kind, or, with rope_rows (B,), tables whose row
 * rope_rows[b] is token b's (the caller checks the rows are inside them). Token b's K/V go to pool slot slots[b];
 * its keys 0..K-1 are read through table[b] (n_chunks chunk ids of `chunk` slots), bias (B, K) additive or NULL.
 * chosen: (B, top_k) expert ids out (MoE). Returns 0; -1 on a bad table or slot; -2 out of memory. */
int mf_decode_layer(const mf_layer *L, float *x, long B, const float *cos_, const float *sin_, const long *rope_rows,
                    const long *table, long n_chunks, long chunk, long K, const long *slots, const float *bias,
                    long *chosen) {
    return mf_decode_layer_from(L, x, B, 0, cos_, sin_, rope_rows, table, n_chunks, chunk, K, slots, bias, chosen);
}

/* mf_decode_layer where only rows from `from` on want their output: every row's K/V is stored, the attention, o
 * product and FFN run for rows from .. B - 1 only (x's earlier rows are left as they were; chosen's rows from `from`
 * on are written); from = B stores the K/V only. A row's output does not depend on which other rows a product runs with (the kernels compute each
 * row alone), so those rows come out as mf_decode_layer gives them. */
int mf_decode_layer_from(const mf_layer *L, float *x, long B, long from, const float *cos_, const float *sin_,
                         const long *rope_rows, const long *table, long n_chunks, long chunk, long K,
                         const long *slots, const float *bias, long *chosen) {
    if (from < 0 || from > B) return -1;
    size_t a = attn_floats(L, B, K), f = ffn_floats(L, B);
    float *y = (float *)mf_scratch(0, sizeof(float) * ((size_t)(B * L->H) + (a > f ? a : f)));
    if (!y) return -2;
    float *buf = y + B * L->H, *xr = x + from * L->H;
    long R = B - from;
    int rc = attn_half(L, x, B, from, cos_, sin_, rope_rows, table, n_chunks, chunk, K, slots, bias, y, buf);
    if (rc || R == 0) return rc;
    for (long i = 0; i < R * L->H; i++) xr[i] += y[i];
    if ((rc = ffn_half(L, xr, R, y, chosen + from * (L->moe ? L->top_k : 0), 0, L->E, buf))) return rc;
    for (long i = 0; i < R * L->H; i++) xr[i] += y[i];
    return 0;
}
