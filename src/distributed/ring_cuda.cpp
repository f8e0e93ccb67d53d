// Ring attention on CUDA tensors: ring.cpp's schedule with device buffers. Forward: every step
// merges into float32 out and lse in the kernels' epilogue (ring_forward_step). Backward: one sweep
// (FlashAttention's ring form): keys travel as in the forward, each step adds into float32 dq and
// into the step's dk, dv (ring_step_gradients, with delta = rowsum(dout∘out)), and those dk, dv go
// back to the keys' owner packed like the keys came. Everything is queued on the caller's stream;
// the communicator orders its transfers against it (bind_stream), so with NCCL a step's transfer
// runs while the step before it computes. The entry lists are made on the host, a step at a time.
// Under grouped-query heads k, v and dk, dv keep their Hkv heads here: the schedule's entries are
// (row, key/value head) ones (ring.cpp's for_kv_heads), the buffers hold Hkv heads, and the step
// kernels read query head h's keys at h / (H / Hkv) and add the group's gradients into one head.
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda/ring_kernels.hpp"
#include "dattn/attention.hpp"
#include "distributed/schedule.hpp"

namespace dattn::detail {
namespace {

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("dattn ring: ") + what + ": " + cudaGetErrorString(e));
}

// One device allocation for the length of a ring call.
class DeviceMemory {
 public:
  explicit DeviceMemory(std::size_t bytes) {
    if (bytes > 0) cuda_check(cudaMalloc(&data_, bytes), "cudaMalloc");
  }
  ~DeviceMemory() {
    if (data_) cudaFree(data_);
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  template <class T = std::byte>
  T* get() const { return static_cast<T*>(data_); }

 private:
  void* data_ = nullptr;
};

// Runs the call on the device that holds q (the helper kernels launch on the current device).
class DeviceOf {
 public:
  explicit DeviceOf(const TensorView& q) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (q.device.index != previous_) cuda_check(cudaSetDevice(q.device.index), "cudaSetDevice");
  }
  ~DeviceOf() { cudaSetDevice(previous_); }
  DeviceOf(const DeviceOf&) = delete;
  DeviceOf& operator=(const DeviceOf&) = delete;

 private:
  int previous_ = 0;
};

Device device_of(const TensorView& t) { return t.device; }

TensorView device_view(void* data, DType dtype, const std::vector<std::int64_t>& shape, Device device) {
  return make_view(data, dtype, shape, {}, device);
}

// A rank's keys on the move: two slots each way, so step t + 1 travels while step t computes.
class KeyExchange {
 public:
  KeyExchange(Communicator& comm, const Schedule& schedule, const Keys& own, int tag, RingStats& stats, void* stream)
      : comm_(comm), schedule_(schedule), own_(own), tag_(tag), stats_(stats), stream_(stream),
        B_(own.k.shape[0]), n_(own.k.shape[1]), H_(own.k.shape[2]), D_(own.k.shape[3]),
        row_bytes_(std::size_t(D_) * dtype_size(own.k.dtype)),
        max_bytes_(2 * std::size_t(B_ * n_ * H_) * row_bytes_ + std::size_t(B_ * n_)),
        send_{DeviceMemory(max_bytes_), DeviceMemory(max_bytes_)},
        receive_{DeviceMemory(max_bytes_), DeviceMemory(max_bytes_)},
        outgoing_{DeviceMemory(std::size_t(n_ * H_) * 8), DeviceMemory(std::size_t(n_ * H_) * 8)},
        incoming_{DeviceMemory(std::size_t(n_ * H_) * 8), DeviceMemory(std::size_t(n_ * H_) * 8)},
        block_(2 * std::size_t(B_ * n_ * H_) * row_bytes_), block_mask_(std::size_t(B_ * n_)) {}

  const Step& step(int t) const { return steps_[t % 2]; }
  const std::int64_t* incoming(int t) const { return incoming_[t % 2].get<std::int64_t>(); }
  const std::int64_t* outgoing(int t) const { return outgoing_[t % 2].get<std::int64_t>(); }

