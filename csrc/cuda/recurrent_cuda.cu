// CUDA backend of the recurrent loop of one layer in one direction.
//
// Shape legend (see csrc/kernels/cells.h): T steps, B batch, H hidden size,
// P recurrent/output size (proj_size or H), G gates (4 LSTM, 3 GRU, 1 RNN),
// GH = G*H, N packed rows. Semantics: csrc/kernels/params.h.
//
// Torch-free: only the CUDA runtime and csrc/kernels. The gate equations come
// from cells.h; this file only arranges the loop.
//
// Two ways to run the loop:
//
//  * persistent (W_hh of at most 64 Ki elements, e.g. LSTM H <= 128, or
//    larger when the weights fit in shared memory):
//    one launch for the whole sequence. Batch rows are independent in the
//    recurrence, so each thread block owns a group of RB
//    rows, keeps their state (h, c, dh, dc) in shared memory and loops over all
//    T steps itself; no grid-wide barrier is needed. W_hh (and W_hr) sit in
//    shared memory when they fit, else they are streamed from global memory
//    (L2) each step. Per step: one small matrix product per row group with the
//    weight element loaded once and reused for 4 rows in registers, then the
//    pointwise cell, separated by __syncthreads().
//
//  * stepwise (large H): per step one matrix product for the recurrent term
//    and a fused pointwise kernel (plus a product for the projection), with
//    the state double-buffered in the workspace. The products go through the
//    caller's GemmFn (cuBLAS in the extension), which runs on the same stream.
//
// Both are deterministic (fixed summation order, no atomics; cuBLAS gives
// the same bits for the same shapes on the same device), run on the caller's
// stream, allocate nothing and never synchronise with the host, so they can
// be captured into a CUDA graph. The environment variable
// FASTCELLS_CUDA_RECURRENT = auto | persistent | persistent_global | stepwise
// forces a path (tests use it to cover both on small shapes).

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../kernels/cells.h"
#include "../kernels/params.h"
#include "recurrent_cuda.h"

