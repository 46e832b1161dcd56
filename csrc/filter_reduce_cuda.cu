// CUDA kernels for the FAIG per-filter reductions (see filter_reduce.cpp for the contract).
// A group of TPF lanes (a power of two <= 32, chosen from kk) owns one filter: the lanes stride
// over its kk elements, reduce with warp shuffles and lane 0 writes out[b, f] (and adds it into
// sums[label[b], f]) for every image b, so delta is read once per filter from cache.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;
// 6 resident blocks of 256 threads per SM (75% occupancy) let ptxas use up to 40 registers; without the
// hint it capped them at 32 and the fp64 kTPF=2 kernels spilled (faig info --kernels sm_90 --nvcc).
constexpr int kMinBlocksPerSM = 6;

__device__ __forceinline__ float abs_val(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_val(double x) { return fabs(x); }

template <typename scalar_t, int kTPF, bool kAccumulate>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    filter_abs_sum_kernel(const scalar_t* __restrict__ delta, const scalar_t* __restrict__ grads,
                          int64_t grads_stride, scalar_t* __restrict__ out, const int64_t* __restrict__ labels,
                          scalar_t* __restrict__ sums, int64_t B, int64_t F, int64_t kk, int64_t D,
                          at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t f = tid / kTPF;
  const int lane = static_cast<int>(threadIdx.x) % kTPF;
  // Inactive groups stay alive so that every lane of the warp takes part in the shuffles.
  const bool active = f < F;
  const scalar_t* d = delta + f * kk;
  for (int64_t b = 0; b < B; ++b) {
    acc_t acc = acc_t(0);
    if (active) {
      const scalar_t* g = grads + b * grads_stride + f * kk;
      for (int64_t j = lane; j < kk; j += kTPF) {
        acc += abs_val(static_cast<acc_t>(d[j]) * static_cast<acc_t>(g[j]));
      }
    }
#pragma unroll
    for (int offset = kTPF / 2; offset > 0; offset /= 2) {
      acc += __shfl_down_sync(0xffffffffu, acc, offset, kTPF);
    }
    if (active && lane == 0) {
      const scalar_t v = static_cast<scalar_t>(acc * scale);
      out[b * F + f] = v;
      if constexpr (kAccumulate) {
        const int64_t label = labels[b];
        if (label >= 0 && label < D) {  // validated on the host; this only keeps memory safe
          gpuAtomicAdd(sums + label * F + f, v);
        }
      }
    }
  }
}

template <typename scalar_t, int kTPF, bool kAccumulate>
void launch(const at::Tensor& delta, const at::Tensor& grads, int64_t kk, at::Tensor& out,
            const at::Tensor* label_idx, at::Tensor* sums, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = grads.size(0);
  const int64_t F = delta.size(0) / kk;
  const int64_t blocks = (F * kTPF + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= 0x7fffffffLL, "too many filters for one launch: ", F);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  filter_abs_sum_kernel<scalar_t, kTPF, kAccumulate><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      delta.data_ptr<scalar_t>(), grads.data_ptr<scalar_t>(), grads.stride(0), out.data_ptr<scalar_t>(),
      kAccumulate ? label_idx->data_ptr<int64_t>() : nullptr, kAccumulate ? sums->data_ptr<scalar_t>() : nullptr,
      B, F, kk, kAccumulate ? sums->size(0) : 0, static_cast<acc_t>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kAccumulate>
void dispatch(const at::Tensor& delta, const at::Tensor& grads, int64_t kk, at::Tensor& out,
              const at::Tensor* label_idx, at::Tensor* sums, double scale) {
  if (grads.size(0) == 0 || delta.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "filter_abs_sum_cuda", [&] {
    if (kk >= 32) {
      launch<scalar_t, 32, kAccumulate>(delta, grads, kk, out, label_idx, sums, scale);
    } else if (kk >= 16) {
      launch<scalar_t, 16, kAccumulate>(delta, grads, kk, out, label_idx, sums, scale);
    } else if (kk >= 8) {
      launch<scalar_t, 8, kAccumulate>(delta, grads, kk, out, label_idx, sums, scale);
    } else if (kk >= 4) {
      launch<scalar_t, 4, kAccumulate>(delta, grads, kk, out, label_idx, sums, scale);
    } else if (kk >= 2) {
      launch<scalar_t, 2, kAccumulate>(delta, grads, kk, out, label_idx, sums, scale);
    } else {
      launch<scalar_t, 1, kAccumulate>(delta, grads, kk, out, label_idx, sums, scale);
    }
  });
}

}  // namespace

at::Tensor filter_abs_sum_cuda(const at::Tensor& delta, const at::Tensor& grads, int64_t kk, double scale) {
  const c10::cuda::CUDAGuard guard(grads.device());
  auto out = at::empty({grads.size(0), delta.size(0) / kk}, grads.options());
  dispatch<false>(delta, grads, kk, out, nullptr, nullptr, scale);
  return out;
}

at::Tensor filter_abs_sum_accumulate_cuda(const at::Tensor& delta, const at::Tensor& grads, int64_t kk,
                                          const at::Tensor& label_idx, at::Tensor& sums, double scale) {
  const c10::cuda::CUDAGuard guard(grads.device());
  auto out = at::empty({grads.size(0), delta.size(0) / kk}, grads.options());
  dispatch<true>(delta, grads, kk, out, &label_idx, &sums, scale);
  return out;
}
