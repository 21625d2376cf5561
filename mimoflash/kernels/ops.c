/* Small fused fp32 ops for CPU decoding. Each replaces 5-15 torch calls whose dispatch (~3-15 us each on this
 * class of CPU) cost more than their arithmetic at decode sizes: one token's RMSNorm, RoPE on q|k, sink attention
 * over a few hundred cached keys. Semantics are those of the model's torch code (mimoflash/model/layers.py and
 * attention.py), which stays the reference; tests/test_kernels.py compares the two.
 */
#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

#include "mimoflash_kernels.h"          /* every kernel's prototype */

/* One binary for any x86-64: GCC builds an AVX2+FMA clone of each function and picks it at load time (ifunc);
 * `omp simd` (-fopenmp-simd, no OpenMP runtime) lets the compiler vectorize the reductions. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VEC __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VEC
#endif

/* exp(x) for the softmax and SiLU loops, written so that `omp simd` loops vectorize it (libm's expf is a call):
 * Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r (Cephes expf coefficients,
 * relative error ~1e-7), and 2^n put into the exponent bits. Inputs are clamped to [-87.3, 88.7]. */
#pragma omp declare simd
static inline float exp_approx(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int i; float f; } u;
    u.i = ((int)n + 127) << 23;
    return p * u.f;
}

/* y[m, :] = w * (x[m, :] * 1/sqrt(mean(x[m, :]^2) + eps)), fp32. x/y rows with strides ldx/ldy. */
VEC void mf_rms_norm(const float *x, long ldx, const float *w, float *y, long ldy, long M, long D, float eps) {
    for (long m = 0; m < M; m++) {
        const float *xr = x + m * ldx;
        float *yr = y + m * ldy;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (long i = 0; i < D; i++) ss += xr[i] * xr[i];
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (long i = 0; i < D; i++) yr[i] = w[i] * (xr[i] * r);
    }
}

/* In place on N rows of a fused q|k|v projection (row stride ld): rotate-half RoPE on the first rd dims of each of
 * the first `heads` heads of width d (q and k heads, side by side), then multiply the v columns [v_off, v_off + v_len)
 * by v_scale. cos/sin: (N, rd) rows, the halves equal (cat(freqs, freqs)), as the model builds them. */