namespace fastcells {
namespace cuda {
namespace {

using kernels::LayerBackwardParams;
using kernels::LayerForwardParams;
using kernels::kGRU;
using kernels::kLSTM;

// ------------------------------------------------------------------ helpers

void check_call(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastcells CUDA: ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

// After a kernel launch: the launch's own error, if any.
void check_launch(const char* what) { check_call(cudaGetLastError(), what); }

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Carves consecutive aligned buffers out of the caller's workspace.
struct Carver {
  char* base;
  size_t used = 0;
  template <typename T>
  T* take(size_t count) {
    T* ptr = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += align_up(count * sizeof(T));
    return ptr;
  }
};

enum class Path { kPersistentSmem, kPersistentGlobal, kStepwise };

// Largest W_hh (G*H x P elements) that the persistent kernel streams from
// global memory each step instead of running the per-step (cuBLAS) loop.
// Measured on an H200 (benchmarks/results/targets_cuda.md, LSTM and GRU
// fwd+bwd, float32 and bfloat16, B = 16 and 64): with 768 Ki (GRU, H = 256)
// or 1 Mi (LSTM, H = 256) weights the per-step loop took 0.55-0.9x the
// persistent kernel's time; with 64 Ki (LSTM, H = 128) it took 1.25x.
// RNN at H = 256 (64 Ki) therefore stays persistent.
constexpr int64_t kPersistentGlobalMaxWeights = 64 * 1024;

struct DeviceInfo {
  int sms;
  int max_smem;  // opt-in dynamic shared memory per block, bytes
};

DeviceInfo device_info() {
  int dev = 0;
  check_call(cudaGetDevice(&dev), "cudaGetDevice");
  DeviceInfo info{};
  check_call(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev),
             "cudaDeviceGetAttribute(MultiProcessorCount)");
  check_call(
      cudaDeviceGetAttribute(&info.max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
      "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return info;
}

int round_up(int x, int m) { return (x + m - 1) / m * m; }
__host__ __device__ __forceinline__ int pad4(int x) { return (x + 3) & ~3; }

// ------------------------------------------------------- shared memory plans
// Element offsets into the dynamic shared memory of the persistent kernels;
// the same function runs on the host (to size the launch) and on the device.
struct FwdSmem {
  int w, wr, h, c, hh, r, total;
};

__host__ __device__ __forceinline__ FwdSmem fwd_smem(int GH, int H, int P, int RB, bool proj,
                                                     bool lstm, bool wsmem) {
  FwdSmem L;
  int o = 0;
  L.w = o;
  if (wsmem) o += GH * P;             // W_hh^T (P, GH)
  L.wr = o;
  if (wsmem && proj) o += H * P;      // W_hr^T (H, P)
  L.h = o;
  o += pad4(RB) * P;                  // h (RB4, P), rows past RB zero
  L.c = o;
  if (lstm) o += RB * H;              // c (RB, H)
  L.hh = o;
  o += RB * GH;                       // h W_hh^T (RB, GH)
  L.r = o;
  if (proj) o += pad4(RB) * H;        // r = o*tanh(c) (RB4, H)
  L.total = o;
  return L;
}

struct BwdSmem {
  int w, wr, dh, dht, dr, dc, dg, direct, total;
};

__host__ __device__ __forceinline__ BwdSmem bwd_smem(int GH, int H, int P, int RB, bool proj,
                                                     bool lstm, bool gru, bool wsmem) {
  BwdSmem L;
  int o = 0;
  L.w = o;
  if (wsmem) o += GH * P;             // W_hh (GH, P)
  L.wr = o;
  if (wsmem && proj) o += P * H;      // W_hr (P, H)
  L.dh = o;
  o += RB * P;                        // dL/dh carried to the previous step (RB, P)
  L.dht = o;
  o += pad4(RB) * P;                  // dL/dh_t incl. grad_out (RB4, P)
  L.dr = o;
  if (proj) o += RB * H;              // dL/dr (RB, H)
  L.dc = o;
  if (lstm) o += RB * H;              // dL/dc (RB, H)
  L.dg = o;
  o += pad4(RB) * GH;                 // recurrent-side gate grads (RB4, GH)
  L.direct = o;
  if (gru) o += RB * P;               // GRU z*dh path (RB, P)
  L.total = o;
  return L;
}

// ------------------------------------------------------------ small kernels

// dst (rows, cols) = src^T where src is (cols, rows) row-major.
template <typename T>
__global__ void transpose_kernel(const T* __restrict__ src, T* __restrict__ dst, int rows,
                                 int cols) {
  __shared__ T tile[32][33];
  const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int c = c0 + i, r = r0 + threadIdx.x;
    if (c < cols && r < rows) tile[i][threadIdx.x] = src[static_cast<int64_t>(c) * rows + r];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) dst[static_cast<int64_t>(r) * cols + c] = tile[threadIdx.x][i];
  }
}

template <typename T>
void launch_transpose(const T* src, T* dst, int rows, int cols, cudaStream_t stream) {
  const dim3 block(32, 8);
  const dim3 grid((cols + 31) / 32, (rows + 31) / 32);
  transpose_kernel<T><<<grid, block, 0, stream>>>(src, dst, rows, cols);
  check_launch("transpose kernel launch");
}

// dst[i] = src ? src[i] : 0
template <typename T>
void copy_or_zero(T* dst, const T* src, size_t count, cudaStream_t stream, const char* what) {
  if (count == 0 || dst == nullptr) return;
  if (src != nullptr) {
    check_call(cudaMemcpyAsync(dst, src, count * sizeof(T), cudaMemcpyDeviceToDevice, stream),
               what);
  } else {
    check_call(cudaMemsetAsync(dst, 0, count * sizeof(T), stream), what);
  }
}

// ------------------------------------------------------------ forward: cell
// Input side of one (row, unit) element: the G values x W_ih^T + b of the
// row's `gates` entry for unit u (loaded ahead of use to hide latency).
template <typename T>
struct CellIn {
  T x[4];
};

template <typename T>
__device__ __forceinline__ CellIn<T> load_cell_in(const T* gin, int G, int H, int u) {
  CellIn<T> in;
#pragma unroll
  for (int g = 0; g < 4; ++g) in.x[g] = g < G ? gin[g * H + u] : T(0);
  return in;
}

// One (row, unit) element of the forward cell. `gout` is the row of `gates`
// (activations written there), `hh` the row of h W_hh^T, `c` this element's
// cell state (LSTM, updated in place). Returns the new r (LSTM) / h (others).
template <typename T>
__device__ __forceinline__ T forward_cell(int mode, int H, int u, const CellIn<T>& in,
                                          T* gout, const T* hh, const T* b_hn, T* extra_elem,
                                          T* c, T h_prev) {
  if (mode == kLSTM) {
    const auto s = kernels::lstm_forward<T>(in.x[0] + hh[u], in.x[1] + hh[H + u],
                                            in.x[2] + hh[2 * H + u], in.x[3] + hh[3 * H + u],
                                            *c);
    gout[u] = s.i;
    gout[H + u] = s.f;
    gout[2 * H + u] = s.g;
    gout[3 * H + u] = s.o;
    *extra_elem = s.c;
    *c = s.c;
    return s.r;
  }
  if (mode == kGRU) {
    const T hn = hh[2 * H + u] + (b_hn != nullptr ? b_hn[u] : T(0));
    const auto s = kernels::gru_forward<T>(in.x[0], in.x[1], in.x[2], hh[u], hh[H + u], hn,
                                           h_prev);
    gout[u] = s.r;
    gout[H + u] = s.z;
    gout[2 * H + u] = s.n;
    *extra_elem = hn;
    return s.h;
  }
  const T h = kernels::rnn_forward<T>(mode, in.x[0] + hh[u]);
  gout[u] = h;
  return h;
}

// ------------------------------------------------- per-block row products
// acc[i] = sum_k a[i*lda + k] * w[k*ws] for the rows i < nr (nr <= 4) of a
// row group, all in the calling thread: each weight element is loaded once
// and used for every row. One row (the common B <= #SMs case) takes a loop
// with a single accumulator. Fixed summation order (k ascending).
template <typename T>
__device__ __forceinline__ void dot_rows(const T* a, int lda, const T* w, int ws, int K, int nr,
                                         T (&acc)[4]) {
  acc[0] = acc[1] = acc[2] = acc[3] = T(0);
  if (nr == 1) {
    T s0 = T(0);
#pragma unroll 4
    for (int k = 0; k < K; ++k) s0 += a[k] * w[k * ws];
    acc[0] = s0;
    return;
  }
  // Rows past nr are read (the buffers are padded to 4 rows) and dropped.
  T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
#pragma unroll 4
  for (int k = 0; k < K; ++k) {
    const T x = w[k * ws];
    s0 += a[k] * x;
    s1 += a[lda + k] * x;
    s2 += a[2 * lda + k] * x;
    s3 += a[3 * lda + k] * x;
  }
  acc[0] = s0;
  acc[1] = s1;
  acc[2] = s2;
  acc[3] = s3;
}

// ------------------------------------------------------- forward: persistent
// grid.x = ceil(B / RB) row groups; block loops over all T steps.
// wt / wrt: transposed weights in global memory (persistent_global), or null
// when the weights are staged into shared memory from p.w_hh / p.w_hr.
template <typename T>
__global__ void __launch_bounds__(1024) forward_persistent_kernel(const LayerForwardParams<T> p, const T* wt,
                                          const T* wrt, int RB) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sm = reinterpret_cast<T*>(smem_raw);
  const int mode = p.mode, H = p.H, P = p.P, B = p.B, T_ = p.T;
  const int GH = kernels::num_gates(mode) * H;
  const bool proj = p.w_hr != nullptr;
  const bool lstm = mode == kLSTM;
  const bool wsmem = wt == nullptr;
  const FwdSmem L = fwd_smem(GH, H, P, RB, proj, lstm, wsmem);
  const int b0 = blockIdx.x * RB;
  const int nrows = min(RB, B - b0);
  const int tid = threadIdx.x, nt = blockDim.x;

