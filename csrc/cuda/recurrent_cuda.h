// CUDA backend of the recurrent loop (see csrc/kernels/params.h). Torch-free:
// ops.cpp includes this header when the extension is built WITH_CUDA.
// All pointers in the params are device pointers except batch_sizes and
// row_offsets (host); batch_sizes_dev/row_offsets_dev are device copies or
// null for dense input. `stream` is a cudaStream_t; `workspace` is device
// memory of at least *_workspace_bytes(p) bytes, allocated by the caller.
#pragma once

#include <cstddef>

#include "../kernels/params.h"

namespace fastcells {
namespace cuda {

template <typename scalar_t>
size_t forward_workspace_bytes(const kernels::LayerForwardParams<scalar_t>& p);

template <typename scalar_t>
void recurrent_forward(const kernels::LayerForwardParams<scalar_t>& p, void* workspace,
                       void* stream);

template <typename scalar_t>
size_t backward_workspace_bytes(const kernels::LayerBackwardParams<scalar_t>& p);

template <typename scalar_t>
void recurrent_backward(const kernels::LayerBackwardParams<scalar_t>& p, void* workspace,
                        void* stream);

}  // namespace cuda
}  // namespace fastcells
