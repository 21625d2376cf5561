/* Greedy MTP speculative decoding of one sequence, several cycles in one call: what engine/engine.py's step,
 * engine/speculative.py's verification and drafting and engine/runner.py's metadata would otherwise drive from Python
 * between the kernels, several times the Python a run of cycles pays (docs/MTP.md, "Cycles in one call"). The loop
 * plays the part of a run of multi-step decoding (steps.c) for a speculating sequence.
 *
 * A cycle, for a sequence whose token t at position pos is not cached yet and which holds k drafts d_1 .. d_k:
 *   verify  the rows [t, d_1 .. d_k] at positions pos .. pos + k through every decoder layer (mf_decode_layer, the
 *           metadata the rows path makes: ModelRunner._prepare_rows), the final norm, the lm_head, each row's argmax
 *           g_0 .. g_k: the calls of the engine's fused verification step, in its order, on its arguments;
 *   accept  a = the longest prefix of drafts equal to g; the tokens d_1 .. d_a, g_a are appended to `seq` and `out`;
 *           the rows' final hidden states at positions pos .. pos + a go to the drafter's buffer (MTPDrafter.observe);
 *           the K/V the rejected rows wrote stay where a rollback leaves them (the caller frees blocks past the end);
 *   draft   with q = pos + a, the next cycle's drafts: MTP block n drafts d'_{n+1} over rows s .. q, row i reading h_i
 *           and the token at position i + n + 1 (known, or an earlier draft of this cycle), as
 *           MTPDrafter.propose / _pass_rows / _passed do it: the tentative ring entries the new tokens confirmed,
 *           each block's first row bounded to the last `catch_up` positions (older entries masked from then on),
 *           a block past the last reused with one row a position further per reuse. Each pass is mf_mtp_pass on the
 *           rows' sliding metadata (mf_ring_rows); the drafts are the argmax over the draft head's rows, mapped
 *           through `vocab` when it is a reduced vocabulary.
 * The loop ends after n cycles, after a cycle whose tokens hold a stop id (that cycle drafts nothing), or when the
 * next cycle could not verify `k` drafts: tokens or length left (it drafts min(k, left - 1) then, 0 meaning none) or
 * a pass wanting more rows than `max_rows` (a catch-up the drafter stores pass by pass: drafts -1, none made, the
 * drafting state untouched so the caller's drafter does it).
 *
 * main (MF_SPEC_MAIN int64): decoder layers (L), the addresses of their LayerArgs (L,), whether each is sliding (L,),
 * an (n, L) table of addresses: cycle c's layer l writes its rows' (k + 1, top_k) routed expert ids at [c * L + l]
 * (an FP8 model's expert store counts them after the run, engine/fp8_layout.py's RunExperts, as after steps.c's),
 * emb (V, H) bf16, V, H, the final norm's weight, the lm_head (mf_product kind MF_BF16 row-major (V, H) or MF_PANELS),
 * its kind, the full and the sliding RoPE tables' cos and sin (rows by position, covering every position the run can
 * reach), the sequence's block table (nb,) and nb, block size, its ring id, ring slots R, window w (swa_keys), the
 * stop ids (n_stop,) and n_stop.
 * mtp (MF_SPEC_MTP int64): the MTP blocks (nblk), a (nblk, MF_SPEC_BLOCK) table per block (LayerArgs, enorm, hnorm,
 * eh_proj weight or panels, whether panels, final_layernorm), the draft head (S, H) bf16 or panels, whether panels,
 * S, vocab (S,) or 0, the hidden-state buffer (float rows of H), its rows per sequence (keep), this sequence's first
 * row in it, catch_up, max_rows. eps: the final norm's, then per block enorm's, hnorm's and final_layernorm's.
 * state (MF_SPEC_STATE int64, read and written back): below. seq[i] is the token at position seq_base + i, up to pos
 * on entry; the run appends. out: the tokens of the cycles in order, counts[c] = a_c + 1 of cycle c.
 * -> cycles run (>= 1), -1 a token id outside [0, V), -2 a slot, block, position or token index out of range,
 * -3 out of memory, -4 a layout this loop does not take.
 */
