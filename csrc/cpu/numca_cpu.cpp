// Numca on CPU (docs/CONTRACT.md §2b, §2c).
//
// numeric_spans: one thread walks a row with the shared grammar (csrc/numeric_grammar.h, the CUDA
// kernel's too), left to right: one lookup of the vocab table's per-token forward transition for a
// token without digits outside a number; class by class only for tokens with a digit or inside a
// number, where numbers start, end, and get their canonical hash and value. There the backward
// automaton's states come from the token's classes and the next 5 classes of the row (all it ever
// depends on). Rows in parallel.
//
// numca_values: rows grouped on the host; per group, the (key, row) pairs of its numbers sorted, so
// "which peers wrote key k" is one binary search (match="last"); per row and peer, the length of
// the common prefix of their number keys (match="prefix"). Every sum runs over peers in a fixed
// order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "../arg_checks.h"
#include "cpu_ops.h"
#include "../numeric_grammar.h"

namespace sveb {
namespace cpu {
namespace {

using namespace grammar;

bool mask_dtype(at::ScalarType s) {
  return s == at::kBool || at::isIntegralType(s, /*includeBool=*/false) || at::isFloatingType(s);
}

at::Tensor as_bool(const at::Tensor& t) { return (t.scalar_type() == at::kBool ? t : t.ne(0)).contiguous(); }

void on_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, " is the cpp backend and needs CPU tensors; got ", name, " on ",
                    t.device());
}

// ---- numeric_spans ---------------------------------------------------------------------------------

constexpr int kLookahead = 5;

struct SpansRow {
  const int64_t* table;
  int64_t vocab, cols, room, length;

  // The table row of token t, or null for a separator (masked token, id outside [0, V)).
  template <class Id>
  const int64_t* entry(const Id* ids, const bool* mask, int64_t t) const {
    const int64_t id = static_cast<int64_t>(ids[t]);
    if ((mask != nullptr && !mask[t]) || id < 0 || id >= vocab) return nullptr;
    return table + id * cols;
  }

  static int class_at(const int64_t* e, int j) {
    return static_cast<int>((static_cast<uint64_t>(e[kColClasses + j / kClassesPerWord]) >>
                             (4 * (j % kClassesPerWord))) & 15u);
  }

  int count_of(const int64_t* e) const {
    const int64_t stored = (e[kColMeta] >> kMetaLenShift) & kMetaLenMask;
    return static_cast<int>(stored < room ? stored : room);  // a malformed table is never overread
  }

  // Backward state of the text after token t: its first 5 classes decide it (",ddd" and a non-digit
  // is the longest pattern the automaton tells); past the row's end come separators.
  template <class Id>
  int backward_after(const Id* ids, const bool* mask, int64_t t) const {
    int ahead[kLookahead];
    int n = 0;
    for (int64_t u = t + 1; u < length && n < kLookahead; ++u) {
      const int64_t* e = entry(ids, mask, u);
      if (e == nullptr) {
        ahead[n++] = kOther;  // resets the automaton: nothing after it matters
        break;
      }
      const int count = count_of(e);
      for (int j = 0; j < count && n < kLookahead; ++j) ahead[n++] = class_at(e, j);
    }
    int s = kN;
    for (int k = n - 1; k >= 0; --k) s = backward_step(s, ahead[k]);
    return s;
  }

