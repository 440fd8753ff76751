// Device ops against references computed here in double precision (or against the CPU ops where
// the reference is the CPU's exact semantics: routing ids). Each test names its device; CUDA
// cases report themselves skipped without a GPU.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "engine/arch.h"
#include "engine/argmax.h"
#include "engine/config.h"
#include "engine/cuda/cuda_engine.h"
#include "engine/dtype.h"
#include "engine/model.h"
#include "engine/ops/attention.h"
#include "engine/ops/kernels.h"
#include "engine/ops/threading.h"
#include "engine/safetensors.h"
#include "gtest/gtest.h"

#ifdef MOEMESH_CUDA_EMU_BUILD
namespace emu {  // engine/cuda/emu/cuda_emu.h's launch statistics
void EnableStatistics();
std::map<std::string, int64_t> Statistics();
}  // namespace emu
#endif

namespace moemesh {
namespace {

bool HaveGpu() { return cuda::DeviceCount() > 0; }

#define SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device on this machine"

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(g);
  return v;
}

template <typename T>
T* Upload(const std::vector<T>& h, cuda::DeviceBuffer* d) {
  EXPECT_TRUE(d->Reserve(h.size() * sizeof(T)).ok());
  EXPECT_EQ(cudaMemcpy(d->get(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice),
            cudaSuccess);
  return d->as<T>();
}

template <typename T>
std::vector<T> Download(const T* d, size_t n) {
  std::vector<T> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

uint32_t BitsOf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

// A device routing's outputs (RouteAndGroup's, or TopKRouting's then BuildGroups') in one
// vector: ids, the groups' slots and row begins, perm, where, then the group count.
std::vector<int32_t> RoutingOutputs(const cuda::DeviceBuffer& ids, const cuda::DeviceBuffer& gs,
                                    const cuda::DeviceBuffer& rb, const cuda::DeviceBuffer& perm,
                                    const cuda::DeviceBuffer& where,
                                    const cuda::DeviceBuffer& ng, int64_t nk) {
  const int32_t G = Download(ng.as<int32_t>(), 1)[0];
  const std::vector<int32_t> begin = Download(rb.as<int32_t>(), G + 1);
  std::vector<int32_t> out = Download(ids.as<int32_t>(), nk);
  for (int32_t v : Download(gs.as<int32_t>(), G)) out.push_back(v);
  out.insert(out.end(), begin.begin(), begin.end());
  for (int32_t v : Download(perm.as<int32_t>(), begin[G])) out.push_back(v);
  for (int32_t v : Download(where.as<int32_t>(), nk)) out.push_back(v);
  out.push_back(G);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return out;
}

// ---------------------------------------------------------------- projections

struct LinearCase {
  int64_t m;
  bool bf16;
};

class ProjectTest : public ::testing::TestWithParam<LinearCase> {};

// Small-batch kernel (m <= 16) and cuBLAS (m > 16), fp32 and bf16 weights, plain, accumulate,
// bias and fused SwiGLU, against a double-precision reference over the stored weights.
TEST_P(ProjectTest, MatchesDoubleReference) {
  SKIP_WITHOUT_GPU();
  const auto [m, bf16] = GetParam();
  const int64_t out = 72, in = 264;  // in % 8 == 0 (vector path); out not a multiple of 8
  std::vector<float> w = Random(2 * out * in, 1, 0.1f), x = Random(m * in, 2), b = Random(2 * out, 3);
  std::vector<float> wq(w.size());  // weights as stored
  for (size_t i = 0; i < w.size(); ++i) wq[i] = bf16 ? BF16ToF32(F32ToBF16(w[i])) : w[i];
  // With bf16 weights, cuBLAS also sees bf16 activations.
  std::vector<float> xq(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    xq[i] = bf16 && m > cuda::kSmallM ? BF16ToF32(F32ToBF16(x[i])) : x[i];
  }
  auto ex = cuda::Exec::Create(0);
  ASSERT_TRUE(ex.ok()) << ex.status();
  cuda::DeviceMatrix mat;
  mat.wt = bf16 ? cuda::WType::kBF16 : cuda::WType::kF32;
  mat.rows = 2 * out;
  mat.in = in;
  mat.count = 1;
  ASSERT_TRUE(mat.w.Reserve(w.size() * cuda::WTypeSize(mat.wt)).ok());
  if (bf16) {
    std::vector<uint16_t> h(w.size());
    for (size_t i = 0; i < w.size(); ++i) h[i] = F32ToBF16(w[i]);
    cudaMemcpy(mat.w.get(), h.data(), h.size() * 2, cudaMemcpyHostToDevice);
  } else {
    cudaMemcpy(mat.w.get(), w.data(), w.size() * 4, cudaMemcpyHostToDevice);
  }
  cuda::DeviceBuffer dx, dy;
  const float* d_x = Upload(x, &dx);
  std::vector<float> y0 = Random(m * 2 * out, 4);
  float* d_y = Upload(y0, &dy);

  // y = x W^T + b, then y += x W^T (accumulate).
  ASSERT_TRUE(mat.bias.Reserve(2 * out * 4).ok());
  cudaMemcpy(mat.bias.get(), b.data(), 2 * out * 4, cudaMemcpyHostToDevice);
  mat.has_bias = true;
  ASSERT_TRUE(cuda::Project(**ex, mat, 0, d_x, m, d_y, 2 * out, false, false).ok());
  mat.has_bias = false;
  ASSERT_TRUE(cuda::Project(**ex, mat, 0, d_x, m, d_y, 2 * out, true, false).ok());
  ASSERT_TRUE((*ex)->Sync().ok());
  std::vector<double> ref(m * 2 * out);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t o = 0; o < 2 * out; ++o) {
      double acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += double(xq[r * in + i]) * wq[o * in + i];
      ref[r * 2 * out + o] = 2 * acc + b[o];
    }
  }
  const double tol = bf16 && m > cuda::kSmallM ? 2e-3 : 2e-5;
  EXPECT_LT(MaxAbsDiff(Download(d_y, m * 2 * out), ref), tol);

  // SwiGLU: silu(gate) * up with gate rows [0, out), up rows [out, 2 out).
  ASSERT_TRUE(cuda::Project(**ex, mat, 0, d_x, m, d_y, out, false, true).ok());
  ASSERT_TRUE((*ex)->Sync().ok());
  std::vector<double> act(m * out);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      const double g = (ref[r * 2 * out + o] - b[o]) / 2;
      const double u = (ref[r * 2 * out + out + o] - b[out + o]) / 2;
      act[r * out + o] = g / (1 + std::exp(-g)) * u;
    }
  }
  EXPECT_LT(MaxAbsDiff(Download(d_y, m * out), act), tol);
}

INSTANTIATE_TEST_SUITE_P(Cases, ProjectTest,
                         ::testing::Values(LinearCase{1, false}, LinearCase{1, true},
                                           LinearCase{11, false}, LinearCase{11, true},
                                           LinearCase{40, false}, LinearCase{40, true}),
                         [](const auto& info) {
                           return "m" + std::to_string(info.param.m) +
                                  (info.param.bf16 ? "_bf16" : "_f32");
                         });

// Weights of `count` [rows, in] matrices: random, stored as fp32 or bf16; `stored` gets the
// values as the device holds them.
void MakeMatrix(int64_t count, int64_t rows, int64_t in, bool bf16, uint32_t seed, float scale,
                cuda::DeviceMatrix* mat, std::vector<float>* stored) {
  std::vector<float> w = Random(count * rows * in, seed, scale);
  mat->wt = bf16 ? cuda::WType::kBF16 : cuda::WType::kF32;
  mat->rows = rows;
  mat->in = in;
  mat->count = count;
  ASSERT_TRUE(mat->w.Reserve(w.size() * cuda::WTypeSize(mat->wt)).ok());
  stored->resize(w.size());
  if (bf16) {
    std::vector<uint16_t> h(w.size());
    for (size_t i = 0; i < w.size(); ++i) {
      h[i] = F32ToBF16(w[i]);
      (*stored)[i] = BF16ToF32(h[i]);
    }
    ASSERT_EQ(cudaMemcpy(mat->w.get(), h.data(), h.size() * 2, cudaMemcpyHostToDevice),
              cudaSuccess);
  } else {
    *stored = w;
    ASSERT_EQ(cudaMemcpy(mat->w.get(), w.data(), w.size() * 4, cudaMemcpyHostToDevice),
              cudaSuccess);
  }
}

float RoundBf16(double v) { return BF16ToF32(F32ToBF16(static_cast<float>(v))); }

struct GroupedCase {
  std::vector<int32_t> rows;  // per group
  bool bf16;
};

class GroupedSmallMTest : public ::testing::TestWithParam<GroupedCase> {};

