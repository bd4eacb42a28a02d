// Runs the Hista, GAE, Numca spans or Numca values kernel of csrc/ on the CPU (cuda_emulation.h), launched the way the host
// code in csrc/*.cu launches it. Inputs and outputs are raw little-endian arrays in a directory,
// plus params.txt ("key value" lines); tests/test_cuda_emulation.py writes and reads them.
//
//   emulate hista DIR    or    emulate gae DIR    or    emulate numca DIR    or    emulate numca_values DIR
#include "cuda_emulation.h"
// The kernels, compiled for the CPU.
#include "gae_kernel.cuh"
#include "hista_kernel.cuh"
#include "numca_kernel.cuh"
#include "numca_values_kernel.cuh"

#include <fstream>
#include <map>
#include <sstream>
#include <string>

namespace {

using Params = std::map<std::string, std::string>;

Params read_params(const std::string& dir) {
  Params params;
  std::ifstream in(dir + "/params.txt");
  std::string key, value;
  while (in >> key >> value) params[key] = value;
  return params;
}

double number(const Params& params, const std::string& key) {
  const auto it = params.find(key);
  if (it == params.end()) emu::fail(("missing parameter " + key).c_str());
  return std::stod(it->second);
}

std::vector<unsigned char> read_bytes(const std::string& dir, const std::string& name, size_t bytes) {
  std::ifstream in(dir + "/" + name, std::ios::binary | std::ios::ate);
  if (!in) emu::fail(("missing input " + name).c_str());
  if (static_cast<size_t>(in.tellg()) != bytes) emu::fail(("wrong size of input " + name).c_str());
  std::vector<unsigned char> data(bytes);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(bytes));
  return data;
}

template <class T>
std::vector<T> read_array(const std::string& dir, const std::string& name, size_t count) {
  const auto bytes = read_bytes(dir, name, count * sizeof(T));
  std::vector<T> out(count);
  if (count) std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

template <class T>
void write_array(const std::string& dir, const std::string& name, const std::vector<T>& data) {
  std::ofstream out(dir + "/" + name, std::ios::binary);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(T)));
}

void set_copy_mode(const Params& params) {
  emu::g_copy_mode = number(params, "late_copies") != 0 ? emu::CopyMode::kLate : emu::CopyMode::kEarly;
}

int run_hista(const std::string& dir) {
  using namespace sveb::hista_kernels;
  const Params params = read_params(dir);
  set_copy_mode(params);
  const int n = static_cast<int>(number(params, "n"));
  const int dim = static_cast<int>(number(params, "dim"));
  const int num_groups = static_cast<int>(number(params, "num_groups"));
  const int elem = static_cast<int>(number(params, "element_bytes"));
  const bool bf16 = number(params, "bf16") != 0;
  const int splits = static_cast<int>(number(params, "key_splits"));

  const auto hidden = read_bytes(dir, "hidden.bin", static_cast<size_t>(n) * dim * elem);
  const auto returns = read_array<float>(dir, "returns.bin", n);
  const auto rollout_ids = read_array<int64_t>(dir, "rollout_ids.bin", n);
  const auto offsets = read_array<int64_t>(dir, "group_offsets.bin", num_groups + 1);
  std::vector<float> inv_norm, bias;
  std::vector<unsigned char> mask;
  if (number(params, "cosine") != 0) inv_norm = read_array<float>(dir, "inv_norm.bin", n);
  if (number(params, "has_mask") != 0) mask = read_array<unsigned char>(dir, "key_mask.bin", n);
  if (number(params, "has_bias") != 0) bias = read_array<float>(dir, "key_bias.bin", n);

  std::vector<float> values(n, 12345.f), lse(n, 12345.f), partial(3 * static_cast<size_t>(splits) * n, 12345.f);
  HistaParams p{};
  p.hidden = hidden.data();
  p.n = n;
  p.dim = dim;
  p.returns = returns.data();
  p.rollout_ids = rollout_ids.data();
  p.group_offsets = offsets.data();
  p.num_groups = num_groups;
  p.inv_norm = inv_norm.empty() ? nullptr : inv_norm.data();
  p.key_mask = mask.empty() ? nullptr : reinterpret_cast<const bool*>(mask.data());
  p.key_bias = bias.empty() ? nullptr : bias.data();
  p.logit_scale = static_cast<float>(number(params, "logit_scale"));
  p.empty_value = static_cast<float>(number(params, "empty_value"));
  p.key_splits = splits;
  p.values = values.data();
  p.lse = lse.data();
  p.part_m = partial.data();
  p.part_l = partial.data() + static_cast<size_t>(splits) * n;
  p.part_a = partial.data() + 2 * static_cast<size_t>(splits) * n;

  const unsigned blocks = static_cast<unsigned>((n + kTileM - 1) / kTileM * splits);
  if (elem == 4) {
    emu::launch(blocks, SimtTiles::kThreads, SimtTiles::kSmemBytes, [&] { hista_kernel<SimtTiles>(p); });
  } else if (bf16) {
    using Tiles = TensorCoreTiles<__nv_bfloat16>;
    emu::launch(blocks, Tiles::kThreads, Tiles::kSmemBytes, [&] { hista_kernel<Tiles>(p); });
  } else {
    using Tiles = TensorCoreTiles<__half>;
    emu::launch(blocks, Tiles::kThreads, Tiles::kSmemBytes, [&] { hista_kernel<Tiles>(p); });
  }
  if (splits > 1) {
    emu::launch(static_cast<unsigned>((n + 255) / 256), 256, 0, [&] { hista_merge_splits_kernel(p); });
  }
  write_array(dir, "values.bin", values);
  write_array(dir, "lse.bin", lse);
  return 0;
}

