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
 * path, so the logits and drafts are the same bit for bit (tests/test_speculative.py compares them); where the one
 * wanted row is the last (a lone sequence's pass), the rows before it only compute and store their K/V
 * (mf_decode_layer_from: a row's output does not depend on the rows it runs with); with none (R = 0) the pass only
 * stores the rows' K/V (a catch-up: engine/runner.py's fill_mtp_kv) and returns before final_layernorm.
 *
 * work: at least N * 3H + R * H floats (u, x, the picked rows). -> 0, -1 a token id outside [0, V), -2 a cache
 * slot or chunk id out of range, -3 out of memory.
 */
#include <math.h>
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
    /* one wanted row, the last: the rows before it only store their K/V (mf_decode_layer_from; the same values);
     * none (R = 0): every row only stores its K/V (a catch-up) */
    long from = R == 0 ? N : rows != NULL && R == 1 && rows[0] == N - 1 ? N - 1 : 0;
    int rc = mf_decode_layer_from(L, x, N, from, (const float *)(intptr_t)attn[0], (const float *)(intptr_t)attn[1],
                                  (const long *)(intptr_t)attn[2], (const long *)(intptr_t)attn[3], attn[4], attn[5],
                                  attn[6], (const long *)(intptr_t)attn[7], (const float *)(intptr_t)attn[8], chosen);
    if (rc) return rc == -1 ? -2 : -3;
    if (R == 0) return 0;
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

/* The sliding kind's rows-path metadata of one pass (engine/runner.py's _ring_rows, the reference: a test compares
 * the drafts), for its slices (ring id, first position, rows, key_from, output index: MF_SLICE_FIELDS each): per row
 * its position (the RoPE row) and ring (a one-chunk table), the write slot ring * R + p % R, the keys K (top + 1 before
 * any ring wraps, else R) and the mask: slot j holds, for a row at position p, position j (unwrapped) or the newest
 * position <= p that maps to it; it is a key iff that position is >= 0, <= p, within p's window (p - w < it) and not
 * before key_from. A mask with no -inf entry is dropped (NULL): adding 0 changes no score. -> the rows, or -2.
 * (speculate.c makes the verification's and the draft passes' sliding metadata with it too.) */
long mf_ring_rows(const int64_t *sl, long n_slices, long R, long w, long *pos, long *rings, long *slots,
                      long *rows, float *bias, long *K, int *masked) {
    long N = 0, top = 0;
    for (long s = 0; s < n_slices; s++, sl += MF_SLICE_FIELDS) {
        if (sl[2] < 1 || sl[1] < 0 || N + sl[2] > MF_CHAIN_ROWS) return -2;
        for (long i = 0; i < sl[2]; i++, N++) {
            pos[N] = sl[1] + i;
            rings[N] = sl[0];
            slots[N] = sl[0] * R + pos[N] % R;
            if (pos[N] > top) top = pos[N];
        }
        rows[s] = N - 1;
    }
    long keys = top < R ? top + 1 : R;
    *K = keys;
    *masked = 0;
    sl -= n_slices * MF_SLICE_FIELDS;
    for (long s = 0, r = 0; s < n_slices; s++, sl += MF_SLICE_FIELDS)
        for (long i = 0; i < sl[2]; i++, r++) {
            long p = pos[r], kf = sl[3];
            for (long j = 0; j < keys; j++) {
                long at = top < R ? j : p - (((p - j) % R) + R) % R;
                int ok = at >= 0 && at <= p && p - at < w && at >= kf;
                bias[r * keys + j] = ok ? 0.f : -INFINITY;
                *masked |= !ok;
            }
        }
    return N;
}

/* A greedy speculative cycle's draft passes in one call: pass p (MF_PASS_FIELDS int64 values, eps[p] = enorm's,
 * hnorm's and final_layernorm's eps) is mf_mtp_pass over its slices' rows (its metadata from ring_rows, the RoPE rows
 * read from the cos/sin tables by position), each slice's last row's argmax (mapped through vocab, the reduced draft
 * vocabulary's token ids, when not NULL) written to out at the slice's output index. A pass's ids may name a draft
 * of an earlier pass instead of a token: id -(1 + i) reads out[i] (put in place in ids before the pass runs), which
 * is how draft n feeds the rows of the passes after it. Pass fields: layer args, N, ids (N,), hidden (N, H) rows,
 * their stride, enorm / hnorm weights, eh_proj weight or panels, whether panels, chosen (N, 1), number of slices,
 * the first one's index in `slices`, final_layernorm weight. emb (V, H). work: MF_CHAIN_ROWS * (4H + R) floats (the
 * passes' mf_mtp_pass work, then the mask); logits (R, S) for the most slices a pass has. R = ring slots, w = the
 * window (swa_keys). -> 0 or mf_mtp_pass's error. */
enum { MF_PASS_FIELDS = 13 };

long mf_mtp_chain(long n, const int64_t *passes, const float *eps, const int64_t *slices, const unsigned short *emb,
                  long V, long emb_h, const float *cos_, const float *sin_, long R, long w, const uint16_t *head_w,
                  int head_panels, long S, const long *vocab, float *work, float *logits, long *out) {
    long pos[MF_CHAIN_ROWS], rings[MF_CHAIN_ROWS], slots[MF_CHAIN_ROWS], rows[MF_CHAIN_ROWS], tok[MF_CHAIN_ROWS];
    float *bias = work + MF_CHAIN_ROWS * 4 * emb_h;          /* after the most mf_mtp_pass's work may take */
    for (long p = 0; p < n; p++) {
        const int64_t *f = passes + p * MF_PASS_FIELDS;
        const int64_t *sl = slices + f[11] * MF_SLICE_FIELDS;
        long N = f[1], ns = f[10], K;
        int masked;
        long *ids = (long *)(intptr_t)f[2];
        if (N > MF_CHAIN_ROWS || ns > N || ns < 1) return -2;
        long got = mf_ring_rows(sl, ns, R, w, pos, rings, slots, rows, bias, &K, &masked);
        if (got != N) return -2;
        for (long i = 0; i < N; i++)
            if (ids[i] < 0) ids[i] = out[-ids[i] - 1];
        int64_t attn[9] = {(intptr_t)cos_, (intptr_t)sin_, (intptr_t)pos, (intptr_t)rings, 1, R, K, (intptr_t)slots,
                           masked ? (intptr_t)bias : 0};
        long rc = mf_mtp_pass((const mf_layer *)(intptr_t)f[0], N, ids, (const float *)(intptr_t)f[3], f[4], emb, V,
                              (const float *)(intptr_t)f[5], eps[3 * p], (const float *)(intptr_t)f[6], eps[3 * p + 1],
                              (const uint16_t *)(intptr_t)f[7], (int)f[8], attn, (long *)(intptr_t)f[9], ns, rows,
                              (const float *)(intptr_t)f[12], eps[3 * p + 2], head_w, head_panels, S, work, logits,
                              tok);
        if (rc) return rc;
        for (long s = 0; s < ns; s++) out[sl[s * MF_SLICE_FIELDS + 4]] = vocab ? vocab[tok[s]] : tok[s];
    }
    return 0;
}
