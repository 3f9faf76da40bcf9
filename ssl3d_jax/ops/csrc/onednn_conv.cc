// oneDNN convolutions as XLA FFI handlers for JAX on CPU (ssl3d_jax/ops/onednn.py).
//
// Why: XLA:CPU runs the 3D convolutions of our U-Nets at 1-10 GFLOP/s, 4-18x slower than
// PyTorch on the same cores; PyTorch's speed comes from oneDNN, and oneDNN's primitives called
// from here run at that speed (benchmarks/results/layers.md).
//
// Three handlers cover every convolution the models use (any stride, explicit padding, no
// dilation, no bias, 2 or 3 spatial axes), in JAX's layouts: activations N[D]HWC, kernels
// [D]HWIO.
//   ssl3d_onednn_conv_fwd          (x, w)   -> y    convolution
//   ssl3d_onednn_conv_bwd_data     (dy, w)  -> dx   input gradient (= a transposed convolution)
//   ssl3d_onednn_conv_bwd_weights  (x, dy)  -> dw   kernel gradient
// Attributes: `strides`, `pad_lo`, `pad_hi` (int64 arrays, one value per spatial axis). Shapes
// come from the buffers; the result buffer's shape fixes the shape that is not an operand.
// float32 everywhere, or bfloat16 activations/kernels (float32 accumulation; the kernel gradient
// may be float32 or bfloat16, whatever the result buffer is).
//
// Implementation notes (each one a failure seen while building this):
//  * Primitives are cached per (kind, shapes, dtypes, geometry): oneDNN JIT-generates its kernels
//    once per shape. Activations stay in JAX's channels-last layout (see `Build`); kernels are
//    reordered to and from the primitive's preferred layout inside the call, into buffers owned
//    by the call.
//  * Scratchpad memory is per call (scratchpad_mode::user): XLA runs the input- and
//    kernel-gradient convolutions of one layer concurrently, and a scratchpad shared between
//    concurrent executions corrupted memory.
//  * Executions are serialised by one process-wide mutex (unless SSL3D_ONEDNN_SERIALIZE=0): each
//    one already runs an OpenMP team over all cores, and two teams started from two XLA threads
//    would put 2x as many busy threads on the cores (measured in benchmarks/results/layers.md).

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;

enum class Kind { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

bool Serialize() {
  static const bool serialize = [] {
    const char* v = std::getenv("SSL3D_ONEDNN_SERIALIZE");
    return !(v != nullptr && std::strcmp(v, "0") == 0);
  }();
  return serialize;
}

std::mutex& ExecMutex() {
  static std::mutex* m = new std::mutex();
  return *m;
}

// N[D]HWC dims -> oneDNN's logical (N, C, [D,] H, W).
memory::dims ActivationDims(ffi::Span<const int64_t> d) {
  memory::dims out = {d[0], d[d.size() - 1]};
  for (size_t i = 1; i + 1 < d.size(); ++i) out.push_back(d[i]);
  return out;
}

// [D]HWIO dims -> oneDNN's logical (O, I, [D,] H, W).
memory::dims KernelDims(ffi::Span<const int64_t> d) {
  size_t n = d.size();
  memory::dims out = {d[n - 1], d[n - 2]};
  for (size_t i = 0; i + 2 < n; ++i) out.push_back(d[i]);
  return out;
}

bool ToDnnlType(ffi::DataType t, memory::data_type* out) {
  switch (t) {
    case ffi::DataType::F32:
      *out = memory::data_type::f32;
      return true;
    case ffi::DataType::BF16:
      *out = memory::data_type::bf16;
      return true;
    default:
      return false;
  }
}

// One cached primitive with its descriptor's memory layouts.
struct Entry {
  dnnl::primitive prim;
  memory::desc src, wei, dst, scratch;  // what the primitive wants (possibly blocked)
};

struct Problem {
  Kind kind;
  int spatial;
  memory::dims src, wei, dst, strides, pad_lo, pad_hi;
  memory::data_type src_t, wei_t, dst_t;

