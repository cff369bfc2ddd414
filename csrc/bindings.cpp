// The only file that includes pybind11: checks arrays, maps dtypes, releases the GIL, calls
// the core. No arithmetic here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "fidelity_kld/logit_stats.h"
#include "fidelity_kld/sigbus_guard.h"
#ifdef FK_HAVE_CUDA
#include <cstdint>

#include "fidelity_kld/logit_stats_cuda.h"
#endif

namespace py = pybind11;

namespace {

fk::DType parse_dtype(const std::string& name) {
  if (name == "float32") return fk::DType::F32;
  if (name == "float16") return fk::DType::F16;
  if (name == "bfloat16") return fk::DType::BF16;
  if (name == "llama_u16") return fk::DType::LLAMA_U16;
  FK_CHECK(false, "unknown logit dtype '" << name
                                          << "' (expected float32, float16, bfloat16, llama_u16)");
}

// numpy storage each logical dtype crosses the boundary as.
char storage_kind(fk::DType d) { return d == fk::DType::F32 ? 'f' : (d == fk::DType::F16 ? 'f' : 'u'); }

struct Matrix {
  const void* data;
  int64_t rows;
  int64_t row_stride;  // bytes
};

Matrix check_matrix(const py::array& a, fk::DType dtype, int64_t vocab, const char* what) {
  const py::buffer_info info = a.request();
  FK_CHECK(info.ndim == 2, what << " must be 2-D [tokens, vocab], got " << info.ndim << "-D");
  const int64_t itemsize = dtype == fk::DType::F32 ? 4 : 2;
  FK_CHECK(info.itemsize == itemsize && a.dtype().kind() == storage_kind(dtype),
           what << ": storage dtype " << std::string(py::str(a.dtype())) << " does not match "
                << fk::dtype_name(dtype));
  const int64_t cols = info.shape[1];
  const int64_t need = (fk::dtype_row_header(dtype) / 2) + vocab;
  if (dtype == fk::DType::LLAMA_U16)
    FK_CHECK(cols >= need, what << ": llama rows hold " << cols << " words, need " << need
                                << " for vocab " << vocab);
  else
    FK_CHECK(cols == vocab, what << " has " << cols << " columns, expected vocab " << vocab);
  FK_CHECK(info.shape[0] <= 1 || info.strides[1] == itemsize || cols == 1,
           what << " rows must be contiguous (element stride " << info.strides[1] << " bytes)");
  FK_CHECK(info.shape[0] <= 1 || info.strides[0] > 0,
           what << " must have a positive row stride (got " << info.strides[0] << ")");
  return Matrix{info.ptr, info.shape[0], info.shape[0] <= 1 ? 0 : info.strides[0]};
}

// Outputs are taken as plain arrays and checked, never converted: a converted copy would
// receive the results and be thrown away.
template <class T>
T* check_out(const std::optional<py::array>& a, int64_t n, const char* name) {
  if (!a) return nullptr;
  FK_CHECK(a->dtype().is(py::dtype::of<T>()),
           name << " must have dtype " << std::string(py::str(py::dtype::of<T>())));
  FK_CHECK(a->writeable(), name << " must be writeable");
  py::buffer_info info = a->request(true);
  FK_CHECK(info.ndim == 1 && info.shape[0] == n, name << " must be 1-D of length " << n);
  FK_CHECK(n <= 1 || info.strides[0] == static_cast<py::ssize_t>(sizeof(T)),
           name << " must be contiguous");
  return static_cast<T*>(info.ptr);
}

// Comma-separated names of the levels that run here.
std::string available_names() {
  std::string names;
  for (fk::SimdLevel l : fk::available_simd_levels())
    names += (names.empty() ? "" : ", ") + std::string(fk::simd_level_name(l));
  return names;
}

fk::SimdLevel parse_simd(const std::string& s) {
  if (s == "auto") return fk::active_simd_level();
  for (fk::SimdLevel l : fk::available_simd_levels())
    if (s == fk::simd_level_name(l)) return l;
  FK_CHECK(s == "scalar" || s == "avx2" || s == "avx512" || s == "neon",
           "simd must be auto, scalar, avx2, avx512 or neon, not '" << s << "'");
  FK_CHECK(false, "simd level " << s << " is not available here (this machine runs "
                                << available_names() << ")");
}

// One model's output arrays, in the order of the keyword arguments.
struct Outputs {
  std::optional<py::array> kld, kld_reverse, lse_ref, lse_q, entropy_ref, top1_ref, top1_q,
      nll_ref, nll_q, p_ref_y, p_q_y, kld_llama;
  // Optional outputs (issue 16): none = not computed.
  std::optional<py::array> logp_top1_ref, logp_top1_q, logp_top2_ref, logp_top2_q, tvd, jsd,
      rank_ref_y, rank_q_y, margin_ref, margin_q;