// The small-batch kernels over groups of rows (a MoE layer's decode: device group arrays, each
// group its own matrix): plain with bias and accumulate, and fused SwiGLU, against double
// precision. Mean rows per group 1 (one-row kernel, its sums split over warps), <= 4 and > 4
// (multi-output kernel, 4 and 8 rows per pass); out not a multiple of the outputs per block.
TEST_P(GroupedSmallMTest, MatchesDoubleReference) {
  SKIP_WITHOUT_GPU();
  const GroupedCase c = GetParam();
  const int64_t out = 76, in = 264, slots = 5;
  const int32_t G = static_cast<int32_t>(c.rows.size());
  std::vector<int32_t> begin = {0}, slot;
  for (int32_t g = 0; g < G; ++g) {
    begin.push_back(begin.back() + c.rows[g]);
    slot.push_back((3 * g + 1) % slots);
  }
  const int64_t m = begin.back();
  cuda::DeviceMatrix mat;
  std::vector<float> w;
  MakeMatrix(slots, 2 * out, in, c.bf16, 31, 0.1f, &mat, &w);
  std::vector<float> x = Random(m * in, 32), y0 = Random(m * out, 34);
  cuda::DeviceBuffer dx, dy, dng, dslot, dbeg;
  const std::vector<int32_t> ng = {G};
  cuda::Groups groups{Upload(ng, &dng), Upload(slot, &dslot), Upload(begin, &dbeg), G};
  const float* d_x = Upload(x, &dx);
  float* d_y = Upload(y0, &dy);
  // Reference: gate and up rows of each group's matrix.
  std::vector<double> gate(m * out), up(m * out);
  for (int32_t g = 0; g < G; ++g) {
    const float* wg = &w[slot[g] * 2 * out * in];
    for (int64_t r = begin[g]; r < begin[g + 1]; ++r) {
      for (int64_t o = 0; o < out; ++o) {
        double a = 0, u = 0;
        for (int64_t i = 0; i < in; ++i) {
          a += double(x[r * in + i]) * wg[o * in + i];
          u += double(x[r * in + i]) * wg[(out + o) * in + i];
        }
        gate[r * out + o] = a;
        up[r * out + o] = u;
      }
    }
  }
  // SwiGLU: y = silu(x Wg^T) * (x Wu^T), gate rows [0, out) and up rows [out, 2 out).
  ASSERT_EQ(cuda::SmallMLinear(mat.w.get(), mat.wt, nullptr, out, in, d_x, m, d_y, out, false,
                               true, groups, nullptr),
            cudaSuccess);
  std::vector<float> got = Download(d_y, m * out);
  std::vector<double> act(m * out);
  for (int64_t i = 0; i < m * out; ++i) act[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
  EXPECT_LT(MaxAbsDiff(got, act), 2e-5) << "SwiGLU";

  // Plain over all 2 out rows, with bias, accumulated into y2.
  cuda::DeviceBuffer dy2, db2;
  std::vector<float> y2 = Random(m * 2 * out, 35), bias2 = Random(2 * out, 36);
  float* d_y2 = Upload(y2, &dy2);
  ASSERT_EQ(cuda::SmallMLinear(mat.w.get(), mat.wt, Upload(bias2, &db2), 2 * out, in, d_x, m,
                               d_y2, 2 * out, true, false, groups, nullptr),
            cudaSuccess);
  std::vector<double> ref(m * 2 * out);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      ref[r * 2 * out + o] = y2[r * 2 * out + o] + gate[r * out + o] + bias2[o];
      ref[r * 2 * out + out + o] = y2[r * 2 * out + out + o] + up[r * out + o] + bias2[out + o];
    }
  }
  EXPECT_LT(MaxAbsDiff(Download(d_y2, m * 2 * out), ref), 2e-5) << "plain, bias, accumulate";

  // Rows read in place through x_rows (here x stored in reverse) give the same results.
  {
    std::vector<float> reversed(m * in);
    std::vector<int32_t> rows(m);
    for (int64_t r = 0; r < m; ++r) {
      rows[r] = static_cast<int32_t>(m - 1 - r);
      std::copy(&x[r * in], &x[(r + 1) * in], &reversed[(m - 1 - r) * in]);
    }
    cuda::DeviceBuffer drev, drows;
    cuda::Groups in_place = groups;
    in_place.x_rows = Upload(rows, &drows);
    ASSERT_EQ(cudaMemcpy(d_y, y0.data(), y0.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cuda::SmallMLinear(mat.w.get(), mat.wt, nullptr, out, in, Upload(reversed, &drev),
                                 m, d_y, out, false, true, in_place, nullptr),
              cudaSuccess);
    EXPECT_EQ(Download(d_y, m * out), got) << "x_rows";
  }

  // Either kernel, chosen explicitly, is as exact, and so is every split of the one-row kernel's
  // sums (forced; where the rows allow it).
  // kMultiDeep and kOneDeep (more loads in flight) add in kMulti's and kOne's order: their bits;
  // so does kMulti8 (8 rows per pass).
  std::vector<float> multi, one;
  for (cuda::SmallMChoice choice :
       {cuda::SmallMChoice::kOne, cuda::SmallMChoice::kMulti, cuda::SmallMChoice::kSplit1,
        cuda::SmallMChoice::kSplit2, cuda::SmallMChoice::kSplit4, cuda::SmallMChoice::kSplit8,
        cuda::SmallMChoice::kMultiDeep, cuda::SmallMChoice::kOneDeep,
        cuda::SmallMChoice::kMulti8}) {
    ASSERT_EQ(cudaMemcpy(d_y, y0.data(), y0.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cuda::SmallMLinear(mat.w.get(), mat.wt, nullptr, out, in, d_x, m, d_y, out, false,
                                 true, groups, nullptr, choice),
              cudaSuccess);
    const std::vector<float> got_choice = Download(d_y, m * out);
    EXPECT_LT(MaxAbsDiff(got_choice, act), 2e-5) << "SwiGLU, kernel " << static_cast<int>(choice);
    if (choice == cuda::SmallMChoice::kMulti) multi = got_choice;
    if (choice == cuda::SmallMChoice::kOne) one = got_choice;
    if (choice == cuda::SmallMChoice::kMultiDeep) {
      EXPECT_EQ(got_choice, multi) << "deep";
    }
    if (choice == cuda::SmallMChoice::kMulti8) {
      EXPECT_EQ(got_choice, multi) << "8 rows a pass";
    }
    if (choice == cuda::SmallMChoice::kOneDeep) {
      EXPECT_EQ(got_choice, one) << "one, deep";
    }
  }
  // And plain (4 outputs per warp) with bias, accumulated.
  {
    std::vector<std::vector<float>> outs;
    for (cuda::SmallMChoice choice : {cuda::SmallMChoice::kMulti, cuda::SmallMChoice::kMultiDeep,
                                      cuda::SmallMChoice::kOne, cuda::SmallMChoice::kOneDeep,
                                      cuda::SmallMChoice::kMulti8}) {
      ASSERT_EQ(cudaMemcpy(d_y2, y2.data(), y2.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cuda::SmallMLinear(mat.w.get(), mat.wt, Upload(bias2, &db2), 2 * out, in, d_x, m,
                                   d_y2, 2 * out, true, false, groups, nullptr, choice),
                cudaSuccess);
      outs.push_back(Download(d_y2, m * 2 * out));
      EXPECT_LT(MaxAbsDiff(outs.back(), ref), 2e-5) << "plain, kernel " << static_cast<int>(choice);
    }
    EXPECT_EQ(outs[1], outs[0]) << "deep, plain";
    EXPECT_EQ(outs[3], outs[2]) << "one, deep, plain";
    EXPECT_EQ(outs[4], outs[0]) << "8 rows a pass, plain";
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, GroupedSmallMTest,
    ::testing::Values(GroupedCase{{1, 1, 1, 1}, true}, GroupedCase{{1, 2, 3, 4, 5, 9}, true},
                      GroupedCase{{1, 2, 3, 4, 5, 9}, false}, GroupedCase{{9, 17, 6}, true},
                      GroupedCase{{9, 17, 6}, false}, GroupedCase{{0, 7, 0, 3}, true}),
    [](const auto& info) {
      std::string name = info.param.bf16 ? "bf16" : "f32";
      for (int32_t r : info.param.rows) name += "_" + std::to_string(r);
      return name;
    });

// The deep variants (weight loads of several steps issued before they are used) over rows long
// enough that a warp has several steps, the last one partial: kOneDeep gives kOne's bits and
// kMultiDeep kMulti's, plain (with bias) and SwiGLU, 1 and 3 rows, against double precision.
TEST(SmallMDeepTest, DeepLoadsGiveTheSameSums) {
  SKIP_WITHOUT_GPU();
  const int64_t out = 40, in = 2056;
  cuda::DeviceMatrix mat;
  std::vector<float> w;
  MakeMatrix(1, 2 * out, in, true, 81, 0.05f, &mat, &w);
  const std::vector<float> bias = Random(2 * out, 82);
  cuda::DeviceBuffer dbias;
  const float* d_bias = Upload(bias, &dbias);
  for (int64_t m : {1, 3}) {
    for (bool swiglu : {false, true}) {
      SCOPED_TRACE(::testing::Message() << m << " rows" << (swiglu ? ", SwiGLU" : ", plain"));
      const std::vector<float> x = Random(m * in, 83 + m);
      const int64_t n = swiglu ? out : 2 * out;
      // Plain: rows o of W (+ bias). SwiGLU: silu(gate row o) * (up row out + o).
      std::vector<double> ref(m * n);
      for (int64_t r = 0; r < m; ++r) {
        std::vector<double> dot(2 * out);
        for (int64_t o = 0; o < 2 * out; ++o) {
          for (int64_t i = 0; i < in; ++i) dot[o] += double(x[r * in + i]) * w[o * in + i];
        }
        for (int64_t o = 0; o < n; ++o) {
          ref[r * n + o] = swiglu ? dot[o] / (1 + std::exp(-dot[o])) * dot[out + o]
                                  : dot[o] + bias[o];
        }
      }
      cuda::DeviceBuffer dx, dy;
      const float* d_x = Upload(x, &dx);
      ASSERT_TRUE(dy.Reserve(m * n * 4).ok());
      auto run = [&](cuda::SmallMChoice choice) {
        EXPECT_EQ(cuda::SmallMLinear(mat.w.get(), mat.wt, swiglu ? nullptr : d_bias, n, in, d_x,
                                     m, dy.as<float>(), n, false, swiglu, cuda::Groups(), nullptr,
                                     choice),
                  cudaSuccess);
        std::vector<float> got = Download(dy.as<float>(), m * n);
        EXPECT_LT(MaxAbsDiff(got, ref), 2e-5) << "choice " << static_cast<int>(choice);
        return got;
      };
      EXPECT_EQ(run(cuda::SmallMChoice::kOneDeep), run(cuda::SmallMChoice::kOne));
      EXPECT_EQ(run(cuda::SmallMChoice::kMultiDeep), run(cuda::SmallMChoice::kMulti));
    }
  }
}

// SmallMFusion's norm: the product of RmsNorm(x) with the norm taken into the one-row kernels
// (m <= 8: unsplit, sums split over 2 and 4 warps) or run first (m = 12; x not 16-byte
// aligned), fp32 and bf16 weights, with bias: y against double precision, xn against the
// RmsNorm kernel (the same bits where it runs first).
TEST(SmallMFusionTest, NormTakenInIsNormThenProduct) {
  SKIP_WITHOUT_GPU();
  const int64_t in = 264;
  const float eps = 1e-6f;
  auto made = cuda::Exec::Create(0);
  ASSERT_TRUE(made.ok()) << made.status();
  cuda::Exec* ex = made->get();
  for (bool bf16 : {false, true}) {
    for (int64_t out : {76, 5000, 9000}) {
      cuda::DeviceMatrix mat;
      std::vector<float> w;
      MakeMatrix(1, out, in, bf16, 41, 0.1f, &mat, &w);
      std::vector<float> bias = Random(out, 42), g = Random(in, 43);
      cuda::DeviceBuffer dbias, dg;
      ASSERT_TRUE(mat.bias.Reserve(out * 4).ok());
      ASSERT_EQ(cudaMemcpy(mat.bias.get(), bias.data(), out * 4, cudaMemcpyHostToDevice),
                cudaSuccess);
      mat.has_bias = true;
      const float* d_g = Upload(g, &dg);
      for (int64_t m : {1, 3, 8, 12, -2}) {  // -2: 2 rows, x misaligned
        const bool misaligned = m < 0;
        if (misaligned) m = -m;
        if (out == 9000 && m > 3) continue;  // the slow emulation; the kernels are the same
        SCOPED_TRACE(::testing::Message() << (bf16 ? "bf16" : "f32") << " out " << out << " m "
                                          << m << (misaligned ? " misaligned" : ""));
        std::vector<float> x = Random(m * in + 1, 44 + m);
        cuda::DeviceBuffer dx, dy, dxn, dref;
        const float* d_x = Upload(x, &dx) + (misaligned ? 1 : 0);
        ASSERT_TRUE(dy.Reserve(m * out * 4).ok());
        ASSERT_TRUE(dxn.Reserve(m * in * 4).ok());
        ASSERT_TRUE(dref.Reserve(m * in * 4).ok());
        ASSERT_TRUE(cuda::ProjectNormed(*ex, mat, d_x, d_g, eps, dxn.as<float>(), m,
                                        dy.as<float>(), out)
                        .ok());
        ASSERT_EQ(cuda::RmsNorm(d_x, d_g, m, in, eps, dref.as<float>(), ex->stream()),
                  cudaSuccess);
        ASSERT_TRUE(ex->Sync().ok());
        const std::vector<float> xn = Download(dxn.as<float>(), m * in),
                                 ref_xn = Download(dref.as<float>(), m * in);
        std::vector<double> ref(m * out);
        float worst_xn = 0;
        for (int64_t r = 0; r < m; ++r) {
          const float* xr = &x[r * in + (misaligned ? 1 : 0)];
          double ss = 0;
          for (int64_t i = 0; i < in; ++i) ss += double(xr[i]) * xr[i];
          const double inv = 1 / std::sqrt(ss / in + eps);
          for (int64_t o = 0; o < out; ++o) {
            double a = bias[o];
            for (int64_t i = 0; i < in; ++i) a += xr[i] * inv * g[i] * w[o * in + i];
            ref[r * out + o] = a;
          }
        }
        for (int64_t i = 0; i < m * in; ++i) {
          worst_xn = std::max(worst_xn, std::abs(xn[i] - ref_xn[i]));
        }
        EXPECT_LT(MaxAbsDiff(Download(dy.as<float>(), m * out), ref), 3e-5);
        if (m > 8 || misaligned) {
          EXPECT_EQ(xn, ref_xn) << "RmsNorm first: its own output";
        } else {
          EXPECT_LT(worst_xn, 2e-6) << "xn written by the fused product";
        }
      }
    }
  }
  // Norm with groups or SwiGLU, or without xn: refused.
  cuda::DeviceBuffer d;
  ASSERT_TRUE(d.Reserve(4096).ok());
  cuda::SmallMFusion f;
  f.norm_w = d.as<float>();
  EXPECT_EQ(cuda::SmallMLinear(d.get(), cuda::WType::kF32, nullptr, 8, 8, d.as<float>(), 1,
                               d.as<float>(), 8, false, false, cuda::Groups(), nullptr,
                               cuda::SmallMChoice::kAuto, f),
            cudaErrorInvalidValue);
}

// SmallMFusion's combine: the MoE combine added by the down product's last warp per column
// (n <= 8 tokens, one-row kernel split and unsplit, the 8-row kernel) or by CombineExperts after
// it (more tokens; the multi-output kernel) gives CombineExperts' sums bit for bit, with
// assignments to experts held elsewhere (where = -1), and again on the next call (the counters
// are left at zero).
TEST(SmallMFusionTest, CombineTakenInIsCombineExperts) {
  SKIP_WITHOUT_GPU();
  const int64_t in = 96, slots = 12;
  for (int64_t out : {76, 9000}) {
    cuda::DeviceMatrix mat;
    std::vector<float> w;
    MakeMatrix(slots, out, in, true, 51, 0.1f, &mat, &w);
    for (int64_t n : {1, 3, 8, 9}) {
      for (int64_t k : {1, 4, 8}) {
        for (cuda::SmallMChoice choice : {cuda::SmallMChoice::kAuto, cuda::SmallMChoice::kMulti,
                                          cuda::SmallMChoice::kSplit8}) {
          if (out == 9000 && (n > 3 || choice != cuda::SmallMChoice::kAuto)) continue;  // slow
          SCOPED_TRACE(::testing::Message() << "out " << out << " n " << n << " k " << k
                                            << " choice " << static_cast<int>(choice));
          // Token t's j-th expert: (5 t + 3 j) % 16 (distinct per token); experts 12..15 are
          // held elsewhere. Groups in expert order.
          std::vector<int32_t> ids(n * k);
          for (int64_t t = 0; t < n; ++t) {
            for (int64_t j = 0; j < k; ++j) ids[t * k + j] = (5 * t + 3 * j) % 16;
          }
          std::vector<int32_t> begin = {0}, slot, where(n * k, -1);
          for (int32_t e = 0; e < slots; ++e) {
            int32_t c = 0;
            for (int64_t a = 0; a < n * k; ++a) {
              if (ids[a] == e) where[a] = begin.back() + c++;
            }
            if (c == 0) continue;
            slot.push_back(e);
            begin.push_back(begin.back() + c);
          }
          const int32_t G = static_cast<int32_t>(slot.size());
          const int64_t A = begin.back();
          std::vector<float> act = Random(std::max<int64_t>(A, 1) * in, 52),
                             weights = Random(n * k, 53), out0 = Random(n * out, 54);
          cuda::DeviceBuffer dng, dslot, dbeg, dact, dwhere, dwt, dy, dout, dref, dcnt;
          const std::vector<int32_t> ng = {G};
          const cuda::Groups groups{Upload(ng, &dng), Upload(slot, &dslot), Upload(begin, &dbeg),
                                    static_cast<int32_t>(std::min<int64_t>(n * k, slots))};
          ASSERT_TRUE(dy.Reserve(std::max<int64_t>(A, 1) * out * 4).ok());
          const std::vector<uint32_t> zeros(out, 0);
          cuda::SmallMFusion f;
          f.where = Upload(where, &dwhere);
          f.weights = Upload(weights, &dwt);
          f.n = static_cast<int32_t>(n);
          f.k = static_cast<int32_t>(k);
          f.out = Upload(out0, &dout);
          f.counters = Upload(zeros, &dcnt);
          float* d_ref = Upload(out0, &dref);
          for (int call = 0; call < 2; ++call) {
            ASSERT_EQ(cuda::SmallMLinear(mat.w.get(), mat.wt, nullptr, out, in,
                                         Upload(act, &dact), A, dy.as<float>(), out, false,
                                         false, groups, nullptr, choice, f),
                      cudaSuccess);
            ASSERT_EQ(cuda::SmallMLinear(mat.w.get(), mat.wt, nullptr, out, in, dact.as<float>(),
                                         A, dy.as<float>(), out, false, false, groups, nullptr,
                                         choice),
                      cudaSuccess);
            ASSERT_EQ(cuda::CombineExperts(dy.as<float>(), f.where, f.weights, n, k, out, d_ref,
                                           nullptr),
                      cudaSuccess);
            const std::vector<float> got = Download(f.out, n * out),
                                     want = Download(d_ref, n * out);
            EXPECT_EQ(got, want) << "call " << call;
            EXPECT_NE(got, out0);
            EXPECT_EQ(Download(f.counters, out), zeros) << "call " << call;
          }
        }
      }
    }
  }
}

// SmallMFusion's routing: a router's norm, product, top-k and grouping in one launch (m <= 8:
// the grid's last block routes) or with the routing launched after (m = 12) give the logits of
// the norm-fused product alone and then RouteAndGroup's ids, weights and groups bit for bit,
// again on the next call (the counter is left at zero).
TEST(SmallMFusionTest, RouteTakenInIsRouteAndGroup) {
  SKIP_WITHOUT_GPU();
  const int64_t in = 256, kmax = 8;
  for (int64_t E : {128, 60}) {
    cuda::DeviceMatrix mat;
    std::vector<float> w;
    MakeMatrix(1, E, in, true, 61, 0.2f, &mat, &w);
    std::vector<float> g = Random(in, 62);
    std::vector<int32_t> slot(E);
    for (int64_t e = 0; e < E; ++e) slot[e] = static_cast<int32_t>(E - 1 - e);
    cuda::DeviceBuffer dg, dslot;
    const float* d_g = Upload(g, &dg);
    const int32_t* d_slot = Upload(slot, &dslot);
    for (int64_t m : {1, 5, 8, 12}) {
      for (cuda::SmallMChoice choice :
           {cuda::SmallMChoice::kAuto, cuda::SmallMChoice::kSplit1, cuda::SmallMChoice::kSplit8}) {
        if (m > 5 && choice != cuda::SmallMChoice::kAuto) continue;
        SCOPED_TRACE(::testing::Message()
                     << E << " experts, " << m << " rows, choice " << static_cast<int>(choice));
        std::vector<float> x = Random(m * in, 63 + m);
        std::vector<int32_t> k(m);
        for (int64_t r = 0; r < m; ++r) k[r] = r % 3 == 2 ? 3 : 8;
        cuda::DeviceBuffer dx, dk, dcnt;
        const float* d_x = Upload(x, &dx);
        const int32_t* d_k = Upload(k, &dk);
        const std::vector<uint32_t> zero = {0};
        uint32_t* d_cnt = Upload(zero, &dcnt);
        // Outputs: RoutingOutputs; logits, then weights.
        auto run = [&](bool fused) {
          const int64_t nk = m * kmax;
          cuda::DeviceBuffer logits, xn, ids, wt, ng, gs, rb, perm, where;
          EXPECT_TRUE(logits.Reserve(m * E * 4).ok() && xn.Reserve(m * in * 4).ok() &&
                      ids.Reserve(nk * 4).ok() && wt.Reserve(nk * 4).ok() && ng.Reserve(4).ok() &&
                      gs.Reserve(E * 4).ok() && rb.Reserve((E + 1) * 4).ok() &&
                      perm.Reserve(nk * 4).ok() && where.Reserve(nk * 4).ok());
          cuda::SmallMFusion f;
          f.norm_w = d_g;
          f.eps = 1e-6f;
          f.xn = xn.as<float>();
          f.counters = d_cnt;
          const cuda::RouteArgs route{d_k,
                                      static_cast<int32_t>(kmax),
                                      true,
                                      ids.as<int32_t>(),
                                      wt.as<float>(),
                                      d_slot,
                                      ng.as<int32_t>(),
                                      gs.as<int32_t>(),
                                      rb.as<int32_t>(),
                                      perm.as<int32_t>(),
                                      where.as<int32_t>()};
          if (fused) f.route = route;
          EXPECT_EQ(
              cuda::SmallMLinear(mat.w.get(), mat.wt, nullptr, E, in, d_x, m, logits.as<float>(), E,
                                 false, false, cuda::Groups(), nullptr, choice, f),
              cudaSuccess);
          if (!fused) {
            EXPECT_EQ(cuda::RouteAndGroup(logits.as<float>(), m, E, d_k, kmax, true, route.ids,
                                          route.weights, d_slot, route.num_groups, route.group_slot,
                                          route.row_begin, route.perm, route.where, nullptr),
                      cudaSuccess);
          }
          std::vector<float> floats = Download(logits.as<float>(), m * E);
          for (float v : Download(wt.as<float>(), nk)) floats.push_back(v);
          return std::make_pair(RoutingOutputs(ids, gs, rb, perm, where, ng, nk), floats);
        };
        const auto separate = run(false);
        for (int call = 0; call < 2; ++call) {
          const auto fused = run(true);
          EXPECT_EQ(fused.first, separate.first) << "call " << call;
          EXPECT_EQ(fused.second, separate.second) << "call " << call;
          EXPECT_EQ(Download(d_cnt, 1), zero) << "call " << call;
        }
      }
    }
  }
}

// SmallMFusion's qkv: the norm, the qkv product (with bias) and PrepareQkv in one launch (1
// and 3 tokens, q/k norm per head or none: each head's last block prepares it) or with
// PrepareQkv launched after (12 tokens; the whole-projection norm) give the norm-fused
// product's qkv rows and then PrepareQkv's q rows and cache rows bit for bit: each q/k norm
// mode, clipping, fp32 and bf16 caches, twice (the counters are left at zero).
TEST(SmallMFusionTest, QkvTakenInIsPrepareQkv) {
  SKIP_WITHOUT_GPU();
  const int64_t nh = 4, nkv = 2, hd = 32, qd = nh * hd, kvd = nkv * hd, qkvd = qd + 2 * kvd;
  const int64_t in = 96, page = 4, layers = 2, layer = 1, num_pages = 6;
  cuda::DeviceMatrix mat;
  std::vector<float> w;
  MakeMatrix(1, qkvd, in, true, 71, 0.2f, &mat, &w);
  const std::vector<float> bias = Random(qkvd, 72);
  ASSERT_TRUE(mat.bias.Reserve(qkvd * 4).ok());
  ASSERT_EQ(cudaMemcpy(mat.bias.get(), bias.data(), qkvd * 4, cudaMemcpyHostToDevice), cudaSuccess);
  mat.has_bias = true;
  std::vector<float> g = Random(in, 73), qn = Random(qd, 74), kn = Random(kvd, 75), inv(hd / 2);
  for (int64_t i = 0; i < hd / 2; ++i) inv[i] = std::pow(1e4f, -float(2 * i) / float(hd));
  cuda::DeviceBuffer dg, dqn, dkn, dinv, dcnt;
  const std::vector<uint32_t> zero(nh + 2 * nkv, 0);
  uint32_t* d_cnt = Upload(zero, &dcnt);
  for (bool bf16_kv : {false, true}) {
    for (int mode : {0, 1, 2}) {
      for (int64_t m : {1, 3, 12}) {
        for (cuda::SmallMChoice choice : {cuda::SmallMChoice::kAuto, cuda::SmallMChoice::kSplit8}) {
          if ((m > 3 || bf16_kv) && choice != cuda::SmallMChoice::kAuto) continue;
          SCOPED_TRACE(::testing::Message()
                       << (bf16_kv ? "bf16" : "f32") << " cache, mode " << mode << ", " << m
                       << " tokens, choice " << static_cast<int>(choice));
          const float clip = mode == 2 ? 0.5f : 0.0f;
          std::vector<float> x = Random(m * in, 76 + m);
          // Token t at position 5 + t of a sequence on pages {4, 1, 5, 0, 2, 3}.
          std::vector<int32_t> pages = {4, 1, 5, 0, 2, 3}, pos(m), off(m, 0);
          for (int64_t t = 0; t < m; ++t) pos[t] = static_cast<int32_t>(5 + t);
          cuda::DeviceBuffer dx, dpages, dpos, doff;
          const float* d_x = Upload(x, &dx);
          const int64_t pool_elems = num_pages * layers * 2 * page * kvd;
          auto run = [&](bool fused) {
            cuda::DeviceBuffer pool, y, xn, q;
            const std::vector<float> nan_pool(pool_elems, std::nanf(""));
            Upload(nan_pool, &pool);
            EXPECT_TRUE(y.Reserve(m * qkvd * 4).ok() && xn.Reserve(m * in * 4).ok() &&
                        q.Reserve(m * qd * 4).ok());
            cuda::QkvArgs a{static_cast<int32_t>(nh),
                            static_cast<int32_t>(nkv),
                            static_cast<int32_t>(hd),
                            clip,
                            mode,
                            Upload(qn, &dqn),
                            Upload(kn, &dkn),
                            1e-6f,
                            Upload(inv, &dinv),
                            layer,
                            cuda::PagedKv(),
                            q.as<float>()};
            a.kv.pool = pool.get();
            a.kv.bf16 = bf16_kv;
            a.kv.page_size = page;
            a.kv.num_layers = layers;
            a.kv.kv_dim = kvd;
            a.kv.pages = Upload(pages, &dpages);
            a.kv.page_off = Upload(off, &doff);
            a.kv.pos = Upload(pos, &dpos);
            cuda::SmallMFusion f;
            f.norm_w = Upload(g, &dg);
            f.eps = 1e-6f;
            f.xn = xn.as<float>();
            f.counters = d_cnt;
            if (fused) f.qkv = a;
            EXPECT_EQ(cuda::SmallMLinear(mat.w.get(), mat.wt, mat.bias.as<float>(), qkvd, in, d_x,
                                         m, y.as<float>(), qkvd, false, false, cuda::Groups(),
                                         nullptr, choice, f),
                      cudaSuccess);
            if (!fused) {
              EXPECT_EQ(
                  cuda::PrepareQkv(y.as<float>(), m, nh, nkv, hd, clip, mode, a.q_norm, a.k_norm,
                                   a.eps, a.inv_freq, layer, a.kv, a.q_out, nullptr),
                  cudaSuccess);
            }
            // qkv rows, xn, q rows, then the pool's bytes (NaN where nothing was written).
            std::vector<uint32_t> bits;
            auto add = [&](const std::vector<float>& v) {
              for (float f : v) bits.push_back(BitsOf(f));
            };
            add(Download(y.as<float>(), m * qkvd));
            add(Download(xn.as<float>(), m * in));
            add(Download(q.as<float>(), m * qd));
            add(Download(pool.as<float>(), pool_elems));
            EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            return bits;
          };
          const std::vector<uint32_t> separate = run(false);
          for (int call = 0; call < 2; ++call) {
            EXPECT_EQ(run(true), separate) << "call " << call;
            EXPECT_EQ(Download(d_cnt, zero.size()), zero) << "call " << call;
          }
        }
      }
    }
  }
}

// The grouped expert GEMMs of large batches (bf16 weights): groups of very different sizes over
// non-consecutive slots, against a double-precision reference that rounds where the device
// stores bf16 (x, gate and up, the activation, y). Up to kMaxPadGroups groups run as padded
// batched GEMMs; more through cuBLAS's grouped GEMM.
TEST(GroupedSwiGluTest, EveryPathMatchesTheReference) {
  SKIP_WITHOUT_GPU();
  const int64_t H = 264, W = 72, slots = 7;
  cuda::DeviceMatrix gate_up, down;
  std::vector<float> wgu, wd;
  MakeMatrix(slots, 2 * W, H, true, 41, 0.1f, &gate_up, &wgu);
  MakeMatrix(slots, H, W, true, 42, 0.1f, &down, &wd);
  auto ex = cuda::Exec::Create(0);
  ASSERT_TRUE(ex.ok()) << ex.status();
  struct Case {
    std::vector<int32_t> rows, slot;
    const char* path;
  };
  // Slots out of order (buckets); one group and consecutive slots (one strided bucket pads no
  // more than the buckets); ascending slots with gaps, where one strided bucket would pad 280
  // rows against the buckets' 184 (buckets, but forced strided below).
  std::vector<Case> cases = {{{40, 3, 33, 1, 70, 17}, {5, 0, 2, 3, 6, 1}, "batched"},
                             {{300}, {4}, "strided"},
                             {{40, 36, 38, 33}, {2, 3, 4, 5}, "strided"},
                             {{40, 33, 17, 35, 38}, {0, 1, 3, 4, 6}, "batched"}};
  Case many;  // more groups than kMaxPadGroups
  for (int g = 0; g < cuda::kMaxPadGroups + 20; ++g) {
    many.rows.push_back(1 + g % 3);
    many.slot.push_back(g % slots);
  }
  many.path = "grouped";
  cases.push_back(many);
  for (const Case& c : cases) {
    const int G = static_cast<int>(c.rows.size());
    std::vector<int32_t> begin = {0};
    for (int32_t r : c.rows) begin.push_back(begin.back() + r);
    const int64_t m = begin.back();
    std::vector<float> x = Random(m * H, 43);
    cuda::DeviceBuffer dx, dy;
    const float* d_x = Upload(x, &dx);
    ASSERT_TRUE(dy.Reserve(m * H * 4).ok());
    // The dispatcher's path, then each bf16 path by name (the batched one refuses > 256 groups).
    std::vector<std::pair<std::string, std::vector<float>>> runs;
    ASSERT_TRUE(cuda::GroupedSwiGlu(**ex, gate_up, down, c.slot, begin, d_x, dy.as<float>())
                    .ok());
    ASSERT_TRUE((*ex)->Sync().ok());
    EXPECT_STREQ(cuda::LastGroupedSwiGluPath(), c.path) << G << " groups";
    runs.emplace_back("dispatched", Download(dy.as<float>(), m * H));
    {
      // The rows read in place through x_rows (x stored in reverse): the same results.
      std::vector<float> reversed(m * H);
      std::vector<int32_t> rows(m);
      for (int64_t r = 0; r < m; ++r) {
        rows[r] = static_cast<int32_t>(m - 1 - r);
        std::copy(&x[r * H], &x[(r + 1) * H], &reversed[(m - 1 - r) * H]);
      }
      cuda::DeviceBuffer drev, drows;
      ASSERT_TRUE(cuda::GroupedSwiGlu(**ex, gate_up, down, c.slot, begin, Upload(reversed, &drev),
                                      dy.as<float>(), Upload(rows, &drows))
                      .ok());
      ASSERT_TRUE((*ex)->Sync().ok());
      EXPECT_EQ(Download(dy.as<float>(), m * H), runs.back().second) << G << " groups, x_rows";
    }
    {
      // Asked for its output in place: the batched way leaves it padded and the padded combine
      // gives what unpadding and the plain combine give, bit for bit; the other ways write fp32
      // rows (to Exec scratch when y is null). Rows are combined as tokens of k = 2 experts:
      // token t takes grouped rows t and m - 1 - t (or none: where -1).
      const int64_t k = 2, n = (m + 1) / 2;
      std::vector<int32_t> where(n * k);
      std::vector<float> wts(n * k);
      for (int64_t t = 0; t < n; ++t) {
        where[t * k] = static_cast<int32_t>(t);
        where[t * k + 1] = t % 5 == 4 ? -1 : static_cast<int32_t>(m - 1 - t);
        wts[t * k] = 0.25f + 0.01f * t;
        wts[t * k + 1] = 0.5f;
      }
      cuda::DeviceBuffer dwhere, dwts, dout1, dout2;
      const std::vector<float> base = Random(n * H, 44);
      cuda::GroupedOut out;
      ASSERT_TRUE(cuda::GroupedSwiGlu(**ex, gate_up, down, c.slot, begin, d_x, nullptr, nullptr,
                                      &out)
                      .ok());
      EXPECT_EQ(out.padded != nullptr, G <= cuda::kMaxPadGroups) << G << " groups";
      EXPECT_EQ(out.y == nullptr, out.padded != nullptr);
      float* o1 = Upload(base, &dout1);
      float* o2 = Upload(base, &dout2);
      const int32_t* w = Upload(where, &dwhere);
      const float* wt = Upload(wts, &dwts);
      if (out.padded != nullptr) {
        ASSERT_EQ(cuda::CombineExpertsPadded(out.padded, out.map, w, wt, n, k, H, o1,
                                             (*ex)->stream()),
                  cudaSuccess);
      } else {
        ASSERT_EQ(cuda::CombineExperts(out.y, w, wt, n, k, H, o1, (*ex)->stream()), cudaSuccess);
      }
      cuda::DeviceBuffer dyf;
      ASSERT_EQ(cuda::CombineExperts(Upload(runs.front().second, &dyf), w, wt, n, k, H, o2,
                                     (*ex)->stream()),
                cudaSuccess);
      ASSERT_TRUE((*ex)->Sync().ok());
      EXPECT_EQ(Download(o1, n * H), Download(o2, n * H)) << G << " groups, combined in place";
    }
    absl::Status batched = cuda::BatchedSwiGlu(**ex, gate_up, down, c.slot, begin, d_x,
                                               dy.as<float>());
    if (G <= cuda::kMaxPadGroups) {
      ASSERT_TRUE(batched.ok()) << batched;
      ASSERT_TRUE((*ex)->Sync().ok());
      runs.emplace_back("batched", Download(dy.as<float>(), m * H));
      // Fewer, more padded buckets (fill 0.5: the 40-row group joins the 70-row one).
      ASSERT_TRUE(cuda::BatchedSwiGlu(**ex, gate_up, down, c.slot, begin, d_x, dy.as<float>(),
                                      nullptr, nullptr, 0.5)
                      .ok());
      ASSERT_TRUE((*ex)->Sync().ok());
      runs.emplace_back("batched, fill 0.5", Download(dy.as<float>(), m * H));
      // Each layout by name: strided only where the slots ascend.
      const bool ascend = std::is_sorted(c.slot.begin(), c.slot.end(), std::less_equal<>());
      for (const auto layout : {cuda::BatchedLayout::kBuckets, cuda::BatchedLayout::kStrided,
                                cuda::BatchedLayout::kBlocks64, cuda::BatchedLayout::kBlocks128}) {
        const bool strided = layout == cuda::BatchedLayout::kStrided;
        absl::Status st = cuda::BatchedSwiGlu(**ex, gate_up, down, c.slot, begin, d_x,
                                              dy.as<float>(), nullptr, nullptr,
                                              cuda::kBucketFill, layout);
        if (strided && !ascend) {
          EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
          continue;
        }
        ASSERT_TRUE(st.ok()) << st;
        ASSERT_TRUE((*ex)->Sync().ok());
        auto plan = cuda::PlanBatched(c.slot, begin, cuda::kBucketFill, layout);
        ASSERT_TRUE(plan.ok());
        EXPECT_EQ(plan->strided, strided);
        runs.emplace_back(std::string(plan->name()) + " " + std::to_string(plan->block_rows),
                          Download(dy.as<float>(), m * H));
      }
    } else {
      EXPECT_EQ(batched.code(), absl::StatusCode::kUnimplemented) << batched;
    }
    ASSERT_TRUE(cuda::CublasGroupedSwiGlu(**ex, gate_up, down, c.slot, begin, d_x,
                                          dy.as<float>())
                    .ok());
    runs.emplace_back("grouped", Download(dy.as<float>(), m * H));
    // Reference, with the device's bf16 roundings.
    std::vector<double> ref(m * H);
    for (int g = 0; g < G; ++g) {
      const float* gw = &wgu[c.slot[g] * 2 * W * H];
      const float* dw = &wd[c.slot[g] * H * W];
      for (int64_t r = begin[g]; r < begin[g + 1]; ++r) {
        std::vector<double> a(W);
        for (int64_t o = 0; o < W; ++o) {
          double gs = 0, us = 0;
          for (int64_t i = 0; i < H; ++i) {
            const double xi = RoundBf16(x[r * H + i]);
            gs += xi * gw[o * H + i];
            us += xi * gw[(W + o) * H + i];
          }
          const double gr = RoundBf16(gs), ur = RoundBf16(us);
          a[o] = RoundBf16(gr / (1 + std::exp(-gr)) * ur);
        }
        for (int64_t o = 0; o < H; ++o) {
          double sum = 0;
          for (int64_t i = 0; i < W; ++i) sum += a[i] * dw[o * W + i];
          ref[r * H + o] = sum;
        }
      }
    }
    for (const auto& [name, got] : runs) {
      // A rounding step apart at most (fp32 sums on the device): 2% of the value, or 1e-3.
      double worst = 0;
      for (int64_t i = 0; i < m * H; ++i) {
        worst = std::max(worst, std::abs(got[i] - RoundBf16(ref[i])) /
                                    (0.02 * std::abs(ref[i]) + 1e-3));
      }
      EXPECT_LE(worst, 1.0) << G << " groups, " << name;
    }
  }
}

// ---------------------------------------------------------------- norms, routing, attention

TEST(CudaKernelsTest, RmsNormMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 5, dim = 300;
  std::vector<float> x = Random(rows * dim, 5), w = Random(dim, 6), ref(rows * dim);
  ops::RmsNorm(x.data(), w.data(), rows, dim, 1e-6f, ref.data());
  cuda::DeviceBuffer dx, dw;
  float* d_x = Upload(x, &dx);
  ASSERT_EQ(cuda::RmsNorm(d_x, Upload(w, &dw), rows, dim, 1e-6f, d_x, nullptr), cudaSuccess);
  std::vector<double> r(ref.begin(), ref.end());
  EXPECT_LT(MaxAbsDiff(Download(d_x, rows * dim), r), 1e-5);
}

// A decode step's routing in one launch (RouteAndGroup) gives exactly TopKRouting's ids and
// weights and BuildGroups' groups: 1, 5 and 32 rows, experts per row varying, 128 and 60
// experts.
TEST(CudaKernelsTest, RouteAndGroupIsTopKThenBuildGroups) {
  SKIP_WITHOUT_GPU();
  for (int64_t E : {128, 60}) {
    for (int64_t rows : {1, 5, 32}) {
      const int64_t kmax = 8;
      std::vector<float> logits = Random(rows * E, 90 + rows, 3.0f);
      std::vector<int32_t> k(rows), slot(E);
      for (int64_t r = 0; r < rows; ++r) k[r] = r % 3 == 2 ? 3 : 8;
      for (int64_t e = 0; e < E; ++e) slot[e] = static_cast<int32_t>(E - 1 - e);
      cuda::DeviceBuffer dl, dk, dslot;
      const float* d_logits = Upload(logits, &dl);
      const int32_t* d_k = Upload(k, &dk);
      const int32_t* d_slot = Upload(slot, &dslot);
      // Outputs: RoutingOutputs, then the weights.
      auto run = [&](bool fused) {
        const int64_t nk = rows * kmax;
        cuda::DeviceBuffer ids, w, ng, gs, rb, perm, where;
        EXPECT_TRUE(ids.Reserve(nk * 4).ok() && w.Reserve(nk * 4).ok() && ng.Reserve(4).ok() &&
                    gs.Reserve(E * 4).ok() && rb.Reserve((E + 1) * 4).ok() &&
                    perm.Reserve(nk * 4).ok() && where.Reserve(nk * 4).ok());
        if (fused) {
          EXPECT_EQ(cuda::RouteAndGroup(d_logits, rows, E, d_k, kmax, true, ids.as<int32_t>(),
                                        w.as<float>(), d_slot, ng.as<int32_t>(),
                                        gs.as<int32_t>(), rb.as<int32_t>(), perm.as<int32_t>(),
                                        where.as<int32_t>(), nullptr),
                    cudaSuccess);
        } else {
          EXPECT_EQ(cuda::TopKRouting(d_logits, rows, E, d_k, kmax, true, ids.as<int32_t>(),
                                      w.as<float>(), nullptr),
                    cudaSuccess);
          EXPECT_EQ(cuda::BuildGroups(ids.as<int32_t>(), rows, kmax, E, d_slot, ng.as<int32_t>(),
                                      gs.as<int32_t>(), rb.as<int32_t>(), perm.as<int32_t>(),
                                      where.as<int32_t>(), nullptr),
                    cudaSuccess);
        }
        return std::make_pair(RoutingOutputs(ids, gs, rb, perm, where, ng, nk),
                              Download(w.as<float>(), nk));
      };
      const auto separate = run(false), fused = run(true);
      EXPECT_EQ(fused.first, separate.first) << E << " experts, " << rows << " rows";
      EXPECT_EQ(fused.second, separate.second) << E << " experts, " << rows << " rows";
    }
  }
}

// The GPU's argmax is the host's ArgMax on every row: ties, NaNs (first or not), infinities,
// a vocabulary-sized row whose maximum appears twice far apart.
TEST(CudaKernelsTest, ArgMaxRowsIsTheHostArgMax) {
  SKIP_WITHOUT_GPU();
  const int64_t n = 151936;
  const float nan = std::nanf(""), inf = std::numeric_limits<float>::infinity();
  std::vector<std::vector<float>> rows;
  auto row = [&](std::initializer_list<std::pair<int64_t, float>> set, float fill) {
    std::vector<float> r(n, fill);
    for (const auto& [i, v] : set) r[i] = v;
    rows.push_back(r);
  };
  row({{7, 3.0f}, {5, 3.0f}, {100000, 3.0f}}, 0.0f);   // tie: 5
  row({{0, nan}, {9, 5.0f}}, 0.0f);                     // NaN first: 0
  row({{3, nan}, {4, 2.0f}, {n - 1, 2.0f}}, 1.0f);      // NaN passed over: 4
  row({}, -inf);                                        // all -inf: 0
  row({{n - 2, inf}, {n - 1, inf}}, -1.0f);             // +inf twice: n - 2
  row({}, nan);                                         // all NaN: 0
  row({{1, nan}, {2, nan}}, -inf);                      // -inf and NaN: 0
  std::vector<float> r = Random(n, 77, 10.0f);
  r[12345] = r[150000] = 11.0f;
  rows.push_back(r);                                    // 12345
  std::vector<float> flat;
  for (const auto& x : rows) flat.insert(flat.end(), x.begin(), x.end());
  cuda::DeviceBuffer dx, dout;
  ASSERT_TRUE(dout.Reserve(rows.size() * 4).ok());
  ASSERT_EQ(cuda::ArgMaxRows(Upload(flat, &dx), static_cast<int64_t>(rows.size()), n,
                             dout.as<int32_t>(), nullptr),
            cudaSuccess);
  const std::vector<int32_t> got = Download(dout.as<int32_t>(), rows.size());
  const std::vector<int32_t> want = {5, 0, 4, 0, static_cast<int32_t>(n - 2), 0, 0, 12345};
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(ArgMax(rows[i].data(), n), want[i]) << "host, row " << i;
    EXPECT_EQ(got[i], want[i]) << "device, row " << i;
  }
}

// Same experts (ties to the lower index) and weights as the CPU, per-row k, renormalisation.
TEST(CudaKernelsTest, TopKRoutingMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 7, experts = 60, kmax = 8;
  std::vector<float> logits = Random(rows * experts, 7, 3.0f);
  logits[3] = logits[4];  // a tie
  std::vector<int32_t> kpr = {8, 8, 2, 8, 1, 8, 5};
  for (bool normalize : {false, true}) {
    cuda::DeviceBuffer dl, dk, di, dw;
    ASSERT_TRUE(di.Reserve(rows * kmax * 4).ok());
    ASSERT_TRUE(dw.Reserve(rows * kmax * 4).ok());
    ASSERT_EQ(cuda::TopKRouting(Upload(logits, &dl), rows, experts, Upload(kpr, &dk), kmax,
                                normalize, di.as<int32_t>(), dw.as<float>(), nullptr),
              cudaSuccess);
    std::vector<int32_t> ids = Download(di.as<int32_t>(), rows * kmax);
    std::vector<float> w = Download(dw.as<float>(), rows * kmax);
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<int32_t> rid(kpr[r]);
      std::vector<float> rw(kpr[r]);
      ops::TopKRouting(&logits[r * experts], 1, experts, kpr[r], normalize, rid.data(), rw.data());
      for (int64_t j = 0; j < kmax; ++j) {
        if (j < kpr[r]) {
          EXPECT_EQ(ids[r * kmax + j], rid[j]) << "row " << r << " slot " << j;
          EXPECT_NEAR(w[r * kmax + j], rw[j], 1e-5);
        } else {
          EXPECT_EQ(ids[r * kmax + j], -1);
          EXPECT_EQ(w[r * kmax + j], 0.0f);
        }
      }
    }
  }
}

// q/k norm per head + RoPE + paged cache write, then paged attention, against the CPU's
// RmsNorm, Rope and Attention over a contiguous cache. Three sequences in one batch (one of 700
// positions), pages scattered, GQA (8 query heads over 2 kv heads), a head_dim that is not a
// multiple of 32; the attention unsplit and split over 3 and 16 blocks per (token, head).
TEST(CudaKernelsTest, PrepareQkvAndPagedAttentionMatchCpu) {
  SKIP_WITHOUT_GPU();
  const int64_t nh = 8, nkv = 2, hd = 48, qd = nh * hd, kvd = nkv * hd, qkvd = qd + 2 * kvd;
  const int64_t page = 16, layers = 2, layer = 1;
  // The third sequence is long enough for several splits of hundreds of positions.
  const std::vector<int64_t> lens = {37, 5, 700};
  std::vector<std::vector<int32_t>> pages = {{5, 0, 3}, {1}, {}};
  for (int32_t p = 0; p < 44; ++p) pages[2].push_back(50 - p);  // 44 pages, out of order
  const float eps = 1e-6f, theta = 1e6f;
  std::vector<float> qn = Random(hd, 11), kn = Random(hd, 12);
  std::vector<float> inv(hd / 2);
  for (int64_t i = 0; i < hd / 2; ++i) {
    inv[i] = 1.0f / static_cast<float>(std::pow(double(theta), double(float(2 * i) / float(hd))));
  }
  int64_t T = 0;
  for (int64_t n : lens) T += n;
  std::vector<float> qkv = Random(T * qkvd, 13);
  std::vector<int32_t> pos, off, flat;
  for (size_t s = 0; s < lens.size(); ++s) {
    for (int64_t i = 0; i < lens[s]; ++i) {
      pos.push_back(static_cast<int32_t>(i));
      off.push_back(static_cast<int32_t>(flat.size()));
    }
    flat.insert(flat.end(), pages[s].begin(), pages[s].end());
  }
  cuda::DeviceBuffer pool, dqkv, dq, dout, dpos, doff, dpages, dqn, dkn, dinv;
  ASSERT_TRUE(pool.Reserve(51 * layers * 2 * page * kvd * 4).ok());
  ASSERT_TRUE(dq.Reserve(T * qd * 4).ok());
  ASSERT_TRUE(dout.Reserve(T * qd * 4).ok());
  cuda::PagedKv kv;
  kv.pool = pool.as<float>();
  kv.page_size = page;
  kv.num_layers = layers;
  kv.kv_dim = kvd;
  kv.pages = Upload(flat, &dpages);
  kv.page_off = Upload(off, &doff);
  kv.pos = Upload(pos, &dpos);
  ASSERT_EQ(cuda::PrepareQkv(Upload(qkv, &dqkv), T, nh, nkv, hd, 0.0f, 1, Upload(qn, &dqn),
                             Upload(kn, &dkn), eps, Upload(inv, &dinv), layer, kv, dq.as<float>(),
                             nullptr),
            cudaSuccess);
  // Unsplit, and split (flash-decoding) into 3 and 16 parts: tokens with fewer positions than
  // splits leave some splits empty.
  std::vector<std::vector<float>> runs;
  for (int splits : {1, 3, 16}) {
    cuda::DeviceBuffer part;
    ASSERT_TRUE(part.Reserve(T * nh * splits * (hd + 2) * 4).ok());
    ASSERT_EQ(cuda::PagedAttention(dq.as<float>(), T, nh, nkv, hd, layer, kv, dout.as<float>(),
                                   nullptr, splits, part.as<float>()),
              cudaSuccess);
    runs.push_back(Download(dout.as<float>(), T * qd));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    if (splits > 1) {
      // The combine by each (token, head)'s last split block: the same bits, twice (the
      // counters are left at zero).
      const std::vector<uint32_t> zeros(T * nh, 0);
      cuda::DeviceBuffer dcnt;
      uint32_t* d_cnt = Upload(zeros, &dcnt);
      for (int call = 0; call < 2; ++call) {
        const std::vector<float> nan_out(T * qd, std::nanf(""));
        ASSERT_EQ(cudaMemcpy(dout.get(), nan_out.data(), T * qd * 4, cudaMemcpyHostToDevice),
                  cudaSuccess);
        ASSERT_EQ(cuda::PagedAttention(dq.as<float>(), T, nh, nkv, hd, layer, kv,
                                       dout.as<float>(), nullptr, splits, part.as<float>(), d_cnt),
                  cudaSuccess);
        EXPECT_EQ(Download(dout.as<float>(), T * qd), runs.back())
            << splits << " splits, fused combine, call " << call;
        EXPECT_EQ(Download(d_cnt, T * nh), zeros);
      }
    }
  }

  // CPU: the same steps per sequence.
  std::vector<float> ref(T * qd);
  int64_t t0 = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    const int64_t n = lens[s];
    std::vector<float> q(n * qd), k(n * kvd), v(n * kvd);
    for (int64_t i = 0; i < n; ++i) {
      const float* row = &qkv[(t0 + i) * qkvd];
      std::copy(row, row + qd, &q[i * qd]);
      std::copy(row + qd, row + qd + kvd, &k[i * kvd]);
      std::copy(row + qd + kvd, row + qkvd, &v[i * kvd]);
    }
    ops::RmsNorm(q.data(), qn.data(), n * nh, hd, eps, q.data());
    ops::RmsNorm(k.data(), kn.data(), n * nkv, hd, eps, k.data());
    std::vector<int32_t> p(pos.begin() + t0, pos.begin() + t0 + n);
    ops::Rope(q.data(), p.data(), n, nh, hd, theta);
    ops::Rope(k.data(), p.data(), n, nkv, hd, theta);
    ops::Attention(q.data(), k.data(), v.data(), 0, n, nh, nkv, hd, &ref[t0 * qd]);
    t0 += n;
  }
  for (size_t r = 0; r < runs.size(); ++r) {
    double max_err = 0;
    for (int64_t i = 0; i < T * qd; ++i) {
      max_err = std::max(max_err, double(std::abs(ref[i] - runs[r][i])));
    }
    EXPECT_LT(max_err, 1e-5) << "run " << r;
  }
}