  std::string Key() const {
    std::ostringstream s;
    s << static_cast<int>(kind) << '|' << static_cast<int>(src_t) << static_cast<int>(wei_t)
      << static_cast<int>(dst_t);
    for (const auto* v : {&src, &wei, &dst, &strides, &pad_lo, &pad_hi}) {
      s << '|';
      for (auto x : *v) s << x << ',';
    }
    return s.str();
  }
};

memory::desc AnyDesc(const memory::dims& d, memory::data_type t) {
  return memory::desc(d, t, tag::any);
}

tag ActivationTag(int spatial) { return spatial == 3 ? tag::ndhwc : tag::nhwc; }
tag KernelTag(int spatial) { return spatial == 3 ? tag::dhwio : tag::hwio; }

std::shared_ptr<Entry> Build(const Problem& p) {
  auto& eng = Engine();
  // Activations stay in JAX's channels-last layout: oneDNN then picks its brgemm kernels made
  // for it (as PyTorch's channels_last_3d does), where format `any` chose blocked layouts whose
  // reorders, and a gemm-based kernel gradient for 8-channel maps, made the segmentation step
  // 1.6x slower (oneDNN's verbose log, default size). Kernels (small) keep format `any`.
  auto A = [&](const memory::dims& d, memory::data_type t) {
    return memory::desc(d, t, ActivationTag(p.spatial));
  };
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  // The forward descriptor is also the hint the backward ones require. In the backward passes
  // activations are float32 or bfloat16 alike; the forward hint uses the activations' type.
  memory::data_type act_t = p.kind == Kind::kBwdData ? p.dst_t : p.src_t;
  memory::data_type wei_fwd_t = p.kind == Kind::kBwdWeights ? act_t : p.wei_t;
  auto fwd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      A(p.src, act_t), AnyDesc(p.wei, wei_fwd_t), A(p.dst, act_t), p.strides,
      p.pad_lo, p.pad_hi, attr);
  auto e = std::make_shared<Entry>();
  switch (p.kind) {
    case Kind::kFwd: {
      e->prim = dnnl::convolution_forward(fwd);
      e->src = fwd.src_desc();
      e->wei = fwd.weights_desc();
      e->dst = fwd.dst_desc();
      e->scratch = fwd.scratchpad_desc();
      break;
    }
    case Kind::kBwdData: {
      auto pd = dnnl::convolution_backward_data::primitive_desc(
          eng, dnnl::algorithm::convolution_direct, A(p.src, p.src_t),
          AnyDesc(p.wei, p.wei_t), A(p.dst, p.dst_t), p.strides, p.pad_lo, p.pad_hi, fwd,
          attr);
      e->prim = dnnl::convolution_backward_data(pd);
      e->src = pd.diff_src_desc();
      e->wei = pd.weights_desc();
      e->dst = pd.diff_dst_desc();
      e->scratch = pd.scratchpad_desc();
      break;
    }
    case Kind::kBwdWeights: {
      auto pd = dnnl::convolution_backward_weights::primitive_desc(
          eng, dnnl::algorithm::convolution_direct, A(p.src, p.src_t),
          AnyDesc(p.wei, p.wei_t), A(p.dst, p.dst_t), p.strides, p.pad_lo, p.pad_hi, fwd,
          attr);
      e->prim = dnnl::convolution_backward_weights(pd);
      e->src = pd.src_desc();
      e->wei = pd.diff_weights_desc();
      e->dst = pd.diff_dst_desc();
      e->scratch = pd.scratchpad_desc();
      break;
    }
  }
  return e;
}