VEC void mf_qkv_rope(float *qkv, long ld, long N, long heads, long d, long rd, const float *cos_, const float *sin_,
                 long v_off, long v_len, float v_scale) {
    long half = rd / 2;
    for (long n = 0; n < N; n++) {
        float *row = qkv + n * ld;
        const float *c = cos_ + n * rd, *s = sin_ + n * rd;
        for (long h = 0; h < heads; h++) {
            float *x = row + h * d;
            for (long i = 0; i < half; i++) {
                float x1 = x[i], x2 = x[i + half];
                x[i] = x1 * c[i] - x2 * s[i];
                x[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
        if (v_scale != 1.0f)
            for (long i = 0; i < v_len; i++) row[v_off + i] *= v_scale;
    }
}

/* x (B, H) fp32 = rows ids[b] of the bf16 embedding table emb (V, H): F.embedding(ids, emb).float() in one call
 * (bf16 -> fp32 is exact). Returns -1, writing nothing, if an id is outside [0, V). */
int mf_embed_bf16(const long *ids, long B, const unsigned short *emb, long V, long H, float *x) {
    for (long b = 0; b < B; b++)
        if (ids[b] < 0 || ids[b] >= V) return -1;
    for (long b = 0; b < B; b++) {
        const unsigned short *row = emb + ids[b] * H;
        float *out = x + b * H;
        for (long i = 0; i < H; i++) {
            unsigned u = (unsigned)row[i] << 16;
            memcpy(out + i, &u, sizeof u);
        }
    }
    return 0;
}

/* out[m, :F] = silu(h[m, :F]) * h[m, F:2F]  (h rows of width 2F, the fused gate|up product). */
VEC void mf_silu_mul(const float *h, long ldh, float *out, long ldo, long M, long F) {
    for (long m = 0; m < M; m++) {
        const float *g = h + m * ldh, *u = g + F;
        float *o = out + m * ldo;
#pragma omp simd
        for (long i = 0; i < F; i++) o[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* K/V rows are fp32 or bf16 (kv_cache_dtype="bfloat16": half the cache bytes; bf16 -> fp32 is exact, so only the
 * rounding when a key is stored differs). ld_f32 / ld_b16 load 8 elements of a row as fp32. */
#define ES_f32 4                                      /* bytes per element, for the macros below */
#define ES_b16 2
AVX2 static inline __m256 ld_f32(const void *row, long i) { return _mm256_loadu_ps((const float *)row + i); }
AVX2 static inline __m256 ld_b16(const void *row, long i) {
    __m128i h = _mm_loadu_si128((const __m128i *)((const unsigned short *)row + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* The scores pass reads each key row once, from a ring or block a sequence owns: at 16 sequences the K/V of a
 * layer (~3 MB fp32 here) comes from DRAM in 64 short streams of ~30 KB, where the hardware prefetcher, which
 * restarts at every 4 KB page, left the loads waiting. Prefetching the row PF_KEYS keys ahead cut the batch's
 * attention phase (what kernels.decode_phase_timing reports) by ~12-15% (2 threads, interleaved A/B in a throwaway
 * script; distances 4-16 alike, 32 worse; prefetching the value rows as well added nothing). Prefetches change no
 * result. */
#define PF_KEYS 8
AVX2 static inline void prefetch_row(const void *row, long bytes) {
    for (long o = 0; o < bytes; o += 64) _mm_prefetch((const char *)row + o, _MM_HINT_T0);
}

/* Scores of GC query heads (q rows of d floats) against KB keys at a time: KB * GC <= 8 accumulators, so 8
 * independent FMA chains hide the FMA latency (one key at a time left a 12-deep dependent chain per key), and
 * each key vector is loaded once for the GC heads (GQA). Compile-time sizes keep the accumulators in registers.
 * scores[g * ld + k] = scale * q_g . key_k + bias[k]. T: the K/V element type (f32 or b16). */
#define SCORES(KB, GC, T)                                                                                             \
    AVX2 static void scores_##KB##x##GC##_##T(const void *const *krow, long K, const float *q, long d,              \
                                               const float *bias, float scale, float *scores, long ld) {            \
        long k = 0;                                                                                                  \
        for (; k + KB <= K; k += KB) {                                                                               \
            for (int j = 0; j < KB && k + j + PF_KEYS < K; j++) prefetch_row(krow[k + j + PF_KEYS], d * ES_##T);    \
            __m256 acc[KB][GC];                                                                                      \
            for (int j = 0; j < KB; j++)                                                                             \
                for (int g = 0; g < GC; g++) acc[j][g] = _mm256_setzero_ps();                                        \
            for (long i = 0; i < d; i += 8)                                                                          \
                for (int j = 0; j < KB; j++) {                                                                       \
                    __m256 kv = ld_##T(krow[k + j], i);                                                              \
                    for (int g = 0; g < GC; g++)                                                                     \
                        acc[j][g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + i), kv, acc[j][g]);                  \
                }                                                                                                    \
            for (int j = 0; j < KB; j++)                                                                             \
                for (int g = 0; g < GC; g++)                                                                         \
                    scores[g * ld + k + j] = hsum8(acc[j][g]) * scale + (bias ? bias[k + j] : 0.f);                  \
        }                                                                                                            \
        for (; k < K; k++)                                                                                           \
            for (int g = 0; g < GC; g++) {                                                                           \
                __m256 a = _mm256_setzero_ps();                                                                      \
                for (long i = 0; i < d; i += 8)                                                                      \
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + i), ld_##T(krow[k], i), a);                      \
                scores[g * ld + k] = hsum8(a) * scale + (bias ? bias[k] : 0.f);                                      \
            }                                                                                                        \
    }
#define SCORES_ALL(T)                                                                                                 \
    SCORES(8, 1, T) SCORES(4, 2, T) SCORES(2, 3, T) SCORES(2, 4, T)                                                   \
    SCORES(1, 5, T) SCORES(1, 6, T) SCORES(1, 7, T) SCORES(1, 8, T)
SCORES_ALL(f32)
SCORES_ALL(b16)

/* The G query heads that share one kv head, for one sequence (any G; heads in sub-groups of <= 8): scores with
 * each key row loaded once per sub-group, softmax with the sink, then the value sums with 8 accumulators (64
 * floats of dv) per pass over the keys. d, dv multiples of 8. krow/vrow: the K key/value row pointers, resolved
 * through the chunk table by the caller. scores: G * K floats. */
#define ATTN_GROUP(T)                                                                                                 \
    AVX2 static void attn_group_##T(const void *const *krow, const void *const *vrow, long K, const float *q,       \
                                    long G, long d, long dv, const float *bias, const float *sinks, float scale,     \
                                    float *out, float *scores) {                                                     \
        for (long g0 = 0; g0 < G; g0 += 8) {                                                                         \
            long gc = G - g0 < 8 ? G - g0 : 8;                                                                       \
            const float *qg = q + g0 * d;                                                                            \
            float *sg = scores + g0 * K;                                                                             \
            switch (gc) {                                                                                            \
            case 1: scores_8x1_##T(krow, K, qg, d, bias, scale, sg, K); break;                                       \
            case 2: scores_4x2_##T(krow, K, qg, d, bias, scale, sg, K); break;                                       \
            case 3: scores_2x3_##T(krow, K, qg, d, bias, scale, sg, K); break;                                       \
            case 4: scores_2x4_##T(krow, K, qg, d, bias, scale, sg, K); break;                                       \
            case 5: scores_1x5_##T(krow, K, qg, d, bias, scale, sg, K); break;                                       \
            case 6: scores_1x6_##T(krow, K, qg, d, bias, scale, sg, K); break;                                       \
            case 7: scores_1x7_##T(krow, K, qg, d, bias, scale, sg, K); break;                                       \
            default: scores_1x8_##T(krow, K, qg, d, bias, scale, sg, K); break;                                      \
            }                                                                                                        \
        }                                                                                                            \
        for (long g = 0; g < G; g++) {                                                                               \
            float *sc = scores + g * K, mx = sinks ? sinks[g] : -INFINITY;                                           \
            for (long k = 0; k < K; k++) mx = sc[k] > mx ? sc[k] : mx;                                               \
            float denom = sinks ? expf(sinks[g] - mx) : 0.f;                                                         \
            _Pragma("omp simd reduction(+ : denom)")                                                                 \
            for (long k = 0; k < K; k++) {                                                                           \
                float p = sc[k] == -INFINITY ? 0.f : exp_approx(sc[k] - mx);                                         \
                sc[k] = p;                                                                                           \
                denom += p;                                                                                          \
            }                                                                                                        \
            float inv = 1.0f / denom, *o = out + g * dv;                                                             \
            for (long i0 = 0; i0 < dv; i0 += 64) {                                                                   \
                long nv = (dv - i0 < 64 ? dv - i0 : 64) / 8;                                                         \
                __m256 acc[8];                                                                                       \
                for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();                                            \
                for (long k = 0; k < K; k++) {                                                                       \
                    if (sc[k] == 0.f) continue;           /* masked key: its (maybe unwritten) row is not read */    \
                    __m256 p = _mm256_set1_ps(sc[k]);                                                                \
                    if (nv == 8)                                                                                     \
                        for (int j = 0; j < 8; j++)                                                                  \
                            acc[j] = _mm256_fmadd_ps(p, ld_##T(vrow[k], i0 + 8 * j), acc[j]);                        \
                    else                                                                                             \
                        for (int j = 0; j < nv; j++)                                                                 \
                            acc[j] = _mm256_fmadd_ps(p, ld_##T(vrow[k], i0 + 8 * j), acc[j]);                        \
                }                                                                                                    \
                __m256 iv = _mm256_set1_ps(inv);                                                                     \
                for (int j = 0; j < nv; j++) _mm256_storeu_ps(o + i0 + 8 * j, _mm256_mul_ps(acc[j], iv));            \
            }                                                                                                        \
        }                                                                                                            \
    }
ATTN_GROUP(f32)
ATTN_GROUP(b16)

typedef struct {
    const float *q;
    long q_sb;
    const void *k_base;
    long k_sh;
    const void *v_base;
    long v_sh;
    const float *bias, *sinks;
    float *out;
    long nq, h, K, d, dv;
    float scale;
    const long *table;
    long n_chunks, chunk;
    int kv_bf16;                                   /* K/V elements: 1 = bf16, 0 = fp32 */
    atomic_int failed;                             /* a task could not allocate its row pointers */
} attn_job;

/* Task i = (sequence b, kv head hh): resolve the K key/value rows through the chunk table, then the G query heads
 * of that kv head (attn_group_f32 or _b16). */
AVX2 static void attn_task(void *p, long i) {
    attn_job *j = (attn_job *)p;
    long b = i / j->h, hh = i % j->h, K = j->K, G = j->nq / j->h, n = K > 0 ? K : 1;
    const void **rows = (const void **)mf_scratch(2, (sizeof(void *) * 2 + sizeof(float) * (size_t)G) * (size_t)n);
    float *scores = rows ? (float *)(rows + 2 * n) : NULL;
    if (rows) {
        const long *tb = j->table + b * j->n_chunks;
        long es = j->kv_bf16 ? 2 : 4;                  /* bytes per K/V element */
        for (long k = 0, c = 0, slot = 0; k < K; k++) {
            long off = tb[c] * j->chunk + slot;
            rows[k] = (const char *)j->k_base + (hh * j->k_sh + off * j->d) * es;
            rows[K + k] = (const char *)j->v_base + (hh * j->v_sh + off * j->dv) * es;
            if (++slot == j->chunk) { slot = 0; c++; }
        }
        const float *qb = j->q + b * j->q_sb + hh * G * j->d, *bias = j->bias ? j->bias + b * K : NULL;
        const float *sinks = j->sinks ? j->sinks + hh * G : NULL;
        float *out = j->out + (b * j->nq + hh * G) * j->dv;
        if (j->kv_bf16)
            attn_group_b16(rows, rows + K, K, qb, G, j->d, j->dv, bias, sinks, j->scale, out, scores);
        else
            attn_group_f32(rows, rows + K, K, qb, G, j->d, j->dv, bias, sinks, j->scale, out, scores);
    } else {
        atomic_store(&j->failed, 1);
    }
}
#endif

/* Element i of a K/V pool as fp32 (the portable path). */
static inline float kv_elem(const void *base, long i, int bf16) {
    if (!bf16) return ((const float *)base)[i];
    union { unsigned u; float f; } v;
    v.u = (unsigned)((const unsigned short *)base)[i] << 16;
    return v.f;
}

/* Decode attention over the paged KV cache, one query token per sequence, with an optional per-head sink logit.
 *   q     (B, nq, d)  rows: q + b * q_sb + j * d;  query head j reads kv head j / (nq / h)
 *   pools K (h, S, d) at k_base + hh * k_sh + slot * d, V (h, S, dv) likewise (v_sh, dv), in elements: fp32, or
 *         bf16 when kv_bf16 (read as fp32: exact)
 *   table (B, n_chunks): key k of sequence b is slot table[b][k / chunk] * chunk + k % chunk (k < K), so blocks and
 *         rings are read where they are instead of being gathered into a copy first
 *   bias  (B, K) additive mask (-inf = not a key) or NULL; sinks (nq) or NULL;  out (B, nq, dv) contiguous.
 * p_k = exp(s_k - m) / (exp(sink - m) + sum_k exp(s_k - m)) with s_k = scale * q.k + bias: the sink joins the
 * denominator only (docs/MODEL.md §2.3). `scratch` holds K floats (portable path). The AVX2 path runs one pool task per
 * (sequence, kv head). Returns -1 (nothing computed) if a table entry is outside [0, pool_chunks), -2 if a task
 * could not allocate its row pointers, else 0. */
VEC int mf_attn_decode(const float *q, long q_sb, const void *k_base, long k_sh, const void *v_base, long v_sh,
                       const float *bias, const float *sinks, float *out, long B, long nq, long h, long K, long d,
                       long dv, float scale, float *scratch, const long *table, long n_chunks, long chunk,
                       long pool_chunks, int kv_bf16) {
    long G = nq / h;
    for (long i = 0; i < B * n_chunks; i++)      /* a bad table would read outside the pools: refuse it */
        if (table[i] < 0 || table[i] >= pool_chunks) return -1;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (mf_simd_level() == 2 && d % 8 == 0 && dv % 8 == 0 && nq % h == 0) {
        attn_job j = {q, q_sb, k_base, k_sh, v_base, v_sh, bias, sinks, out, nq, h, K, d, dv, scale, table,
                      n_chunks, chunk, kv_bf16, 0};
        mf_parallel(B * h, attn_task, &j);         /* one task per (sequence, kv head): disjoint outputs */
        return j.failed ? -2 : 0;
    }
#endif
    for (long b = 0; b < B; b++) {
        const float *bb = bias ? bias + b * K : NULL;
        const long *tb = table + b * n_chunks;
        for (long j = 0; j < nq; j++) {
            long hh = j / G;
            const float *qv = q + b * q_sb + j * d;
            float mx = sinks ? sinks[j] : -INFINITY;
            for (long k = 0, c = 0, slot = 0; k < K; k++) {         /* c: chunk index, slot: slot within it */
                long at = hh * k_sh + (tb[c] * chunk + slot) * d;
                if (++slot == chunk) { slot = 0; c++; }
                float s = 0.f;
                for (long i = 0; i < d; i++) s += qv[i] * kv_elem(k_base, at + i, kv_bf16);
                s = s * scale + (bb ? bb[k] : 0.f);
                scratch[k] = s;
                if (s > mx) mx = s;
            }
            float denom = sinks ? expf(sinks[j] - mx) : 0.f;
#pragma omp simd reduction(+ : denom)
            for (long k = 0; k < K; k++) {
                float p = scratch[k] == -INFINITY ? 0.f : exp_approx(scratch[k] - mx);
                scratch[k] = p;
                denom += p;
            }
            float *o = out + (b * nq + j) * dv;
            for (long i = 0; i < dv; i++) o[i] = 0.f;
            for (long k = 0, c = 0, slot = 0; k < K; k++) {
                long at = hh * v_sh + (tb[c] * chunk + slot) * dv;
                if (++slot == chunk) { slot = 0; c++; }
                float p = scratch[k];
                if (p != 0.f)
                    for (long i = 0; i < dv; i++) o[i] += p * kv_elem(v_base, at + i, kv_bf16);
            }
            float inv = 1.0f / denom;
            for (long i = 0; i < dv; i++) o[i] *= inv;
        }
    }
    return 0;
}

/* Routing of one row (docs/MODEL.md §2.5): scores = sigmoid(router_w @ x) in fp32, top-k of scores + bias (first index
 * wins a tie), weights = scores of the chosen (optionally / their sum) * scaling. scores: E floats of scratch. */
VEC void mf_route_row(const float *x, long D, const float *router_w, const float *bias, long E, long top_k,
                      int norm_topk, float scaling, float *scores, long *chosen, float *weights) {
    for (long e = 0; e < E; e++) {
        const float *wr = router_w + e * D;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (long i = 0; i < D; i++) s += wr[i] * x[i];
        scores[e] = 1.0f / (1.0f + expf(-s));
    }
    float wsum = 0.f;
    for (long k = 0; k < top_k; k++) {
        long best = -1;
        float bv = -INFINITY;
        for (long e = 0; e < E; e++) {
            int taken = 0;
            for (long j = 0; j < k; j++) taken |= chosen[j] == e;
            float c = scores[e] + bias[e];
            if (!taken && (best < 0 || c > bv)) { best = e; bv = c; }
        }
        chosen[k] = best;
        weights[k] = scores[best];
        wsum += weights[k];
    }
    for (long k = 0; k < top_k; k++) weights[k] = (norm_topk ? weights[k] / (wsum + 1e-20f) : weights[k]) * scaling;
}

/* The routed experts of one layer for P (token, expert) pairs already sorted by expert: rows
 * [off_e, off_e + counts[e]) of x_PD (P, D) go through expert e; y_PD (P, D) gets down[e] @ (silu(gate[e] @ x) *
 * (up[e] @ x)) per row, unweighted. One call instead of a Python loop of ~6 torch calls per expert: mf_experts_rows
 * (decode.c), the fused decode step's code, each expert's weights read once for its rows.
 * scratch: 3 * F * P floats. Returns 0; -1 out of memory; -2 if the counts are negative or do not sum to P. */
int mf_experts_bf16(const float *x_PD, long P, const long *counts, long E, long D, long F,
                    const unsigned short *gate_up, const unsigned short *down, float *y_PD, float *scratch) {
    long total = 0;
    for (long e = 0; e < E; e++) {
        if (counts[e] < 0) return -2;
        total += counts[e];
    }
    if (total != P) return -2;                         /* the rows would not match x_PD / y_PD */
    mf_expert *ex = (mf_expert *)mf_scratch(3, sizeof(mf_expert) * (size_t)(E > 0 ? E : 1));
    if (!ex) return -1;
    for (long e = 0; e < E; e++) ex[e] = (mf_expert){gate_up + e * 2 * F * D, NULL, down + e * D * F, NULL, NULL, NULL};
    return mf_experts_rows(ex, E, counts, x_PD, D, D, F, 0, 0, scratch, y_PD, D) ? -1 : 0;
}

/* out[r] = torch.argmax(x[r, :V]) for R rows of stride ld: the first index of the maximum, or of the first NaN if
 * the row has one (torch's rule). Greedy decoding takes this on every step: torch's CPU argmax over a (16, 32000)
 * batch of logits takes ~0.7 ms here, longer than a layer's attention. One vectorizable pass keeps the maximum of
 * each block of 64 (NaN noticed, not propagated); the first block whose maximum is the row's is then scanned
 * alone, so the scalar search reads 64 values, not half the row (as an earlier two-pass form did). Rows are split
 * over the pool; each row is one task's, so the result does not depend on the thread count. */
#define AM_BLOCK 64
VEC static long argmax_row(const float *row, long V) {
    float m = -INFINITY;
    int nan = 0;
    long first_block = 0;
    for (long b0 = 0; b0 < V; b0 += AM_BLOCK) {
        long n = V - b0 < AM_BLOCK ? V - b0 : AM_BLOCK;
        const float *p = row + b0;
        float bm = -INFINITY;
#pragma omp simd reduction(max : bm) reduction(| : nan)
        for (long i = 0; i < n; i++) {
            bm = p[i] > bm ? p[i] : bm;
            nan |= p[i] != p[i];
        }
        if (bm > m) {                         /* strictly: a later block holding an equal maximum comes second */
            m = bm;
            first_block = b0;
        }
    }
    long at = 0;
    if (nan) {
        while (row[at] == row[at]) at++;
    } else {
        at = first_block;                     /* the maximum is in this block (all -inf: block 0, index 0) */
        while (at < V - 1 && row[at] != m) at++;
    }
    return at;
}

typedef struct {
    const float *x;
    long ld, V;
    long *out;
} argmax_job;

static void argmax_task(void *p, long r) {
    const argmax_job *j = (const argmax_job *)p;
    j->out[r] = argmax_row(j->x + r * j->ld, j->V);
}

void mf_argmax_rows(const float *x, long ld, long R, long V, long *out) {
    argmax_job j = {x, ld, V, out};
    if (R > 1 && mf_num_threads() > 1 && R * V >= (1L << 15)) {
        mf_parallel(R, argmax_task, &j);
        return;
    }
    for (long r = 0; r < R; r++) out[r] = argmax_row(x + r * ld, V);
}

/* ---- read bandwidth: the yardstick the decode benchmarks divide a step's bytes by ----
 * The 64-bit words of p[0, nbytes) summed (wrapping, returned as the same bits signed), the bytes split over the pool in ranges of whole 4 KB pages.
 * Integer adds over 8 independent lanes (one vector register per lane group) keep the loop limited by loads, not
 * by an add's latency, so it reads as fast as a weight-streaming kernel can; a fp32 torch sum on one thread does not
 * (it measured less than the decode kernels achieved). nbytes is rounded down to whole words. */
typedef struct {
    const uint64_t *w;
    _Atomic uint64_t sum;
} read_job;

VEC static uint64_t read_words(const uint64_t *w, long n) {
    uint64_t a[32] = {0};
    long i = 0;
    for (; i + 32 <= n; i += 32) {
#pragma omp simd
        for (int k = 0; k < 32; k++) a[k] += w[i + k];
    }
    uint64_t s = 0;
    for (int k = 0; k < 32; k++) s += a[k];
    for (; i < n; i++) s += w[i];
    return s;
}

static void read_range(void *p, long lo, long hi) {                  /* [lo, hi) in words */
    read_job *j = (read_job *)p;
    atomic_fetch_add_explicit(&j->sum, read_words(j->w + lo, hi - lo), memory_order_relaxed);
}

int64_t mf_read_sum(const void *p, long nbytes) {
    long n = nbytes / 8;
    if (n <= 0) return 0;
    read_job j = {(const uint64_t *)p, 0};
    if (mf_num_threads() > 1 && n >= (1L << 16)) mf_parallel_ranges(n, 512, read_range, &j);
    else read_range(&j, 0, n);
    return (int64_t)atomic_load(&j.sum);
}