// ---------------------------------------------------------------- experts

struct ExpertCase {
  std::string device;
  ComputeType compute;
  int64_t rows;
};

class ExpertShardTest : public ::testing::TestWithParam<ExpertCase> {};

// The routed experts of the embedded model (bf16 weights) on each device, a shard holding half
// of them, against a double-precision reference computed from the checkpoint's weights.
TEST_P(ExpertShardTest, MatchesDoubleReference) {
  const ExpertCase c = GetParam();
  if (c.device != "cpu") SKIP_WITHOUT_GPU();
  const std::string dir = "models/pydoc-moe-17m";
  auto cfg = ModelConfig::FromFile(dir + "/config.json");
  ASSERT_TRUE(cfg.ok());
  auto arch = ArchFor(*cfg);
  auto ckpt = CheckpointReader::Open(dir);
  ASSERT_TRUE(arch.ok() && ckpt.ok());
  const int32_t layer = 2;
  std::set<ExpertId> held;
  for (int32_t e = 0; e < cfg->num_experts; e += 2) held.insert({layer, e});
  LoadOptions opt;
  opt.compute = c.compute;
  opt.device = *ParseDevice(c.device);
  auto shard = ExpertShard::Load(**ckpt, *cfg, *arch, held, opt);
  ASSERT_TRUE(shard.ok()) << shard.status();
  const int64_t H = cfg->hidden_size, W = cfg->moe_intermediate_size, k = 3, n = c.rows;
  std::vector<float> x = Random(n * H, 21), wts = Random(n * k, 22);
  std::vector<int32_t> ids(n * k);
  std::mt19937 g(23);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < k; ++j) ids[r * k + j] = j == 2 && r % 3 == 0 ? -1 : 2 * (g() % 8);
  }
  std::vector<float> out = Random(n * H, 24);  // accumulated into
  std::vector<double> ref(out.begin(), out.end());
  auto weight = [&](const WeightSpec& w, int64_t rows, int64_t in) {
    const TensorInfo* t = (*ckpt)->Find(w.name);
    std::vector<float> f(rows * in);
    ToF32(t->data, t->dtype, rows * in, f.data());
    return f;
  };
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = ids[r * k + j];
      if (e < 0) continue;
      const MlpTensors ex = ExpertTensorsOf(*cfg, *arch, layer, e);
      auto gw = weight(ex.gate, W, H), uw = weight(ex.up, W, H), dw = weight(ex.down, H, W);
      std::vector<double> act(W);
      for (int64_t o = 0; o < W; ++o) {
        double gs = 0, us = 0;
        for (int64_t i = 0; i < H; ++i) {
          gs += double(x[r * H + i]) * gw[o * H + i];
          us += double(x[r * H + i]) * uw[o * H + i];
        }
        act[o] = gs / (1 + std::exp(-gs)) * us;
      }
      for (int64_t o = 0; o < H; ++o) {
        double s = 0;
        for (int64_t i = 0; i < W; ++i) s += act[i] * dw[o * W + i];
        ref[r * H + o] += wts[r * k + j] * s;
      }
    }
  }
  ASSERT_TRUE((*shard)->RunExperts(layer, x.data(), n, ids.data(), wts.data(), k, out.data()).ok());
  // bf16 rounding of activations (bf16 compute, or cuBLAS over bf16 weights) costs ~3 digits.
  const bool rounded = c.compute == ComputeType::kBF16 || (c.device != "cpu" && n * k / 8 > cuda::kSmallM);
  EXPECT_LT(MaxAbsDiff(out, ref), rounded ? 5e-2 : 1e-4) << c.device << " rows " << n;

  // An expert this shard does not hold is refused, and nothing is written.
  ids[0] = 1;
  std::vector<float> before = out;
  auto st = (*shard)->RunExperts(layer, x.data(), n, ids.data(), wts.data(), k, out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_EQ(out, before);
}

