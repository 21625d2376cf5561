/* The C interface of mimoflash's CPU kernels, declared once: every .c file of kernels/ includes this header, so the
 * compiler rejects a definition that disagrees with its prototype here, and kernels/__init__.py reads this file
 * when it loads the library and checks its ctypes table against the prototypes of the first section (and the
 * mf_layer struct against its LayerArgs, names in order, offsets and size through mf_layer_abi), raising
 * KernelABIError on any difference. Python passes every pointer as an address (c_void_p); `long` is 64-bit on the
 * platforms the kernels build for, as the Python side assumes.
 */
#ifndef MIMOFLASH_KERNELS_H
#define MIMOFLASH_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* One decoder layer's dimensions and weight / cache pointers for mf_decode_layer (Python: kernels.LayerArgs). */
typedef struct {
    long H, nq, nkv, d, dv, rd;
    float eps_in, eps_post, scale, v_scale;
    const float *in_norm, *post_norm, *sinks;        /* sinks may be NULL */
    const unsigned short *qkv_w, *o_w;               /* (W, H), (H, nq * dv) bf16 */
    void *k_pool, *v_pool;                           /* (nkv, S, d), (nkv, S, dv) fp32 or bf16, contiguous */
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
    int kv_bf16;                                     /* the pools hold bf16 (kv_cache_dtype="bfloat16") */
    int panels;                                      /* qkv_w .. down_w are packed panels (panels.c), not (N, K) */
    /* Block-FP8 weights (docs/MODEL.md §4.3): a weight whose scale grid below is not NULL is (N, K) E4M3 bytes,
     * row-major, with fp32 scales (ceil(N / fp8_br), ceil(K / fp8_bc)) row-major (fp8.c); NULL: bf16 as above.
     * The q|k|v product's stacked grid has its own row block, qkv_br (a divisor of fp8_br: rows repeated). */
    long fp8_br, fp8_bc, qkv_br;
    const float *qkv_s, *o_s, *gate_s, *up_s, *down_s;
    const int64_t *experts_fp8;                      /* FP8 experts: (E, 6) addresses (gate, its scales, up, its
                                                        scales, down, its scales; F_moe rows); NULL: gate_up/down */
} mf_layer;

/* ---- Called from Python (kernels/__init__.py checks its ctypes table against this section) ---- */
/* mimoflash-python-begin */

/* wgemm.c, panels.c: y (M, N) = x (M, K) @ w^T, w bf16 row-major (N, K) or packed in panels */
void mf_gemm_bf16w(const float *x, long ldx, const uint16_t *w, float *y, long ldy, long M, long N, long K);
void mf_gemm_bf16p(const float *x, long ldx, const uint16_t *wp, float *y, long ldy, long M, long N, long K);
int mf_simd_level(void);

/* ops.c: fused fp32 ops */
void mf_rms_norm(const float *x, long ldx, const float *w, float *y, long ldy, long M, long D, float eps);
void mf_qkv_rope(float *qkv, long ld, long N, long heads, long d, long rd, const float *cos_, const float *sin_,
                 long v_off, long v_len, float v_scale);
int mf_embed_bf16(const long *ids, long B, const unsigned short *emb, long V, long H, float *x);
void mf_silu_mul(const float *h, long ldh, float *out, long ldo, long M, long F);
int mf_attn_decode(const float *q, long q_sb, const void *k_base, long k_sh, const void *v_base, long v_sh,
                   const float *bias, const float *sinks, float *out, long B, long nq, long h, long K, long d,
                   long dv, float scale, float *scratch, const long *table, long n_chunks, long chunk,
                   long pool_chunks, int kv_bf16);
int mf_experts_bf16(const float *x_PD, long P, const long *counts, long E, long D, long F,
                    const unsigned short *gate_up, const unsigned short *down, float *y_PD, float *scratch);
void mf_argmax_rows(const float *x, long ld, long R, long V, long *out);
int64_t mf_read_sum(const void *p, long nbytes);   /* the bandwidth yardstick: sum of 64-bit words */

/* decode.c: one decoder layer for one token per sequence */
int mf_decode_layer(const mf_layer *L, float *x, long B, const float *cos_, const float *sin_, const long *rope_rows,
                    const long *table, long n_chunks, long chunk, long K, const long *slots, const float *bias,
                    long *chosen);
