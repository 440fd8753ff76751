#include "mesh/placement.h"

#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "google/protobuf/text_format.h"

namespace moemesh {

absl::StatusOr<ClusterConfig> LoadClusterConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot read cluster config"));
  std::stringstream ss;
  ss << in.rdbuf();
  ClusterConfig c;
  if (!google::protobuf::TextFormat::ParseFromString(ss.str(), &c)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a valid ClusterConfig in protobuf text format (see protos/cluster.proto)"));
  }
  return c;
}

absl::StatusOr<std::set<int32_t>> ParseIndexSet(const std::string& spec, int32_t limit) {
  std::set<int32_t> out;
  std::string s(absl::StripAsciiWhitespace(spec));
  if (s.empty() || s == "*") {
    for (int32_t i = 0; i < limit; ++i) out.insert(i);
    return out;
  }
  for (absl::string_view part : absl::StrSplit(s, ',')) {
    std::vector<std::string> ends = absl::StrSplit(part, '-');
    int32_t a, b;
    if (ends.size() == 1 && absl::SimpleAtoi(ends[0], &a)) {
      b = a;
    } else if (ends.size() != 2 || !absl::SimpleAtoi(ends[0], &a) || !absl::SimpleAtoi(ends[1], &b) || b < a) {
      return absl::InvalidArgumentError(absl::StrCat("bad index range '", std::string(part), "' in '", spec, "'"));
    }
    if (a < 0 || b >= limit) {
      return absl::InvalidArgumentError(
          absl::StrCat("index range '", std::string(part), "' outside [0, ", limit, ")"));
    }
    for (int32_t i = a; i <= b; ++i) out.insert(i);
  }
  return out;
}

std::set<ExpertId> EvenShare(const ModelConfig& cfg, int index, int count) {
  std::set<ExpertId> out;
  const int64_t e = cfg.num_experts;
  const int64_t lo = e * index / count, hi = e * (index + 1) / count;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!cfg.IsMoeLayer(l)) continue;
    for (int64_t x = lo; x < hi; ++x) out.emplace(static_cast<int32_t>(l), static_cast<int32_t>(x));
  }
  return out;
}

namespace {

absl::StatusOr<std::set<ExpertId>> Expand(const std::string& layers, const std::string& experts,
                                          const ModelConfig& cfg) {
  auto ls = ParseIndexSet(layers, static_cast<int32_t>(cfg.num_hidden_layers));
  if (!ls.ok()) return ls.status();
  auto es = ParseIndexSet(experts, static_cast<int32_t>(cfg.num_experts));
  if (!es.ok()) return es.status();
  std::set<ExpertId> out;
  for (int32_t l : *ls) {
    if (!cfg.IsMoeLayer(l)) continue;
    for (int32_t e : *es) out.emplace(l, e);
  }
  return out;
}

}  // namespace

absl::StatusOr<std::set<ExpertId>> ShardsOf(const ClusterConfig& cluster, const ModelConfig& cfg,
                                            int index) {
  if (index < 0 || index >= cluster.experts_size()) {
    return absl::InvalidArgumentError(absl::StrCat("no expert worker ", index, " in the cluster config"));
  }
  const auto& p = cluster.experts(index);
  if (p.shards_size() == 0) return EvenShare(cfg, index, cluster.experts_size());
  std::set<ExpertId> out;
  for (const auto& s : p.shards()) {
    auto part = Expand(s.layers(), s.experts(), cfg);
    if (!part.ok()) return part.status();
    out.insert(part->begin(), part->end());
  }
  return out;
}

absl::StatusOr<std::set<ExpertId>> ParseShardSpec(const std::string& spec, const ModelConfig& cfg) {
  std::set<ExpertId> out;
  for (absl::string_view entry : absl::StrSplit(spec, ';', absl::SkipWhitespace())) {
    std::vector<std::string> le = absl::StrSplit(entry, ':');
    if (le.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat("shard entry '", std::string(entry), "' must be LAYERS:EXPERTS"));
    }
    auto part = Expand(le[0], le[1], cfg);
    if (!part.ok()) return part.status();
    out.insert(part->begin(), part->end());
  }
  return out;
}

std::string ShardSummary(const std::set<ExpertId>& shards) {
  std::map<int32_t, std::vector<int32_t>> by_layer;
  for (const auto& [l, e] : shards) by_layer[l].push_back(e);
  auto ranges = [](const std::vector<int32_t>& v) {
    std::vector<std::string> parts;
    for (size_t i = 0; i < v.size();) {
      size_t j = i;
      while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
      parts.push_back(i == j ? absl::StrCat(v[i]) : absl::StrCat(v[i], "-", v[j]));
      i = j + 1;
    }
    return absl::StrJoin(parts, ",");
  };
  std::vector<std::string> out;
  for (auto it = by_layer.begin(); it != by_layer.end();) {
    auto jt = it;
    while (std::next(jt) != by_layer.end() && std::next(jt)->first == jt->first + 1 &&
           std::next(jt)->second == it->second) {
      ++jt;
    }
    std::string layers = it->first == jt->first ? absl::StrCat(it->first)
                                                : absl::StrCat(it->first, "-", jt->first);
    out.push_back(absl::StrCat(layers, ":", ranges(it->second)));
    it = std::next(jt);
  }
  return absl::StrJoin(out, ";");
}

absl::Status CheckCoverage(const std::vector<std::set<ExpertId>>& workers, const ModelConfig& cfg) {
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!cfg.IsMoeLayer(l)) continue;
    for (int64_t e = 0; e < cfg.num_experts; ++e) {
      ExpertId id(static_cast<int32_t>(l), static_cast<int32_t>(e));
      bool held = false;
      for (const auto& w : workers) held |= w.count(id) != 0;
      if (!held) {
        return absl::InvalidArgumentError(
            absl::StrCat("no expert worker holds expert ", e, " of layer ", l));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace moemesh
