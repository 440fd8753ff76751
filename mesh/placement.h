// Cluster configuration and expert placement.
#ifndef MOEMESH_MESH_PLACEMENT_H_
#define MOEMESH_MESH_PLACEMENT_H_

#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/config.h"
#include "engine/model.h"
#include "protos/cluster.pb.h"

namespace moemesh {

using ClusterConfig = ::moemesh::cluster::v1::ClusterConfig;

// Reads a ClusterConfig in protobuf text format; errors name the file and the problem.
absl::StatusOr<ClusterConfig> LoadClusterConfig(const std::string& path);

// "0-3,7" -> {0, 1, 2, 3, 7}; "" or "*" -> [0, limit). InvalidArgument outside [0, limit).
absl::StatusOr<std::set<int32_t>> ParseIndexSet(const std::string& spec, int32_t limit);

// Worker `index` of `count`'s even share: the experts of every MoE layer are split into `count`
// contiguous blocks of (nearly) equal size.
std::set<ExpertId> EvenShare(const ModelConfig& cfg, int index, int count);

// The shards of cfg.experts(index): its `shards` entries, or EvenShare when it has none.
absl::StatusOr<std::set<ExpertId>> ShardsOf(const ClusterConfig& cluster, const ModelConfig& cfg,
                                            int index);

// Parses "L:E" entries such as "0-5:0-7;2:8" (layers:experts, ';'-separated) as on the command line.
absl::StatusOr<std::set<ExpertId>> ParseShardSpec(const std::string& spec, const ModelConfig& cfg);

// "0:0-7,1:0-7" style summary of a shard set (layers with identical expert sets are grouped).
std::string ShardSummary(const std::set<ExpertId>& shards);

// InvalidArgument unless every (MoE layer, expert) pair is held by at least one worker.
absl::Status CheckCoverage(const std::vector<std::set<ExpertId>>& workers, const ModelConfig& cfg);

}  // namespace moemesh

#endif  // MOEMESH_MESH_PLACEMENT_H_