  // Posts step t: receives source's entries, packs and sends this rank's entries dest needs.
  // Step 0 (this rank's own keys) moves nothing.
  void post(int t) {
    if (t >= schedule_.P) return;
    const int slot = t % 2;
    if (t == 0) {
      steps_[0] = schedule_.step(0);
      return;
    }
    comm_.wait(sends_[slot]);  // step t − 2's send, before its buffer is refilled
    sends_[slot] = receives_[slot] = -1;
    const Step& s = steps_[slot] = schedule_.step(t);
    if (!s.incoming.empty()) {
      upload(s.incoming, incoming_[slot]);
      receives_[slot] = comm_.irecv(receive_[slot].get(), bytes(s.incoming.size()), s.source, tag_);
    }
    if (!s.outgoing.empty()) {
      upload(s.outgoing, outgoing_[slot]);
      const std::int64_t count = std::int64_t(s.outgoing.size());
      std::byte* packed = send_[slot].get();
      const std::size_t part = std::size_t(B_ * count) * row_bytes_;
      cuda::gather_entries(own_.k, outgoing_[slot].get<std::int64_t>(), count, packed, stream_);
      cuda::gather_entries(own_.v, outgoing_[slot].get<std::int64_t>(), count, packed + part, stream_);
      if (own_.mask) cuda::copy_mask(*own_.mask, mask_view(packed + 2 * part), stream_);
      sends_[slot] = comm_.isend(packed, bytes(s.outgoing.size()), s.dest, tag_);
      stats_.bytes_sent += std::int64_t(bytes(s.outgoing.size()));
      ++stats_.transfers;
    }
    comm_.flush();
  }

  // The keys of step t ≥ 1 (after post(t)): the received entries unpacked into a zeroed block.
  Keys receive(int t) {
    const int slot = t % 2;
    const Step& s = steps_[slot];
    comm_.wait(receives_[slot]);
    receives_[slot] = -1;
    stats_.bytes_received += std::int64_t(bytes(s.incoming.size()));
    const Device device = device_of(own_.k);
    const TensorView k = device_view(block_.get(), own_.k.dtype, {B_, n_, H_, D_}, device);
    const TensorView v = device_view(block_.get() + std::size_t(B_ * n_ * H_) * row_bytes_, own_.k.dtype, {B_, n_, H_, D_}, device);
    cuda_check(cudaMemsetAsync(block_.get(), 0, 2 * std::size_t(B_ * n_ * H_) * row_bytes_, cudaStream_t(stream_)),
               "cudaMemsetAsync");
    const std::int64_t count = std::int64_t(s.incoming.size());
    const std::byte* packed = receive_[slot].get();
    const std::size_t part = std::size_t(B_ * count) * row_bytes_;
    cuda::scatter_entries(packed, incoming_[slot].get<std::int64_t>(), count, k, stream_);
    cuda::scatter_entries(packed + part, incoming_[slot].get<std::int64_t>(), count, v, stream_);
    Keys keys{k, v, std::nullopt};
    if (own_.mask) {
      keys.mask = device_view(block_mask_.get(), DType::boolean, {B_, n_}, device);
      cuda::copy_mask(mask_view(const_cast<std::byte*>(packed) + 2 * part), *keys.mask, stream_);
    }
    return keys;
  }

  void finish() {
    comm_.wait(sends_[0]);
    comm_.wait(sends_[1]);
  }

 private:
  std::size_t bytes(std::size_t entries) const {
    return 2 * std::size_t(B_) * entries * row_bytes_ + (own_.mask ? std::size_t(B_ * n_) : 0);
  }
  TensorView mask_view(std::byte* data) const { return device_view(data, DType::boolean, {B_, n_}, device_of(own_.k)); }
  // A pageable upload returns once the host copy is staged, so `entries` may go right after.
  void upload(const Entries& entries, const DeviceMemory& to) const {
    cuda_check(cudaMemcpyAsync(to.get(), entries.data(), entries.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice,
                               cudaStream_t(stream_)),
               "entry upload");
  }

  Communicator& comm_;
  const Schedule& schedule_;
  const Keys& own_;
  int tag_;
  RingStats& stats_;
  void* stream_;
  std::int64_t B_, n_, H_, D_;
  std::size_t row_bytes_, max_bytes_;
  DeviceMemory send_[2], receive_[2], outgoing_[2], incoming_[2], block_, block_mask_;
  Step steps_[2];
  int sends_[2] = {-1, -1}, receives_[2] = {-1, -1};
};

// Calls body(t, source, keys) for every step whose keys this rank needs (its own at t = 0) and
// after_step(t) after every step, with step t + 1 in flight meanwhile.
template <class Body, class AfterStep>
void for_each_source(KeyExchange& exchange, const Schedule& schedule, const Keys& own, Body&& body,
                     AfterStep&& after_step) {
  exchange.post(0);  // t = 0 sends nothing: only makes the step's entries
  exchange.post(1);
  if (!exchange.step(0).incoming.empty()) body(0, schedule.rank, own);
  after_step(0);
  for (int t = 1; t < schedule.P; ++t) {
    exchange.post(t + 1);
    if (!exchange.step(t).incoming.empty()) body(t, exchange.step(t).source, exchange.receive(t));
    after_step(t);
  }
  exchange.finish();
}