  template <class Id>
  void run(const Id* ids, const bool* mask, int* classes, int* backward_from, bool* end, int64_t* key,
           double* value, int32_t* start) const {
    int state = kO;  // the row starts as after a separator
    bool in_number = false;
    int64_t minus_token = -1;  // the token of the latest '-' that may be a sign
    NumberBuilder number{};
    for (int64_t t = 0; t < length; ++t) {
      end[t] = false;
      key[t] = 0;
      value[t] = NAN;
      start[t] = -1;
      const int64_t* e = entry(ids, mask, t);
      int count;
      if (e == nullptr) {
        count = 1;
        classes[0] = kOther;
      } else {
        count = count_of(e);
        if (!in_number && ((e[kColMeta] >> kMetaDigitShift) & 1) == 0) {
          // No digit and no number going on: nothing starts or ends here (a sign's number starts at
          // the next digit, which is in a later token).
          const int after = token_forward(e[kColFwd], state);
          if (count > 0 && after == kMS) minus_token = t;
          state = after;
          continue;
        }
        for (int j = 0; j < count; ++j) classes[j] = class_at(e, j);
      }
      if (e == nullptr && !in_number) {
        state = kO;
        continue;
      }
      backward_from[count] = backward_after(ids, mask, t);
      for (int j = count - 1; j >= 0; --j) backward_from[j] = backward_step(backward_from[j + 1], classes[j]);
      for (int j = 0; j < count; ++j) {
        const int c = classes[j];
        const int after = forward_step(state, c);
        const int back_next = backward_from[j + 1];
        const bool digit = c < 10;
        const bool next_digit = is_digit_run(back_next);
        if (!in_number) {
          if (c == kMinus && after == kMS && next_digit) {
            number.begin(t, true);
            in_number = true;
          } else if (digit && (state == kO || (state == kOC && backward_from[j] != kD3))) {  // not a ",ddd" group
            number.begin(t, false);
            in_number = true;
          } else if (digit && state == kMS) {  // the sign was the last class of a digit-free token
            number.begin(minus_token, true);
            in_number = true;
          }
        }
        if (in_number) {
          number.add(c);
          const bool in_integer = after >= kA1 && after <= kA4;
          const bool goes_on = (back_next == kG && after <= kA3) || back_next == kFR;
          if (digit && !next_digit && (after == kF || (in_integer && !goes_on))) {
            int64_t k;
            double v;
            number.finish(k, v);
            end[t] = true;  // a later number ending in this token overwrites
            key[t] = k;
            value[t] = v;
            start[t] = static_cast<int32_t>(number.start_token);
            in_number = false;
          }
        }
        if (after == kMS) minus_token = t;
        state = after;
      }
    }
  }
};

void check_spans_args(const at::Tensor& token_ids, const at::Tensor& table, const std::optional<at::Tensor>& mask) {
  using namespace checks;
  TORCH_CHECK_VALUE(token_ids.dim() == 2, "token_ids must have shape [B, T], got ", token_ids.sizes());
  TORCH_CHECK_TYPE(dtype_in(token_ids, {at::kInt, at::kLong}), "token_ids must have dtype int32/int64, got ",
                   token_ids.scalar_type());
  TORCH_CHECK_VALUE(token_ids.size(1) <= INT_MAX, "token_ids has T = ", token_ids.size(1),
                    " tokens a row, more than 2^31 - 1 (start is int32)");
  TORCH_CHECK_TYPE(table.scalar_type() == at::kLong, "vocab table must have dtype int64, got ", table.scalar_type());
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) > kColClasses,
                    "vocab table must have shape [V, >2] as NumericVocab builds it, got ", table.sizes());
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask_dtype(mask->scalar_type()), "mask must have dtype bool, an integer or a float dtype, got ",
                     mask->scalar_type());
    same_shape("mask", *mask, token_ids, "token_ids");
  }
  on_cpu("sveb::_cpp_numeric_spans", "token_ids", token_ids);
  on_device_of("vocab table", table, "token_ids", token_ids);
  if (mask.has_value()) on_device_of("mask", *mask, "token_ids", token_ids);
}

template <class Id>
void spans_rows(const SpansRow& walker, const Id* ids, const bool* mask, int64_t batch, bool* end, int64_t* key,
                double* value, int32_t* start) {
  const int64_t length = walker.length;
  at::parallel_for(0, batch, grain_for(4 * length), [&](int64_t begin, int64_t stop) {
    std::vector<int> classes(static_cast<size_t>(walker.room) + 1), backward_from(static_cast<size_t>(walker.room) + 2);
    for (int64_t row = begin; row < stop; ++row) {
      const int64_t o = row * length;
      walker.run(ids + o, mask == nullptr ? nullptr : mask + o, classes.data(),
                 backward_from.data(), end + o, key + o, value + o, start + o);
    }
  });
}

// ---- numca_values ------------------------------------------------------------------------------------

void check_values_args(const at::Tensor& end, const at::Tensor& key, const at::Tensor& returns,
                       const at::Tensor& group_index, const at::Tensor& mask, const std::string& match,
                       int64_t min_support) {
  using namespace checks;
  TORCH_CHECK_VALUE(end.dim() == 2, "spans.end must have shape [B, T], got ", end.sizes());
  TORCH_CHECK_TYPE(end.scalar_type() == at::kBool, "spans.end must have dtype bool, got ", end.scalar_type());
  TORCH_CHECK_TYPE(key.scalar_type() == at::kLong, "spans.key must have dtype int64, got ", key.scalar_type());
  same_shape("spans.key", key, end, "spans.end");
  floating("returns", returns);
  vector_of("returns", returns, end.size(0));
  TORCH_CHECK_TYPE(dtype_in(group_index, {at::kChar, at::kShort, at::kInt, at::kLong, at::kByte}),
                   "group_index must have dtype int8/int16/int32/int64/uint8, got ", group_index.scalar_type());
  vector_of("group_index", group_index, end.size(0));
  TORCH_CHECK_TYPE(mask_dtype(mask.scalar_type()), "mask must have dtype bool, an integer or a float dtype, got ",
                   mask.scalar_type());
  same_shape("mask", mask, end, "spans.end");
  TORCH_CHECK_VALUE(match == "last" || match == "prefix", "match must be one of 'last', 'prefix', got '", match,
                    "'");
  TORCH_CHECK_VALUE(min_support >= 1, "min_support must be >= 1, got ", min_support);
  on_cpu("sveb::_cpp_numca_values", "spans.end", end);
  on_device_of("spans.key", key, "spans.end", end);
  on_device_of("returns", returns, "spans.end", end);
  on_device_of("group_index", group_index, "spans.end", end);
  on_device_of("mask", mask, "spans.end", end);
}