#include <math.h>
#include <string.h>

#include "mimoflash_kernels.h"

enum {
    MM_L, MM_LAYERS, MM_SLIDING, MM_CHOSEN, MM_EMB, MM_V, MM_H, MM_NORM, MM_HEAD, MM_HEAD_KIND, MM_COS_G, MM_SIN_G,
    MM_COS_S, MM_SIN_S, MM_TABLE, MM_NB, MM_BS, MM_RING, MM_R, MM_W, MM_STOP, MM_NSTOP, MF_SPEC_MAIN
};
enum {
    MT_NBLK, MT_BLOCKS, MT_HEAD, MT_HEAD_PANELS, MT_S, MT_VOCAB, MT_HBUF, MT_KEEP, MT_HBASE, MT_CATCH, MT_MAX_ROWS,
    MF_SPEC_MTP
};
enum { MB_LAYER, MB_ENORM, MB_HNORM, MB_EH, MB_EH_PANELS, MB_FINAL, MF_SPEC_BLOCK };
enum {
    ST_POS,          /* num_computed_tokens: the position of the token fed first */
    ST_DEPTH,        /* in: drafts to verify (k >= 1); out: drafts made for the next cycle, 0 none, -1 left to the
                        caller's drafter */
    ST_OUT_LEFT,     /* tokens the request may still emit (max_tokens - output) */
    ST_LEN_LEFT,     /* max_model_len - tokens so far (prompt + output) */
    ST_H0, ST_END,   /* the drafter's kept hidden states cover positions h0 .. end - 1 */
    ST_DRAFTS,                                           /* MF_SPEC_DRAFTS: d_1 .. d_k */
    ST_DONE = ST_DRAFTS + MF_SPEC_DRAFTS,                /* MF_SPEC_BLOCKS each: block n's ring right below done */
    ST_KEY_FROM = ST_DONE + MF_SPEC_BLOCKS,              /* ... its entries before key_from masked */
    ST_TENT_LO = ST_KEY_FROM + MF_SPEC_BLOCKS,           /* ... its tentative entries: positions lo .. lo + n - 1, */
    ST_TENT_N = ST_TENT_LO + MF_SPEC_BLOCKS,
    ST_TENT = ST_TENT_N + MF_SPEC_BLOCKS,                /* ... the draft tokens they read (MF_SPEC_DRAFTS each) */
    MF_SPEC_STATE = ST_TENT + MF_SPEC_BLOCKS * MF_SPEC_DRAFTS
};

#define PTR(T, v) ((T)(intptr_t)(v))

/* One draft pass planned: block, first row's position, rows, key_from for its slice (0: none). */
typedef struct {
    long li, s, N, kf;
} pass_plan;

static int is_stop(long t, const long *stop, long n) {
    for (long i = 0; i < n; i++)
        if (stop[i] == t) return 1;
    return 0;
}

/* The next cycle's `depth` passes planned on copies of the drafting state (done, key_from), as MTPDrafter.propose
 * confirms tentative entries and _pass_rows picks rows; q = the newest cached position. -> 0, 1 when a pass wants
 * more rows than max_rows (the caller's drafter runs that cycle's passes: nothing here is changed), -2 a token
 * outside seq. */
