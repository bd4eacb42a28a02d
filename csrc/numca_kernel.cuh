// Numeric spans (docs/CONTRACT.md §2b) as one kernel: one thread per row walks the row's class stream
// (sveb_kernels/numca/vocab.py: 4-bit byte classes per token, 16 to an int64 word) from left to right.
//
// The walk applies the closed form of the §2b regex that reference.py and triton.py use: a forward
// automaton (FWD_*: what the text so far means for a digit that follows) and, at each class, the
// backward automaton's state of the text from there on (BWD_*). The backward state never depends on
// more than 5 classes (",ddd" + a non-digit is the longest pattern it tells), so it is recomputed
// from a 6-class lookahead window instead of a backward pass. Between a number's first and last
// class every class belongs to it, so its canonical FNV-1a hash and its value are accumulated in the
// same walk: leading integer zeros are skipped, fraction zeros are held back until a non-zero digit
// commits them, and the hash is kept both with and without the '-' (the sign is dropped when the
// number turns out to be zero).
//
// Values: M * 10^E with M the first 19 significant digits. One correctly rounded IEEE operation when
// M <= 2^53 and |E| <= 22 (nothing was cut then), as in the reference; otherwise M and 10^|E| as
// double-doubles, within 1 ulp of float(canonical string) (docs/CONTRACT.md §2b allows 1 ulp for kernels).
//
// Simple on purpose (correctness first, issue 5): one thread per row reads every class of the row,
// digit-free tokens included; the Triton kernel's parallel automaton scans are the faster design.
//
// Device code only (host code: numca.cu); builds with a host compiler under SVEB_CPU_EMULATION
// for the CPU tests in tests/cuda_emulation/.
#pragma once

#include <cmath>
#include <cstdint>

namespace sveb {
namespace numca_kernels {

constexpr int kThreads = 64;  // rows per CTA (one thread each)

// Table layout and classes: sveb_kernels/numca/vocab.py.
constexpr int kColMeta = 1, kColClasses = 2;
constexpr int kMetaLenShift = 24;
constexpr int64_t kMetaLenMask = 0xFFFF;
constexpr int kClassesPerWord = 16;
constexpr int kComma = 10, kDot = 11, kMinus = 12, kWord = 13, kOther = 14, kEnd = 15;

// Forward automaton states (vocab.py FWD_*).
constexpr int kO = 0, kOC = 1, kW = 2, kDA = 3, kMS = 4, kA1 = 5, kA2 = 6, kA3 = 7, kA4 = 8, kF = 9, kI = 10;
// Backward automaton states (vocab.py BWD_*).
constexpr int kN = 0, kD1 = 1, kD3 = 3, kD4 = 4, kG = 5, kFR = 6;

constexpr int kMaxDigits = 19;  // significant digits kept in a uint64 mantissa (10^19 - 1 < 2^64)
constexpr uint64_t kFnvOffset = 0xCBF29CE484222325ull;
constexpr uint64_t kFnvPrime = 0x100000001B3ull;
constexpr int kWindow = 6;  // the current class and the 5 after it

__device__ __forceinline__ int forward_step(int s, int c) {
  if (c == kEnd) return s;
  if (c < 10) {
    switch (s) {
      case kO: case kOC: case kMS: return kA1;
      case kW: case kI: return kI;
      case kDA: case kF: return kF;
      case kA1: return kA2;
      case kA2: return kA3;
      default: return kA4;  // kA3, kA4
    }
  }
  if (c == kComma) return (s >= kA1 && s <= kA3) ? kOC : kO;
  if (c == kDot) return (s >= kA1 && s <= kA4) ? kDA : kW;
  if (c == kMinus) return (s == kO || s == kOC || s == kMS) ? kMS : kO;
  if (c == kWord) return kW;
  return kO;
}

__device__ __forceinline__ int backward_step(int s, int c) {
  if (c == kEnd) return s;
  if (c < 10) return (s >= kD1 && s <= kD4) ? (s == kD4 ? kD4 : s + 1) : kD1;
  if (c == kComma) return s == kD3 ? kG : kN;
  if (c == kDot) return (s >= kD1 && s <= kD4) ? kFR : kN;
  return kN;
}

// ---- decimal to double ---------------------------------------------------------------------------
struct DoubleDouble {
  double hi, lo;
};

__device__ __forceinline__ DoubleDouble dd_mul(DoubleDouble a, DoubleDouble b) {
  const double p = a.hi * b.hi;
  double e = fma(a.hi, b.hi, -p);  // a.hi * b.hi - p exactly
  e += a.hi * b.lo + a.lo * b.hi;
  const double s = p + e;
  return {s, e - (s - p)};
}

__device__ __forceinline__ DoubleDouble dd_div(DoubleDouble a, DoubleDouble b) {
  const double q1 = a.hi / b.hi;
  const double p = q1 * b.hi;
  const double pe = fma(q1, b.hi, -p);
  const double r = ((a.hi - p) - pe) + a.lo - q1 * b.lo;  // a - q1 * b
  const double q2 = r / b.hi;
  const double s = q1 + q2;
  return {s, q2 - (s - q1)};
}

__device__ __forceinline__ double pow10_exact(int k) {  // 10^k, 0 <= k <= 22: every step exact
  double p = 1.0;
  for (int i = 0; i < k; ++i) p *= 10.0;
  return p;
}

// 10^k for 0 <= k <= 308 as a double-double (relative error ~2^-100): 10^(k mod 22) * (10^22)^(k / 22).
__device__ DoubleDouble pow10_dd(int k) {
  DoubleDouble acc{pow10_exact(k % 22), 0.0};
  DoubleDouble base{1e22, 0.0};
  for (int q = k / 22; q > 0; q >>= 1) {
    if (q & 1) acc = dd_mul(acc, base);
    if (q > 1) base = dd_mul(base, base);
  }
  return acc;
}

// m * 10^e for 1 <= m < 10^19.
__device__ double decimal_to_double(uint64_t m, int64_t e) {
  if (m <= (1ull << 53) && e >= -22 && e <= 22) {
    const double mf = static_cast<double>(m);
    return e >= 0 ? mf * pow10_exact(static_cast<int>(e)) : mf / pow10_exact(static_cast<int>(-e));
  }
  if (e > 308) return INFINITY;  // >= 10^309
  if (e < -343) return 0.0;      // < 10^19 * 10^-344, below half the smallest subnormal
  const double hi = static_cast<double>(m);
  DoubleDouble x{hi, static_cast<double>(static_cast<int64_t>(m - static_cast<uint64_t>(hi)))};
  if (e >= 0) {
    // One rounding of the double-double product; fma never overflows in between, so a product just
    // under DBL_MAX stays finite and a larger one becomes inf.
    const DoubleDouble p = pow10_dd(static_cast<int>(e));
    return fma(x.hi, p.hi, x.hi * p.lo + x.lo * p.hi);
  }
  int k = static_cast<int>(-e);
  if (k > 300) {  // 10^k would not be a normal double: divide in two steps
    x = dd_div(x, pow10_dd(300));
    k -= 300;
  }
  return dd_div(x, pow10_dd(k)).hi;
}

// ---- one number, accumulated class by class ------------------------------------------------------
struct NumberBuilder {
  uint64_t hash, hash_signed;  // FNV-1a of the canonical form so far, without and with a leading '-'
  uint64_t mantissa;
  int64_t exponent;
  int64_t pending_zeros;  // fraction zeros not yet known to be inside the canonical form
  int kept;               // digits in mantissa
  bool negative, in_fraction, int_nonzero, fraction_nonzero;
  int64_t start_token;

