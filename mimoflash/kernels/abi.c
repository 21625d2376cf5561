/* The layout of mf_layer as this compiler lays it out, for kernels/__init__.py to compare with its ctypes
 * LayerArgs when it loads the library: a field added, removed, reordered or retyped on one side only fails the load
 * with a clear error instead of handing decode_layer pointers at the wrong offsets. */
#include "mimoflash_kernels.h"

long mf_layer_abi(long *out, long n) {
    const long v[] = {
        (long)sizeof(mf_layer),
        (long)offsetof(mf_layer, H), (long)offsetof(mf_layer, nq), (long)offsetof(mf_layer, nkv),
        (long)offsetof(mf_layer, d), (long)offsetof(mf_layer, dv), (long)offsetof(mf_layer, rd),
        (long)offsetof(mf_layer, eps_in), (long)offsetof(mf_layer, eps_post), (long)offsetof(mf_layer, scale),
        (long)offsetof(mf_layer, v_scale), (long)offsetof(mf_layer, in_norm), (long)offsetof(mf_layer, post_norm),
        (long)offsetof(mf_layer, sinks), (long)offsetof(mf_layer, qkv_w), (long)offsetof(mf_layer, o_w),
        (long)offsetof(mf_layer, k_pool), (long)offsetof(mf_layer, v_pool), (long)offsetof(mf_layer, pool_slots),
        (long)offsetof(mf_layer, moe), (long)offsetof(mf_layer, gate_w), (long)offsetof(mf_layer, up_w),
        (long)offsetof(mf_layer, down_w), (long)offsetof(mf_layer, F_dense), (long)offsetof(mf_layer, router_w),
        (long)offsetof(mf_layer, router_bias), (long)offsetof(mf_layer, E), (long)offsetof(mf_layer, top_k),
        (long)offsetof(mf_layer, norm_topk), (long)offsetof(mf_layer, scaling), (long)offsetof(mf_layer, gate_up),
        (long)offsetof(mf_layer, down), (long)offsetof(mf_layer, F_moe), (long)offsetof(mf_layer, kv_bf16),
        (long)offsetof(mf_layer, panels), (long)offsetof(mf_layer, fp8_br), (long)offsetof(mf_layer, fp8_bc),
        (long)offsetof(mf_layer, qkv_br), (long)offsetof(mf_layer, qkv_s), (long)offsetof(mf_layer, o_s),
        (long)offsetof(mf_layer, gate_s), (long)offsetof(mf_layer, up_s), (long)offsetof(mf_layer, down_s),
        (long)offsetof(mf_layer, experts_fp8),
    };
    long m = (long)(sizeof v / sizeof v[0]);
    for (long i = 0; i < m && i < n; i++) out[i] = v[i];
    return m;
}