template <class T>
void launch_gae(const std::string& dir, int64_t batch, int64_t length, double gamma, double lam) {
  using namespace sveb::gae_kernels;
  const size_t count = static_cast<size_t>(batch * length);
  const auto rewards = read_array<T>(dir, "rewards.bin", count);
  const auto values = read_array<T>(dir, "values.bin", count);
  const auto mask = read_array<unsigned char>(dir, "mask.bin", count);
  std::vector<float> adv(count, 12345.f), ret(count, 12345.f);
  emu::launch(static_cast<unsigned>(batch), kThreads, 0, [&] {
    gae_kernel<T>(rewards.data(), values.data(), reinterpret_cast<const bool*>(mask.data()), length, gamma,
                  gamma * lam, adv.data(), ret.data());
  });
  write_array(dir, "advantages.bin", adv);
  write_array(dir, "returns.bin", ret);
}

int run_gae(const std::string& dir) {
  const Params params = read_params(dir);
  const auto batch = static_cast<int64_t>(number(params, "batch"));
  const auto length = static_cast<int64_t>(number(params, "length"));
  const double gamma = number(params, "gamma"), lam = number(params, "lam");
  if (number(params, "element_bytes") == 8) {
    launch_gae<double>(dir, batch, length, gamma, lam);
  } else {
    launch_gae<float>(dir, batch, length, gamma, lam);
  }
  return 0;
}

