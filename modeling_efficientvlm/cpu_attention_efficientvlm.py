"""
An opt-in CPU attention kernel for inference: `attn_implementation="efficientvlm_cpu"`.

PyTorch's CPU flash attention cuts the queries into blocks of 64 rows below 768 tokens and runs its block products
through MKL; at a 384-px image's 577 tokens it reaches about 60% of the float32 matmul peak, the one part of a
pruned model's call far below it. This kernel gives each thread an equal share of the (batch, head, query) rows,
copies each head's K (transposed) and V rows together once per thread, takes each block's softmax over all its keys
at once (no running rescale; a vectorised 2^x on AVX-512 or AVX2) and runs both block products through oneDNN's
batch-reduce GEMM (`at::native::cpublas::brgemm`): 1.3-1.45x the rate of PyTorch's kernel at 577 tokens with 2
threads, 1.25x with 1 (AMD Zen 4, before V was copied); 1.17-1.20x with 1 or 2 threads on an AVX2-only Zen 1, 85% of
its matmul peak (the benchmark's `--cpu_attention_kernel` measures it on yours).
It writes the context straight in the (batch, q_len, heads, head_dim) layout the output projection reads.

It is C++ built on first use with `torch.utils.cpp_extension.load_inline` (a C++ compiler and `ninja`; about 30 s,
then cached under `~/.cache/torch_extensions`) and checked against `scaled_dot_product_attention` once. Calls it
does not cover fall back to SDPA: a mask, dropout, gradients, causal attention, tracing, compiling or a dispatch
mode (FLOP counting), another device or dtype; so does everything when the build or the check fails (one warning
says why).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTN_IMPLEMENTATION = "efficientvlm_cpu"
MAX_KEYS = 16384  # one block's scores (64 rows x keys) stay in a thread's buffer
QUERY_BLOCK = 64

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define VECTOR_SOFTMAX 1  // the softmax's exp on AVX-512, or on AVX2 with FMA
#include <immintrin.h>
#endif

namespace {

#ifdef VECTOR_SOFTMAX
// 2^x for x <= 0 (a score minus its row's maximum, in base 2), one polynomial for both vector widths: 2^x = 2^n 2^f
// with n = round(x) and f = x - n in [-0.5, 0.5] (exact), 2^f of degree 5 (these minimax coefficients: relative
// error 7.5e-8). x is clamped at -126, so 2^n stays a normal float; the clamp's `max` returns its second operand
// when one is NaN, so a NaN score (or +inf, through inf - inf) reaches the sum and the row, as in SDPA.
constexpr float kExp2Clamp = -126.0f, kLog2e = 1.44269504088896341f;
constexpr float kExp2Poly[] = {1.327647245e-3f, 9.675540961e-3f, 5.550713092e-2f,
                               2.402212024e-1f, 6.931469440e-1f, 1.000000119f};
#endif

#if defined(__AVX512F__)
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(kExp2Clamp), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  return _mm512_scalef_ps(p, n);
}
#elif defined(__AVX2__) && defined(__FMA__)
// On 8 lanes, round(x) by adding 1.5 * 2^23: the sum's low mantissa bits then hold n, which shifted into the
// exponent field (plus the bias) are 2^n.
inline __m256 exp2_ps(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(kExp2Clamp), x);
  const __m256 shifter = _mm256_set1_ps(12582912.0f);
  const __m256 shifted = _mm256_add_ps(x, shifter);
  const __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(shifted, shifter));
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i bits = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(shifted), 23),
                                        _mm256_set1_epi32(127 << 23));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float reduce_add(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}
#endif

// s[j] <- exp(scale * (s[j] - max)) over one row of n scores; returns their sum. The vector forms take it as
// 2^(scale log2(e) (s[j] - max)).
inline float softmax_numerators(float* s, int64_t n, float scale) {
#ifdef VECTOR_SOFTMAX
  const float scale2 = scale * kLog2e;
#endif
#if defined(__AVX512F__)
  const int64_t full = n / 16 * 16;
  const __mmask16 tail = (__mmask16)((1u << (n - full)) - 1u);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < full; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
  if (tail) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, s + full));
  const float row_max = _mm512_reduce_max_ps(vmax);
  const __m512 vscale = _mm512_set1_ps(scale2), vshift = _mm512_set1_ps(-row_max * scale2);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < full; j += 16) {
    const __m512 e = exp2_ps(_mm512_fmadd_ps(_mm512_loadu_ps(s + j), vscale, vshift));
    _mm512_storeu_ps(s + j, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  if (tail) {
    const __m512 e = exp2_ps(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, s + full), vscale, vshift));
    _mm512_mask_storeu_ps(s + full, tail, e);
    vsum = _mm512_mask_add_ps(vsum, tail, vsum, e);
  }
  return _mm512_reduce_add_ps(vsum);
#elif defined(__AVX2__) && defined(__FMA__)
  const int64_t full = n / 8 * 8;
  // Lanes past the row's end: loaded as 0, then set to -inf for the maximum and to 0 for the sum.
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - full)), lanes);
  const __m256 tail_ps = _mm256_castsi256_ps(tail);
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < full; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
  if (n > full) {
    const __m256 last = _mm256_maskload_ps(s + full, tail);
    vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), last, tail_ps));
  }
  const float row_max = reduce_max(vmax);
  const __m256 vscale = _mm256_set1_ps(scale2), vshift = _mm256_set1_ps(-row_max * scale2);
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t j = 0; j < full; j += 8) {
    const __m256 e = exp2_ps(_mm256_fmadd_ps(_mm256_loadu_ps(s + j), vscale, vshift));
    _mm256_storeu_ps(s + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  if (n > full) {
    const __m256 last = _mm256_maskload_ps(s + full, tail);
    const __m256 e = _mm256_and_ps(exp2_ps(_mm256_fmadd_ps(last, vscale, vshift)), tail_ps);
    _mm256_maskstore_ps(s + full, tail, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  return reduce_add(vsum);
#else
  float row_max = -INFINITY;
  for (int64_t j = 0; j < n; ++j) row_max = std::max(row_max, s[j]);
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp((s[j] - row_max) * scale);
    sum += s[j];
  }
  return sum;
#endif
}

}  // namespace

// q: (B, H, Lq, D), k and v: (B, H, Lk, D), any strides with unit stride over D. Returns (B, Lq, H, D).
torch::Tensor attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale, int64_t block) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes());
  TORCH_CHECK(block > 0 && block <= 256);
  auto out = torch::empty({B, Lq, H, D}, q.options());
  if (B * H * Lq == 0) return out;
  const int64_t ld_s = (Lk + 15) / 16 * 16, ld_o = H * D;
  const float* Q = q.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float fscale = (float)scale;

  // V's rows are copied D apart unless they already are: a view of a projection's output (rows H * D apart, 3 * H * D
  // with the stacked q/k/v product) read in place held the context product at ~75% of the score product's rate.
  const bool pack_v = v.stride(2) != D;

  // One block of n query rows of head (b, h) from row q0: scores, softmax numerators, context, then 1/sum.
  // `s`, `kt` and `vp` are the calling thread's buffers (scores, and K^T and V of head `packed_bh`).
  auto run_block = [&](int64_t bh, int64_t q0, int64_t n, float* s, float* kt, float* vp, int64_t& packed_bh) {
    const int64_t b = bh / H, h = bh % H;
    const float* q_rows = Q + b * q.stride(0) + h * q.stride(1) + q0 * q.stride(2);
    const float* k_rows = K + b * k.stride(0) + h * k.stride(1);
    const float* v_head = V + b * v.stride(0) + h * v.stride(1);
    float* o_rows = O + (b * Lq + q0) * ld_o + h * D;
    if (packed_bh != bh) {  // K^T (D x Lk), and V (Lk x D), once per head and thread
      for (int64_t j = 0; j < Lk; ++j) {
        const float* row = k_rows + j * k.stride(2);
        for (int64_t d = 0; d < D; ++d) kt[d * ld_s + j] = row[d];
      }
      if (pack_v)
        for (int64_t j = 0; j < Lk; ++j) std::copy_n(v_head + j * v.stride(2), D, vp + j * D);
      packed_bh = bh;
    }
    const float* v_rows = pack_v ? vp : v_head;
    const int64_t ld_v = pack_v ? D : v.stride(2);
    at::native::cpublas::brgemm(n, Lk, D, q.stride(2), ld_s, ld_s, false, q_rows, kt, s, false);
    float inverse[256];
    for (int64_t i = 0; i < n; ++i) inverse[i] = 1.0f / softmax_numerators(s + i * ld_s, Lk, fscale);
    at::native::cpublas::brgemm(n, D, Lk, ld_s, ld_v, ld_o, false, s, v_rows, o_rows, false);
    for (int64_t i = 0; i < n; ++i) {
      float* row = o_rows + i * ld_o;
      for (int64_t d = 0; d < D; ++d) row[d] *= inverse[i];
    }
  };

  // Each thread takes an equal share of the B * H * Lq rows, cut per head into near-equal blocks of <= `block`.
  at::parallel_for(0, B * H * Lq, 1, [&](int64_t begin, int64_t end) {
    // Per thread, kept between calls: no allocation per call, and safe however the threads are numbered.
    thread_local std::vector<float> scores, keys_t, values;
    scores.resize(std::max(scores.size(), (size_t)(block * ld_s)));
    keys_t.resize(std::max(keys_t.size(), (size_t)(D * ld_s)));
    if (pack_v) values.resize(std::max(values.size(), (size_t)(Lk * D)));
    int64_t packed_bh = -1;
    for (int64_t r = begin; r < end;) {
      const int64_t bh = r / Lq, q0 = r % Lq, rows = std::min(Lq - q0, end - r);
      const int64_t blocks = (rows + block - 1) / block, base = rows / blocks, extra = rows % blocks;
      for (int64_t i = 0, start = q0; i < blocks; ++i) {
        const int64_t n = base + (i < extra ? 1 : 0);
        run_block(bh, start, n, scores.data(), keys_t.data(), values.data(), packed_bh);
        start += n;
      }
      r += rows;
    }
    at::native::cpublas::brgemm_release();
  });
  return out;
}

// The vector instructions this build's softmax runs on: "avx512", "avx2" (with FMA) or "portable" (a plain loop).
std::string softmax_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_forward", &attention_forward);
  m.def("softmax_isa", &softmax_isa);
}
"""