INSTANTIATE_TEST_SUITE_P(
    Devices, ExpertShardTest,
    ::testing::Values(ExpertCase{"cpu", ComputeType::kF32, 5},
                      ExpertCase{"cpu", ComputeType::kF32, 70},
                      ExpertCase{"cpu", ComputeType::kBF16, 70},
                      ExpertCase{"cuda:0", ComputeType::kF32, 5},
                      ExpertCase{"cuda:0", ComputeType::kF32, 70},
                      ExpertCase{"cuda:0", ComputeType::kBF16, 70}),
    [](const auto& info) {
      return (info.param.device == "cpu" ? std::string("cpu") : std::string("cuda")) + "_" +
             (info.param.compute == ComputeType::kF32 ? "fp32" : "bf16") + "_rows" +
             std::to_string(info.param.rows);
    });

// A long context through the whole model: steps of 690 positions and more (a prefill chunk, then
// decode) run attention split over 16 blocks per head on the GPU and give the CPU's logits
// and greedy tokens.
TEST(CudaLongContextTest, SplitAttentionDecodeMatchesCpu) {
  SKIP_WITHOUT_GPU();
  ops::SetNumThreads(2);
  LoadOptions on_gpu;
  on_gpu.device = *ParseDevice("cuda:0");
  auto cpu = Model::Load("models/pydoc-moe-17m", LoadOptions{});
  auto gpu = Model::Load("models/pydoc-moe-17m", on_gpu);
  ASSERT_TRUE(cpu.ok() && gpu.ok());
  const int64_t V = (*cpu)->config().vocab_size;
  ASSERT_GT(cuda::AttentionSplits(1, (*gpu)->config().num_attention_heads, 690), 4);
  std::mt19937 g(5);
  std::vector<int32_t> prompt(690);
  for (int32_t& t : prompt) t = static_cast<int32_t>(g() % V);
  auto cc = (*cpu)->NewCache(720), gc = (*gpu)->NewCache(720);
  SeqStep step;
  step.seq_id = 1;
  // Prefill in chunks of kSmallM tokens, so that every GPU product keeps fp32 activations (larger
  // ones round them to bf16 for cuBLAS) and the two caches hold the same rows.
  for (size_t at = 0; at < prompt.size(); at += cuda::kSmallM) {
    step.start_pos = static_cast<int64_t>(at);
    step.tokens.assign(prompt.begin() + at,
                       prompt.begin() + std::min(prompt.size(), at + cuda::kSmallM));
    if (step.start_pos + static_cast<int64_t>(step.tokens.size()) ==
        static_cast<int64_t>(prompt.size())) {
      break;  // the last chunk runs below
    }
    std::vector<float> a, b;
    ASSERT_TRUE((*cpu)->Step({step}, cc.get(), &a).ok());
    ASSERT_TRUE((*gpu)->Step({step}, gc.get(), &b).ok());
  }
  for (int i = 0; i < 12; ++i) {
    std::vector<float> a, b;
    ASSERT_TRUE((*cpu)->Step({step}, cc.get(), &a).ok());
    ASSERT_TRUE((*gpu)->Step({step}, gc.get(), &b).ok());
    ASSERT_EQ(a.size(), b.size());
    double err = 0;
    for (size_t j = 0; j < a.size(); ++j) err = std::max(err, double(std::abs(a[j] - b[j])));
    EXPECT_LT(err, 2e-3) << "step " << i << " at position " << step.start_pos;
    const int32_t next = ArgMax(a.data(), V);
    EXPECT_EQ(ArgMax(b.data(), V), next) << "step " << i;
    step.start_pos += static_cast<int64_t>(step.tokens.size());
    step.tokens = {next};
  }
}