// As csrc/numca.cu. The outputs start as garbage (the host allocates them uninitialised): the kernel
// must write every element.
int run_numca(const std::string& dir) {
  using namespace sveb::numca_kernels;
  const Params params = read_params(dir);
  const auto batch = static_cast<int64_t>(number(params, "batch"));
  const auto length = static_cast<int64_t>(number(params, "length"));
  const auto vocab = static_cast<int64_t>(number(params, "vocab"));
  const auto cols = static_cast<int64_t>(number(params, "cols"));
  const size_t count = static_cast<size_t>(batch * length);
  const bool int32_ids = number(params, "id_bytes") == 4;
  const auto ids32 = int32_ids ? read_array<int32_t>(dir, "ids.bin", count) : std::vector<int32_t>{};
  const auto ids64 = int32_ids ? std::vector<int64_t>{} : read_array<int64_t>(dir, "ids.bin", count);
  const auto table = read_array<int64_t>(dir, "table.bin", static_cast<size_t>(vocab * cols));
  std::vector<unsigned char> mask;
  if (number(params, "has_mask") != 0) mask = read_array<unsigned char>(dir, "mask.bin", count);
  std::vector<unsigned char> end(count, 0xAB);
  std::vector<int64_t> key(count, 12345);
  std::vector<double> value(count, 12345.0);
  std::vector<int32_t> start(count, 12345);
  SpansParams p{};
  p.ids = int32_ids ? static_cast<const void*>(ids32.data()) : static_cast<const void*>(ids64.data());
  p.mask = mask.empty() ? nullptr : reinterpret_cast<const bool*>(mask.data());
  p.table = table.data();
  p.batch = batch;
  p.length = length;
  p.vocab = vocab;
  p.cols = cols;
  p.end = reinterpret_cast<bool*>(end.data());
  p.key = key.data();
  p.value = value.data();
  p.start = start.data();
  emu::launch(static_cast<unsigned>(batch), kThreads, 0, [&] {
    if (int32_ids) {
      numeric_spans_kernel<int32_t>(p);
    } else {
      numeric_spans_kernel<int64_t>(p);
    }
  });
  write_array(dir, "end.bin", end);
  write_array(dir, "key.bin", key);
  write_array(dir, "value.bin", value);
  write_array(dir, "start.bin", start);
  return 0;
}

// As csrc/numca_values.cu after its ATen preprocessing, which the test does with the same torch ops.
int run_numca_values(const std::string& dir) {
  using namespace sveb::numca_values_kernels;
  const Params params = read_params(dir);
  const auto batch = static_cast<int64_t>(number(params, "batch"));
  const auto length = static_cast<int64_t>(number(params, "length"));
  const size_t count = static_cast<size_t>(batch * length);
  const auto valid = read_array<unsigned char>(dir, "valid.bin", count);
  const auto mask = read_array<unsigned char>(dir, "mask.bin", count);
  const auto key = read_array<int64_t>(dir, "key.bin", count);
  const auto sorted_keys = read_array<int64_t>(dir, "sorted_keys.bin", count);
  const auto hash1 = read_array<int64_t>(dir, "hash1.bin", count);
  const auto hash2 = read_array<int64_t>(dir, "hash2.bin", count);
  const auto numbers = read_array<int32_t>(dir, "count.bin", batch);
  const auto returns = read_array<double>(dir, "returns.bin", batch);
  const auto order = read_array<int64_t>(dir, "order.bin", batch);
  const auto lo = read_array<int64_t>(dir, "lo.bin", batch);
  const auto hi = read_array<int64_t>(dir, "hi.bin", batch);
  std::vector<float> out(count, 12345.f);
  ValuesParams p{};
  p.valid = reinterpret_cast<const bool*>(valid.data());
  p.mask = reinterpret_cast<const bool*>(mask.data());
  p.key = key.data();
  p.sorted_keys = sorted_keys.data();
  p.hash1 = hash1.data();
  p.hash2 = hash2.data();
  p.count = numbers.data();
  p.returns = returns.data();
  p.order = order.data();
  p.lo = lo.data();
  p.hi = hi.data();
  p.length = length;
  p.prefix = number(params, "prefix") != 0;
  p.leave_one_out = number(params, "leave_one_out") != 0;
  p.min_support = static_cast<int64_t>(number(params, "min_support"));
  p.empty_value = number(params, "empty_value");
  p.out = out.data();
  emu::launch(static_cast<unsigned>(batch), kThreads, 0, [&] { numca_values_kernel(p); });
  write_array(dir, "values.bin", out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s hista|gae|numca|numca_values DIR\n", argv[0]);
    return 2;
  }
  const std::string what = argv[1], dir = argv[2];
  if (what == "hista") return run_hista(dir);
  if (what == "gae") return run_gae(dir);
  if (what == "numca") return run_numca(dir);
  if (what == "numca_values") return run_numca_values(dir);
  std::fprintf(stderr, "unknown kernel %s\n", what.c_str());
  return 2;
}
