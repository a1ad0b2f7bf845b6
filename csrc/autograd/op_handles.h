// Helpers for the C++ autograd of csrc/autograd/: call an rglcd_fast op below the autograd key.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

namespace rglcd_fast {

// rglcd_fast::<name> with the given C++ signature (it must match the schema in rglcd_fast/ops).
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A gradient that autograd passed undefined (the output was unused) as an optional argument.
inline std::optional<at::Tensor> optional_grad(const at::Tensor& grad) {
  return grad.defined() ? std::optional<at::Tensor>(grad) : std::nullopt;
}

}  // namespace rglcd_fast