std::shared_ptr<Entry> Lookup(const Problem& p) {
  static std::mutex* mu = new std::mutex();
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Entry>>();
  std::string key = p.Key();
  {
    std::lock_guard<std::mutex> lock(*mu);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  auto e = Build(p);  // outside the lock: building JIT-compiles kernels
  std::lock_guard<std::mutex> lock(*mu);
  return cache->emplace(key, e).first->second;
}

// 64-byte aligned memory owned by one call.
struct Buffer {
  void* ptr = nullptr;
  explicit Buffer(size_t bytes) {
    if (bytes > 0 && posix_memalign(&ptr, 64, bytes) != 0) throw std::bad_alloc();
  }
  ~Buffer() { std::free(ptr); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

ffi::Error Run(Kind kind, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
               ffi::Span<const int64_t> pad_hi) {
  // Which buffer holds which tensor of the convolution src (*) wei -> dst.
  ffi::AnyBuffer* src_b = nullptr;
  ffi::AnyBuffer* wei_b = nullptr;
  ffi::AnyBuffer* dst_b = nullptr;
  ffi::AnyBuffer& o = *out;
  switch (kind) {
    case Kind::kFwd:
      src_b = &a, wei_b = &b, dst_b = &o;
      break;
    case Kind::kBwdData:
      dst_b = &a, wei_b = &b, src_b = &o;
      break;
    case Kind::kBwdWeights:
      src_b = &a, dst_b = &b, wei_b = &o;
      break;
  }
  auto sd = src_b->dimensions();
  auto wd = wei_b->dimensions();
  auto dd = dst_b->dimensions();
  int spatial = static_cast<int>(sd.size()) - 2;
  if ((spatial != 2 && spatial != 3) || dd.size() != sd.size() || wd.size() != sd.size() ||
      strides.size() != static_cast<size_t>(spatial) ||
      pad_lo.size() != static_cast<size_t>(spatial) ||
      pad_hi.size() != static_cast<size_t>(spatial)) {
    return ffi::Error::InvalidArgument(
        "ssl3d_onednn_conv: expected N[D]HWC activations, a [D]HWIO kernel and one stride and "
        "padding per spatial axis (2 or 3 spatial axes)");
  }
  if (o.element_count() == 0) return ffi::Error::Success();
  if (src_b->element_count() == 0 || dst_b->element_count() == 0 ||
      wei_b->element_count() == 0) {
    // An empty batch (or channel axis): a weight gradient of nothing is zero.
    std::memset(o.untyped_data(), 0, o.size_bytes());
    return ffi::Error::Success();
  }
  Problem p;
  p.kind = kind;
  p.spatial = spatial;
  p.src = ActivationDims(sd);
  p.wei = KernelDims(wd);
  p.dst = ActivationDims(dd);
  p.strides.assign(strides.begin(), strides.end());
  p.pad_lo.assign(pad_lo.begin(), pad_lo.end());
  p.pad_hi.assign(pad_hi.begin(), pad_hi.end());
  if (!ToDnnlType(src_b->element_type(), &p.src_t) ||
      !ToDnnlType(wei_b->element_type(), &p.wei_t) ||
      !ToDnnlType(dst_b->element_type(), &p.dst_t)) {
    return ffi::Error::InvalidArgument("ssl3d_onednn_conv: only float32 and bfloat16 are supported");
  }
  try {
    auto e = Lookup(p);
    auto& eng = Engine();
    memory src_user({p.src, p.src_t, ActivationTag(spatial)}, eng, src_b->untyped_data());
    memory wei_user({p.wei, p.wei_t, KernelTag(spatial)}, eng, wei_b->untyped_data());
    memory dst_user({p.dst, p.dst_t, ActivationTag(spatial)}, eng, dst_b->untyped_data());

    // The primitive's memories: the user's buffers where the layouts agree, else call-owned
    // buffers with reorders (in before execution for inputs, out after it for the output).
    std::vector<std::unique_ptr<Buffer>> owned;
    auto bind = [&](memory& user, const memory::desc& want) {
      if (user.get_desc() == want) return user;
      owned.emplace_back(new Buffer(want.get_size()));
      return memory(want, eng, owned.back()->ptr);
    };
    memory src_m = bind(src_user, e->src);
    memory wei_m = bind(wei_user, e->wei);
    memory dst_m = bind(dst_user, e->dst);
    Buffer scratch(e->scratch.get_size());
    memory scratch_m(e->scratch, eng, scratch.ptr);

    std::unique_lock<std::mutex> lock(ExecMutex(), std::defer_lock);
    if (Serialize()) lock.lock();
    dnnl::stream s(eng);
    auto reorder_in = [&](memory& user, memory& m) {
      if (m.get_data_handle() != user.get_data_handle()) dnnl::reorder(user, m).execute(s, user, m);
    };
    auto reorder_out = [&](memory& m, memory& user) {
      if (m.get_data_handle() != user.get_data_handle()) dnnl::reorder(m, user).execute(s, m, user);
    };
    switch (kind) {
      case Kind::kFwd:
        reorder_in(src_user, src_m);
        reorder_in(wei_user, wei_m);
        e->prim.execute(s, {{DNNL_ARG_SRC, src_m},
                            {DNNL_ARG_WEIGHTS, wei_m},
                            {DNNL_ARG_DST, dst_m},
                            {DNNL_ARG_SCRATCHPAD, scratch_m}});
        reorder_out(dst_m, dst_user);
        break;
      case Kind::kBwdData:
        reorder_in(dst_user, dst_m);
        reorder_in(wei_user, wei_m);
        e->prim.execute(s, {{DNNL_ARG_DIFF_DST, dst_m},
                            {DNNL_ARG_WEIGHTS, wei_m},
                            {DNNL_ARG_DIFF_SRC, src_m},
                            {DNNL_ARG_SCRATCHPAD, scratch_m}});
        reorder_out(src_m, src_user);
        break;
      case Kind::kBwdWeights:
        reorder_in(src_user, src_m);
        reorder_in(dst_user, dst_m);
        e->prim.execute(s, {{DNNL_ARG_SRC, src_m},
                            {DNNL_ARG_DIFF_DST, dst_m},
                            {DNNL_ARG_DIFF_WEIGHTS, wei_m},
                            {DNNL_ARG_SCRATCHPAD, scratch_m}});
        reorder_out(wei_m, wei_user);
        break;
    }
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("ssl3d_onednn_conv: oneDNN error: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("ssl3d_onednn_conv: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error Fwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
               ffi::Span<const int64_t> pad_hi) {
  return Run(Kind::kFwd, x, w, y, strides, pad_lo, pad_hi);
}

ffi::Error BwdData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                   ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                   ffi::Span<const int64_t> pad_hi) {
  return Run(Kind::kBwdData, dy, w, dx, strides, pad_lo, pad_hi);
}

ffi::Error BwdWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                      ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                      ffi::Span<const int64_t> pad_hi) {
  return Run(Kind::kBwdWeights, x, dy, dw, strides, pad_lo, pad_hi);
}

}  // namespace

#define SSL3D_CONV_BINDING                      \
  ffi::Ffi::Bind()                              \
      .Arg<ffi::AnyBuffer>()                    \
      .Arg<ffi::AnyBuffer>()                    \
      .Ret<ffi::AnyBuffer>()                    \
      .Attr<ffi::Span<const int64_t>>("strides") \
      .Attr<ffi::Span<const int64_t>>("pad_lo")  \
      .Attr<ffi::Span<const int64_t>>("pad_hi")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ssl3d_onednn_conv_fwd, Fwd, SSL3D_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ssl3d_onednn_conv_bwd_data, BwdData, SSL3D_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ssl3d_onednn_conv_bwd_weights, BwdWeights, SSL3D_CONV_BINDING);

// For the Python loader's log line: the oneDNN version this library runs with.
extern "C" int ssl3d_onednn_version(int* major, int* minor, int* patch) {
  const dnnl_version_t* v = dnnl_version();
  *major = v->major;
  *minor = v->minor;
  *patch = v->patch;
  return 0;
}

// 1 when this CPU runs bfloat16 convolutions (all three kinds), else 0: oneDNN has no bfloat16
// kernels for CPUs without AVX-512 (or AVX2 with the newer VNNI extensions).
extern "C" int ssl3d_onednn_bf16_supported() {
  try {
    for (Kind kind : {Kind::kFwd, Kind::kBwdData, Kind::kBwdWeights}) {
      Problem p;
      p.kind = kind;
      p.spatial = 3;
      p.src = {1, 8, 4, 4, 4};
      p.wei = {8, 8, 3, 3, 3};
      p.dst = {1, 8, 4, 4, 4};
      p.strides = {1, 1, 1};
      p.pad_lo = {1, 1, 1};
      p.pad_hi = {1, 1, 1};
      p.src_t = p.wei_t = p.dst_t = memory::data_type::bf16;
      Build(p);
    }
  } catch (const std::exception&) {
    return 0;
  }
  return 1;
}
