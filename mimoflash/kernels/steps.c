/* Several greedy decode steps in one call: the loop that engine/runner.py's multi-step run (docs/ENGINE.md,
 * "Multi-step decoding") would otherwise drive from Python, where each step's ~100 small Python operations run
 * right after the step has streamed every weight through the caches and cost 10-30x their warm time.
 *
 * Step i, for B sequences: embed tokens[i] (mf_embed_bf16), each decoder layer (mf_decode_layer, with the step's
 * metadata for the layer's attention kind), the final RMSNorm (mf_rms_norm), the lm_head product, then
 * tokens[i + 1] = the greedy argmax (mf_argmax_rows):
 * the same calls, in the same order, on the same arguments as one Python step (engine/fused_decode.py, the model's
 * final norm and lm_head, sampling.sample for greedy rows), so the tokens are the same bit for bit. The run stops
 * after the first step in which a row's token is one of its stop ids (eos, stop_token_ids).
 *
 * The lm_head is read as head_kind says (mf_product's kinds): MF_BF16, its (V, H) bf16 weight row-major
 * (mf_gemm_bf16w); MF_PANELS, its panels (mf_gemm_bf16p); MF_FP8, (V, H) E4M3 bytes with the fp32 scale grid head_s
 * (ceil(V / head_br), ceil(H / head_bc)) row-major (mf_gemm_fp8w: the opt-in block-FP8 head, engine/fp8_layout.py
 * `quantize_lm_head`, whose module calls the same kernel on the same arguments).
 *
 * The per-step metadata is made by the runner beforehand, one row of 2 x MF_STEP_FIELDS int64 values per step
 * (kind 0 = global attention, 1 = sliding window): cos table, sin table, rope rows (B,), chunk table (B, n_chunks),
 * n_chunks, chunk, K, write slots (B,), bias (B, K) or 0, all as mf_decode_layer takes them.
 *
 * chosen is an (n, L) table of addresses: step i's layer l writes its (B, top_k) routed expert ids at chosen[i * L + l]
 * (unused for dense layers). Each step keeps its own, so that an FP8 model's expert store can count every step's
 * experts after the run (engine/fp8_layout.py, RunExperts.account) as the per-step path counts them.
 *
 * hidden: NULL, or (n, B, H) floats: step i's final hidden states (the residual stream before the final norm, what
 * an MTP block reads) at hidden + i * B * H, so that an engine with MTP blocks keeps them across a run
 * (engine/speculative.py, MTPDrafter.observe).
 */
#include <string.h>

#include "mimoflash_kernels.h"

enum { MF_STEP_FIELDS = 9 };

long mf_decode_steps(long n, long B, long L, const int64_t *layers, const long *sliding, const int64_t *chosen,
                     const int64_t *step_args, const unsigned short *emb, long V, long H, const float *norm_w,
                     float eps, const void *head_w, int head_kind, const float *head_s, long head_br, long head_bc,
                     float *x, float *xn, float *logits, long *tokens, const long *stop_ids, const long *stop_off,
                     float *hidden) {
    if (head_kind == MF_FP8 && (!head_s || head_br <= 0 || head_bc <= 0)) return -4;
    if (head_kind != MF_BF16 && head_kind != MF_PANELS && head_kind != MF_FP8) return -4;
    for (long i = 0; i < n; i++) {
        const long *ids = tokens + i * B;
        long *next = tokens + (i + 1) * B;
        if (mf_embed_bf16(ids, B, emb, V, H, x)) return -1;
        for (long l = 0; l < L; l++) {
            const int64_t *a = step_args + (i * 2 + (sliding[l] ? 1 : 0)) * MF_STEP_FIELDS;
            int rc = mf_decode_layer((const mf_layer *)(intptr_t)layers[l], x, B, (const float *)(intptr_t)a[0],
                                     (const float *)(intptr_t)a[1], (const long *)(intptr_t)a[2],
                                     (const long *)(intptr_t)a[3], a[4], a[5], a[6], (const long *)(intptr_t)a[7],
                                     (const float *)(intptr_t)a[8], (long *)(intptr_t)chosen[i * L + l]);
            if (rc) return rc == -1 ? -2 : -3;
        }
        if (hidden) memcpy(hidden + i * B * H, x, sizeof(float) * (size_t)(B * H));
        mf_rms_norm(x, H, norm_w, xn, H, B, H, eps);
        if (head_kind == MF_FP8) {
            if (mf_gemm_fp8w(xn, H, head_w, head_s, (H + head_bc - 1) / head_bc, logits, V, B, V, H, head_br,
                             head_bc))
                return -3;
        } else if (head_kind == MF_PANELS)
            mf_gemm_bf16p(xn, H, head_w, logits, V, B, V, H);
        else
            mf_gemm_bf16w(xn, H, head_w, logits, V, B, V, H);
        mf_argmax_rows(logits, V, B, V, next);
        for (long b = 0; b < B; b++)
            for (long s = stop_off[b]; s < stop_off[b + 1]; s++)
                if (next[b] == stop_ids[s]) return i + 1;
    }
    return n;
}