void mf_decode_timing(int on, double *out);
/* decode.c: one token's routed MoE with bf16 experts (the fused step's MoE code for one row) */
int mf_moe_token_bf16(const float *x, long D, const float *router_w, const float *bias, long E, long top_k,
                      int norm_topk, float scaling, const unsigned short *gate_up, const unsigned short *down, long F,
                      float *y, long *chosen);
/* decode.c: the layer's two halves, for a caller that adds partial sums between them (tensor parallelism) */
int mf_decode_attn(const mf_layer *L, const float *x, long B, const float *cos_, const float *sin_,
                   const long *rope_rows, const long *table, long n_chunks, long chunk, long K, const long *slots,
                   const float *bias, float *y);
int mf_decode_ffn(const mf_layer *L, const float *x, long B, float *y, long *chosen, long e_lo, long e_hi);

/* fp8.c: products against block-FP8 weights */
int mf_gemm_fp8w(const float *x, long ldx, const uint8_t *w, const float *s, long ldS, float *y, long ldy, long M,
                 long N, long K, long br, long bc);
int mf_experts_fp8(const float *x, long ldx, long D, long Fd, long n, const long *rows, const int64_t *ptrs, long br,
                   long bc, float *y, long ldy);

/* prefill.c: a layer's routed experts over many tokens; sink attention over long slices; 512 if AVX-512F runs */
int mf_prefill_experts(const float *x, long T, long D, const long *topk_idx, const float *topk_w, long K, long E,
                       long F, const unsigned short *gate_up, const unsigned short *down, float *y_PD, float *out);
int mf_prefill_attn(const float *q, long q_sr, const float *k, long k_sr, const float *v, long v_sr, const long *pos,
                    const long *seq_lo, long B, const void *k_pool, const void *v_pool, long S, int kv_bf16,
                    const long *read_slots, const long *past_pos, long P, long nq, long h, long d, long dv,
                    long window, const float *sinks, float scale, float *out);
void mf_prefill_panels(const float *x, long ldx, const unsigned short *wp, float *y, long ldy, long M, long N,
                       long K);
int mf_prefill_simd(void);

/* steps.c: n greedy decode steps of B sequences in one call (engine/runner.py's multi-step run) -> steps run;
 * chosen: (n, L) addresses, step i's layer l's expert-id buffer at chosen[i * L + l]; head_kind: MF_BF16,
 * MF_PANELS or MF_FP8 (below: head_w E4M3 bytes, head_s its (head_br x head_bc)-block scale grid); hidden: NULL or
 * (n, B, H) floats, each step's final hidden states */
long mf_decode_steps(long n, long B, long L, const int64_t *layers, const long *sliding, const int64_t *chosen,
                     const int64_t *step_args, const unsigned short *emb, long V, long H, const float *norm_w,
                     float eps, const void *head_w, int head_kind, const float *head_s, long head_br, long head_bc,
                     float *x, float *xn, float *logits, long *tokens, const long *stop_ids, const long *stop_off,
                     float *hidden);

/* draft.c: an MTP block's draft pass for N rows in one call (engine/fused_decode.py's FusedMTPLayer.draft):
 * embedding, enorm/hnorm, eh_proj, the block's layer, final_layernorm of the R wanted rows, the head, the argmax */
long mf_mtp_pass(const mf_layer *L, long N, const long *ids, const float *hidden, long ldh, const unsigned short *emb,
                 long V, const float *enorm_w, float enorm_eps, const float *hnorm_w, float hnorm_eps,
                 const uint16_t *eh_w, int eh_panels, const int64_t *attn, long *chosen, long R, const long *rows,
                 const float *final_w, float final_eps, const uint16_t *head_w, int head_panels, long S,
                 float *work, float *logits, long *tokens);
/* draft.c: a greedy cycle's draft passes in one call, each pass's drafts feeding the next ones' rows */
long mf_mtp_chain(long n, const int64_t *passes, const float *eps, const int64_t *slices, const unsigned short *emb,
                  long V, long emb_h, const float *cos_, const float *sin_, long R, long w, const uint16_t *head_w,
                  int head_panels, long S, const long *vocab, float *work, float *logits, long *out);