  // Stage weights (transposing) and the initial state.
  const T* W = wt;
  const T* Wr = wrt;
  if (wsmem) {
    for (int idx = tid; idx < GH * P; idx += nt) {
      const int j = idx / P, k = idx - j * P;
      sm[L.w + k * GH + j] = p.w_hh[idx];
    }
    W = sm + L.w;
    if (proj) {
      for (int idx = tid; idx < P * H; idx += nt) {
        const int q = idx / H, u = idx - q * H;
        sm[L.wr + u * P + q] = p.w_hr[idx];
      }
      Wr = sm + L.wr;
    }
  }
  T* sh = sm + L.h;
  T* sc = sm + L.c;
  T* shh = sm + L.hh;
  T* sr = sm + L.r;
  for (int idx = tid; idx < pad4(RB) * P; idx += nt) {
    const int b = idx / P;
    sh[idx] = b < nrows ? p.h0[static_cast<int64_t>(b0) * P + idx] : T(0);
  }
  if (lstm) {
    for (int idx = tid; idx < nrows * H; idx += nt)
      sc[idx] = p.c0 != nullptr ? p.c0[static_cast<int64_t>(b0) * H + idx] : T(0);
  }
  if (proj) {
    for (int idx = tid; idx < pad4(RB) * H; idx += nt) sr[idx] = T(0);
  }
  __syncthreads();

  // Each thread's first pointwise element of the next step is loaded one step
  // ahead (`pre`), so the global-memory latency overlaps the current step.
  const int G = kernels::num_gates(mode);
  CellIn<T> pre{};
  auto prefetch = [&](int bs_, int64_t off_) {
    if (tid < min(nrows, bs_ - b0) * H) {
      const int b = tid / H, u = tid - b * H;
      pre = load_cell_in<T>(p.gates + (off_ + b0 + b) * GH, G, H, u);
    }
  };
  int bs_next = 0;
  int64_t off_next = 0;
  if (T_ > 0) {
    kernels::step_rows(p.batch_sizes_dev, p.row_offsets_dev, p.reverse ? T_ - 1 : 0, B, bs_next,
                  off_next);
    prefetch(bs_next, off_next);
  }
  for (int s = 0; s < T_; ++s) {
    const int bs = bs_next;
    const int64_t off = off_next;
    if (s + 1 < T_) {
      kernels::step_rows(p.batch_sizes_dev, p.row_offsets_dev, p.reverse ? T_ - 2 - s : s + 1, B,
                    bs_next, off_next);
    }
    const int na = min(nrows, bs - b0);  // active rows of this group (a prefix); uniform
    if (na <= 0) {
      if (s + 1 < T_) prefetch(bs_next, off_next);
      continue;
    }

    // hh (na, GH) = h W_hh^T; each weight element feeds 4 rows.
    for (int j = tid; j < GH; j += nt) {
      for (int rb = 0; rb < na; rb += 4) {
        T a[4];
        dot_rows<T>(sh + rb * P, P, W + j, GH, P, min(4, na - rb), a);
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (rb + i < na) shh[(rb + i) * GH + j] = a[i];
      }
    }
    __syncthreads();

    // Pointwise cell.
    for (int idx = tid; idx < na * H; idx += nt) {
      const int b = idx / H, u = idx - b * H;
      const int64_t row = off + b0 + b;
      T* grow = p.gates + row * GH;
      const CellIn<T> in = idx == tid ? pre : load_cell_in<T>(grow, G, H, u);
      T dummy;
      T* extra = p.extra != nullptr ? p.extra + row * H + u : &dummy;
      const T h_prev = mode == kGRU ? sh[b * P + u] : T(0);
      const T v = forward_cell<T>(mode, H, u, in, grow, shh + b * GH, p.b_hn, extra,
                                  lstm ? sc + b * H + u : &dummy, h_prev);
      if (proj) {
        sr[b * H + u] = v;
      } else {
        sh[b * P + u] = v;
        p.out[row * p.ld_out + u] = v;
      }
    }
    if (s + 1 < T_) prefetch(bs_next, off_next);
    __syncthreads();

    if (proj) {
      // h (na, P) = r W_hr^T
      for (int q = tid; q < P; q += nt) {
        for (int rb = 0; rb < na; rb += 4) {
          T a[4];
          dot_rows<T>(sr + rb * H, H, Wr + q, P, H, min(4, na - rb), a);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if (rb + i < na) {
              sh[(rb + i) * P + q] = a[i];
              p.out[(off + b0 + rb + i) * p.ld_out + q] = a[i];
            }
          }
        }
      }
      __syncthreads();
    }
  }

