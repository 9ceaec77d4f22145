// lmforge plan [CONFIG.yaml] [--set KEY=VALUE]... [--ranks N] [--ranks-per-node K]
//              [--memory-gib G] [--tflops T] [--mfu F]
#include <fmt/core.h>

#include <cmath>

#include "commands.h"
#include "lmforge/backend/cuda/runtime.h"
#include "lmforge/core/tensor.h"
#include "lmforge/plan/planner.h"

namespace lmforge::app {

void add_plan(CLI::App& app) {
  struct Opts {
    std::string config;
    std::vector<std::string> sets;
    PlanOptions p;
    double memory_gib = 0;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "plan",
      "Predict a run's memory per rank under each dist.strategy, its traffic, FLOPs and time; "
      "recommend a strategy");
  cmd->add_option("config", o->config, "YAML config (docs/config.md); none = the embedded default");
  cmd->add_option("--set", o->sets, "Override a config key, e.g. --set model.preset=gpt2")
      ->type_name("KEY=VALUE")
      ->take_all();
  cmd->add_option("--ranks", o->p.ranks, "Ranks (processes: GPUs, or CPU ranks) in all")
      ->capture_default_str();
  cmd->add_option("--ranks-per-node", o->p.ranks_per_node,
                  "Ranks on each node (hybrid shards within one); 0 = all on one node")
      ->capture_default_str();
  cmd->add_option("--memory-gib", o->memory_gib,
                  "Memory of each rank in GiB; 0 = this machine's (a GPU's free memory, or "
                  "MemAvailable shared by the node's ranks)")
      ->capture_default_str();
  cmd->add_option("--tflops", o->p.tflops,
                  "Each rank's peak TFLOP/s for the time estimate; 0 = train.peak_tflops, or the "
                  "GPU's datasheet bf16 peak")
      ->capture_default_str();
  cmd->add_option("--mfu", o->p.mfu, "The share of the peak a step reaches")->capture_default_str();
  cmd->callback([o] {
    Config cfg = load_run_config(o->config, o->sets);
    PlanOptions p = o->p;
    const int per_node = p.ranks_per_node > 0 ? p.ranks_per_node : p.ranks;
    const bool gpu =
        cfg.train.device == "cuda" || (cfg.train.device == "auto" && cuda::available());
    if (!(o->memory_gib >= 0) || !std::isfinite(o->memory_gib))
      fail("--memory-gib: must be a number >= 0, got {}", o->memory_gib);
    p.memory_bytes = o->memory_gib * 1073741824.0;
    if (p.memory_bytes == 0)
      p.memory_bytes = gpu ? (cuda::available() ? static_cast<double>(cuda::free_memory()) : 0.0)
                           : static_cast<double>(available_host_memory()) / std::max(1, per_node);
    if (!(p.tflops >= 0 && p.tflops < 1e9)) fail("--tflops: must be >= 0, got {}", p.tflops);
    if (p.tflops == 0)
      p.tflops = cfg.train.peak_tflops > 0  ? cfg.train.peak_tflops
                 : gpu && cuda::available() ? cuda::datasheet_bf16_tflops()
                                            : 0.0;
    fmt::print("{}", format_plan(make_plan(cfg, p)));
    if (p.memory_bytes == 0) fmt::print("(no GPU here: pass --memory-gib for what fits)\n");
    if (p.tflops == 0) fmt::print("(pass --tflops for a time estimate)\n");
  });
}

}  // namespace lmforge::app