  __device__ void begin(int64_t token, bool sign) {
    hash = kFnvOffset;
    hash_signed = (kFnvOffset ^ static_cast<uint64_t>('-')) * kFnvPrime;
    mantissa = 0;
    exponent = 0;
    pending_zeros = 0;
    kept = 0;
    negative = sign;
    in_fraction = int_nonzero = fraction_nonzero = false;
    start_token = token;
  }
  __device__ void put(int ch) {
    hash = (hash ^ static_cast<uint64_t>(ch)) * kFnvPrime;
    hash_signed = (hash_signed ^ static_cast<uint64_t>(ch)) * kFnvPrime;
  }
  __device__ void integer_digit(int d) {
    if (d == 0 && !int_nonzero) return;  // a leading zero
    int_nonzero = true;
    put('0' + d);
    if (kept < kMaxDigits) {
      mantissa = mantissa * 10 + static_cast<uint64_t>(d);
      ++kept;
    } else {
      ++exponent;  // a dropped integer digit
    }
  }
  __device__ void fraction_mantissa(int d) {
    if (mantissa == 0 && d == 0) {
      --exponent;  // a zero before the first significant digit: 0.00d
    } else if (kept < kMaxDigits) {
      mantissa = mantissa * 10 + static_cast<uint64_t>(d);
      ++kept;
      --exponent;
    }
  }
  __device__ void fraction_digit(int d) {
    if (d == 0) {
      ++pending_zeros;
      return;
    }
    if (!fraction_nonzero) {
      if (!int_nonzero) put('0');
      put('.');
      fraction_nonzero = true;
    }
    for (; pending_zeros > 0; --pending_zeros) {
      put('0');
      fraction_mantissa(0);
    }
    put('0' + d);
    fraction_mantissa(d);
  }
  __device__ void add(int c) {
    if (c < 10) {
      if (in_fraction) {
        fraction_digit(c);
      } else {
        integer_digit(c);
      }
    } else if (c == kDot) {
      in_fraction = true;
    }  // ',' and the '-' that began the number add nothing more
  }
  // key (0 -> 1) and value of the finished number
  __device__ void finish(int64_t& key, double& value) {
    const bool zero = !int_nonzero && !fraction_nonzero;
    if (zero) {
      put('0');  // the canonical "0", never signed
      key = static_cast<int64_t>(hash);
      value = 0.0;
    } else {
      key = static_cast<int64_t>(negative ? hash_signed : hash);
      const double v = decimal_to_double(mantissa, exponent);
      value = negative ? -v : v;
    }
    if (key == 0) key = 1;
  }
};

// ---- the row's classes in order ------------------------------------------------------------------
// Masked tokens and ids outside [0, V) are one "other" class (a separator); zero-length tokens add
// nothing; past the row's end come "other" classes.
template <class Id>
struct ClassReader {
  const Id* ids;
  const bool* mask;  // may be null
  const int64_t* table;
  int64_t vocab, cols, length;
  int64_t token = -1;
  const int64_t* words = nullptr;  // the current token's class words; null for a separator
  int count = 0, next_class = 0;   // classes of the current token, and the next one to read

