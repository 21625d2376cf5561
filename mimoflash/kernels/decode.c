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

typedef struct {
    long H, nq, nkv, d, dv, rd;
    float eps_in, eps_post, scale, v_scale;
    const float *in_norm, *post_norm, *sinks;        /* sinks may be NULL */
    const unsigned short *qkv_w, *o_w;               /* (W, H), (H, nq * dv) bf16 */
    float *k_pool, *v_pool;                          /* (nkv, S, d), (nkv, S, dv) fp32, contiguous */
    long pool_slots;                                 /* S */
    int moe;
    const unsigned short *gate_w, *up_w, *down_w;    /* dense: (F, H), (F, H), (H, F) bf16 */
    long F_dense;
    const float *router_w, *router_bias;             /* MoE: (E, H), (E,) fp32 */
    long E, top_k;
    int norm_topk;
    float scaling;
    const unsigned short *gate_up, *down;            /* (E, 2F, H), (E, H, F) bf16 */
    long F_moe;
} mf_layer;

int mf_gemm_bf16w(const float *x, long ldx, const unsigned short *w, float *y, long ldy, long M, long N, long K);
void mf_rms_norm(const float *x, long ldx, const float *w, float *y, long ldy, long M, long D, float eps);
void mf_qkv_rope(float *qkv, long ld, long N, long heads, long d, long rd, const float *cos_, const float *sin_,
                 long v_off, long v_len, float v_scale);
void mf_silu_mul(const float *h, long ldh, float *out, long ldo, long M, long F);
int mf_attn_decode(const float *q, long q_sb, const float *k_base, long k_sh, long k_sb, const float *v_base,
                   long v_sh, long v_sb, const float *bias, const float *sinks, float *out, long B, long nq, long h,
                   long K, long d, long dv, float scale, float *scratch, const long *table, long n_chunks, long chunk,
                   long pool_chunks);
int mf_moe_token_bf16(const float *x, long D, const float *router_w, const float *bias, long E, long top_k,
                      int norm_topk, float scaling, const unsigned short *gate_up, const unsigned short *down, long F,
                      float *y, float *scratch, long *chosen);

/* x (H) fp32 is updated in place. cos/sin: this position's (rd) rows for the layer's attention kind. The token's
 * K/V go to pool slot `slot`; keys 0..K-1 are read through table (n_chunks chunk ids of `chunk` slots), bias (K)
 * additive or NULL. chosen: top_k expert ids out (MoE). Returns 0; -1 on a bad table; -2 out of memory. */
int mf_decode_layer(const mf_layer *L, float *x, const float *cos_, const float *sin_, const long *table,
                    long n_chunks, long chunk, long K, long slot, const float *bias, long *chosen) {
    long H = L->H, nq = L->nq, nkv = L->nkv, d = L->d, dv = L->dv, S = L->pool_slots;
    long Wq = (nq + nkv) * d, W = Wq + nkv * dv;
    long F = L->moe ? L->F_moe : L->F_dense;
    if (slot < 0 || slot >= S) return -1;
    size_t n = (size_t)(H + W + nq * dv + H + (K > 0 ? K : 1) + 3 * F + (L->moe ? L->E + H : 0) + 2 * F);
    float *buf = (float *)malloc(sizeof(float) * n);
    if (!buf) return -2;
    float *xn = buf, *qkv = xn + H, *o = qkv + W, *y = o + nq * dv, *scores = y + H, *ffn = scores + (K > 0 ? K : 1);

    mf_rms_norm(x, H, L->in_norm, xn, H, 1, H, L->eps_in);
    mf_gemm_bf16w(xn, H, L->qkv_w, qkv, W, 1, W, H);
    mf_qkv_rope(qkv, W, 1, nq + nkv, d, L->rd, cos_, sin_, Wq, nkv * dv, L->v_scale);
    for (long hh = 0; hh < nkv; hh++) {             /* store first: the ring has room for this token's key */
        memcpy(L->k_pool + (hh * S + slot) * d, qkv + nq * d + hh * d, sizeof(float) * d);
        memcpy(L->v_pool + (hh * S + slot) * dv, qkv + Wq + hh * dv, sizeof(float) * dv);
    }
    int rc = mf_attn_decode(qkv, 0, L->k_pool, S * d, 0, L->v_pool, S * dv, 0, bias, L->sinks, o, 1, nq, nkv, K, d,
                            dv, L->scale, scores, table, n_chunks, chunk, S / chunk);
    if (rc) { free(buf); return rc; }
    mf_gemm_bf16w(o, nq * dv, L->o_w, y, H, 1, H, nq * dv);
    for (long i = 0; i < H; i++) x[i] += y[i];

    mf_rms_norm(x, H, L->post_norm, xn, H, 1, H, L->eps_post);
    if (L->moe) {
        if (mf_moe_token_bf16(xn, H, L->router_w, L->router_bias, L->E, L->top_k, L->norm_topk, L->scaling,
                              L->gate_up, L->down, F, y, ffn, chosen)) { free(buf); return -2; }
    } else {
        float *gu = ffn, *act = ffn + 2 * F;
        mf_gemm_bf16w(xn, H, L->gate_w, gu, F, 1, F, H);
        mf_gemm_bf16w(xn, H, L->up_w, gu + F, F, 1, F, H);
        mf_silu_mul(gu, 2 * F, act, F, 1, F);
        mf_gemm_bf16w(act, F, L->down_w, y, H, 1, H, F);
    }
    for (long i = 0; i < H; i++) x[i] += y[i];
    free(buf);
    return 0;
}
