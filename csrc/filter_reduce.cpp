// FAIG per-filter reductions: out[b, f] = scale * sum_j |delta[f*kk + j] * grads[b, f*kk + j]|,
// optionally fused with sums[label[b], f] += out[b, f].  CPU path: OpenMP over filters; CUDA
// tensors go to filter_reduce_cuda.cu when the module is built WITH_CUDA.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef WITH_CUDA
at::Tensor filter_abs_sum_cuda(const at::Tensor& delta, const at::Tensor& grads, int64_t kk, double scale);
at::Tensor filter_abs_sum_accumulate_cuda(const at::Tensor& delta, const at::Tensor& grads, int64_t kk,
                                          const at::Tensor& label_idx, at::Tensor& sums, double scale);
#endif

namespace {

constexpr int64_t kGrain = 1 << 15;  // elements below which the loop stays serial

void check_inputs(const at::Tensor& delta, const at::Tensor& grads, int64_t kk) {
  TORCH_CHECK(kk >= 1, "kk must be >= 1, got ", kk);
  TORCH_CHECK(delta.dim() == 1, "delta must be 1-D, got shape ", delta.sizes());
  TORCH_CHECK(grads.dim() == 2, "grads must be 2-D (B, P), got shape ", grads.sizes());
  TORCH_CHECK(grads.size(1) == delta.size(0), "grads has ", grads.size(1), " columns but delta has ",
              delta.size(0), " elements");
  TORCH_CHECK(delta.size(0) % kk == 0, "P=", delta.size(0), " is not a multiple of kk=", kk);
  TORCH_CHECK(delta.scalar_type() == grads.scalar_type(), "delta and grads must share a dtype");
  TORCH_CHECK(delta.device() == grads.device(), "delta and grads must be on the same device");
  TORCH_CHECK(delta.is_contiguous(), "delta must be contiguous");
  TORCH_CHECK(grads.size(0) == 0 || grads.size(1) == 0 || grads.stride(1) == 1,
              "grads rows must be contiguous (stride(1) == 1)");
}

void check_accumulate(const at::Tensor& grads, int64_t n_filters, const at::Tensor& label_idx,
                      const at::Tensor& sums) {
  TORCH_CHECK(label_idx.dim() == 1 && label_idx.size(0) == grads.size(0), "label_idx must have shape (",
              grads.size(0), ",), got ", label_idx.sizes());
  TORCH_CHECK(label_idx.scalar_type() == at::kLong, "label_idx must be int64");
  TORCH_CHECK(label_idx.is_contiguous(), "label_idx must be contiguous");
  TORCH_CHECK(sums.dim() == 2 && sums.size(1) == n_filters, "sums must have shape (D, ", n_filters, "), got ",
              sums.sizes());
  TORCH_CHECK(sums.scalar_type() == grads.scalar_type(), "sums must have the dtype of grads");
  TORCH_CHECK(sums.is_contiguous(), "sums must be contiguous");
  TORCH_CHECK(sums.device() == grads.device() && label_idx.device() == grads.device(),
              "label_idx and sums must be on the device of grads");
}

int thread_count() {
  return static_cast<int>(at::get_num_threads());
}

// Filters are split across threads; each thread owns whole columns f, so the (optional) writes
// into sums never race and the result does not depend on the thread count.
// kKK > 0 fixes kk at compile time (unrolled inner loop for the common 1x1, 3x3, 5x5 kernels).
template <typename scalar_t, bool kAccumulate, int kKK>
void filter_abs_sum_cpu_impl(const scalar_t* delta, const scalar_t* grads, int64_t grads_stride, scalar_t* out,
                             const int64_t* labels, scalar_t* sums, int64_t B, int64_t F, int64_t kk_rt,
                             double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t kk = kKK > 0 ? kKK : kk_rt;
  const acc_t s = static_cast<acc_t>(scale);
  const bool parallel = B * F * kk >= kGrain;
#pragma omp parallel for schedule(static) num_threads(thread_count()) if (parallel)
  for (int64_t f = 0; f < F; ++f) {
    const scalar_t* d = delta + f * kk;
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* g = grads + b * grads_stride + f * kk;
      acc_t acc = 0;
      for (int64_t j = 0; j < kk; ++j) {
        acc += std::abs(static_cast<acc_t>(d[j]) * static_cast<acc_t>(g[j]));
      }
      const scalar_t v = static_cast<scalar_t>(acc * s);
      out[b * F + f] = v;
      if constexpr (kAccumulate) {
        scalar_t& dst = sums[labels[b] * F + f];
        dst = static_cast<scalar_t>(static_cast<acc_t>(dst) + static_cast<acc_t>(v));
      }
    }
  }
}

