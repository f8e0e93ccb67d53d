// Communicator over NCCL: posts are queued and started together at flush() as one NCCL group on
// a transfer stream of the communicator's own, after an event of the bound stream; wait() makes
// the bound stream wait for the group's completion event. The host never blocks.
#include <cuda_runtime.h>
#include <nccl.h>

#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "dattn/error.hpp"
#include "dattn/ring.hpp"

namespace dattn {
namespace {

void check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw Error(std::string(what) + " failed: " + ncclGetErrorString(r));
}
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string(what) + " failed: " + cudaGetErrorString(e));
}

using Event = std::shared_ptr<std::remove_pointer_t<cudaEvent_t>>;

Event record(cudaStream_t stream) {
  cudaEvent_t e = nullptr;
  check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  Event event(e, [](cudaEvent_t x) { cudaEventDestroy(x); });
  check(cudaEventRecord(e, stream), "cudaEventRecord");
  return event;
}

class NcclCommunicator : public Communicator {
 public:
  explicit NcclCommunicator(ncclComm_t comm) : comm_(comm) {
    check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    check(ncclCommCount(comm_, &size_), "ncclCommCount");
    // The transfer stream lives on the communicator's device, whichever is current here.
    int device = 0, current = 0;
    check(ncclCommCuDevice(comm_, &device), "ncclCommCuDevice");
    check(cudaGetDevice(&current), "cudaGetDevice");
    check(cudaSetDevice(device), "cudaSetDevice");
    const cudaError_t created = cudaStreamCreateWithFlags(&transfer_, cudaStreamNonBlocking);
    cudaSetDevice(current);
    check(created, "cudaStreamCreateWithFlags");
  }
  ~NcclCommunicator() override {
    done_.clear();
    cudaStreamDestroy(transfer_);
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void bind_stream(void* stream) override { bound_ = static_cast<cudaStream_t>(stream); }

  int isend(const void* data, std::size_t bytes, int peer, int) override {
    return queue({true, const_cast<void*>(data), bytes, peer, next_});
  }
  int irecv(void* data, std::size_t bytes, int peer, int) override { return queue({false, data, bytes, peer, next_}); }

  void flush() override {
    if (queued_.empty()) return;
    const Event ready = record(bound_);
    check(cudaStreamWaitEvent(transfer_, ready.get(), 0), "cudaStreamWaitEvent");
    check(ncclGroupStart(), "ncclGroupStart");
    for (const Op& op : queued_) {
      if (op.send) check(ncclSend(op.data, op.bytes, ncclUint8, op.peer, comm_, transfer_), "ncclSend");
      else check(ncclRecv(op.data, op.bytes, ncclUint8, op.peer, comm_, transfer_), "ncclRecv");
    }
    check(ncclGroupEnd(), "ncclGroupEnd");
    const Event done = record(transfer_);
    for (const Op& op : queued_) done_[op.id] = done;
    queued_.clear();
  }

  void wait(int request) override {
    if (request < 0) return;
    flush();  // posted but not started yet
    const auto it = done_.find(request);
    if (it == done_.end()) throw Error("NCCL communicator: request " + std::to_string(request) + " is not pending");
    check(cudaStreamWaitEvent(bound_, it->second.get(), 0), "cudaStreamWaitEvent");
    done_.erase(it);
  }

 private:
  struct Op {
    bool send;
    void* data;
    std::size_t bytes;
    int peer, id;
  };
  int queue(const Op& op) {
    if (op.peer < 0 || op.peer >= size_)
      throw Error("peer " + std::to_string(op.peer) + " is not a rank of this group of " + std::to_string(size_));
    queued_.push_back(op);
    return next_++;
  }
  ncclComm_t comm_;
  int rank_ = 0, size_ = 1, next_ = 0;
  cudaStream_t transfer_ = nullptr, bound_ = nullptr;
  std::vector<Op> queued_;
  std::map<int, Event> done_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(void* nccl_comm) {
  if (nccl_comm == nullptr) throw Error("make_nccl_communicator: nccl_comm is null; expected a pointer to an ncclComm_t");
  return std::make_unique<NcclCommunicator>(*static_cast<ncclComm_t*>(nccl_comm));
}

}  // namespace dattn
