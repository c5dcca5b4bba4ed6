// gloo behind whet-collective: a gloo rendezvous store that calls back into the whet store,
// a tcp device, connectFullMesh, and gloo's own allreduce, allgatherv, broadcast and barrier.
// Element types are gloo's float and double and, as torch's ProcessGroupGloo does for bf16 on
// the CPU (gloo has no bf16 type), gloo::sum over a bf16 type whose + adds in f32 and rounds
// to nearest even.
#include "whet-collective/src/gloo/bridge.h"

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <cerrno>
#include <stdexcept>
#include <system_error>
#include <vector>

#include <gloo/allgatherv.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/math.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

#include "whet-collective/src/gloo/ffi.rs.h"

namespace whet_gloo {
namespace {

// bf16 as torch's c10::BFloat16 adds it: widen both to f32, add, round to nearest even
// (a NaN stays a quiet NaN).
struct BFloat16 {
  std::uint16_t bits;

  static float widen(std::uint16_t bits) {
    std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof(value));
    return value;
  }

  static std::uint16_t narrow(float value) {
    std::uint32_t wide;
    std::memcpy(&wide, &value, sizeof(wide));
    if ((wide & 0x7fffffffu) > 0x7f800000u) {
      return 0x7fc0;
    }
    const std::uint32_t lsb = (wide >> 16) & 1u;
    return static_cast<std::uint16_t>((wide + 0x7fffu + lsb) >> 16);
  }

  BFloat16 operator+(const BFloat16& other) const {
    return BFloat16{narrow(widen(bits) + widen(other.bits))};
  }
};
static_assert(sizeof(BFloat16) == 2, "bf16 is two bytes");

// Calls `body` with a value of the C++ element type of `dtype` (its type is what matters).
template <typename Body>
void with_element_type(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::F32:
      body(float{});
      return;
    case DType::F64:
      body(double{});
      return;
    case DType::BF16:
      body(BFloat16{});
      return;
  }
  throw std::invalid_argument("unknown element type");
}

// gloo::sum<T> in the form allreduce takes (it is overloaded with an in-place form).
template <typename T>
::gloo::AllreduceOptions::Func sum_function() {
  return static_cast<void (*)(void*, const void*, const void*, size_t)>(
      &::gloo::sum<T>);
}

template <typename T>
size_t element_count(size_t bytes) {
  if (bytes % sizeof(T) != 0) {
    throw std::invalid_argument("buffer is not a whole number of elements");
  }
  return bytes / sizeof(T);
}

template <typename T>
T* elements(rust::Slice<std::uint8_t> bytes) {
  return reinterpret_cast<T*>(bytes.data());
}

// gloo's options take non-const pointers for inputs too; it only reads them.
template <typename T>
T* elements(rust::Slice<const std::uint8_t> bytes) {
  return reinterpret_cast<T*>(const_cast<std::uint8_t*>(bytes.data()));
}

// gloo's rendezvous store, answered by the whet store on the Rust side. A failure there comes
// back as a thrown rust::Error, which connectFullMesh lets through to connect().
class BridgeStore : public ::gloo::rendezvous::Store {
 public:
  BridgeStore(const RendezvousStore& store, std::chrono::milliseconds timeout)
      : store_(store), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    store_set(
        store_,
        rust::Str(key),
        rust::Slice<const std::uint8_t>(
            reinterpret_cast<const std::uint8_t*>(data.data()), data.size()));
  }

  std::vector<char> get(const std::string& key) override {
    auto value = store_get(store_, rust::Str(key));
    return std::vector<char>(value.begin(), value.end());
  }

  void wait(const std::vector<std::string>& keys) override {
    wait(keys, timeout_);
  }

  void wait(
      const std::vector<std::string>& keys,
      const std::chrono::milliseconds& timeout) override {
    rust::Vec<rust::String> names;
    names.reserve(keys.size());
    for (const auto& key : keys) {
      names.push_back(rust::String(key));
    }
    store_wait(store_, names, static_cast<std::uint64_t>(timeout.count()));
  }

 private:
  const RendezvousStore& store_;
  std::chrono::milliseconds timeout_;
};

std::chrono::milliseconds millis(std::uint64_t timeout_ms) {
  return std::chrono::milliseconds(static_cast<std::int64_t>(timeout_ms));
}

} // namespace