  __device__ void open(int64_t t) {
    next_class = 0;
    const int64_t id = static_cast<int64_t>(ids[t]);
    if ((mask != nullptr && !mask[t]) || id < 0 || id >= vocab) {
      words = nullptr;
      count = 1;
      return;
    }
    const int64_t* row = table + id * cols;
    words = row + kColClasses;
    const int64_t stored = (row[kColMeta] >> kMetaLenShift) & kMetaLenMask;
    const int64_t room = (cols - kColClasses) * kClassesPerWord;  // a malformed table is never overread
    count = static_cast<int>(stored < room ? stored : room);
  }
  // the next class and the token holding it (length past the end)
  __device__ void next(int& cls, int64_t& at) {
    while (token < length && next_class >= count) {
      ++token;
      if (token < length) open(token);
    }
    if (token >= length) {
      cls = kOther;
      at = length;
      return;
    }
    const int j = next_class++;
    cls = words == nullptr ? kOther
                           : static_cast<int>((static_cast<uint64_t>(words[j / kClassesPerWord]) >>
                                               (4 * (j % kClassesPerWord))) & 15u);
    at = token;
  }
};

// Backward state of the text starting at window[first] (5 classes decide it).
__device__ __forceinline__ int backward_state(const int (&cls)[kWindow], int first) {
  int s = kN;
  for (int k = first + 4; k >= first; --k) s = backward_step(s, k < kWindow ? cls[k] : kOther);
  return s;
}

struct SpansParams {
  const void* ids;  // int32 or int64 [batch, length], row-major
  const bool* mask;  // [batch, length] or null
  const int64_t* table;  // [vocab, cols]
  int64_t batch, length, vocab, cols;
  // outputs, filled beforehand with end = false, key = 0, value = NaN, start = -1
  bool* end;
  int64_t* key;
  double* value;
  int32_t* start;
};

template <class Id>
__global__ void __launch_bounds__(kThreads) numeric_spans_kernel(SpansParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.batch) return;
  const int64_t offset = row * p.length;
  ClassReader<Id> reader{static_cast<const Id*>(p.ids) + offset, p.mask == nullptr ? nullptr : p.mask + offset,
                         p.table, p.vocab, p.cols, p.length};
  int cls[kWindow];
  int64_t tok[kWindow];
  for (int k = 0; k < kWindow; ++k) reader.next(cls[k], tok[k]);

  int state = kO;  // the row starts as after a separator
  bool in_number = false;
  NumberBuilder number{};
  while (tok[0] < p.length) {
    const int c = cls[0];
    const int after = forward_step(state, c);
    const int back_next = backward_state(cls, 1);
    const bool digit = c < 10;
    const bool next_digit = back_next >= kD1 && back_next <= kD4;
    if (!in_number) {
      const bool starts_digit =
          digit && (state == kO || (state == kOC && backward_state(cls, 0) != kD3));  // not a ",ddd" group
      const bool starts_sign = c == kMinus && after == kMS && next_digit;
      if (starts_digit || starts_sign) {
        number.begin(tok[0], starts_sign);
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
        const int64_t out = offset + tok[0];  // a later number ending in this token overwrites
        p.end[out] = true;
        p.key[out] = k;
        p.value[out] = v;
        p.start[out] = static_cast<int32_t>(number.start_token);
        in_number = false;
      }
    }
    state = after;
    for (int k = 0; k + 1 < kWindow; ++k) {
      cls[k] = cls[k + 1];
      tok[k] = tok[k + 1];
    }
    reader.next(cls[kWindow - 1], tok[kWindow - 1]);
  }
}

}  // namespace numca_kernels
}  // namespace sveb