  static Outputs from_dict(const py::dict& d) {
    Outputs o;
    const std::pair<const char*, std::optional<py::array>*> fields[] = {
        {"kld", &o.kld}, {"kld_reverse", &o.kld_reverse}, {"lse_ref", &o.lse_ref},
        {"lse_q", &o.lse_q}, {"entropy_ref", &o.entropy_ref}, {"top1_ref", &o.top1_ref},
        {"top1_q", &o.top1_q}, {"nll_ref", &o.nll_ref}, {"nll_q", &o.nll_q},
        {"p_ref_y", &o.p_ref_y}, {"p_q_y", &o.p_q_y}, {"kld_llama", &o.kld_llama},
        {"logp_top1_ref", &o.logp_top1_ref}, {"logp_top1_q", &o.logp_top1_q},
        {"logp_top2_ref", &o.logp_top2_ref}, {"logp_top2_q", &o.logp_top2_q}, {"tvd", &o.tvd},
        {"jsd", &o.jsd}, {"rank_ref_y", &o.rank_ref_y}, {"rank_q_y", &o.rank_q_y},
        {"margin_ref", &o.margin_ref}, {"margin_q", &o.margin_q}};
    size_t used = 0;
    for (const auto& [name, field] : fields) {
      if (!d.contains(name)) continue;
      ++used;
      if (!d[name].is_none()) *field = d[name].cast<py::array>();
    }
    FK_CHECK(used == d.size(), "unknown output name in " << std::string(py::str(d.attr("keys")())));
    return o;
  }