_state: dict[str, Any] = {}  # "module": the built extension, or "error": why it is not used


def cpuinfo_field(key: str) -> str | None:
    """The value of the first `key` line of /proc/cpuinfo ("" without one); None where the file cannot be read (not
    Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith(key)), "")
    except OSError:
        return None


def _cpu_name() -> str:
    name = cpuinfo_field("model name")
    return platform.processor() if name is None else name


def _ninja_on_path() -> None:
    """Puts the `ninja` of the pip package on PATH when none is (a virtual environment run without activating it)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build(extra_flags: tuple[str, ...] = ()) -> Any:
    """Builds and checks the kernel; `extra_flags` go to the compiler after ours (`-mno-avx512f` builds the AVX2
    softmax that CPUs without AVX-512 run, `-mno-avx512f -mno-avx2` the portable loop)."""
    from torch.utils.cpp_extension import load_inline

    _ninja_on_path()

    flags = ["-O3", "-march=native", "-fopenmp", *extra_flags]
    # `-march=native` builds for this CPU: a cache shared with other machines must not hand them this build.
    cpu = f"{platform.machine()}{_cpu_name()}{torch.backends.cpu.get_cpu_capability()}"
    digest = hashlib.sha1(f"{_SOURCE}{flags}{torch.__version__}{cpu}".encode()).hexdigest()[:12]
    module = load_inline(
        name=f"efficientvlm_cpu_attention_{digest}",
        cpp_sources=_SOURCE,
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )
    # Checked once against SDPA on odd sizes (strided queries, more keys than queries, a partial vector).
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 37, 3, 40, generator=generator).transpose(1, 2)
    k, v = (torch.randn(2, 3, 53, 40, generator=generator) for _ in range(2))
    got = module.attention_forward(q, k, v, 40**-0.5, QUERY_BLOCK).transpose(1, 2)
    expected = F.scaled_dot_product_attention(q, k, v)
    if not torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
        raise RuntimeError(f"its output differs from SDPA's by {(got - expected).abs().max().item():.2e}")
    return module


