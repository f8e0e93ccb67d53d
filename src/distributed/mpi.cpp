// Communicator over MPI (OpenMPI from Debian): non-blocking point-to-point on a communicator the
// caller initialised.
#include <mpi.h>

#include <climits>
#include <map>

#include "dattn/error.hpp"
#include "dattn/ring.hpp"

namespace dattn {
namespace {

class MpiCommunicator : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) throw Error("MPI is not initialised; call MPI_Init before make_mpi_communicator");
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int isend(const void* data, std::size_t bytes, int peer, int tag) override {
    MPI_Request request;
    check(MPI_Isend(data, count(bytes), MPI_BYTE, peer, tag, comm_, &request), "MPI_Isend");
    return keep(request);
  }
  int irecv(void* data, std::size_t bytes, int peer, int tag) override {
    MPI_Request request;
    check(MPI_Irecv(data, count(bytes), MPI_BYTE, peer, tag, comm_, &request), "MPI_Irecv");
    return keep(request);
  }
  void wait(int request) override {
    if (request < 0) return;
    MPI_Request r = requests_.at(request);
    requests_.erase(request);
    check(MPI_Wait(&r, MPI_STATUS_IGNORE), "MPI_Wait");
  }

 private:
  static int count(std::size_t bytes) {
    if (bytes > std::size_t(INT_MAX)) throw Error("an MPI message of " + std::to_string(bytes) + " bytes exceeds 2 GiB");
    return int(bytes);
  }
  static void check(int code, const char* what) {
    if (code != MPI_SUCCESS) throw Error(std::string(what) + " failed with MPI error " + std::to_string(code));
  }
  int keep(MPI_Request request) {
    requests_[next_] = request;
    return next_++;
  }
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
  std::map<int, MPI_Request> requests_;
  int next_ = 0;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(void* mpi_comm) {
  return std::make_unique<MpiCommunicator>(mpi_comm ? *static_cast<MPI_Comm*>(mpi_comm) : MPI_COMM_WORLD);
}

}  // namespace dattn