/* speculate.c: up to n greedy MTP speculative cycles of one sequence (verify, accept, draft) in one call
 * (engine/runner.py's spec_cycles builds the fields) -> cycles run */
long mf_spec_cycles(long n, const int64_t *m, const int64_t *mtp, const float *eps, int64_t *st, long *seq,
                    long seq_base, long seq_cap, long *out, long *counts);

/* pool.c: the thread pool */
void mf_set_num_threads(int n);
long mf_pool_probe(long n, long spin_us);

/* abi.c: sizeof(mf_layer), then the offset of each of its fields in order, into out[0 .. n) -> values written */
long mf_layer_abi(long *out, long n);

/* mimoflash-python-end */

/* ---- Shared between the .c files only ---- */
typedef void (*mf_task)(void *ctx, long i);
void mf_parallel(long n, mf_task fn, void *ctx);                                     /* pool.c */
void mf_parallel_ranges(long n, long align, void (*range)(void *, long, long), void *ctx);
int mf_num_threads(void);
void *mf_scratch(int slot, size_t bytes);              /* pool.c: per-thread buffers kept between calls */

/* decode.c: mf_decode_layer with outputs for rows from .. B - 1 only (every row's K/V stored) */
int mf_decode_layer_from(const mf_layer *L, float *x, long B, long from, const float *cos_, const float *sin_,
                         const long *rope_rows, const long *table, long n_chunks, long chunk, long K,
                         const long *slots, const float *bias, long *chosen);

/* draft.c: the sliding kind's rows-path metadata of slices (ring id, first position, rows, key_from, output index) */
enum { MF_SLICE_FIELDS = 5, MF_CHAIN_ROWS = 64 };
long mf_ring_rows(const int64_t *sl, long n_slices, long R, long w, long *pos, long *rings, long *slots, long *rows,
                  float *bias, long *K, int *masked);
enum { MF_SPEC_BLOCKS = 4, MF_SPEC_DRAFTS = 16 };       /* speculate.c: most MTP blocks, most drafts + 1 */

/* One product y (M, N) = x (M, K) @ w^T of a group that mf_gemm_group (wgemm.c) runs in one parallel region.
 * kind: MF_BF16 w (N, K) bf16 row-major; MF_PANELS w bf16 in panels (panels.c); MF_FP8 w (N, K) E4M3 bytes with
 * scale grid s (ceil(N / br), ldS) (fp8.c). */
enum { MF_BF16, MF_PANELS, MF_FP8 };
typedef struct {
    int kind;
    const float *x;
    long ldx;
    const void *w;
    const float *s;
    long ldS, br, bc;
    float *y;
    long ldy, M, N, K;
} mf_product;
int mf_gemm_group(const mf_product *p, long n);                                      /* wgemm.c */
void mf_bf16w_range(const float *x, long ldx, const uint16_t *w, float *y, long ldy, long M, long K, long n0,
                    long n1);                                                        /* wgemm.c */
void mf_bf16p_range(const float *x, long ldx, const uint16_t *wp, float *y, long ldy, long M, long N, long K,
                    long n0, long n1);                                               /* panels.c */
void mf_fp8_init(void);                                                              /* fp8.c */
int mf_fp8w_range(const mf_product *p, long n0, long n1);                            /* fp8.c */

/* One routed expert's weights: bf16 gate_up (2F, D) in `gate` (up NULL) and down (D, F), scales NULL; or FP8 gate,
 * up (F, D) and down (D, F) E4M3 bytes with their scale grids (br x bc blocks). */
typedef struct {
    const void *gate, *up, *down;
    const float *gate_s, *up_s, *down_s;
} mf_expert;
int mf_experts_rows(const mf_expert *ex, long n, const long *rows, const float *x, long ldx, long D, long F,
                    long br, long bc, float *h, float *y, long ldy);                 /* decode.c */
void mf_route_row(const float *x, long D, const float *router_w, const float *bias, long E, long top_k,
                  int norm_topk, float scaling, float *scores, long *chosen, float *weights);      /* ops.c */

#endif