struct ValuesInputs {
  const bool* valid_end;  // end (a number ends at this token)
  const bool* keep;       // mask
  const int64_t* key;
  const double* returns;
  int64_t batch, length;
  bool leave_one_out;
  int64_t min_support;
  double empty_value;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> numeric_spans(const at::Tensor& token_ids,
                                                                         const at::Tensor& table,
                                                                         const std::optional<at::Tensor>& mask) {
  check_spans_args(token_ids, table, mask);
  const int64_t batch = token_ids.size(0), length = token_ids.size(1);
  const auto options = token_ids.options();
  at::Tensor end = at::empty({batch, length}, options.dtype(at::kBool));
  at::Tensor key = at::empty({batch, length}, options.dtype(at::kLong));
  at::Tensor value = at::empty({batch, length}, options.dtype(at::kDouble));
  at::Tensor start = at::empty({batch, length}, options.dtype(at::kInt));
  if (batch == 0 || length == 0) return {end, key, value, start};

  const at::Tensor ids = token_ids.contiguous();
  const at::Tensor tab = table.contiguous();
  at::Tensor m;
  if (mask.has_value()) m = as_bool(*mask);
  SpansRow walker{tab.data_ptr<int64_t>(), tab.size(0), tab.size(1), (tab.size(1) - kColClasses) * kClassesPerWord,
                  length};
  const bool* mp = m.defined() ? m.data_ptr<bool>() : nullptr;
  if (ids.scalar_type() == at::kInt) {
    spans_rows(walker, ids.data_ptr<int32_t>(), mp, batch, end.data_ptr<bool>(), key.data_ptr<int64_t>(),
               value.data_ptr<double>(), start.data_ptr<int32_t>());
  } else {
    spans_rows(walker, ids.data_ptr<int64_t>(), mp, batch, end.data_ptr<bool>(), key.data_ptr<int64_t>(),
               value.data_ptr<double>(), start.data_ptr<int32_t>());
  }
  return {end, key, value, start};
}

at::Tensor numca_values(const at::Tensor& end, const at::Tensor& key, const at::Tensor& returns,
                        const at::Tensor& group_index, const at::Tensor& mask, const std::string& match,
                        bool leave_one_out, int64_t min_support, double empty_value) {
  check_values_args(end, key, returns, group_index, mask, match, min_support);
  const int64_t batch = end.size(0), length = end.size(1);
  at::Tensor out = at::empty({batch, length}, end.options().dtype(at::kFloat));
  if (batch == 0 || length == 0) return out;

  const at::Tensor ends = end.contiguous();
  const at::Tensor keep = as_bool(mask);
  const at::Tensor keys = key.contiguous();
  const at::Tensor ret = returns.to(at::kDouble).contiguous();
  const at::Tensor groups = group_index.to(at::kLong).contiguous();
  const bool* endp = ends.data_ptr<bool>();
  const bool* keepp = keep.data_ptr<bool>();
  const int64_t* keyp = keys.data_ptr<int64_t>();
  const double* retp = ret.data_ptr<double>();
  const int64_t* groupp = groups.data_ptr<int64_t>();
  float* outp = out.data_ptr<float>();
  const bool prefix = match == "prefix";

  // Rows by group, each group's rows in ascending order: group g is order[first[g] .. first[g + 1]).
  std::vector<int64_t> order(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return groupp[a] < groupp[b]; });
  std::vector<int64_t> first{0}, group_of(static_cast<size_t>(batch));
  for (int64_t q = 0; q < batch; ++q) {
    if (q > 0 && groupp[order[q]] != groupp[order[q - 1]]) first.push_back(q);
    group_of[order[q]] = static_cast<int64_t>(first.size()) - 1;
  }
  first.push_back(batch);
  const int64_t num_groups = static_cast<int64_t>(first.size()) - 1;

