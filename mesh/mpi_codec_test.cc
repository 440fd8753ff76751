#include "mesh/mpi_codec.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "mesh/tensor_codec.h"

namespace moemesh {
namespace mpi_wire {
namespace {

// A request as ExpertDispatcher builds it: x [n, hidden] in `dtype`, ids and weights [n, k].
wire::RunExpertsRequest MakeRequest(wire::DType dtype, int64_t n, int64_t hidden, int64_t k) {
  std::vector<float> x(n * hidden), w(n * k);
  std::vector<int32_t> ids(n * k);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.25f * static_cast<float>(i % 97) - 3.0f;
  for (size_t i = 0; i < ids.size(); ++i) {
    ids[i] = i % 3 == 2 ? -1 : static_cast<int32_t>(i % 16);
    w[i] = 1.0f / static_cast<float>(i + 1);
  }
  wire::RunExpertsRequest req;
  req.set_layer(5);
  EncodeFloats(x.data(), n, hidden, dtype, req.mutable_x());
  EncodeInts(ids.data(), n, k, req.mutable_ids());
  EncodeFloats(w.data(), n, k, wire::DTYPE_F32, req.mutable_weights());
  return req;
}

class RoundTrip : public ::testing::TestWithParam<wire::DType> {};

TEST_P(RoundTrip, RequestAndResponse) {
  const wire::DType dtype = GetParam();
  const wire::RunExpertsRequest req = MakeRequest(dtype, 7, 256, 4);
  std::string buf;
  ASSERT_TRUE(EncodeRequest(42, req, &buf).ok());
  const size_t elem = dtype == wire::DTYPE_BF16 ? 2 : 4;
  // Lean: the payload's bytes plus a fixed header, no per-element overhead.
  EXPECT_EQ(buf.size(), sizeof(MessageHeader) + 3 * sizeof(TensorHeader) + 7 * 256 * elem +
                            2 * 7 * 4 * 4);
  Kind kind;
  uint64_t id = 0;
  ASSERT_TRUE(PeekKind(buf.data(), buf.size(), &kind, &id).ok());
  EXPECT_EQ(kind, Kind::kRequest);
  EXPECT_EQ(id, 42u);
  wire::RunExpertsRequest back;
  id = 0;
  ASSERT_TRUE(DecodeRequest(buf.data(), buf.size(), &id, &back).ok());
  EXPECT_EQ(id, 42u);
  EXPECT_EQ(back.layer(), 5);
  EXPECT_EQ(back.x().dtype(), dtype);
  EXPECT_EQ(back.SerializeAsString(), req.SerializeAsString());

  // The response: out [n, hidden] in x's dtype, within what the client posts for it.
  std::vector<float> out(7 * 256);
  for (size_t i = 0; i < out.size(); ++i) out[i] = -0.5f * static_cast<float>(i % 13);
  wire::RunExpertsResponse resp;
  EncodeFloats(out.data(), 7, 256, dtype, resp.mutable_out());
  EncodeResponse(42, absl::OkStatus(), resp, &buf);
  EXPECT_EQ(buf.size(), MaxResponseBytes(req));
  wire::RunExpertsResponse rback;
  absl::Status status = absl::UnknownError("unset");
  ASSERT_TRUE(DecodeResponse(buf.data(), buf.size(), &id, &status, &rback).ok());
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_EQ(rback.SerializeAsString(), resp.SerializeAsString());
  int64_t rows = 7, cols = 256;
  std::vector<float> decoded;
  ASSERT_TRUE(DecodeFloats(rback.out(), "out", &rows, &cols, &decoded).ok());
  EXPECT_EQ(decoded, out);  // exactly representable in bf16 too
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RoundTrip,
                         ::testing::Values(wire::DTYPE_F32, wire::DTYPE_BF16));

TEST(MpiCodec, ErrorStatusKeepsCodeAndMessage) {
  const wire::RunExpertsRequest req = MakeRequest(wire::DTYPE_BF16, 1, 8, 2);
  std::string buf;
  EncodeResponse(9, absl::InvalidArgumentError("layer 99 out of range [0, 6)"),
                 wire::RunExpertsResponse(), &buf);
  EXPECT_LE(buf.size(), MaxResponseBytes(req));
  uint64_t id = 0;
  absl::Status status;
  wire::RunExpertsResponse resp;
  ASSERT_TRUE(DecodeResponse(buf.data(), buf.size(), &id, &status, &resp).ok());
  EXPECT_EQ(id, 9u);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), "layer 99 out of range [0, 6)");
  EXPECT_FALSE(resp.has_out());

  // A long message is cut so that the response fits the buffer posted for the smallest request.
  EncodeResponse(10, absl::FailedPreconditionError(std::string(10000, 'e')),
                 wire::RunExpertsResponse(), &buf);
  EXPECT_LE(buf.size(), MaxResponseBytes(wire::RunExpertsRequest()));
  ASSERT_TRUE(DecodeResponse(buf.data(), buf.size(), &id, &status, &resp).ok());
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(status.message().size(), kMaxErrorMessageBytes);
}

TEST(MpiCodec, MalformedRequestsTravelAsTheyAre) {
  // What the expert must reject (missing weights, a rank-3 x) arrives exactly so, so its
  // validation gives the same error as over gRPC.
  wire::RunExpertsRequest req = MakeRequest(wire::DTYPE_F32, 2, 4, 2);
  req.clear_weights();
  req.mutable_x()->add_shape(1);
  std::string buf;
  ASSERT_TRUE(EncodeRequest(3, req, &buf).ok());
  wire::RunExpertsRequest back;
  uint64_t id = 0;
  ASSERT_TRUE(DecodeRequest(buf.data(), buf.size(), &id, &back).ok());
  EXPECT_FALSE(back.has_weights());
  EXPECT_EQ(back.x().shape_size(), 3);
  EXPECT_EQ(back.SerializeAsString(), req.SerializeAsString());

  for (int i = 0; i < 3; ++i) req.mutable_x()->add_shape(1);  // rank 6: not carried
  absl::Status st = EncodeRequest(4, req, &buf);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("'x'"), std::string::npos) << st;
}

TEST(MpiCodec, CorruptMessagesAreDataLoss) {
  const wire::RunExpertsRequest req = MakeRequest(wire::DTYPE_F32, 3, 16, 2);
  std::string buf;
  ASSERT_TRUE(EncodeRequest(1, req, &buf).ok());
  uint64_t id;
  wire::RunExpertsRequest back;
  EXPECT_EQ(DecodeRequest(buf.data(), buf.size() - 1, &id, &back).code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(DecodeRequest(buf.data(), 10, &id, &back).code(), absl::StatusCode::kDataLoss);
  std::string bad = buf;
  bad[0] ^= 1;  // magic
  EXPECT_EQ(DecodeRequest(bad.data(), bad.size(), &id, &back).code(), absl::StatusCode::kDataLoss);
  absl::Status status;
  wire::RunExpertsResponse resp;
  EXPECT_EQ(DecodeResponse(buf.data(), buf.size(), &id, &status, &resp).code(),
            absl::StatusCode::kDataLoss);  // a request is not a response

  EncodeStop(&buf);
  Kind kind;
  ASSERT_TRUE(PeekKind(buf.data(), buf.size(), &kind, &id).ok());
  EXPECT_EQ(kind, Kind::kStop);
}

}  // namespace
}  // namespace mpi_wire
}  // namespace moemesh