// ---------------------------------------------------------------- CUDA graphs

// Decode steps replayed from CUDA graphs give the same logits, bit for bit, as steps launched
// kernel by kernel: one sequence in one cache and two in another (graphs are per cache), page
// boundaries crossed (the page lists grow), experts per token changed for one sequence midway
// (read on the device, not baked into the graph).
class CudaGraphTest : public ::testing::TestWithParam<std::string> {};

// bf16: weights stored in bf16 (deep_loads: the deep-load kernels' automatic use, bf16 only).
std::vector<std::vector<float>> DecodeTrace(const std::string& dir, bool graphs,
                                            bool pdl = false, bool bf16 = false,
                                            bool deep_loads = false) {
  LoadOptions opt;
  opt.device = *ParseDevice("cuda:0");
  opt.cuda_graphs = graphs;
  opt.cuda_pdl = pdl;
  if (bf16) opt.compute = ComputeType::kBF16;
  opt.cuda_deep_loads = deep_loads;
  auto model = Model::Load(dir, opt);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return {};
  const int64_t V = (*model)->config().vocab_size;
  auto one = (*model)->NewCache(256), two = (*model)->NewCache(256);
  struct Seq {
    uint64_t id;
    KvCache* cache;
    std::vector<int32_t> tokens;
    int64_t pos = 0;
    int32_t k = 0;
  };
  std::vector<Seq> seqs = {{1, one.get(), {16, 201, 496, 21, 17}},
                           {2, two.get(), {5, 9, 14}},
                           {3, two.get(), {30, 31, 32, 33, 34, 35, 36}}};
  std::vector<std::vector<float>> trace;
  auto run = [&](std::vector<Seq*> group) {
    std::vector<SeqStep> batch;
    for (Seq* q : group) {
      SeqStep st;
      st.seq_id = q->id;
      st.tokens = q->tokens;
      st.start_pos = q->pos;
      st.experts_per_token = q->k;
      batch.push_back(st);
    }
    std::vector<float> logits;
    absl::Status st = (*model)->Step(batch, group[0]->cache, &logits);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) return false;
    EXPECT_EQ(logits.size(), group.size() * V);
    for (size_t b = 0; b < group.size(); ++b) {
      Seq* q = group[b];
      q->pos += static_cast<int64_t>(q->tokens.size());
      const float* row = logits.data() + b * V;
      q->tokens = {static_cast<int32_t>(std::max_element(row, row + V) - row)};
    }
    trace.push_back(std::move(logits));
    return true;
  };
  for (Seq& q : seqs) {
    if (!run({&q})) return trace;  // prefill (never a graph: more tokens than sequences)
  }
  for (int step = 0; step < 40; ++step) {
    if (step == 20) seqs[2].k = 1;
    if (!run({&seqs[0]}) || !run({&seqs[1], &seqs[2]})) break;
  }
  return trace;
}