  // Each row's number keys in order (numbers at masked tokens do not count).
  // From torch's allocator, so that its profiler (and the bench's peak) sees it.
  const at::Tensor compact_storage = at::empty({batch, length}, keys.options());
  int64_t* compact = compact_storage.data_ptr<int64_t>();
  std::vector<int64_t> count(static_cast<size_t>(batch));
  at::parallel_for(0, batch, grain_for(length), [&](int64_t begin, int64_t stop) {
    for (int64_t b = begin; b < stop; ++b) {
      int64_t n = 0;
      for (int64_t t = 0; t < length; ++t) {
        const int64_t at = b * length + t;
        if (endp[at] && keepp[at]) compact[b * length + n++] = keyp[at];
      }
      count[b] = n;
    }
  });

  // match="last": per group, (key, row) of every number, sorted (duplicates within a row removed).
  std::vector<std::vector<std::pair<int64_t, int64_t>>> holders(prefix ? 0 : static_cast<size_t>(num_groups));
  if (!prefix) {
    at::parallel_for(0, num_groups, grain_for(batch * length / std::max<int64_t>(num_groups, 1)),
                     [&](int64_t begin, int64_t stop) {
      for (int64_t g = begin; g < stop; ++g) {
        auto& pairs = holders[g];
        for (int64_t q = first[g]; q < first[g + 1]; ++q) {
          const int64_t b = order[q];
          for (int64_t i = 0; i < count[b]; ++i) pairs.emplace_back(compact[b * length + i], b);
        }
        std::sort(pairs.begin(), pairs.end());
        pairs.erase(std::unique(pairs.begin(), pairs.end()), pairs.end());
      }
    });
  }

  const int64_t min_sup = min_support;
  at::parallel_for(0, batch, grain_for(length), [&](int64_t begin, int64_t stop) {
    std::vector<int64_t> support_at;  // prefix: peers whose common prefix with this row is exactly l
    std::vector<double> sum_at;
    for (int64_t b = begin; b < stop; ++b) {
      const int64_t g = group_of[b];
      double peer_sum = 0.0;
      int64_t peers = 0;
      for (int64_t q = first[g]; q < first[g + 1]; ++q) {
        const int64_t p = order[q];
        if (leave_one_out && p == b) continue;
        peer_sum += retp[p];
        ++peers;
      }
      double current = peers > 0 ? peer_sum / static_cast<double>(peers) : empty_value;
      const int64_t n = count[b];
      const int64_t* mine = compact + b * length;
      if (prefix) {
        // support(m) = peers whose first m keys are mine: the common prefix is at least m long.
        support_at.assign(static_cast<size_t>(n) + 2, 0);
        sum_at.assign(static_cast<size_t>(n) + 2, 0.0);
        for (int64_t q = first[g]; q < first[g + 1]; ++q) {
          const int64_t p = order[q];
          if (leave_one_out && p == b) continue;
          const int64_t* theirs = compact + p * length;
          const int64_t limit = std::min(n, count[p]);
          int64_t l = 0;
          while (l < limit && theirs[l] == mine[l]) ++l;
          ++support_at[l];
          sum_at[l] += retp[p];
        }
        for (int64_t l = n - 1; l >= 0; --l) {  // now: peers with a common prefix >= l
          support_at[l] += support_at[l + 1];
          sum_at[l] += sum_at[l + 1];
        }
      }
      const std::pair<int64_t, int64_t>* pairs_begin = prefix ? nullptr : holders[g].data();
      const std::pair<int64_t, int64_t>* pairs_end = prefix ? nullptr : holders[g].data() + holders[g].size();
      int64_t ordinal = 0;
      for (int64_t t = 0; t < length; ++t) {
        const int64_t at = b * length + t;
        if (endp[at] && keepp[at]) {
          ++ordinal;
          int64_t support = 0;
          double total = 0.0;
          if (prefix) {
            support = support_at[ordinal];
            total = sum_at[ordinal];
          } else {
            const int64_t k = keyp[at];
            const auto* it = std::lower_bound(pairs_begin, pairs_end, std::make_pair(k, INT64_MIN));
            for (; it != pairs_end && it->first == k; ++it) {
              if (leave_one_out && it->second == b) continue;
              ++support;
              total += retp[it->second];
            }
          }
          if (support >= min_sup) current = total / static_cast<double>(support);
        }
        outp[at] = keepp[at] ? static_cast<float>(current) : 0.0f;
      }
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace sveb