  for (int idx = tid; idx < nrows * P; idx += nt) p.hy[static_cast<int64_t>(b0) * P + idx] = sh[idx];
  if (lstm && p.cy != nullptr) {
    for (int idx = tid; idx < nrows * H; idx += nt)
      p.cy[static_cast<int64_t>(b0) * H + idx] = sc[idx];
  }
}

// --------------------------------------------------------- forward: stepwise
// One step for all rows: active rows (b < bs) run the cell on hh (bs, GH);
// inactive rows carry h over into the next buffer.
template <typename T>
__global__ void forward_step_pointwise_kernel(const LayerForwardParams<T> p, int bs,
                                              int64_t off, const T* __restrict__ hh,
                                              const T* __restrict__ h_cur,
                                              T* __restrict__ h_next, T* __restrict__ c,
                                              T* __restrict__ r) {
  const int H = p.H, P = p.P, mode = p.mode;
  const int GH = kernels::num_gates(mode) * H;
  const bool proj = p.w_hr != nullptr;
  const int64_t total = static_cast<int64_t>(p.B) * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int b = static_cast<int>(idx / H), u = static_cast<int>(idx - static_cast<int64_t>(b) * H);
    if (b >= bs) {
      if (u < P) h_next[b * static_cast<int64_t>(P) + u] = h_cur[b * static_cast<int64_t>(P) + u];
      continue;
    }
    const int64_t row = off + b;
    T* grow = p.gates + row * GH;
    const CellIn<T> in = load_cell_in<T>(grow, kernels::num_gates(mode), H, u);
    T dummy;
    T* extra = p.extra != nullptr ? p.extra + row * H + u : &dummy;
    T* cel = c != nullptr ? c + idx : &dummy;
    const T h_prev = mode == kGRU ? h_cur[b * static_cast<int64_t>(P) + u] : T(0);
    const T v = forward_cell<T>(mode, H, u, in, grow, hh + static_cast<int64_t>(b) * GH,
                                p.b_hn, extra, cel, h_prev);
    if (proj) {
      r[idx] = v;
    } else {
      h_next[b * static_cast<int64_t>(P) + u] = v;
      p.out[row * p.ld_out + u] = v;
    }
  }
}

// ----------------------------------------------------------- backward: cell
// What forward saved for one (row, unit) element: the G activated gates, the
// extra value (LSTM c_t, GRU hh_n) and the previous state (LSTM c_{t-1}, GRU
// h_{t-1}); loaded ahead of use to hide latency.
template <typename T>
struct SavedIn {
  T g[4];
  T extra;
  T prev;
};

// `prev_active`: the row was active at the step forward ran before this one
// (tp, rows from offp), else its previous state is the initial one.
template <typename T>
__device__ __forceinline__ SavedIn<T> load_saved(const LayerBackwardParams<T>& p, int G,
                                                 int64_t row, int b, int u, bool prev_active,
                                                 int64_t offp) {
  const int H = p.H;
  SavedIn<T> in;
  const T* g = p.gates + row * (G * H);
#pragma unroll
  for (int k = 0; k < 4; ++k) in.g[k] = k < G ? g[k * H + u] : T(0);
  in.extra = T(0);
  in.prev = T(0);
  if (p.mode == kLSTM) {
    in.extra = p.extra[row * H + u];
    in.prev = prev_active ? p.extra[(offp + b) * H + u]
                          : (p.c0 != nullptr ? p.c0[static_cast<int64_t>(b) * H + u] : T(0));
  } else if (p.mode == kGRU) {
    in.extra = p.extra[row * H + u];
    in.prev = prev_active ? p.out[(offp + b) * p.ld_out + u]
                          : p.h0[static_cast<int64_t>(b) * p.P + u];
  }
  return in;
}

// One (row, unit) element of the backward cell. Writes the input-side and
// recurrent-side gate gradients to the output rows and the recurrent side to
// `dg` (the row of the buffer multiplied by W_hh); returns the GRU direct
// term z*dh (0 otherwise). `dr` is dL/d(cell output), `dc` this element's
// dL/dc (LSTM), updated in place.
template <typename T>
__device__ __forceinline__ T backward_cell(const LayerBackwardParams<T>& p, int u, int64_t row,
                                           const SavedIn<T>& in, T dr, T* dc, T* dg) {
  const int H = p.H, mode = p.mode;
  const int GH = kernels::num_gates(mode) * H;
  T* dx = p.dgates_x + row * GH;
  if (mode == kLSTM) {
    const T i = in.g[0], f = in.g[1], gg = in.g[2], o = in.g[3];
    const auto d = kernels::lstm_backward<T>(i, f, gg, o, in.extra, in.prev, dr, *dc);
    dx[u] = d.di;
    dx[H + u] = d.df;
    dx[2 * H + u] = d.dg;
    dx[3 * H + u] = d.do_;
    dg[u] = d.di;
    dg[H + u] = d.df;
    dg[2 * H + u] = d.dg;
    dg[3 * H + u] = d.do_;
    *dc = d.dc_prev;
    if (p.r_all != nullptr) p.r_all[row * H + u] = o * kernels::fc_tanh(in.extra);
    return T(0);
  }
  if (mode == kGRU) {
    const auto d = kernels::gru_backward<T>(in.g[0], in.g[1], in.g[2], in.extra, in.prev, dr);
    dx[u] = d.dx_r;
    dx[H + u] = d.dx_z;
    dx[2 * H + u] = d.dx_n;
    if (p.dgates_h != nullptr) {
      T* dh = p.dgates_h + row * GH;
      dh[u] = d.dx_r;
      dh[H + u] = d.dx_z;
      dh[2 * H + u] = d.dhh_n;
    }
    dg[u] = d.dx_r;
    dg[H + u] = d.dx_z;
    dg[2 * H + u] = d.dhh_n;
    return d.dh_prev_direct;
  }
  const T da = kernels::rnn_backward<T>(mode, in.g[0], dr);
  dx[u] = da;
  dg[u] = da;
  return T(0);
}

