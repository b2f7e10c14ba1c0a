// Autograd hooks that commit a layer's pass from C++ (adafisher/hooks.py, native backend on CPU).
//
// The Python forward hook registers one of these per tracked layer and pass; the backward then
// runs no Python for statistics: the hook calls the adafisher::commit_statistics op (and, for a
// BatchNorm whose Ĥ comes from its saved batch mean, adafisher::norm_input_statistic) through the
// dispatcher, so the op schemas stay the seam. A Python hook per layer cost ~0.2 ms of interpreter
// and dispatch work per pass in a training step (cold caches), more than the commit itself.
//
// Semantics match the Python hooks they replace:
// - on the layer's output tensor: a tensor pre-hook on its grad_fn (in-place ops that follow the
//   layer leave it where it was, so it sees the gradient of the pre-in-place value);
// - on a norm layer's autograd node: a post-hook that reads the gradient the node produced for
//   the bias (Σ g, which Ŝ squares), or the output gradient if that is absent;
// - a pass whose backward does not accumulate into the layer's parameter (autograd.grad with
//   respect to inputs, backward(inputs=...) without it) commits nothing.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/python_variable.h>

#include <memory>
#include <utility>

namespace adafisher {
namespace {

using torch::autograd::Node;
using torch::autograd::variable_list;

// A strong reference to an autograd node, whichever smart pointer this torch version uses.
using NodeRef = std::decay_t<decltype(torch::autograd::impl::grad_accumulator(at::Tensor()))>;

// Whether the running backward executes `node` (the layer parameter's AccumulateGrad), as
// torch._C._will_engine_execute_node answers it; a captured leaf (autograd.grad with respect to
// the parameter) and an unknown node count as executed, as the Python hooks treat them.
bool engine_will_execute(Node* node) {
  if (node == nullptr) return true;
  const auto* nodes = torch::autograd::get_current_graph_task_nodes_in_graph();
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  if (nodes == nullptr || exec_info == nullptr) return true;
  if (nodes->find(node) == nodes->end()) return false;
  if (exec_info->empty()) return true;
  const auto it = exec_info->find(node);
  return it != exec_info->end() && it->second.should_execute();
}

using CommitFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      int64_t, int64_t, int64_t, int64_t, int64_t, bool, double);
using NormInputFn = at::Tensor(const at::Tensor&, int64_t, int64_t, double, double);

const c10::TypedOperatorHandle<CommitFn>& commit_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("adafisher::commit_statistics", "")
                             .typed<CommitFn>();
  return op;
}

const c10::TypedOperatorHandle<NormInputFn>& norm_input_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("adafisher::norm_input_statistic", "")
                             .typed<NormInputFn>();
  return op;
}

// One layer's pass: where it commits and how Ŝ is formed (the op's arguments).
struct PassCommit {
  at::Tensor pending, pending_count;
  at::Tensor h_hat;     // Ĥ of the pass; undefined when it comes from h_source at commit time
  at::Tensor h_source;  // BatchNorm's saved batch mean: Ĥ = norm_input_statistic(it, 0, 1, ...)
  double h_scale = 0.0, h_second = 0.0;
  int64_t layer = 0, h_offset = 0, s_offset = 0, channel_start = 0, channel_end = 0;
  int64_t s_len = 0;  // the layer's S length (a norm bias gradient must have it)
  bool sum_then_square = false;
  double scale = 1.0;
  NodeRef accumulator;  // of the layer's parameter; null: unknown, commit

  void commit(const at::Tensor& grad, int64_t start, int64_t end) const {
    if (!engine_will_execute(accumulator.get())) return;
    // Statistics are sums outside autograd (create_graph=True runs hooks in grad mode).
    at::NoGradGuard no_grad;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor h = h_hat.defined() ? h_hat
                                         : norm_input_op().call(h_source, 0, 1, h_scale, h_second);
    commit_op().call(pending, pending_count, h, grad, layer, h_offset, s_offset, start, end,
                     sum_then_square, scale);
  }
};

// Compiled autograd runs only hooks it can trace (Python ones); the Python side registers these
// only when it is off at forward time, and a backward compiled anyway says why it cannot run.
[[noreturn]] void refuse_compiled_autograd() {
  TORCH_CHECK_NOT_IMPLEMENTED(
      false,
      "AdaFisher's native commit hooks cannot run under compiled autograd: the forward pass ran "
      "with it off. Enable compiled autograd before the forward (torch._dynamo.config."
      "compiled_autograd = True), or use AdaFisher(..., backend='torch').");
}

// Tensor pre-hook on the output's grad_fn, keyed by the output's index (what Tensor.register_hook
// does): the commit sees the gradient of the output as the layer produced it.
struct OutputCommit final : torch::autograd::FunctionPreHook {
  OutputCommit(std::shared_ptr<const PassCommit> pass, size_t output_nr)
      : pass(std::move(pass)), output_nr(output_nr) {}

