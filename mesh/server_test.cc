#include "mesh/server.h"

#include <string>

#include "gtest/gtest.h"

namespace moemesh {
namespace {

// A second server on a port in use fails with the address (instead of sharing the port's calls
// with the first), CheckCanListen says so before anything starts, and the port is free again
// once the first shuts down.
TEST(ServerTest, APortInUseIsRefusedNotShared) {
  std::string bound;
  auto first = StartServer("127.0.0.1:0", {}, &bound);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_NE(bound, "127.0.0.1:0");
  const absl::Status free = CheckCanListen(bound);
  EXPECT_EQ(free.code(), absl::StatusCode::kUnavailable) << free;
  EXPECT_NE(free.message().find("cannot listen on " + bound + ": in use"), std::string::npos)
      << free;
  auto second = StartServer(bound, {});
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable) << second.status();
  EXPECT_NE(second.status().message().find("cannot listen on " + bound), std::string::npos);
  (*first)->Shutdown();
  first->reset();
  EXPECT_TRUE(CheckCanListen(bound).ok());
  auto again = StartServer(bound, {});
  EXPECT_TRUE(again.ok()) << again.status();
}

// Addresses it cannot judge pass (StartServer reports their problems).
TEST(ServerTest, CheckCanListenPassesWhatItCannotJudge) {
  EXPECT_TRUE(CheckCanListen("127.0.0.1:0").ok());
  EXPECT_TRUE(CheckCanListen("unix:/tmp/x.sock").ok());
  EXPECT_TRUE(CheckCanListen("no-port").ok());
  EXPECT_TRUE(CheckCanListen("no.such.host.invalid:50051").ok());
}

}  // namespace
}  // namespace moemesh