  void apply(fk::LogitStatsParams& p, int64_t n) const {
    p.kld = check_out<double>(kld, n, "kld");
    p.kld_reverse = check_out<double>(kld_reverse, n, "kld_reverse");
    p.lse_ref = check_out<double>(lse_ref, n, "lse_ref");
    p.lse_q = check_out<double>(lse_q, n, "lse_q");
    p.entropy_ref = check_out<double>(entropy_ref, n, "entropy_ref");
    p.top1_ref = check_out<int32_t>(top1_ref, n, "top1_ref");
    p.top1_q = check_out<int32_t>(top1_q, n, "top1_q");
    p.nll_ref = check_out<double>(nll_ref, n, "nll_ref");
    p.nll_q = check_out<double>(nll_q, n, "nll_q");
    p.p_ref_y = check_out<double>(p_ref_y, n, "p_ref_y");
    p.p_q_y = check_out<double>(p_q_y, n, "p_q_y");
    p.kld_llama = check_out<double>(kld_llama, n, "kld_llama");
    p.logp_top1_ref = check_out<double>(logp_top1_ref, n, "logp_top1_ref");
    p.logp_top1_q = check_out<double>(logp_top1_q, n, "logp_top1_q");
    p.logp_top2_ref = check_out<double>(logp_top2_ref, n, "logp_top2_ref");
    p.logp_top2_q = check_out<double>(logp_top2_q, n, "logp_top2_q");
    p.tvd = check_out<double>(tvd, n, "tvd");
    p.jsd = check_out<double>(jsd, n, "jsd");
    p.rank_ref_y = check_out<int32_t>(rank_ref_y, n, "rank_ref_y");
    p.rank_q_y = check_out<int32_t>(rank_q_y, n, "rank_q_y");
    p.margin_ref = check_out<double>(margin_ref, n, "margin_ref");
    p.margin_q = check_out<double>(margin_q, n, "margin_q");
  }
};

// The reference side and the shared settings of a call.
using Labels = std::optional<py::array_t<int64_t, py::array::c_style>>;

fk::LogitStatsParams ref_params(const py::array& ref, const std::string& ref_dtype, int64_t vocab,
                                const Labels& labels, bool llama_parity, int threads) {
  fk::LogitStatsParams p;
  p.ref_dtype = parse_dtype(ref_dtype);
  const Matrix a = check_matrix(ref, p.ref_dtype, vocab, "ref");
  p.ref = a.data;
  p.ref_row_stride = a.row_stride;
  p.n_rows = a.rows;
  p.vocab = vocab;
  if (labels) {
    FK_CHECK(labels->ndim() == 1 && labels->shape(0) == a.rows,
             "labels must be 1-D of length " << a.rows);
    p.labels = labels->data();
  }
  p.llama_parity = llama_parity;
  p.threads = threads;
  return p;
}

void set_q(fk::LogitStatsParams& p, const py::array& q, const std::string& q_dtype,
           const char* what) {
  p.q_dtype = parse_dtype(q_dtype);
  const Matrix b = check_matrix(q, p.q_dtype, p.vocab, what);
  FK_CHECK(b.rows == p.n_rows,
           "ref has " << p.n_rows << " tokens but " << what << " has " << b.rows);
  p.q = b.data;
  p.q_row_stride = b.row_stride;
}

void register_logit_stats(py::module_& m) {
  using OutD = std::optional<py::array>;
  using OutI = std::optional<py::array>;
  m.def(
      "logit_stats",
      [](const py::array& ref, const std::string& ref_dtype, const py::array& q,
         const std::string& q_dtype, int64_t vocab,
         const std::optional<py::array_t<int64_t, py::array::c_style>>& labels,
         bool llama_parity, int threads, const std::string& simd, OutD kld, OutD kld_reverse,
         OutD lse_ref, OutD lse_q, OutD entropy_ref, OutI top1_ref, OutI top1_q, OutD nll_ref,
         OutD nll_q, OutD p_ref_y, OutD p_q_y, OutD kld_llama, const py::dict& extra) {
        fk::LogitStatsParams p = ref_params(ref, ref_dtype, vocab, labels, llama_parity, threads);
        set_q(p, q, q_dtype, "q");
        Outputs o = Outputs::from_dict(extra);
        o.kld = kld, o.kld_reverse = kld_reverse, o.lse_ref = lse_ref, o.lse_q = lse_q;
        o.entropy_ref = entropy_ref, o.top1_ref = top1_ref, o.top1_q = top1_q;
        o.nll_ref = nll_ref, o.nll_q = nll_q, o.p_ref_y = p_ref_y, o.p_q_y = p_q_y;
        o.kld_llama = kld_llama;
        o.apply(p, p.n_rows);
        const fk::SimdLevel level = parse_simd(simd);
        // Safe without the GIL: the core reads and writes only the buffers above, which the
        // py::array arguments keep alive until this lambda returns, and touches no Python object.
        py::gil_scoped_release release;
        fk::logit_stats(p, level);
      },
      py::arg("ref"), py::arg("ref_dtype"), py::arg("q"), py::arg("q_dtype"), py::arg("vocab"),
      py::kw_only(), py::arg("labels") = py::none(), py::arg("llama_parity") = false,
      py::arg("threads") = 0, py::arg("simd") = "auto", py::arg("kld"), py::arg("kld_reverse"),
      py::arg("lse_ref"), py::arg("lse_q"), py::arg("entropy_ref"), py::arg("top1_ref"),
      py::arg("top1_q"), py::arg("nll_ref") = py::none(), py::arg("nll_q") = py::none(),
      py::arg("p_ref_y") = py::none(), py::arg("p_q_y") = py::none(),
      py::arg("kld_llama") = py::none(), py::arg("extra") = py::dict(),
      "Fill per-token statistics of ref vs q into the given float64/int32 output arrays; "
      "extra: {name: array} of optional outputs (logp_top1_ref, ..., margin_q) to compute.");
  m.def(
      "logit_stats_multi",
      [](const py::array& ref, const std::string& ref_dtype, const std::vector<py::array>& qs,
         const std::string& q_dtype, int64_t vocab, const Labels& labels, bool llama_parity,
         int threads, const std::string& simd, const std::vector<py::dict>& outs) {
        FK_CHECK(!qs.empty() && qs.size() == outs.size(),
                 "need one output dict per model (" << qs.size() << " models, " << outs.size()
                                                    << " dicts)");
        const fk::LogitStatsParams base =
            ref_params(ref, ref_dtype, vocab, labels, llama_parity, threads);
        std::vector<fk::LogitStatsParams> ps(qs.size(), base);
        for (size_t j = 0; j < qs.size(); ++j) {
          const std::string what = "q[" + std::to_string(j) + "]";
          set_q(ps[j], qs[j], q_dtype, what.c_str());
          Outputs::from_dict(outs[j]).apply(ps[j], base.n_rows);
        }
        const fk::SimdLevel level = parse_simd(simd);
        py::gil_scoped_release release;  // as above: only the arrays in qs and outs are touched
        fk::logit_stats_multi(ps.data(), static_cast<int>(ps.size()), level);
      },
      py::arg("ref"), py::arg("ref_dtype"), py::arg("qs"), py::arg("q_dtype"), py::arg("vocab"),
      py::kw_only(), py::arg("labels") = py::none(), py::arg("llama_parity") = false,
      py::arg("threads") = 0, py::arg("simd") = "auto", py::arg("outs"),
      "Per-token statistics of several models (same dtype) against one reference, each into "
      "its own dict of output arrays; each model's results are bitwise those of logit_stats.");
}

#ifdef FK_HAVE_CUDA
// Device memory crosses as integers (torch's data_ptr(), __cuda_array_interface__, DLPack), so the
// extension never links torch; fidelity_kld.gpu checks shapes, dtypes, devices and labels and
// allocates the outputs. Optional outputs are 0 when not wanted.
void register_logit_stats_cuda(py::module_& m) {
  m.def(
      "logit_stats_cuda",
      [](std::uintptr_t ref, const std::string& ref_dtype, int64_t ref_row_stride,
         std::uintptr_t q, const std::string& q_dtype, int64_t q_row_stride, int64_t n_rows,
         int64_t vocab, std::uintptr_t labels, bool llama_parity, std::uintptr_t kld,
         std::uintptr_t kld_reverse, std::uintptr_t lse_ref, std::uintptr_t lse_q,
         std::uintptr_t entropy_ref, std::uintptr_t top1_ref, std::uintptr_t top1_q,
         std::uintptr_t nll_ref, std::uintptr_t nll_q, std::uintptr_t p_ref_y,
         std::uintptr_t p_q_y, std::uintptr_t kld_llama, std::uintptr_t stream,
         int vocab_splits, std::uintptr_t logp_top1_ref, std::uintptr_t logp_top1_q,
         std::uintptr_t logp_top2_ref, std::uintptr_t logp_top2_q, std::uintptr_t tvd,
         std::uintptr_t jsd, std::uintptr_t rank_ref_y, std::uintptr_t rank_q_y,
         std::uintptr_t margin_ref, std::uintptr_t margin_q) {
        fk::LogitStatsParams p;
        p.ref = reinterpret_cast<const void*>(ref);
        p.q = reinterpret_cast<const void*>(q);
        p.ref_dtype = parse_dtype(ref_dtype);
        p.q_dtype = parse_dtype(q_dtype);
        p.ref_row_stride = ref_row_stride;
        p.q_row_stride = q_row_stride;
        p.n_rows = n_rows;
        p.vocab = vocab;
        p.labels = reinterpret_cast<const int64_t*>(labels);
        p.llama_parity = llama_parity;
        p.kld = reinterpret_cast<double*>(kld);
        p.kld_reverse = reinterpret_cast<double*>(kld_reverse);
        p.lse_ref = reinterpret_cast<double*>(lse_ref);
        p.lse_q = reinterpret_cast<double*>(lse_q);
        p.entropy_ref = reinterpret_cast<double*>(entropy_ref);
        p.top1_ref = reinterpret_cast<int32_t*>(top1_ref);
        p.top1_q = reinterpret_cast<int32_t*>(top1_q);
        p.nll_ref = reinterpret_cast<double*>(nll_ref);
        p.nll_q = reinterpret_cast<double*>(nll_q);
        p.p_ref_y = reinterpret_cast<double*>(p_ref_y);
        p.p_q_y = reinterpret_cast<double*>(p_q_y);
        p.kld_llama = reinterpret_cast<double*>(kld_llama);
        p.logp_top1_ref = reinterpret_cast<double*>(logp_top1_ref);
        p.logp_top1_q = reinterpret_cast<double*>(logp_top1_q);
        p.logp_top2_ref = reinterpret_cast<double*>(logp_top2_ref);
        p.logp_top2_q = reinterpret_cast<double*>(logp_top2_q);
        p.tvd = reinterpret_cast<double*>(tvd);
        p.jsd = reinterpret_cast<double*>(jsd);
        p.rank_ref_y = reinterpret_cast<int32_t*>(rank_ref_y);
        p.rank_q_y = reinterpret_cast<int32_t*>(rank_q_y);
        p.margin_ref = reinterpret_cast<double*>(margin_ref);
        p.margin_q = reinterpret_cast<double*>(margin_q);
        // Safe without the GIL: only device memory and a stream handle are touched, and the
        // call returns once the kernels are queued; the caller keeps the tensors alive.
        py::gil_scoped_release release;
        fk::logit_stats_cuda(p, reinterpret_cast<void*>(stream), vocab_splits);
      },
      py::arg("ref"), py::arg("ref_dtype"), py::arg("ref_row_stride"), py::arg("q"),
      py::arg("q_dtype"), py::arg("q_row_stride"), py::arg("n_rows"), py::arg("vocab"),
      py::kw_only(), py::arg("labels") = 0, py::arg("llama_parity") = false, py::arg("kld"),
      py::arg("kld_reverse"), py::arg("lse_ref"), py::arg("lse_q"), py::arg("entropy_ref"),
      py::arg("top1_ref"), py::arg("top1_q"), py::arg("nll_ref") = 0, py::arg("nll_q") = 0,
      py::arg("p_ref_y") = 0, py::arg("p_q_y") = 0, py::arg("kld_llama") = 0,
      py::arg("stream") = 0, py::arg("vocab_splits") = 0, py::arg("logp_top1_ref") = 0,
      py::arg("logp_top1_q") = 0, py::arg("logp_top2_ref") = 0, py::arg("logp_top2_q") = 0,
      py::arg("tvd") = 0, py::arg("jsd") = 0, py::arg("rank_ref_y") = 0,
      py::arg("rank_q_y") = 0, py::arg("margin_ref") = 0, py::arg("margin_q") = 0,
      "Queue the fused statistics on a CUDA stream: integer device pointers, byte row strides, "
      "float64/int32 device outputs (the optional ones, issue 16: 0 = not computed). Returns "
      "without synchronising.");
}
#endif

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fidelity-kld compiled core (private; use fidelity_kld.compare)";
  register_logit_stats(m);
  m.attr("simd_level") = fk::simd_level_name(fk::active_simd_level());
  m.def("active_simd_level", [] { return std::string(fk::simd_level_name(fk::active_simd_level())); },
        "SIMD path logit_stats uses now (reads FIDELITY_KLD_SIMD on every call).");
  m.def("available_simd_levels", [] {
    std::vector<std::string> names;
    for (fk::SimdLevel l : fk::available_simd_levels()) names.emplace_back(fk::simd_level_name(l));
    return names;
  }, "SIMD paths that run here, lowest first, up to active_simd_level().");
  m.def("sigbus_guard", &fk::sigbus_guard, py::arg("address"), py::arg("length"), py::arg("message"),
        "Exit 1 with `message` on stderr if a read in [address, address + length) faults with "
        "SIGBUS (a memory-mapped file cut short). Returns a slot for sigbus_unguard (-1: none free).");
  m.def("sigbus_unguard", &fk::sigbus_unguard, py::arg("slot"));
#ifdef FK_HAVE_CUDA
  m.attr("has_cuda") = true;
  register_logit_stats_cuda(m);
#else
  m.attr("has_cuda") = false;
#endif
}