static int plan_passes(const int64_t *st, long nblk, long q, long depth, const int64_t *mtp, long w, const long *seq,
                       long seq_base, long *done, long *key_from, pass_plan *plan) {
    long catch_up = mtp[MT_CATCH], max_rows = mtp[MT_MAX_ROWS], h0 = st[ST_H0];
    for (long b = 0; b < nblk; b++) {
        long d = st[ST_DONE + b], lo = st[ST_TENT_LO + b], n = st[ST_TENT_N + b];
        while (d >= lo && d < lo + n && d + b + 1 <= q + 1) {
            if (d + b + 1 < seq_base) return -2;
            if (seq[d + b + 1 - seq_base] != st[ST_TENT + b * MF_SPEC_DRAFTS + (d - lo)]) break;
            d++;
        }
        done[b] = d;
        key_from[b] = st[ST_KEY_FROM + b];
    }
    for (long n = 0; n < depth; n++) {
        long li = n < nblk ? n : nblk - 1, s, N;
        if (n < nblk) {
            s = done[li];
            if (q - catch_up + 1 > s) s = q - catch_up + 1;
            if (h0 > s) s = h0;
            if (s < 0) s = 0;
            if (s > done[li]) key_from[li] = s;
            N = q - s + 1;
            if (N < 1 || s + n + 1 < seq_base) return -2;
        } else {
            s = q + n - li;                              /* the last block reused: one row, a position further */
            N = 1;
        }
        if (N > max_rows || N > MF_CHAIN_ROWS) return 1;
        long kf = key_from[li];
        plan[n] = (pass_plan){li, s, N, kf > s - w + 1 ? kf : 0};
    }
    return 0;
}

/* The verification of rows [t, d_1 .. d_k] at positions pos .. pos + k: x (N, H) the final hidden states, g (N,)
 * each row's argmax. -> 0 or mf_decode_layer's / the head's error, as the run returns it. */
static long verify(const int64_t *m, float eps, long pos, long N, const long *ids, float *x, float *xn,
                   float *logits, long *g, float *gbias, long *gtab, long *gslots, long *spos, float *sbias,
                   const int64_t *chosen) {
    long L = m[MM_L], V = m[MM_V], H = m[MM_H], nb = m[MM_NB], bs = m[MM_BS], R = m[MM_R];
    const int64_t *layers = PTR(const int64_t *, m[MM_LAYERS]);
    const long *sliding = PTR(const long *, m[MM_SLIDING]), *table = PTR(const long *, m[MM_TABLE]);
    long top = pos + N - 1, Kg = top + 1, Ks, srings[MF_CHAIN_ROWS], sslots[MF_CHAIN_ROWS], last;
    int masked;
    if (Kg > nb * bs) return -2;
    for (long i = 0; i < N; i++) {                              /* the global kind: the table repeated per row */
        long p = pos + i;
        memcpy(gtab + i * nb, table, sizeof(long) * (size_t)nb);
        gslots[i] = table[p / bs] * bs + p % bs;
        for (long j = 0; j < Kg; j++) gbias[i * Kg + j] = j > p ? -INFINITY : 0.f;
    }
    int64_t slice[MF_SLICE_FIELDS] = {m[MM_RING], pos, N, 0, 0};
    if (mf_ring_rows(slice, 1, R, m[MM_W], spos, srings, sslots, &last, sbias, &Ks, &masked) != N) return -2;
    if (mf_embed_bf16(ids, N, PTR(const unsigned short *, m[MM_EMB]), V, H, x)) return -1;
    for (long l = 0; l < L; l++) {
        const mf_layer *a = PTR(const mf_layer *, layers[l]);
        long *ch = PTR(long *, chosen[l]);
        int rc = sliding[l]
                     ? mf_decode_layer(a, x, N, PTR(const float *, m[MM_COS_S]), PTR(const float *, m[MM_SIN_S]),
                                       spos, srings, 1, R, Ks, sslots, masked ? sbias : NULL, ch)
                     : mf_decode_layer(a, x, N, PTR(const float *, m[MM_COS_G]), PTR(const float *, m[MM_SIN_G]),
                                       spos, gtab, nb, bs, Kg, gslots, N > 1 ? gbias : NULL, ch);
        if (rc) return rc == -1 ? -2 : -3;
    }
    mf_rms_norm(x, H, PTR(const float *, m[MM_NORM]), xn, H, N, H, eps);
    if (m[MM_HEAD_KIND] == MF_PANELS)
        mf_gemm_bf16p(xn, H, PTR(const uint16_t *, m[MM_HEAD]), logits, V, N, V, H);
    else
        mf_gemm_bf16w(xn, H, PTR(const uint16_t *, m[MM_HEAD]), logits, V, N, V, H);
    mf_argmax_rows(logits, V, N, V, g);
    return 0;
}