TEST_P(CudaGraphTest, ReplayedStepsMatchLaunchedSteps) {
  SKIP_WITHOUT_GPU();
  ops::SetNumThreads(2);
  const auto eager = DecodeTrace(GetParam(), false);
  const cuda::GraphCounts before = cuda::StepGraphCounts();
  const auto graphs = DecodeTrace(GetParam(), true);
  const cuda::GraphCounts after = cuda::StepGraphCounts();
  ASSERT_EQ(eager.size(), 3u + 80u);
  ASSERT_EQ(graphs.size(), eager.size());
  for (size_t i = 0; i < eager.size(); ++i) EXPECT_EQ(graphs[i], eager[i]) << "step " << i;
  // Two shapes (one sequence in cache one, two in cache two), each captured and then replayed
  // for 40 steps, less the first few of each, which run as is while the buffers grow (a step
  // that allocates drops every graph).
  EXPECT_GE(after.captured - before.captured, 2);
  EXPECT_LE(after.captured - before.captured, 4);
  EXPECT_GE(after.replayed - before.replayed, 2 * 36);
}

// DecodeTrace's steps launched (`launched`) and replayed (`replayed`) another way give
// `plain`'s logits bit for bit.
void ExpectTheSameSteps(const std::vector<std::vector<float>>& plain,
                        const std::vector<std::vector<float>>& launched,
                        const std::vector<std::vector<float>>& replayed) {
  ASSERT_EQ(plain.size(), 3u + 80u);
  ASSERT_EQ(launched.size(), plain.size());
  ASSERT_EQ(replayed.size(), plain.size());
  for (size_t i = 0; i < plain.size(); ++i) {
    EXPECT_EQ(launched[i], plain[i]) << "step " << i;
    EXPECT_EQ(replayed[i], plain[i]) << "step " << i << ", replayed";
  }
}

