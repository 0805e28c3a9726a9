// CPU backend of the recurrent loop (contract in csrc/kernels/params.h).
#pragma once

#include "../kernels/params.h"

namespace fastcells {
namespace cpu {

template <typename scalar_t>
void recurrent_forward(const kernels::LayerForwardParams<scalar_t>& p);

template <typename scalar_t>
void recurrent_backward(const kernels::LayerBackwardParams<scalar_t>& p);

}  // namespace cpu
}  // namespace fastcells
