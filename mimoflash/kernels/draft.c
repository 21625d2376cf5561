/* An MTP block's draft pass in one call: what engine/fused_decode.py's FusedMTPLayer.forward, the draft head and
 * the greedy argmax run from Python as a dozen calls with torch between them (~0.1 ms a pass on the shipped model,
 * as much as the pass's arithmetic; docs/MTP.md, "What limits it here").
 *
 * For N rows (ids, the main model's hidden states at their positions): e = embed(ids) (mf_embed_bf16); u =
 * [enorm(e) | hnorm(h)] (two mf_rms_norm calls writing the two halves of one (N, 2H) row); x = eh_proj(u) on its
 * panels or row-major weight; the block's attention + dense MLP (mf_decode_layer, reading and writing the block's
 * own ring through the same per-kind metadata as steps.c: cos table, sin table, rope rows (N,), chunk table, n_chunks,
 * chunk, K, write slots (N,), bias (N, K) or 0); the R wanted rows (rows[], or all N when rows is NULL) through
 * final_layernorm; the head product (panels or row-major, S outputs: the full vocabulary or a reduced draft one);
 * with tokens not NULL, each row's argmax. The same calls on the same arguments in the same order as the Python
 * path, so the logits and drafts are the same bit for bit (tests/test_speculative.py compares them).
 *
 * work: at least N * 3H + R * H floats (u, x, the picked rows). -> 0, -1 a token id outside [0, V), -2 a cache
 * slot or chunk id out of range, -3 out of memory.
 */
#include <string.h>

#include "mimoflash_kernels.h"

long mf_mtp_pass(const mf_layer *L, long N, const long *ids, const float *hidden, long ldh, const unsigned short *emb,
                 long V, const float *enorm_w, float enorm_eps, const float *hnorm_w, float hnorm_eps,
                 const uint16_t *eh_w, int eh_panels, const int64_t *attn, long *chosen, long R, const long *rows,
                 const float *final_w, float final_eps, const uint16_t *head_w, int head_panels, long S,
                 float *work, float *logits, long *tokens) {
    long H = L->H;
    float *u = work, *x = work + N * 2 * H, *picked = x + N * H;
    float *e = x;                                    /* the embeddings: x is free until eh_proj writes it */
    if (R > N) return -2;
    if (mf_embed_bf16(ids, N, emb, V, H, e)) return -1;
    mf_rms_norm(e, H, enorm_w, u, 2 * H, N, H, enorm_eps);
    mf_rms_norm(hidden, ldh, hnorm_w, u + H, 2 * H, N, H, hnorm_eps);
    if (eh_panels)
        mf_gemm_bf16p(u, 2 * H, eh_w, x, H, N, H, 2 * H);
    else
        mf_gemm_bf16w(u, 2 * H, eh_w, x, H, N, H, 2 * H);
    int rc = mf_decode_layer(L, x, N, (const float *)(intptr_t)attn[0], (const float *)(intptr_t)attn[1],
                             (const long *)(intptr_t)attn[2], (const long *)(intptr_t)attn[3], attn[4], attn[5],
                             attn[6], (const long *)(intptr_t)attn[7], (const float *)(intptr_t)attn[8], chosen);
    if (rc) return rc == -1 ? -2 : -3;
    const float *src = x;
    if (rows != NULL) {
        for (long r = 0; r < R; r++) {
            if (rows[r] < 0 || rows[r] >= N) return -2;
            memcpy(picked + r * H, x + rows[r] * H, sizeof(float) * (size_t)H);
        }
        src = picked;
    }
    mf_rms_norm(src, H, final_w, u, H, R, H, final_eps);        /* u is free again: the normed rows */
    if (head_panels)
        mf_gemm_bf16p(u, H, head_w, logits, S, R, S, H);
    else
        mf_gemm_bf16w(u, H, head_w, logits, S, R, S, H);
    if (tokens != NULL) mf_argmax_rows(logits, S, R, S, tokens);
    return 0;
}