// ------------------------------------------------------ backward: persistent
// Walks the steps in the opposite order of forward. W_hh (GH, P) and
// W_hr (P, H) are used untransposed (the products here run along their rows).
template <typename T>
__global__ void __launch_bounds__(1024) backward_persistent_kernel(const LayerBackwardParams<T> p, bool wsmem, int RB) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sm = reinterpret_cast<T*>(smem_raw);
  const int mode = p.mode, H = p.H, P = p.P, B = p.B, T_ = p.T;
  const int G = kernels::num_gates(mode);
  const int GH = G * H;
  const bool proj = p.w_hr != nullptr;
  const bool lstm = mode == kLSTM, gru = mode == kGRU;
  const BwdSmem L = bwd_smem(GH, H, P, RB, proj, lstm, gru, wsmem);
  const int b0 = blockIdx.x * RB;
  const int nrows = min(RB, B - b0);
  const int tid = threadIdx.x, nt = blockDim.x;

  const T* W = p.w_hh;
  const T* Wr = p.w_hr;
  if (wsmem) {
    for (int idx = tid; idx < GH * P; idx += nt) sm[L.w + idx] = p.w_hh[idx];
    W = sm + L.w;
    if (proj) {
      for (int idx = tid; idx < P * H; idx += nt) sm[L.wr + idx] = p.w_hr[idx];
      Wr = sm + L.wr;
    }
  }
  T* sdh = sm + L.dh;
  T* sdht = sm + L.dht;
  T* sdr = sm + L.dr;
  T* sdc = sm + L.dc;
  T* sdg = sm + L.dg;
  T* sdirect = sm + L.direct;
  for (int idx = tid; idx < nrows * P; idx += nt)
    sdh[idx] = p.grad_hy != nullptr ? p.grad_hy[static_cast<int64_t>(b0) * P + idx] : T(0);
  for (int idx = tid; idx < pad4(RB) * P; idx += nt) sdht[idx] = T(0);
  for (int idx = tid; idx < pad4(RB) * GH; idx += nt) sdg[idx] = T(0);
  if (lstm) {
    for (int idx = tid; idx < nrows * H; idx += nt)
      sdc[idx] = p.grad_cy != nullptr ? p.grad_cy[static_cast<int64_t>(b0) * H + idx] : T(0);
  }
  __syncthreads();

  for (int s = 0; s < T_; ++s) {
    const int t = p.reverse ? s : T_ - 1 - s;
    int bs;
    int64_t off;
    kernels::step_rows(p.batch_sizes_dev, p.row_offsets_dev, t, B, bs, off);
    const int na = min(nrows, bs - b0);
    if (na <= 0) continue;  // uniform across the block
    // Where each row's previous state came from in forward.
    int bsp;
    int64_t offp;
    kernels::prev_step_rows(p.batch_sizes_dev, p.row_offsets_dev, T_, B, t, p.reverse, bsp, offp);
    // Saved values of this thread's first pointwise element, loaded now so
    // that the loads overlap the dh_t and projection phases.
    SavedIn<T> pre{};
    if (tid < na * H) {
      const int b = tid / H, u = tid - b * H;
      pre = load_saved<T>(p, G, off + b0 + b, b0 + b, u, b0 + b < bsp, offp);
    }

    // dh_t = carried dh + grad_out; record h_{t-1} and dh_t.
    for (int idx = tid; idx < na * P; idx += nt) {
      const int b = idx / P, q = idx - b * P;
      const int64_t row = off + b0 + b;
      T v = sdh[idx];
      if (p.grad_out != nullptr) v += p.grad_out[row * p.ld_gout + q];
      sdht[idx] = v;
      if (p.dh_all != nullptr) p.dh_all[row * P + q] = v;
      if (p.h_prev != nullptr) {
        p.h_prev[row * P + q] = (b0 + b < bsp) ? p.out[(offp + b0 + b) * p.ld_out + q]
                                               : p.h0[static_cast<int64_t>(b0 + b) * P + q];
      }
    }
    __syncthreads();

    if (proj) {
      // dr (na, H) = dh_t W_hr
      for (int u = tid; u < H; u += nt) {
        for (int rb = 0; rb < na; rb += 4) {
          T a[4];
          dot_rows<T>(sdht + rb * P, P, Wr + u, H, P, min(4, na - rb), a);
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (rb + i < na) sdr[(rb + i) * H + u] = a[i];
        }
      }
      __syncthreads();
    }

    // Pointwise cell backward.
    for (int idx = tid; idx < na * H; idx += nt) {
      const int b = idx / H, u = idx - b * H;
      const int64_t row = off + b0 + b;
      const SavedIn<T> in =
          idx == tid ? pre : load_saved<T>(p, G, row, b0 + b, u, b0 + b < bsp, offp);
      const T dr = proj ? sdr[b * H + u] : sdht[b * P + u];
      T dummy = T(0);
      const T direct = backward_cell<T>(p, u, row, in, dr, lstm ? sdc + b * H + u : &dummy,
                                        sdg + b * GH);
      if (gru) sdirect[b * P + u] = direct;
    }
    __syncthreads();

    // dh_{t-1} (na, P) = dg W_hh (+ z*dh for GRU)
    for (int q = tid; q < P; q += nt) {
      for (int rb = 0; rb < na; rb += 4) {
        T a[4];
        dot_rows<T>(sdg + rb * GH, GH, W + q, P, GH, min(4, na - rb), a);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (rb + i < na) {
            sdh[(rb + i) * P + q] = a[i] + (gru ? sdirect[(rb + i) * P + q] : T(0));
          }
        }
      }
    }
    __syncthreads();
  }

  if (p.dh0 != nullptr) {
    for (int idx = tid; idx < nrows * P; idx += nt) p.dh0[static_cast<int64_t>(b0) * P + idx] = sdh[idx];
  }
  if (lstm && p.dc0 != nullptr) {
    for (int idx = tid; idx < nrows * H; idx += nt) p.dc0[static_cast<int64_t>(b0) * H + idx] = sdc[idx];
  }
}

