// Ranks as threads of one process: a send copies into the receiver's mailbox at once; a receive
// waits for the message from its peer with its tag. Device buffers (a CUDA ring, each rank's
// thread on its own stream) go through the host mailbox after the bound stream is synchronised:
// simple and slow, for testing the ring's logic on one GPU.
#ifdef DATTN_WITH_CUDA
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "dattn/error.hpp"
#include "dattn/ring.hpp"

namespace dattn {
namespace {

bool is_device_memory(const void* p) {
#ifdef DATTN_WITH_CUDA
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
#else
  (void)p;
  return false;
#endif
}

#ifdef DATTN_WITH_CUDA
void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("in-process ring: ") + what + ": " + cudaGetErrorString(e));
}
#endif

struct Mailboxes {
  std::mutex mutex;
  std::condition_variable arrived;
  std::map<std::tuple<int, int, int>, std::deque<std::vector<std::byte>>> queues;  // (from, to, tag)
};

class InProcessCommunicator : public Communicator {
 public:
  InProcessCommunicator(std::shared_ptr<Mailboxes> boxes, int rank, int size)
      : boxes_(std::move(boxes)), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void bind_stream(void* stream) override { stream_ = stream; }

  int isend(const void* data, std::size_t bytes, int peer, int tag) override {
    check_peer(peer);
    const auto* first = static_cast<const std::byte*>(data);
    std::vector<std::byte> message(bytes);
    if (bytes > 0 && is_device_memory(data)) {
#ifdef DATTN_WITH_CUDA
      cuda_check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)), "cudaStreamSynchronize");
      cuda_check(cudaMemcpy(message.data(), data, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
#endif
    } else {
      std::copy(first, first + bytes, message.begin());
    }
    {
      std::lock_guard lock(boxes_->mutex);
      boxes_->queues[{rank_, peer, tag}].push_back(std::move(message));
    }
    boxes_->arrived.notify_all();
    return -1;  // complete already
  }

  int irecv(void* data, std::size_t bytes, int peer, int tag) override {
    check_peer(peer);
    pending_[next_] = {data, bytes, peer, tag};
    return next_++;
  }

  void wait(int request) override {
    if (request < 0) return;
    const Receive r = pending_.at(request);
    pending_.erase(request);
    std::unique_lock lock(boxes_->mutex);
    auto& queue = boxes_->queues[{r.peer, rank_, r.tag}];
    boxes_->arrived.wait(lock, [&] { return !queue.empty(); });
    if (queue.front().size() != r.bytes)
      throw Error("in-process receive of " + std::to_string(r.bytes) + " bytes from rank " + std::to_string(r.peer) +
                  " got " + std::to_string(queue.front().size()));
    std::vector<std::byte> message = std::move(queue.front());
    queue.pop_front();
    lock.unlock();
    if (r.bytes > 0 && is_device_memory(r.data)) {
#ifdef DATTN_WITH_CUDA
      const auto stream = static_cast<cudaStream_t>(stream_);
      cuda_check(cudaMemcpyAsync(r.data, message.data(), r.bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
      cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
#endif
    } else {
      std::memcpy(r.data, message.data(), r.bytes);
    }
  }

 private:
  struct Receive {
    void* data;
    std::size_t bytes;
    int peer, tag;
  };
  void check_peer(int peer) const {
    if (peer < 0 || peer >= size_)
      throw Error("peer " + std::to_string(peer) + " is not a rank of this group of " + std::to_string(size_));
  }
  std::shared_ptr<Mailboxes> boxes_;
  int rank_, size_;
  std::map<int, Receive> pending_;
  int next_ = 0;
  void* stream_ = nullptr;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_in_process_group(int size) {
  if (size < 1) throw Error("group size " + std::to_string(size) + "; expected >= 1");
  auto boxes = std::make_shared<Mailboxes>();
  std::vector<std::unique_ptr<Communicator>> group;
  for (int r = 0; r < size; ++r) group.push_back(std::make_unique<InProcessCommunicator>(boxes, r, size));
  return group;
}

#ifndef DATTN_WITH_NCCL
std::unique_ptr<Communicator> make_nccl_communicator(void*) {
  throw Error("make_nccl_communicator: this build has no NCCL; expected a build with DATTN_NCCL=ON (CUDA and NCCL)");
}
#endif

#ifndef DATTN_WITH_MPI
std::unique_ptr<Communicator> make_mpi_communicator(void*) {
  throw Error("make_mpi_communicator: this build has no MPI; expected a build with DATTN_MPI=ON (libopenmpi-dev)");
}
#endif

}  // namespace dattn