rust::String local_hostname() {
  char name[256] = {0};
  if (gethostname(name, sizeof(name) - 1) != 0) {
    throw std::system_error(errno, std::system_category(), "gethostname");
  }
  return rust::String(name);
}

std::unique_ptr<Communicator> connect(
    const RendezvousStore& store,
    std::int32_t rank,
    std::int32_t size,
    rust::Str iface,
    rust::Str hostname,
    std::uint64_t timeout_ms) {
  ::gloo::transport::tcp::attr attr;
  if (iface.size() > 0) {
    attr.iface = std::string(iface);
  } else {
    attr.hostname = std::string(hostname);
  }
  auto device = ::gloo::transport::tcp::CreateDevice(attr);
  auto context = std::make_shared<::gloo::rendezvous::Context>(rank, size);
  context->setTimeout(millis(timeout_ms));
  BridgeStore gloo_store(store, millis(timeout_ms));
  context->connectFullMesh(gloo_store, device);
  return std::make_unique<Communicator>(std::move(context));
}

void all_reduce_in_place(
    const Communicator& comm,
    DType dtype,
    rust::Slice<std::uint8_t> buffer,
    std::uint32_t tag,
    std::uint64_t timeout_ms) {
  with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    ::gloo::AllreduceOptions opts(comm.context());
    opts.setOutput(elements<T>(buffer), element_count<T>(buffer.size()));
    opts.setReduceFunction(sum_function<T>());
    opts.setTag(tag);
    opts.setTimeout(millis(timeout_ms));
    ::gloo::allreduce(opts);
  });
}

void all_reduce(
    const Communicator& comm,
    DType dtype,
    rust::Slice<const std::uint8_t> input,
    rust::Slice<std::uint8_t> output,
    std::uint32_t tag,
    std::uint64_t timeout_ms) {
  with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    ::gloo::AllreduceOptions opts(comm.context());
    opts.setInput(elements<T>(input), element_count<T>(input.size()));
    opts.setOutput(elements<T>(output), element_count<T>(output.size()));
    opts.setReduceFunction(sum_function<T>());
    opts.setTag(tag);
    opts.setTimeout(millis(timeout_ms));
    ::gloo::allreduce(opts);
  });
}

void all_gather_in_place(
    const Communicator& comm,
    DType dtype,
    rust::Slice<std::uint8_t> output,
    rust::Slice<const std::uint64_t> counts,
    std::uint32_t tag,
    std::uint64_t timeout_ms) {
  with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    ::gloo::AllgathervOptions opts(comm.context());
    opts.setOutput(
        elements<T>(output), std::vector<size_t>(counts.begin(), counts.end()));
    opts.setTag(tag);
    opts.setTimeout(millis(timeout_ms));
    ::gloo::allgatherv(opts);
  });
}

void all_gather(
    const Communicator& comm,
    DType dtype,
    rust::Slice<const std::uint8_t> input,
    rust::Slice<std::uint8_t> output,
    rust::Slice<const std::uint64_t> counts,
    std::uint32_t tag,
    std::uint64_t timeout_ms) {
  with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    ::gloo::AllgathervOptions opts(comm.context());
    opts.setInput(elements<T>(input), element_count<T>(input.size()));
    opts.setOutput(
        elements<T>(output), std::vector<size_t>(counts.begin(), counts.end()));
    opts.setTag(tag);
    opts.setTimeout(millis(timeout_ms));
    ::gloo::allgatherv(opts);
  });
}

void broadcast(
    const Communicator& comm,
    DType dtype,
    rust::Slice<std::uint8_t> buffer,
    std::int32_t root,
    std::uint32_t tag,
    std::uint64_t timeout_ms) {
  with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    ::gloo::BroadcastOptions opts(comm.context());
    opts.setOutput(elements<T>(buffer), element_count<T>(buffer.size()));
    opts.setRoot(root);
    opts.setTag(tag);
    opts.setTimeout(millis(timeout_ms));
    ::gloo::broadcast(opts);
  });
}

void barrier(
    const Communicator& comm,
    std::uint32_t tag,
    std::uint64_t timeout_ms) {
  ::gloo::BarrierOptions opts(comm.context());
  opts.setTag(tag);
  opts.setTimeout(millis(timeout_ms));
  ::gloo::barrier(opts);
}

} // namespace whet_gloo