long mf_spec_cycles(long n, const int64_t *m, const int64_t *mtp, const float *eps, int64_t *st, long *seq,
                    long seq_base, long seq_cap, long *out, long *counts) {
    long V = m[MM_V], H = m[MM_H], R = m[MM_R], w = m[MM_W], nblk = mtp[MT_NBLK], S = mtp[MT_S];
    long keep = mtp[MT_KEEP], hbase = mtp[MT_HBASE], k = st[ST_DEPTH], nstop = m[MM_NSTOP];
    const long *stop = PTR(const long *, m[MM_STOP]), *vocab = PTR(const long *, mtp[MT_VOCAB]);
    const int64_t *blocks = PTR(const int64_t *, mtp[MT_BLOCKS]);
    float *hbuf = PTR(float *, mtp[MT_HBUF]);
    if (m[MM_HEAD_KIND] != MF_BF16 && m[MM_HEAD_KIND] != MF_PANELS) return -4;
    if (k < 1 || k > MF_SPEC_DRAFTS - 1 || nblk < 1 || nblk > MF_SPEC_BLOCKS || keep < 1) return -4;
    long N = k + 1, nb = m[MM_NB], Kg = st[ST_POS] + n * N + 1;     /* the most keys a verification sees */
    /* floats: x, xn (N, H); logits (N, V); the global mask (N, Kg); the sliding one (MF_CHAIN_ROWS, R); a pass's
     * hidden rows (MF_CHAIN_ROWS, H), its mf_mtp_pass work (MF_CHAIN_ROWS * 4H) and logits (S) */
    size_t nf = (size_t)(2 * N * H + N * V + N * Kg + MF_CHAIN_ROWS * (R + 5 * H) + S);
    char *mem = (char *)mf_scratch(4, sizeof(float) * nf + sizeof(long) * (size_t)(N * nb + N + MF_CHAIN_ROWS));
    if (!mem) return -3;
    float *x = (float *)mem, *xn = x + N * H, *logits = xn + N * H, *gbias = logits + N * V, *sbias = gbias + N * Kg;
    float *hid = sbias + MF_CHAIN_ROWS * R, *pwork = hid + MF_CHAIN_ROWS * H, *plog = pwork + MF_CHAIN_ROWS * 4 * H;
    long *gtab = (long *)(plog + S), *gslots = gtab + N * nb, *ch = gslots + N;
    long c = 0, emitted = 0;
    for (; c < n; c++) {
        long pos = st[ST_POS], ids[MF_SPEC_DRAFTS], g[MF_SPEC_DRAFTS], spos[MF_CHAIN_ROWS];
        if (pos < seq_base || pos - seq_base >= seq_cap) return -2;
        ids[0] = seq[pos - seq_base];
        for (long j = 0; j < k; j++) ids[j + 1] = st[ST_DRAFTS + j];
        long rc = verify(m, eps[0], pos, N, ids, x, xn, logits, g, gbias, gtab, gslots, spos, sbias,
                         PTR(const int64_t *, m[MM_CHOSEN]) + c * m[MM_L]);
        if (rc) return rc;
        long a = 0;
        while (a < k && ids[a + 1] == g[a]) a++;
        if (pos + a + 2 - seq_base > seq_cap) return -2;
        int stopped = 0;
        for (long j = 0; j <= a; j++) {                         /* d_1 .. d_a, g_a at positions pos + 1 .. */
            long t = j < a ? ids[j + 1] : g[a];
            seq[pos + 1 + j - seq_base] = t;
            out[emitted++] = t;
            stopped |= is_stop(t, stop, nstop);
        }
        counts[c] = a + 1;
        for (long j = 0; j <= a; j++)                           /* MTPDrafter.observe */
            memcpy(hbuf + (hbase + (pos + j) % keep) * H, x + j * H, sizeof(float) * (size_t)H);
        if (pos != st[ST_END]) st[ST_H0] = pos;
        st[ST_END] = pos + a + 1;
        st[ST_POS] = pos + a + 1;
        st[ST_OUT_LEFT] -= a + 1;
        st[ST_LEN_LEFT] -= a + 1;
        long q = pos + a, left = st[ST_OUT_LEFT] < st[ST_LEN_LEFT] ? st[ST_OUT_LEFT] : st[ST_LEN_LEFT];
        long depth = stopped ? 0 : (k < left - 1 ? k : left - 1);
        if (depth <= 0) {
            st[ST_DEPTH] = 0;
            return c + 1;
        }
        /* the next cycle's drafts */
        long done[MF_SPEC_BLOCKS], key_from[MF_SPEC_BLOCKS];
        pass_plan plan[MF_SPEC_DRAFTS];
        int got = plan_passes(st, nblk, q, depth, mtp, w, seq, seq_base, done, key_from, plan);
        if (got) {
            if (got < 0) return got;
            st[ST_DEPTH] = -1;
            return c + 1;
        }
        long d[MF_SPEC_DRAFTS];
        for (long p = 0; p < depth; p++) {
            const pass_plan *pp = &plan[p];
            const int64_t *b = blocks + pp->li * MF_SPEC_BLOCK;
            long pids[MF_CHAIN_ROWS], prings[MF_CHAIN_ROWS], pslots[MF_CHAIN_ROWS], prow, K, tok;
            int pm;
            for (long i = 0; i < pp->N; i++) {
                long at = pp->s + i + p + 1, hp = pp->s + i < q ? pp->s + i : q;
                pids[i] = p >= nblk ? d[p - 1] : at <= q + 1 ? seq[at - seq_base] : d[at - q - 2];
                memcpy(hid + i * H, hbuf + (hbase + hp % keep) * H, sizeof(float) * (size_t)H);
            }
            int64_t slice[MF_SLICE_FIELDS] = {m[MM_RING], pp->s, pp->N, pp->kf, 0};
            if (mf_ring_rows(slice, 1, R, w, spos, prings, pslots, &prow, sbias, &K, &pm) != pp->N) return -2;
            int64_t attn[9] = {m[MM_COS_S], m[MM_SIN_S], (intptr_t)spos, (intptr_t)prings, 1, R, K, (intptr_t)pslots,
                               pm ? (intptr_t)sbias : 0};
            const float *e = eps + 1 + 3 * pp->li;
            rc = mf_mtp_pass(PTR(const mf_layer *, b[MB_LAYER]), pp->N, pids, hid, H,
                             PTR(const unsigned short *, m[MM_EMB]), V, PTR(const float *, b[MB_ENORM]), e[0],
                             PTR(const float *, b[MB_HNORM]), e[1], PTR(const uint16_t *, b[MB_EH]),
                             (int)b[MB_EH_PANELS],
                             attn, ch, 1, &prow, PTR(const float *, b[MB_FINAL]), e[2],
                             PTR(const uint16_t *, mtp[MT_HEAD]), (int)mtp[MT_HEAD_PANELS], S, pwork, plog, &tok);
            if (rc) return rc;
            d[p] = vocab ? vocab[tok] : tok;
        }
        /* MTPDrafter._passed: block 0 read known tokens only; block n's rows fed a draft are tentative */
        for (long b = 0; b < nblk; b++) {
            st[ST_DONE + b] = done[b];
            st[ST_KEY_FROM + b] = key_from[b];
            st[ST_TENT_N + b] = 0;
        }
        for (long p = 0; p < depth && p < nblk; p++) {
            if (p == 0) {
                st[ST_DONE] = q + 1;
                continue;
            }
            long lo = plan[p].s > q - p + 1 ? plan[p].s : q - p + 1;
            st[ST_TENT_LO + p] = lo;
            st[ST_TENT_N + p] = q - lo + 1;
            for (long i = lo; i <= q; i++) st[ST_TENT + p * MF_SPEC_DRAFTS + (i - lo)] = d[i + p - q - 1];
            st[ST_DONE + p] = lo;
        }
        for (long j = 0; j < depth; j++) st[ST_DRAFTS + j] = d[j];
        st[ST_DEPTH] = depth;
        if (depth < k) return c + 1;
    }
    return c;
}
