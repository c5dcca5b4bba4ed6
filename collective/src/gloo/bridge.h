// The C++ half of whet-collective's gloo bridge (the Rust half is ffi.rs): a connected gloo
// context and the collectives on it, over byte buffers tagged with their element type.
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <string>

#include <gloo/common/error.h>
#include <gloo/common/logging.h>
#include <gloo/rendezvous/context.h>

#include "rust/cxx.h"

// cxx turns a C++ exception into a Rust `Err` through this hook (it must come before the
// generated code, which this header is included by). Its message starts with the exception's
// kind, which ffi.rs reads back: `gloo-io` (timeouts and broken connections), `store` (a
// callback into the Rust store failed), `gloo-enforce` (gloo refused its arguments), `gloo`,
// `c++`. Nothing a C++ function throws escapes into Rust.
namespace rust {
namespace behavior {
template <typename Try, typename Fail>
static void trycatch(Try&& func, Fail&& fail) noexcept try {
  func();
} catch (const ::rust::Error& e) {
  fail((std::string("store: ") + e.what()).c_str());
} catch (const ::gloo::IoException& e) {
  fail((std::string("gloo-io: ") + e.what()).c_str());
} catch (const ::gloo::EnforceNotMet& e) {
  fail((std::string("gloo-enforce: ") + e.what()).c_str());
} catch (const ::gloo::Exception& e) {
  fail((std::string("gloo: ") + e.what()).c_str());
} catch (const std::exception& e) {
  fail((std::string("c++: ") + e.what()).c_str());
} catch (...) {
  fail("c++: an exception that is not a std::exception");
}
} // namespace behavior
} // namespace rust

namespace whet_gloo {

enum class DType : std::uint8_t;
struct RendezvousStore;

class Communicator {
 public:
  explicit Communicator(std::shared_ptr<::gloo::rendezvous::Context> context)
      : context_(std::move(context)) {}

  const std::shared_ptr<::gloo::rendezvous::Context>& context() const {
    return context_;
  }

 private:
  std::shared_ptr<::gloo::rendezvous::Context> context_;
};

rust::String local_hostname();

std::unique_ptr<Communicator> connect(
    const RendezvousStore& store,
    std::int32_t rank,
    std::int32_t size,
    rust::Str iface,
    rust::Str hostname,
    std::uint64_t timeout_ms);

void all_reduce_in_place(
    const Communicator& comm,
    DType dtype,
    rust::Slice<std::uint8_t> buffer,
    std::uint32_t tag,
    std::uint64_t timeout_ms);

void all_reduce(
    const Communicator& comm,
    DType dtype,
    rust::Slice<const std::uint8_t> input,
    rust::Slice<std::uint8_t> output,
    std::uint32_t tag,
    std::uint64_t timeout_ms);

void all_gather_in_place(
    const Communicator& comm,
    DType dtype,
    rust::Slice<std::uint8_t> output,
    rust::Slice<const std::uint64_t> counts,
    std::uint32_t tag,
    std::uint64_t timeout_ms);

void all_gather(
    const Communicator& comm,
    DType dtype,
    rust::Slice<const std::uint8_t> input,
    rust::Slice<std::uint8_t> output,
    rust::Slice<const std::uint64_t> counts,
    std::uint32_t tag,
    std::uint64_t timeout_ms);

void broadcast(
    const Communicator& comm,
    DType dtype,
    rust::Slice<std::uint8_t> buffer,
    std::int32_t root,
    std::uint32_t tag,
    std::uint64_t timeout_ms);

void barrier(
    const Communicator& comm,
    std::uint32_t tag,
    std::uint64_t timeout_ms);

} // namespace whet_gloo
