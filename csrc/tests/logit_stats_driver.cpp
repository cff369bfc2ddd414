// Runs the C++ core on matrices read from raw files and writes every output, so a test can
// check a build it cannot import: tests/test_logit_stats_neon.py cross-compiles this driver for
// aarch64, runs it under qemu-user and compares the NEON path with reference.py.
//
//   logit_stats_driver --levels                      prints the levels that run here, lowest
//                                                    first, then the active one
//   logit_stats_driver OUT ROWS VOCAB LABELS LLAMA REF REF_DTYPE Q_DTYPE Q1 [Q2 ...]
//
// REF and each Qj hold ROWS rows back to back (a row: dtype_row_header + VOCAB entries, no
// padding); LABELS is a file of ROWS int64 or '-'; LLAMA is 0 or 1. For each level that runs
// here, each thread count 1, 2, 3 and each of logit_stats (model by model) and
// logit_stats_multi (all models at once), OUT gets, per model, the 12 outputs below as
// float64 [ROWS] each (top1 converted exactly), in that nesting order. With FK_DRIVER_EXTRA=1
// in the environment, each model's 12 are followed by issue 16's optional outputs
// (kExtraFields; the label ones 0 without labels).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "fidelity_kld/logit_stats.h"

namespace {

constexpr int kFields = 12;  // kld, kld_reverse, lse_ref, lse_q, entropy_ref, top1_ref,
                             // top1_q, nll_ref, nll_q, p_ref_y, p_q_y, kld_llama
const int kThreads[] = {1, 2, 3};
constexpr int kExtraFields = 10;  // logp_top1_ref, logp_top1_q, logp_top2_ref, logp_top2_q, tvd,
                                  // jsd, rank_ref_y, rank_q_y, margin_ref, margin_q

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  FK_RUNTIME_CHECK(f, "cannot open " << path);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

fk::DType parse_dtype(const std::string& name) {
  for (fk::DType d : {fk::DType::F32, fk::DType::F16, fk::DType::BF16, fk::DType::LLAMA_U16})
    if (name == fk::dtype_name(d)) return d;
  FK_CHECK(false, "unknown dtype " << name);
}

// One model's outputs, attached to its params.
struct Outputs {
  explicit Outputs(int64_t n)
      : f(kFields - 2, std::vector<double>(n)), top1(2, std::vector<int32_t>(n)),
        extra(kExtraFields - 2, std::vector<double>(n)), rank(2, std::vector<int32_t>(n)) {}
  std::vector<std::vector<double>> f;  // the float fields, in kFields order without top1
  std::vector<std::vector<int32_t>> top1;
  std::vector<std::vector<double>> extra;  // kExtraFields without the ranks
  std::vector<std::vector<int32_t>> rank;
  bool with_extra = false;
  void attach_extra(fk::LogitStatsParams& p) {
    with_extra = true;
    p.logp_top1_ref = extra[0].data();
    p.logp_top1_q = extra[1].data();
    p.logp_top2_ref = extra[2].data();
    p.logp_top2_q = extra[3].data();
    p.tvd = extra[4].data();
    p.jsd = extra[5].data();
    if (p.labels) {
      p.rank_ref_y = rank[0].data();
      p.rank_q_y = rank[1].data();
      p.margin_ref = extra[6].data();
      p.margin_q = extra[7].data();
    }
  }
  void attach(fk::LogitStatsParams& p) {
    p.kld = f[0].data();
    p.kld_reverse = f[1].data();
    p.lse_ref = f[2].data();
    p.lse_q = f[3].data();
    p.entropy_ref = f[4].data();
    p.top1_ref = top1[0].data();
    p.top1_q = top1[1].data();
    p.nll_ref = f[5].data();
    p.nll_q = f[6].data();
    p.p_ref_y = f[7].data();
    p.p_q_y = f[8].data();
    p.kld_llama = f[9].data();
  }
  void write(std::FILE* out) const {
    const auto put = [&](const std::vector<double>& v) {
      std::fwrite(v.data(), sizeof(double), v.size(), out);
    };
    for (int k = 0; k < 5; ++k) put(f[k]);
    for (const auto& t : top1) put(std::vector<double>(t.begin(), t.end()));
    for (int k = 5; k < 10; ++k) put(f[k]);
    if (!with_extra) return;
    for (int k = 0; k < 6; ++k) put(extra[k]);
    for (const auto& r : rank) put(std::vector<double>(r.begin(), r.end()));
    for (int k = 6; k < 8; ++k) put(extra[k]);
  }
};

int run(int argc, char** argv) {
  const std::string out_path = argv[1];
  const int64_t rows = std::stoll(argv[2]), vocab = std::stoll(argv[3]);
  const std::string labels_path = argv[4];
  const bool llama = std::string(argv[5]) == "1";
  const std::vector<uint8_t> ref = read_file(argv[6]);
  const fk::DType ref_dtype = parse_dtype(argv[7]), q_dtype = parse_dtype(argv[8]);
  std::vector<std::vector<uint8_t>> qs;
  for (int k = 9; k < argc; ++k) qs.push_back(read_file(argv[k]));
  std::vector<uint8_t> label_bytes;
  if (labels_path != "-") label_bytes = read_file(labels_path);
  std::vector<int64_t> labels(label_bytes.size() / 8);
  if (!labels.empty()) std::memcpy(labels.data(), label_bytes.data(), label_bytes.size());

  fk::LogitStatsParams base;
  base.ref = ref.data();
  base.ref_dtype = ref_dtype;
  base.q_dtype = q_dtype;
  base.ref_row_stride = fk::dtype_row_header(ref_dtype) + vocab * fk::dtype_size(ref_dtype);
  base.q_row_stride = fk::dtype_row_header(q_dtype) + vocab * fk::dtype_size(q_dtype);
  base.n_rows = rows;
  base.vocab = vocab;
  base.labels = labels.empty() ? nullptr : labels.data();
  base.llama_parity = llama;
  FK_CHECK(static_cast<int64_t>(ref.size()) == rows * base.ref_row_stride, "ref size");
  for (const auto& q : qs)
    FK_CHECK(static_cast<int64_t>(q.size()) == rows * base.q_row_stride, "q size");

  std::FILE* out = std::fopen(out_path.c_str(), "wb");
  FK_RUNTIME_CHECK(out, "cannot write " << out_path);
  const int m = static_cast<int>(qs.size());
  const char* extra_env = std::getenv("FK_DRIVER_EXTRA");
  const bool extra = extra_env && std::string(extra_env) == "1";
  for (fk::SimdLevel level : fk::available_simd_levels()) {
    for (int threads : kThreads) {
      for (bool multi : {false, true}) {
        std::vector<Outputs> outs(m, Outputs(rows));
        std::vector<fk::LogitStatsParams> ps(m, base);
        for (int j = 0; j < m; ++j) {
          ps[j].q = qs[j].data();
          ps[j].threads = threads;
          outs[j].attach(ps[j]);
          if (extra) outs[j].attach_extra(ps[j]);
          if (!multi) fk::logit_stats(ps[j], level);
        }
        if (multi) fk::logit_stats_multi(ps.data(), m, level);
        for (const Outputs& o : outs) o.write(out);
      }
    }
  }
  return std::fclose(out) == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 2 && std::string(argv[1]) == "--levels") {
      for (fk::SimdLevel l : fk::available_simd_levels()) std::printf("%s ", fk::simd_level_name(l));
      std::printf("\n%s\n", fk::simd_level_name(fk::active_simd_level()));
      return 0;
    }
    if (argc < 10) {
      std::fprintf(stderr, "usage: %s OUT ROWS VOCAB LABELS LLAMA REF REF_DTYPE Q_DTYPE Q1 [Q2 ...]\n",
                   argv[0]);
      return 2;
    }
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "logit_stats_driver: %s\n", e.what());
    return 1;
  }
}