  variable_list operator()(const variable_list& grads) override {
    if (output_nr < grads.size() && grads[output_nr].defined()) {
      pass->commit(grads[output_nr], pass->channel_start, pass->channel_end);
    }
    return grads;
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs&) const override {
    refuse_compiled_autograd();
  }

  std::shared_ptr<const PassCommit> pass;
  size_t output_nr;
};

// Post-hook on a norm layer's node: Ŝ from the bias gradient it produced (input 2).
struct NormNodeCommit final : torch::autograd::FunctionPostHook {
  explicit NormNodeCommit(std::shared_ptr<const PassCommit> pass) : pass(std::move(pass)) {}

  variable_list operator()(const variable_list& grad_inputs,
                           const variable_list& grad_outputs) override {
    constexpr size_t kBias = 2;  // the node's inputs are (input, weight, bias)
    if (grad_inputs.size() > kBias && grad_inputs[kBias].defined() &&
        grad_inputs[kBias].numel() == pass->s_len) {
      const at::Tensor& bias_grad = grad_inputs[kBias];  // one "sample": Σ over nothing
      pass->commit(bias_grad, 0, bias_grad.dim());
    } else if (!grad_outputs.empty() && grad_outputs[0].defined()) {
      pass->commit(grad_outputs[0], pass->channel_start, pass->channel_end);
    }
    return grad_inputs;
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs&) const override {
    refuse_compiled_autograd();
  }

  std::shared_ptr<const PassCommit> pass;
};

bool unpack_tensor(PyObject* object, const char* name, bool optional, at::Tensor* out) {
  if (optional && object == Py_None) return true;
  if (!THPVariable_Check(object)) {
    PyErr_Format(PyExc_TypeError, "register_commit_hook: %s must be a Tensor%s, got %s", name,
                 optional ? " or None" : "", Py_TYPE(object)->tp_name);
    return false;
  }
  *out = THPVariable_Unpack(object);
  return true;
}

}  // namespace

// register_commit_hook(output, on_node, pending, pending_count, h_hat, h_source, h_scale,
//                      h_second, layer, h_offset, s_offset, channel_start, channel_end,
//                      sum_then_square, scale, s_len, param) -> bool
// on_node: hook output.grad_fn (a norm node, Ŝ from its bias gradient) instead of the output.
// h_hat or h_source (the other None); param: the leaf whose accumulation decides, or None.
// False: not hooked (output has no grad_fn); the caller's Python hooks take the pass.
PyObject* register_commit_hook(PyObject*, PyObject* args) {
  PyObject *output_obj, *pending_obj, *count_obj, *h_hat_obj, *h_source_obj, *param_obj;
  int on_node = 0, sum_then_square = 0;
  long long layer, h_offset, s_offset, channel_start, channel_end, s_len;
  auto pass = std::make_shared<PassCommit>();
  if (!PyArg_ParseTuple(args, "OpOOOOddLLLLLpdLO:register_commit_hook", &output_obj, &on_node,
                        &pending_obj, &count_obj, &h_hat_obj, &h_source_obj, &pass->h_scale,
                        &pass->h_second, &layer, &h_offset, &s_offset, &channel_start,
                        &channel_end, &sum_then_square, &pass->scale, &s_len, &param_obj)) {
    return nullptr;
  }
  pass->layer = layer;
  pass->h_offset = h_offset;
  pass->s_offset = s_offset;
  pass->channel_start = channel_start;
  pass->channel_end = channel_end;
  pass->s_len = s_len;
  at::Tensor output, param;
  if (!unpack_tensor(output_obj, "output", false, &output) ||
      !unpack_tensor(pending_obj, "pending", false, &pass->pending) ||
      !unpack_tensor(count_obj, "pending_count", false, &pass->pending_count) ||
      !unpack_tensor(h_hat_obj, "h_hat", true, &pass->h_hat) ||
      !unpack_tensor(h_source_obj, "h_source", true, &pass->h_source) ||
      !unpack_tensor(param_obj, "param", true, &param)) {
    return nullptr;
  }
  if (pass->h_hat.defined() == pass->h_source.defined()) {
    PyErr_SetString(PyExc_ValueError,
                    "register_commit_hook: exactly one of h_hat and h_source must be a Tensor");
    return nullptr;
  }
  pass->sum_then_square = sum_then_square != 0;
  const auto& node = output.grad_fn();
  if (!node) Py_RETURN_FALSE;  // a leaf (or no autograd): the Python hooks take it
  try {
    if (param.defined()) pass->accumulator = torch::autograd::impl::grad_accumulator(param);
    if (on_node) {
      node->add_post_hook(std::make_unique<NormNodeCommit>(std::move(pass)));
    } else {
      node->add_tensor_pre_hook(std::make_unique<OutputCommit>(std::move(pass),
                                                               output.output_nr()));
    }
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
  Py_RETURN_TRUE;
}

}  // namespace adafisher