// -------------------------------------------------------- backward: stepwise
// dh_t = dh_cur + grad_out for active rows (also recorded in dh_all), h_prev
// recorded; inactive rows carry dh_cur into dh_next.
template <typename T>
__global__ void backward_step_prep_kernel(const LayerBackwardParams<T> p, int bs, int64_t off,
                                          int bsp, int64_t offp, const T* __restrict__ dh_cur,
                                          T* __restrict__ dh_next, T* __restrict__ dht) {
  const int P = p.P;
  const int64_t total = static_cast<int64_t>(p.B) * P;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int b = static_cast<int>(idx / P), q = static_cast<int>(idx - static_cast<int64_t>(b) * P);
    if (b >= bs) {
      dh_next[idx] = dh_cur[idx];
      continue;
    }
    const int64_t row = off + b;
    T v = dh_cur[idx];
    if (p.grad_out != nullptr) v += p.grad_out[row * p.ld_gout + q];
    dht[idx] = v;
    if (p.dh_all != nullptr) p.dh_all[row * P + q] = v;
    if (p.h_prev != nullptr) {
      p.h_prev[row * P + q] = b < bsp ? p.out[(offp + b) * p.ld_out + q] : p.h0[idx];
    }
  }
}

// Pointwise backward for the bs active rows. The recurrent-side gradients go
// to dgates_h (GRU) or dgates_x (others), which then feed the dh GEMM.
template <typename T>
__global__ void backward_step_pointwise_kernel(const LayerBackwardParams<T> p, int bs,
                                               int64_t off, int bsp, int64_t offp,
                                               const T* __restrict__ dr_buf,
                                               T* __restrict__ dc, T* __restrict__ direct,
                                               T* __restrict__ dg_scratch) {
  const int H = p.H, P = p.P, mode = p.mode;
  const int GH = kernels::num_gates(mode) * H;
  const bool lstm = mode == kLSTM, gru = mode == kGRU;
  const int64_t total = static_cast<int64_t>(bs) * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int b = static_cast<int>(idx / H), u = static_cast<int>(idx - static_cast<int64_t>(b) * H);
    const int64_t row = off + b;
    const SavedIn<T> in = load_saved<T>(p, kernels::num_gates(mode), row, b, u, b < bsp, offp);
    const T dr = dr_buf[static_cast<int64_t>(b) * (p.w_hr != nullptr ? H : P) + u];
    T dummy = T(0);
    // dg_scratch: the row's recurrent-side gradients; for GRU that is
    // dgates_h when given, else a workspace row.
    T* dg = dg_scratch + static_cast<int64_t>(b) * GH;
    const T d = backward_cell<T>(p, u, row, in, dr, lstm ? dc + idx : &dummy, dg);
    if (gru) direct[static_cast<int64_t>(b) * P + u] = d;
  }
}