template <bool kAccumulate>
void filter_abs_sum_cpu(const at::Tensor& delta, const at::Tensor& grads, int64_t kk, const at::Tensor& out,
                        const at::Tensor* label_idx, at::Tensor* sums, double scale) {
  const int64_t B = grads.size(0);
  const int64_t F = delta.size(0) / kk;
  if (B == 0 || F == 0) return;
  const int64_t* labels = kAccumulate ? label_idx->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "filter_abs_sum_cpu", [&] {
    const scalar_t* d = delta.data_ptr<scalar_t>();
    const scalar_t* g = grads.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* s = kAccumulate ? sums->data_ptr<scalar_t>() : nullptr;
    const int64_t gs = grads.stride(0);
    switch (kk) {
      case 1: filter_abs_sum_cpu_impl<scalar_t, kAccumulate, 1>(d, g, gs, o, labels, s, B, F, kk, scale); break;
      case 9: filter_abs_sum_cpu_impl<scalar_t, kAccumulate, 9>(d, g, gs, o, labels, s, B, F, kk, scale); break;
      case 25: filter_abs_sum_cpu_impl<scalar_t, kAccumulate, 25>(d, g, gs, o, labels, s, B, F, kk, scale); break;
      default: filter_abs_sum_cpu_impl<scalar_t, kAccumulate, 0>(d, g, gs, o, labels, s, B, F, kk, scale);
    }
  });
}

}  // namespace

at::Tensor filter_abs_sum(const at::Tensor& delta, const at::Tensor& grads, int64_t kk, double scale) {
  check_inputs(delta, grads, kk);
  if (grads.is_cuda()) {
#ifdef WITH_CUDA
    return filter_abs_sum_cuda(delta, grads, kk, scale);
#else
    TORCH_CHECK(false, "faig_fast_ext was built without CUDA support");
#endif
  }
  TORCH_CHECK(grads.device().is_cpu(), "unsupported device ", grads.device());
  auto out = at::empty({grads.size(0), delta.size(0) / kk}, grads.options());
  filter_abs_sum_cpu<false>(delta, grads, kk, out, nullptr, nullptr, scale);
  return out;
}

at::Tensor filter_abs_sum_accumulate(const at::Tensor& delta, const at::Tensor& grads, int64_t kk,
                                     const at::Tensor& label_idx, at::Tensor sums, double scale) {
  check_inputs(delta, grads, kk);
  check_accumulate(grads, delta.size(0) / kk, label_idx, sums);
  if (grads.is_cuda()) {
#ifdef WITH_CUDA
    return filter_abs_sum_accumulate_cuda(delta, grads, kk, label_idx, sums, scale);
#else
    TORCH_CHECK(false, "faig_fast_ext was built without CUDA support");
#endif
  }
  TORCH_CHECK(grads.device().is_cpu(), "unsupported device ", grads.device());
  const int64_t D = sums.size(0);
  const int64_t* labels = label_idx.data_ptr<int64_t>();
  for (int64_t b = 0; b < label_idx.size(0); ++b) {
    TORCH_CHECK(labels[b] >= 0 && labels[b] < D, "label_idx[", b, "] = ", labels[b], " is outside [0, ", D, ")");
  }
  auto out = at::empty({grads.size(0), delta.size(0) / kk}, grads.options());
  filter_abs_sum_cpu<true>(delta, grads, kk, out, &label_idx, &sums, scale);
  return out;
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "faig_fast per-filter |delta * grad| reductions (CPU OpenMP, optional CUDA)";
  m.def("filter_abs_sum", &filter_abs_sum, "out[b, f] = scale * sum_j |delta[f*kk+j] * grads[b, f*kk+j]|",
        py::arg("delta"), py::arg("grads"), py::arg("kk"), py::arg("scale") = 1.0);
  m.def("filter_abs_sum_accumulate", &filter_abs_sum_accumulate,
        "filter_abs_sum fused with sums[label_idx[b]] += out[b]; returns out", py::arg("delta"), py::arg("grads"),
        py::arg("kk"), py::arg("label_idx"), py::arg("sums"), py::arg("scale") = 1.0);
  m.def("has_cuda", &has_cuda, "whether this build includes the CUDA kernels");
  m.def("has_openmp", &has_openmp, "whether this build uses OpenMP");
}