// Programmatic dependent launch (LoadOptions::cuda_pdl): every kernel that may now start before
// the one before it has finished must still wait for it, so launched and replayed steps give the
// plain launches' logits bit for bit. (On a GPU a missing wait shows as a race; the emulation
// runs kernels one after another and checks the launch path only.)
TEST_P(CudaGraphTest, ProgrammaticLaunchGivesThePlainLaunchesSteps) {
  SKIP_WITHOUT_GPU();
  ops::SetNumThreads(2);
  const auto plain = DecodeTrace(GetParam(), false);
  const auto pdl = DecodeTrace(GetParam(), false, true);
  EXPECT_TRUE(cuda::ProgrammaticLaunch());
  const auto pdl_graphs = DecodeTrace(GetParam(), true, true);
  cuda::SetProgrammaticLaunch(false);  // process-wide: the other tests launch plainly
  ExpectTheSameSteps(plain, pdl, pdl_graphs);
}

// Deep weight loads (LoadOptions::cuda_deep_loads): the automatic choice's one-row and
// multi-output kernels with several steps of weight loads in flight give the default kernels'
// logits bit for bit, launched and replayed (bf16 weights, which those kernels need). On the
// emulation the deep kernels must have run (its launch statistics).
TEST_P(CudaGraphTest, DeepLoadsGiveTheDefaultKernelsSteps) {
  SKIP_WITHOUT_GPU();
  ops::SetNumThreads(2);
  const auto plain = DecodeTrace(GetParam(), false, false, true);
#ifdef MOEMESH_CUDA_EMU_BUILD
  emu::EnableStatistics();
  auto deep_runs = [] {
    int64_t n = 0;
    for (const auto& [name, count] : emu::Statistics()) {
      if (name.rfind("run ", 0) == 0 && name.find("(deep loads)") != std::string::npos) n += count;
    }
    return n;
  };
  const int64_t before = deep_runs();
#endif
  const auto deep = DecodeTrace(GetParam(), false, false, true, true);
  EXPECT_TRUE(cuda::DeepLoads());
  const auto deep_graphs = DecodeTrace(GetParam(), true, false, true, true);
  cuda::SetDeepLoads(false);  // process-wide: the other tests run the default kernels
#ifdef MOEMESH_CUDA_EMU_BUILD
  // At least the o projections and the experts' gate/up of every decode step.
  EXPECT_GE(deep_runs() - before, 2 * 80);
#endif
  ExpectTheSameSteps(plain, deep, deep_graphs);
}