int pointwise_blocks(int64_t total) {
  const int64_t blocks = (total + 255) / 256;
  return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

// ------------------------------------------------------------ path choosing

// Threads of a persistent block: enough for one output per thread in the
// widest phase (GH gate columns, RB*H cell elements, RB*P state elements).
int choose_threads(int GH, int H, int P, int RB) {
  int n = GH;
  if (RB * H > n) n = RB * H;
  if (RB * P > n) n = RB * P;
  n = round_up(n, 32);
  return n > 1024 ? 1024 : n;
}

struct Plan {
  Path path;
  int RB;
  size_t smem;
};

// Picks the loop implementation for one layer-direction, or takes the one
// the op layer forces.
template <typename T>
Plan plan_loop(int mode, int B, int H, int P, bool proj, bool backward,
               kernels::CudaLoop forced) {
  using kernels::CudaLoop;
  const DeviceInfo dev = device_info();
  const int GH = kernels::num_gates(mode) * H;
  const bool lstm = mode == kLSTM, gru = mode == kGRU;
  auto bytes = [&](int RB, bool wsmem) -> size_t {
    const int elems = backward ? bwd_smem(GH, H, P, RB, proj, lstm, gru, wsmem).total
                               : fwd_smem(GH, H, P, RB, proj, lstm, wsmem).total;
    return static_cast<size_t>(elems) * sizeof(T);
  };
  int RB = (B + dev.sms - 1) / dev.sms;
  if (RB < 1) RB = 1;

  const size_t cap = static_cast<size_t>(dev.max_smem);
  const bool global = forced == CudaLoop::kPersistentGlobal;
  if (forced == CudaLoop::kStepwise) return Plan{Path::kStepwise, 0, 0};
  if (!global && bytes(1, true) <= cap) {
    // Weights in shared memory; smaller row groups (more blocks, possibly in
    // several waves) when the state of RB rows does not fit beside them.
    while (RB > 1 && bytes(RB, true) > cap) --RB;
    return Plan{Path::kPersistentSmem, RB, bytes(RB, true)};
  }
  if (global || static_cast<int64_t>(GH) * P <= kPersistentGlobalMaxWeights) {
    // Weights from L2: larger row groups amortise the weight traffic.
    if (!global && RB < 4) RB = B < 4 ? B : 4;
    while (RB > 1 && bytes(RB, false) > cap) --RB;
    if (bytes(RB, false) <= cap) {
      return Plan{Path::kPersistentGlobal, RB, bytes(RB, false)};
    }
  }
  return Plan{Path::kStepwise, 0, 0};
}

template <typename K>
void set_smem(K kernel, size_t smem) {
  if (smem > 48 * 1024) {
    check_call(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
}

// Workspace layout (shared by the size query and the run).
template <typename T>
struct FwdWork {
  T* wt;      // (P, GH) W_hh^T (persistent_global only)
  T* wrt;     // (H, P) W_hr^T (persistent_global only)
  T* h[2];    // (B, P) double-buffered state
  T* c;       // (B, H)
  T* hh;      // (B, GH) h W_hh^T of one step
  T* r;       // (B, H) LSTM r before projection
  size_t bytes;
};

template <typename T>
FwdWork<T> carve_forward(const LayerForwardParams<T>& p, void* workspace) {
  Carver cv{static_cast<char*>(workspace)};
  const size_t GH = static_cast<size_t>(kernels::num_gates(p.mode)) * p.H;
  const size_t B = p.B, H = p.H, P = p.P;
  const bool proj = p.w_hr != nullptr;
  FwdWork<T> w;
  w.wt = cv.take<T>(GH * P);
  w.wrt = proj ? cv.take<T>(H * P) : nullptr;
  w.h[0] = cv.take<T>(B * P);
  w.h[1] = cv.take<T>(B * P);
  w.c = p.mode == kLSTM ? cv.take<T>(B * H) : nullptr;
  w.hh = cv.take<T>(B * GH);
  w.r = proj ? cv.take<T>(B * H) : nullptr;
  w.bytes = cv.used;
  return w;
}

template <typename T>
struct BwdWork {
  T* dh[2];   // (B, P) double-buffered dL/dh
  T* dht;     // (B, P) dL/dh_t of one step
  T* dr;      // (B, H) dL/dr (projection)
  T* dc;      // (B, H) dL/dc (LSTM)
  T* dg;      // (B, GH) GRU recurrent-side grads when dgates_h is null
  size_t bytes;
};

template <typename T>
BwdWork<T> carve_backward(const LayerBackwardParams<T>& p, void* workspace) {
  Carver cv{static_cast<char*>(workspace)};
  const size_t GH = static_cast<size_t>(kernels::num_gates(p.mode)) * p.H;
  const size_t B = p.B, H = p.H, P = p.P;
  BwdWork<T> w;
  w.dh[0] = cv.take<T>(B * P);
  w.dh[1] = cv.take<T>(B * P);
  w.dht = cv.take<T>(B * P);
  w.dr = p.w_hr != nullptr ? cv.take<T>(B * H) : nullptr;
  w.dc = p.mode == kLSTM ? cv.take<T>(B * H) : nullptr;
  w.dg = p.mode == kGRU ? cv.take<T>(B * GH) : nullptr;
  w.bytes = cv.used;
  return w;
}

void check_mode(int mode, int H, int P, bool proj) {
  if (!kernels::is_valid_mode(mode)) {
    throw std::runtime_error("fastcells CUDA: `mode` must be " + kernels::valid_modes() +
                             ", got " + std::to_string(mode));
  }
  if (proj && !kernels::allows_proj(mode)) {
    throw std::runtime_error("fastcells CUDA: w_hr is LSTM-only");
  }
  if (!proj && P != H) {
    throw std::runtime_error("fastcells CUDA: P must equal H without a projection (H=" +
                             std::to_string(H) + ", P=" + std::to_string(P) + ")");
  }
}

}  // namespace

// ------------------------------------------------------------------ forward

template <typename scalar_t>
size_t forward_workspace_bytes(const kernels::LayerForwardParams<scalar_t>& p) {
  return carve_forward<scalar_t>(p, nullptr).bytes;
}

template <typename scalar_t>
void recurrent_forward(const kernels::LayerForwardParams<scalar_t>& p, void* workspace,
                       void* stream_ptr, GemmFn<scalar_t> gemm) {
  using T = scalar_t;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool proj = p.w_hr != nullptr;
  check_mode(p.mode, p.H, p.P, proj);
  if (p.B <= 0) return;
  const int GH = kernels::num_gates(p.mode) * p.H;
  const FwdWork<T> w = carve_forward<T>(p, workspace);
  const Plan plan = plan_loop<T>(p.mode, p.B, p.H, p.P, proj, /*backward=*/false, p.cuda_loop);

  if (plan.path != Path::kStepwise) {
    const bool global = plan.path == Path::kPersistentGlobal;
    if (global) {
      launch_transpose<T>(p.w_hh, w.wt, p.P, GH, stream);
      if (proj) launch_transpose<T>(p.w_hr, w.wrt, p.H, p.P, stream);
    }
    set_smem(forward_persistent_kernel<T>, plan.smem);
    const int threads = choose_threads(GH, p.H, p.P, plan.RB);
    const int blocks = (p.B + plan.RB - 1) / plan.RB;
    forward_persistent_kernel<T><<<blocks, threads, plan.smem, stream>>>(
        p, global ? w.wt : nullptr, global ? w.wrt : nullptr, plan.RB);
    check_launch("persistent forward kernel launch");
    return;
  }

  // Stepwise: per step h W_hh^T, the pointwise cell (+ r W_hr^T).
  if (gemm == nullptr) throw std::runtime_error("fastcells CUDA: no GEMM for the stepwise path");
  const size_t BP = static_cast<size_t>(p.B) * p.P, BH = static_cast<size_t>(p.B) * p.H;
  copy_or_zero<T>(w.h[0], p.h0, BP, stream, "copy h0");
  if (p.mode == kLSTM) copy_or_zero<T>(w.c, p.c0, BH, stream, "copy c0");
  int cur = 0;
  const int pw_blocks = pointwise_blocks(static_cast<int64_t>(BH));
  for (int s = 0; s < p.T; ++s) {
    const int t = p.reverse ? p.T - 1 - s : s;
    int bs;
    int64_t off;
    kernels::step_rows(p.batch_sizes, p.row_offsets, t, p.B, bs, off);
    if (bs <= 0) continue;
    T* h_cur = w.h[cur];
    T* h_next = w.h[1 - cur];
    gemm(bs, GH, p.P, h_cur, p.P, p.w_hh, p.P, /*trans_b=*/true, /*accumulate=*/false, w.hh, GH);
    forward_step_pointwise_kernel<T><<<pw_blocks, 256, 0, stream>>>(p, bs, off, w.hh, h_cur,
                                                                    h_next, w.c, w.r);
    check_launch("stepwise forward pointwise kernel launch");
    if (proj) {
      gemm(bs, p.P, p.H, w.r, p.H, p.w_hr, p.H, /*trans_b=*/true, /*accumulate=*/false, h_next,
           p.P);
      check_call(cudaMemcpy2DAsync(p.out + off * p.ld_out, p.ld_out * sizeof(T), h_next,
                                   p.P * sizeof(T), p.P * sizeof(T), bs,
                                   cudaMemcpyDeviceToDevice, stream),
                 "copy projected h to the output");
    }
    cur = 1 - cur;
  }
  copy_or_zero<T>(p.hy, w.h[cur], BP, stream, "copy hy");
  if (p.mode == kLSTM && p.cy != nullptr) copy_or_zero<T>(p.cy, w.c, BH, stream, "copy cy");
}

// ----------------------------------------------------------------- backward

template <typename scalar_t>
size_t backward_workspace_bytes(const kernels::LayerBackwardParams<scalar_t>& p) {
  return carve_backward<scalar_t>(p, nullptr).bytes;
}

template <typename scalar_t>
void recurrent_backward(const kernels::LayerBackwardParams<scalar_t>& p, void* workspace,
                        void* stream_ptr, GemmFn<scalar_t> gemm) {
  using T = scalar_t;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool proj = p.w_hr != nullptr;
  check_mode(p.mode, p.H, p.P, proj);
  if (p.B <= 0) return;
  const int GH = kernels::num_gates(p.mode) * p.H;
  const BwdWork<T> w = carve_backward<T>(p, workspace);
  const Plan plan = plan_loop<T>(p.mode, p.B, p.H, p.P, proj, /*backward=*/true, p.cuda_loop);

  if (plan.path != Path::kStepwise) {
    const bool wsmem = plan.path == Path::kPersistentSmem;
    set_smem(backward_persistent_kernel<T>, plan.smem);
    const int threads = choose_threads(GH, p.H, p.P, plan.RB);
    const int blocks = (p.B + plan.RB - 1) / plan.RB;
    backward_persistent_kernel<T><<<blocks, threads, plan.smem, stream>>>(p, wsmem, plan.RB);
    check_launch("persistent backward kernel launch");
    return;
  }

  if (gemm == nullptr) throw std::runtime_error("fastcells CUDA: no GEMM for the stepwise path");
  const size_t BP = static_cast<size_t>(p.B) * p.P, BH = static_cast<size_t>(p.B) * p.H;
  copy_or_zero<T>(w.dh[0], p.grad_hy, BP, stream, "copy grad_hy");
  if (p.mode == kLSTM) copy_or_zero<T>(w.dc, p.grad_cy, BH, stream, "copy grad_cy");
  int cur = 0;
  const int prep_blocks = pointwise_blocks(static_cast<int64_t>(BP));
  for (int s = 0; s < p.T; ++s) {
    const int t = p.reverse ? s : p.T - 1 - s;
    int bs;
    int64_t off;
    kernels::step_rows(p.batch_sizes, p.row_offsets, t, p.B, bs, off);
    if (bs <= 0) continue;
    int bsp;
    int64_t offp;
    kernels::prev_step_rows(p.batch_sizes, p.row_offsets, p.T, p.B, t, p.reverse, bsp, offp);
    T* dh_cur = w.dh[cur];
    T* dh_next = w.dh[1 - cur];
    backward_step_prep_kernel<T><<<prep_blocks, 256, 0, stream>>>(p, bs, off, bsp, offp, dh_cur,
                                                                  dh_next, w.dht);
    check_launch("stepwise backward prep kernel launch");
    if (proj) {
      gemm(bs, p.H, p.P, w.dht, p.P, p.w_hr, p.H, /*trans_b=*/false, /*accumulate=*/false, w.dr,
           p.H);
    }
    // Recurrent-side gradient rows: dgates_x for LSTM/RNN; for GRU dgates_h
    // (or a workspace buffer when the caller passed none).
    T* dg_rows;
    if (p.mode == kGRU) {
      dg_rows = p.dgates_h != nullptr ? p.dgates_h + off * GH : w.dg;
    } else {
      dg_rows = p.dgates_x + off * GH;
    }
    // GRU: the direct term z*dh goes straight into dh_next's active rows and
    // the product below adds dg W_hh to it.
    const bool gru = p.mode == kGRU;
    backward_step_pointwise_kernel<T>
        <<<pointwise_blocks(static_cast<int64_t>(bs) * p.H), 256, 0, stream>>>(
            p, bs, off, bsp, offp, proj ? w.dr : w.dht, w.dc, gru ? dh_next : nullptr, dg_rows);
    check_launch("stepwise backward pointwise kernel launch");
    gemm(bs, p.P, GH, dg_rows, GH, p.w_hh, p.P, /*trans_b=*/false, /*accumulate=*/gru, dh_next,
         p.P);
    cur = 1 - cur;
  }
  copy_or_zero<T>(p.dh0, w.dh[cur], BP, stream, "copy dh0");
  if (p.mode == kLSTM && p.dc0 != nullptr) copy_or_zero<T>(p.dc0, w.dc, BH, stream, "copy dc0");
}

// ------------------------------------------------------ explicit instances

#define FASTCELLS_INSTANTIATE(T)                                                              \
  template size_t forward_workspace_bytes<T>(const kernels::LayerForwardParams<T>&);         \
  template void recurrent_forward<T>(const kernels::LayerForwardParams<T>&, void*, void*,   \
                                     GemmFn<T>);                                            \
  template size_t backward_workspace_bytes<T>(const kernels::LayerBackwardParams<T>&);       \
  template void recurrent_backward<T>(const kernels::LayerBackwardParams<T>&, void*, void*, \
                                      GemmFn<T>);

FASTCELLS_INSTANTIATE(float)
FASTCELLS_INSTANTIATE(double)

#undef FASTCELLS_INSTANTIATE

}  // namespace cuda
}  // namespace fastcells
