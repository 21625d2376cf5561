/* Small fused fp32 ops for CPU decoding. Each replaces 5-15 torch calls whose dispatch (~3-15 us each on this
 * class of CPU) cost more than their arithmetic at decode sizes: one token's RMSNorm, RoPE on q|k, sink attention
 * over a few hundred cached keys. Semantics are those of the model's torch code (mimoflash/model/layers.py and
 * attention.py), which stays the reference; tests/test_kernels.py compares the two.
 */
#include <math.h>
#include <stddef.h>

/* One binary for any x86-64: GCC builds an AVX2+FMA clone of each function and picks it at load time (ifunc);
 * `omp simd` (-fopenmp-simd, no OpenMP runtime) lets the compiler vectorize the reductions. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VEC __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VEC
#endif

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

/* out[m, :F] = silu(h[m, :F]) * h[m, F:2F]  (h rows of width 2F, the fused gate|up product). */
VEC void mf_silu_mul(const float *h, long ldh, float *out, long ldo, long M, long F) {
    for (long m = 0; m < M; m++) {
        const float *g = h + m * ldh, *u = g + F;
        float *o = out + m * ldo;
        for (long i = 0; i < F; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* Decode attention with an optional per-head sink logit, one query token per sequence.
 *   q    (B, nq, d)   rows: q + b * q_sb + j * d
 *   keys (h, B, K, d) element [hh, b, k, :] at k_base + hh * k_sh + b * k_sb + k * d
 *   vals (h, B, K, dv) likewise with v_sh, v_sb, dv
 *   bias (B, K) additive mask (-inf = not a key) or NULL; sinks (nq) or NULL
 *   out  (B, nq, dv) contiguous;  query head j reads kv head j / (nq / h).
 * p_k = exp(s_k - m) / (exp(sink - m) + sum_k exp(s_k - m)) with s_k = scale * q.k + bias: the sink joins the
 * denominator only (SPEC §2.3). `scratch` holds K floats. */
VEC void mf_attn_decode(const float *q, long q_sb, const float *k_base, long k_sh, long k_sb, const float *v_base,
                    long v_sh, long v_sb, const float *bias, const float *sinks, float *out, long B, long nq, long h,
                    long K, long d, long dv, float scale, float *scratch) {
    long G = nq / h;
    for (long b = 0; b < B; b++) {
        const float *bb = bias ? bias + b * K : NULL;
        for (long j = 0; j < nq; j++) {
            long hh = j / G;
            const float *qv = q + b * q_sb + j * d;
            const float *kb = k_base + hh * k_sh + b * k_sb;
            const float *vb = v_base + hh * v_sh + b * v_sb;
            float mx = sinks ? sinks[j] : -INFINITY;
            for (long k = 0; k < K; k++) {
                const float *kr = kb + k * d;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (long i = 0; i < d; i++) s += qv[i] * kr[i];
                s = s * scale + (bb ? bb[k] : 0.f);
                scratch[k] = s;
                if (s > mx) mx = s;
            }
            float denom = sinks ? expf(sinks[j] - mx) : 0.f;
            float *o = out + (b * nq + j) * dv;
            for (long i = 0; i < dv; i++) o[i] = 0.f;
            for (long k = 0; k < K; k++) {
                float p = scratch[k] == -INFINITY ? 0.f : expf(scratch[k] - mx);
                denom += p;
                if (p != 0.f) {
                    const float *vr = vb + k * dv;
#pragma omp simd
                    for (long i = 0; i < dv; i++) o[i] += p * vr[i];
                }
            }
            float inv = 1.0f / denom;
            for (long i = 0; i < dv; i++) o[i] *= inv;
        }
    }
}