// fn(query chunk index, its offset, q0, q1, key offset, k0, k1) over every (query chunk, key chunk
// of source) pair; offsets are into the local tensors.
template <class F>
void each_pair(const Schedule& schedule, int source, F&& fn) {
  std::int64_t key_at = 0;
  for (const auto& [k0, k1] : ring_rows(schedule.N, schedule.P, source, schedule.layout)) {
    std::int64_t query_at = 0;
    for (std::size_t i = 0; i < schedule.mine.size(); ++i) {
      const auto [q0, q1] = schedule.mine[i];
      fn(i, query_at, q0, q1, key_at, k0, k1);
      query_at += q1 - q0;
    }
    key_at += k1 - k0;
  }
}

}  // namespace

void ring_forward_cuda(Communicator& comm, const Schedule& schedule, const CudaStepKernels& kernels, const Keys& own,
                       const TensorView& q, const TensorView& out, const TensorView& lse, RingStats& stats,
                       void* stream) {
  const DeviceOf device(q);
  comm.bind_stream(stream);
  const std::int64_t B = q.shape[0], n = q.shape[1], H = q.shape[2], D = q.shape[3], N = schedule.N;
  const Device dev = device_of(q);
  DeviceMemory merged(std::size_t(B * n * H * D) * 4), merged_lse(std::size_t(B * H * n) * 4);
  const TensorView merged_view = device_view(merged.get(), DType::float32, {B, n, H, D}, dev);
  const TensorView merged_lse_view = device_view(merged_lse.get(), DType::float32, {B, H, n}, dev);
  cuda::fill(merged.get<float>(), B * n * H * D, 0.0f, stream);
  cuda::fill(merged_lse.get<float>(), B * H * n, -INFINITY, stream);
  KeyExchange exchange(comm, schedule, own, 1, stats, stream);
  for_each_source(
      exchange, schedule, own,
      [&](int, int source, const Keys& keys) {
        each_pair(schedule, source, [&](std::size_t, std::int64_t qa, std::int64_t q0, std::int64_t q1, std::int64_t ka,
                                        std::int64_t k0, std::int64_t k1) {
          kernels.forward(step_mask(keys, ka, k1 - k0), RingStep{q0, N, k0, k1}, q.narrow(1, qa, q1 - q0),
                          keys.k.narrow(1, ka, k1 - k0), keys.v.narrow(1, ka, k1 - k0),
                          merged_view.narrow(1, qa, q1 - q0), merged_lse_view.narrow(2, qa, q1 - q0), stream);
        });
      },
      [](int) {});
  cuda::store_converted(merged.get<float>(), out, stream);
  // lse [B, H, n] as [B, H, n, 1] rows of one element, any strides.
  cuda::store_converted(merged_lse.get<float>(),
                        make_view(lse.data, DType::float32, {B, H, n, 1}, {lse.strides[0], lse.strides[1], lse.strides[2], 1}, dev),
                        stream);
  cuda_check(cudaStreamSynchronize(cudaStream_t(stream)), "ring forward");  // before the buffers go
}

