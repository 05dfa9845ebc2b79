// The last-bit flip of sitecustomize.py, in C++: a boxed fallback on a mode key at the top of the
// dispatcher, so that the operators it does not perturb cost a C++ redispatch instead of a round
// trip through Python. It flips exactly what the Python TorchDispatchMode flipped:
//  - an operator that decomposes (a CompositeImplicitAutograd kernel) is passed on with the mode
//    still on, so that the operators of its decomposition are seen, as they were below autograd;
//  - any other operator runs with the mode off (its kernel's own calls are not seen, as inside
//    __torch_dispatch__), and if it is one of the listed functional overloads, the lowest mantissa
//    bit of each finite, non-zero floating-point result is flipped;
//  - the flip runs below autograd's in-place and view tracking, as the Python mode's did (it
//    happens before autograd sees the result), so saved tensors carry it and no version moves.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <unordered_set>

namespace {

constexpr auto kMode = c10::DispatchKey::TESTING_ONLY_GenericMode;
std::unordered_set<std::string> listed;  // "aten::mm", ...: the functional overloads are chosen below

bool is_listed(const c10::OperatorHandle& op) {
  const auto& name = op.operator_name();
  return name.overload_name.find("out") == std::string::npos && listed.count(name.name) > 0;
}

// On the CPU, a dense tensor's numbers are flipped in one pass over its memory, in place: four
// tensor operations (isfinite, ne, logical_and, xor) would each cost an operator call and an
// allocation, which for the book's small tensors is most of the time the mode adds.
// `exponent` and `magnitude` mask the bits of the format: a number is finite when its exponent is
// not all ones, and non-zero when any bit but the sign is set.
template <typename Bits>
void flip_in_place(const at::Tensor& t, Bits exponent, Bits magnitude) {
  auto* data = static_cast<Bits*>(t.data_ptr());
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    if ((data[i] & exponent) != exponent && (data[i] & magnitude) != 0) data[i] ^= Bits(1);
  }
}

void flip(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0 || t.layout() != at::kStrided) return;
  at::ScalarType bits;
  switch (t.scalar_type()) {
    case at::kDouble: bits = at::kLong; break;
    case at::kFloat: bits = at::kInt; break;
    case at::kHalf:
    case at::kBFloat16: bits = at::kShort; break;
    default: return;
  }
  if (t.is_cpu() && t.is_non_overlapping_and_dense()) {  // its numbers fill numel() slots from data_ptr()
    switch (t.scalar_type()) {
      case at::kDouble: return flip_in_place<uint64_t>(t, 0x7ff0000000000000, 0x7fffffffffffffff);
      case at::kFloat: return flip_in_place<uint32_t>(t, 0x7f800000, 0x7fffffff);
      case at::kHalf: return flip_in_place<uint16_t>(t, 0x7c00, 0x7fff);
      default: return flip_in_place<uint16_t>(t, 0x7f80, 0x7fff);  // bfloat16
    }
  }
  t.view(bits).bitwise_xor_(t.isfinite().logical_and(t.ne(0)));
}

void flip_last_bit(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  auto below = keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kMode);
  if (op.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd)) {
    op.redispatchBoxed(below, stack);  // decomposes: its parts come back through this fallback
    return;
  }
  {
    c10::impl::ExcludeDispatchKeyGuard off(kMode);
    op.redispatchBoxed(below, stack);
  }
  if (!is_listed(op)) return;
  c10::impl::ExcludeDispatchKeyGuard off(kMode);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto returns = op.schema().returns().size();
  for (size_t i = stack->size() - returns; i < stack->size(); ++i) {
    const auto& value = (*stack)[i];
    if (value.isTensor()) {
      flip(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorList().vec()) flip(t);
    }
  }
}

void set_listed(std::vector<std::string> names) { listed = std::unordered_set<std::string>(names.begin(), names.end()); }

void set_enabled(bool on) { c10::impl::tls_set_dispatch_key_included(kMode, on); }

bool enabled() { return c10::impl::tls_is_dispatch_key_included(kMode); }

}  // namespace

TORCH_LIBRARY_IMPL(_, TESTING_ONLY_GenericMode, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&flip_last_bit>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_listed", &set_listed);
  m.def("set_enabled", &set_enabled);
  m.def("enabled", &enabled);
}