def load_kernel() -> Any | None:
    """The built kernel, building it on the first call; None (after one warning naming why) when it cannot be."""
    if "module" not in _state and "error" not in _state:
        try:
            _state["module"] = _build()
        except Exception as error:  # no compiler, no ninja, another torch's internals: SDPA serves
            _state["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
            warnings.warn(
                f"attn_implementation={ATTN_IMPLEMENTATION!r}: the CPU attention kernel could not be built or "
                f"failed its check ({_state['error']}); attention runs on SDPA. It needs a C++ compiler and "
                "`ninja` (pip install ninja).",
                stacklevel=3,
            )
    return _state.get("module")


def kernel_covers(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> bool:
    """Whether the kernel computes this call: float32 CPU inference without mask, dropout or causality."""
    tensors = (query, key, value)
    return (
        kwargs.get("attention_mask") is None
        and not kwargs.get("dropout")
        and not kwargs.get("is_causal", getattr(module, "is_causal", True))  # SDPA's reading of it
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 for t in tensors)
        and all(t.stride(-1) == 1 for t in tensors)
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and key.shape[:2] == query.shape[:2]
        and value.shape == key.shape
        and 0 < key.shape[2] <= MAX_KEYS
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
        # A dispatch mode (FLOP counting, fake or meta tensors) sees SDPA's op; the kernel would be opaque to it.
        and _get_current_dispatch_mode() is None
    )


def cpu_kernel_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: (batch, heads, len, head_dim) queries, keys and values in, the context as
    (batch, q_len, heads, head_dim) out (no weights), from the kernel when it covers the call, else from SDPA."""
    covered = kernel_covers(module, query, key, value, attention_mask=attention_mask, dropout=dropout, **kwargs)
    kernel = load_kernel() if covered else None
    if kernel is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return kernel.attention_forward(query, key, value, float(scale), QUERY_BLOCK), None


def register() -> None:
    """Makes `attn_implementation="efficientvlm_cpu"` known to transformers (`from_pretrained`,
    `set_attn_implementation`); nothing is built until a call runs on it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, cpu_kernel_attention_forward)