void ring_backward_cuda(Communicator& comm, const Schedule& schedule, const CudaStepKernels& kernels, const Keys& own,
                        const TensorView& q, const TensorView& out, const TensorView& lse, const TensorView& dout,
                        const TensorView& dq, const TensorView& dk, const TensorView& dv, RingStats& stats,
                        void* stream) {
  const DeviceOf device(q);
  comm.bind_stream(stream);
  const std::int64_t B = q.shape[0], n = q.shape[1], H = q.shape[2], D = q.shape[3], N = schedule.N;
  const std::int64_t kv_heads = own.k.shape[2];  // Hkv under grouped-query heads: dk, dv and what travels
  const Device dev = device_of(q);
  const std::size_t rows = std::size_t(B * n * H * D), kv_rows = std::size_t(B * n * kv_heads * D);
  DeviceMemory dq_sum(rows * 4), own_grads(2 * kv_rows * 4), partial(2 * kv_rows * 4), delta(std::size_t(B * H * n) * 4);
  DeviceMemory grads_out(2 * kv_rows * 4), grads_in(2 * kv_rows * 4);
  const TensorView dq_view = device_view(dq_sum.get(), DType::float32, {B, n, H, D}, dev);
  const TensorView partial_k = device_view(partial.get(), DType::float32, {B, n, kv_heads, D}, dev);
  const TensorView partial_v = device_view(partial.get<float>() + kv_rows, DType::float32, {B, n, kv_heads, D}, dev);
  const TensorView own_k = device_view(own_grads.get(), DType::float32, {B, n, kv_heads, D}, dev);
  const TensorView own_v = device_view(own_grads.get<float>() + kv_rows, DType::float32, {B, n, kv_heads, D}, dev);
  cuda::fill(dq_sum.get<float>(), std::int64_t(rows), 0.0f, stream);
  cuda::fill(own_grads.get<float>(), 2 * std::int64_t(kv_rows), 0.0f, stream);
  // delta per query chunk, each [B, H, rows] contiguous as ring_step_gradients takes it.
  std::vector<TensorView> deltas;
  {
    std::int64_t at = 0, offset = 0;
    for (const auto& [q0, q1] : schedule.mine) {
      const TensorView d = device_view(delta.get<float>() + offset, DType::float32, {B, H, q1 - q0}, dev);
      cuda::row_dot(dout.narrow(1, at, q1 - q0), out.narrow(1, at, q1 - q0), d.ptr<float>(), stream);
      deltas.push_back(d);
      offset += B * H * (q1 - q0);
      at += q1 - q0;
    }
  }
  KeyExchange exchange(comm, schedule, own, 2, stats, stream);
  for_each_source(
      exchange, schedule, own,
      [&](int, int source, const Keys& keys) {
        cuda::fill(partial.get<float>(), 2 * std::int64_t(kv_rows), 0.0f, stream);
        each_pair(schedule, source, [&](std::size_t chunk, std::int64_t qa, std::int64_t q0, std::int64_t q1,
                                        std::int64_t ka, std::int64_t k0, std::int64_t k1) {
          kernels.gradients(step_mask(keys, ka, k1 - k0), RingStep{q0, N, k0, k1}, q.narrow(1, qa, q1 - q0),
                            keys.k.narrow(1, ka, k1 - k0), keys.v.narrow(1, ka, k1 - k0), dout.narrow(1, qa, q1 - q0),
                            lse.narrow(2, qa, q1 - q0), deltas[chunk], dq_view.narrow(1, qa, q1 - q0),
                            partial_k.narrow(1, ka, k1 - k0), partial_v.narrow(1, ka, k1 - k0), stream);
        });
      },
      [&](int t) {  // the step's key gradients go back to their owner; this rank's come from dest
        const Step& s = exchange.step(t);
        if (t == 0) {
          if (!s.incoming.empty()) cuda::add(own_grads.get<float>(), partial.get<float>(), 2 * std::int64_t(kv_rows), stream);
          return;
        }
        const std::size_t out_count = s.incoming.size(), in_count = s.outgoing.size();
        int send = -1, receive = -1;
        if (in_count > 0)
          receive = comm.irecv(grads_in.get(), 2 * std::size_t(B) * in_count * std::size_t(D) * 4, s.dest, 3);
        if (out_count > 0) {
          float* packed = grads_out.get<float>();
          cuda::gather_entries(partial_k, exchange.incoming(t), std::int64_t(out_count), packed, stream);
          cuda::gather_entries(partial_v, exchange.incoming(t), std::int64_t(out_count),
                               packed + std::size_t(B) * out_count * std::size_t(D), stream);
          const std::size_t bytes = 2 * std::size_t(B) * out_count * std::size_t(D) * 4;
          send = comm.isend(packed, bytes, s.source, 3);
          stats.bytes_sent += std::int64_t(bytes);
          ++stats.transfers;
        }
        comm.flush();
        comm.wait(send);
        comm.wait(receive);
        if (in_count > 0) {
          stats.bytes_received += std::int64_t(2 * std::size_t(B) * in_count * std::size_t(D) * 4);
          const float* packed = grads_in.get<float>();
          cuda::scatter_add_entries(packed, exchange.outgoing(t), std::int64_t(in_count), own_k, stream);
          cuda::scatter_add_entries(packed + std::size_t(B) * in_count * std::size_t(D), exchange.outgoing(t),
                                    std::int64_t(in_count), own_v, stream);
        }
      });
  cuda::store_converted(dq_sum.get<float>(), dq, stream);
  cuda::store_converted(own_grads.get<float>(), dk, stream);
  cuda::store_converted(own_grads.get<float>() + kv_rows, dv, stream);
  cuda_check(cudaStreamSynchronize(cudaStream_t(stream)), "ring backward");  // before the buffers go
}

}  // namespace dattn::detail