INSTANTIATE_TEST_SUITE_P(Models, CudaGraphTest,
                         ::testing::Values("models/pydoc-moe-17m", "testdata/oracle/qwen2_moe",
                                           "testdata/oracle/mixtral"),
                         [](const auto& info) {
                           std::string n = info.param.substr(info.param.rfind('/') + 1);
                           for (char& c : n) {
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           }
                           return n;
                         });

// The device KV cache's prefix-cache and speculation operations keep the rows they should:
// rows copied to another sequence (CopyRows) give that sequence the original's next logits bit
// for bit; a renamed sequence (Rename) keeps its rows; a truncated one (Truncate) gives its
// pages back and, recomputed from there, reaches the same logits.
class CudaKvCacheTest : public ::testing::TestWithParam<KvDType> {};

TEST_P(CudaKvCacheTest, CopyRenameAndTruncateKeepTheRows) {
  SKIP_WITHOUT_GPU();
  ops::SetNumThreads(2);
  LoadOptions opt;
  opt.device = *ParseDevice("cuda:0");
  opt.kv_dtype = GetParam();
  auto model = Model::Load("testdata/oracle/qwen3_moe", opt);
  ASSERT_TRUE(model.ok()) << model.status();
  const int64_t V = (*model)->config().vocab_size;
  // Room for 3 sequences of 40 positions: 16-token pages.
  auto cache = (*model)->NewCache(120);
  EXPECT_EQ(cache->dtype(), GetParam());
  std::vector<int32_t> prompt;
  for (int i = 0; i < 37; ++i) prompt.push_back((i * 37 + 11) % static_cast<int32_t>(V));
  auto step = [&](uint64_t seq, std::vector<int32_t> tokens, int64_t start) {
    SeqStep st;
    st.seq_id = seq;
    st.tokens = std::move(tokens);
    st.start_pos = start;
    std::vector<float> logits;
    absl::Status s = (*model)->Step({st}, cache.get(), &logits);
    EXPECT_TRUE(s.ok()) << s;
    return logits;
  };
  step(1, prompt, 0);
  const std::vector<float> next1 = step(1, {7}, 37);  // position 37 of sequence 1
  ASSERT_EQ(next1.size(), static_cast<size_t>(V));

  // Copy: sequence 2 gets rows 0..36 from sequence 1 (across three pages, the last partial).
  ASSERT_TRUE(cache->Reserve(2, 37).ok());
  ASSERT_TRUE(cache->CopyRows(1, 2, 0, 37).ok());
  EXPECT_EQ(step(2, {7}, 37), next1);
  EXPECT_EQ(cache->CopyRows(1, 2, 0, 39).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(cache->CopyRows(1, 9, 0, 1).code(), absl::StatusCode::kNotFound);

  // Rename: sequence 1's rows (and pages) now belong to 5.
  ASSERT_TRUE(cache->Rename(1, 5));
  EXPECT_FALSE(cache->Has(1));
  EXPECT_FALSE(cache->Rename(1, 6));
  const std::vector<float> after5 = step(5, {9}, 38);
  EXPECT_EQ(step(2, {9}, 38), after5);

  // Truncate to 20 positions (the pages past the second go back), then recompute positions
  // 20..38: the same logits. (Uncopied or lost rows would be NaN here: the emulation fills new
  // device memory with NaNs.)
  EXPECT_EQ(cache->used_tokens(), 39 + 39);
  cache->Truncate(5, 20);
  EXPECT_EQ(cache->Reserved(5), 20);
  EXPECT_EQ(cache->used_tokens(), 20 + 39);
  std::vector<int32_t> rest(prompt.begin() + 20, prompt.end());
  rest.push_back(7);
  step(5, rest, 20);
  const std::vector<float> again = step(5, {9}, 38);
  ASSERT_EQ(again.size(), after5.size());
  for (int64_t i = 0; i < V; ++i) ASSERT_NEAR(again[i], after5[i], 1e-4) << i;
  cache->Truncate(5, 0);
  cache->Truncate(2, 0);
  EXPECT_EQ(cache->used_tokens(), 0);
  EXPECT_TRUE(cache->Reserve(3, 120).ok());
}

INSTANTIATE_TEST_SUITE_P(Types, CudaKvCacheTest, ::testing::Values(KvDType::kF32, KvDType::kBF16),
                         [](const auto& info) {
                           return std::string(info.param == KvDType::kBF16 ? "bf16" : "fp32");
                         });

// A device that does not exist is a clear error, not a crash.
TEST(CudaDeviceTest, MissingDeviceIsNotFound) {
  auto st = DescribeDevice(*ParseDevice("cuda:64"));
  EXPECT_EQ(st.status().code(), absl::StatusCode::kNotFound) << st.status();
  if (HaveGpu()) {
    auto ok = DescribeDevice(*ParseDevice("cuda:0"));
    ASSERT_TRUE(ok.ok()) << ok.status();
    EXPECT_EQ(ok->rfind("cuda:0 (", 0), 0u) << *ok;
  }
}

}  // namespace
}  // namespace moemesh
