// lmforge train [CONFIG.yaml] [--set KEY=VALUE]... [--resume[=auto|PATH]] [--start-step N]
//               [--reset-optimizer]
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "commands.h"
#include "lmforge/dist/communicator.h"
#include "lmforge/io/config.h"
#include "lmforge/train/trainer.h"

namespace lmforge::app {

Config load_run_config(const std::string& file, const std::vector<std::string>& sets) {
  Config cfg;
  ConfigLoader loader(cfg);
  if (file.empty())
    loader.load_yaml_text(kDefaultConfigYaml, "<embedded default config>", /*base=*/true);
  else
    loader.load_yaml_file(file);
  for (const std::string& s : sets) loader.set(s);
  loader.finish();
  return cfg;
}

void add_train_args(CLI::App* cmd, TrainArgs& o) {
  cmd->add_option("config", o.config, "YAML config (docs/config.md)");
  cmd->add_option("--set", o.sets, "Override a config key, e.g. --set train.lr=3e-4")
      ->type_name("KEY=VALUE");
  cmd->add_option("--resume", o.resume,
                  "Continue from a checkpoint: bare or =auto for the newest in run.dir that "
                  "verifies against its manifest, or a checkpoint directory")
      ->expected(0, 1)
      ->default_str("auto");
  cmd->add_option("--start-step", o.start_step,
                  "With --resume: continue as if N steps were done (step counter and LR "
                  "schedule); the data position still comes from the checkpoint")
      ->type_name("N")
      ->check(in_range(0));
  cmd->add_flag("--reset-optimizer", o.reset_optimizer,
                "With --resume: load the weights only; fresh AdamW state (moments and step "
                "count 0)");
}

bool check_train_command(const std::vector<std::string>& args, int ranks) {
  CLI::App cmd("lmforge train", "train");
  TrainArgs o;
  add_train_args(&cmd, o);
  std::vector<std::string> reversed(args.rbegin(), args.rend());  // CLI11 takes them reversed
  try {
    cmd.parse(reversed);
  } catch (const CLI::CallForHelp&) {
    std::fputs(cmd.help().c_str(), stdout);
    return false;
  }
  const Config cfg = load_run_config(o.config, o.sets);
  validate_train_config(cfg);  // what every rank checks first, and what needs the rank count
  validate_rank_count(cfg, ranks);
  // (what dist::init_world checks in every rank)
  if (cfg.dist.backend == "local" && ranks > 1)
    fail("dist.backend: local runs one process but launch starts {}", ranks);
  if (cfg.dist.ranks_per_node > 0 && ranks % cfg.dist.ranks_per_node != 0)
    fail("dist.ranks_per_node: {} does not divide the {} ranks", cfg.dist.ranks_per_node, ranks);
  return true;
}

void add_train(CLI::App& app) {
  auto o = std::make_shared<TrainArgs>();
  CLI::App* cmd = app.add_subcommand(
      "train",
      "Train a model. Without CONFIG, trains the embedded default (a small GPT on the "
      "demo corpus; see configs/default.yaml).");
  add_train_args(cmd, *o);
  cmd->callback([o, cmd] {
    set_oom_hint(kTrainingOomHint);
    Config cfg = load_run_config(o->config, o->sets);
    ResumeOptions resume{o->resume, o->start_step, o->reset_optimizer};
    if (cmd->count("--resume") && resume.from.empty()) resume.from = "auto";
    // `train --resume my.yaml`: the optional value took the config meant as CONFIG.
    if (o->config.empty() && (resume.from.ends_with(".yaml") || resume.from.ends_with(".yml")) &&
        std::filesystem::is_regular_file(resume.from))
      fail(
          "--resume {}: a config file, taken as the checkpoint to resume; put it first (train {} "
          "--resume), or give the checkpoint as --resume=PATH",
          resume.from, resume.from);
    // A reader of the progress that went away (`train | head`) would end the run unsaved
    // (SIGPIPE): it goes on and saves, and the lost output is one error line at the end, as with
    // a full disk (check_stdout).
    std::signal(SIGPIPE, SIG_IGN);
    TrainResult r = train(cfg, resume);
    // Under launch, the signal launch got (Ctrl-C), which it passed to the ranks as SIGTERM.
    if (const char* f = std::getenv("LMFORGE_INTERRUPTED_FILE"); r.interrupted && f && *f)
      if (std::FILE* in = std::fopen((std::string(f) + ".launch").c_str(), "r")) {
        int sig = 0;
        if (std::fscanf(in, "%d", &sig) == 1 && (sig == SIGINT || sig == SIGTERM))
          r.interrupted = sig;
        std::fclose(in);
      }
    if (r.interrupted) {
      if (dist::rank_info().rank == 0)  // (every rank stopped after the same step)
        std::fprintf(stderr,
                     "lmforge: interrupted (%s) after step %lld; saved %s; continue with the same "
                     "command and --resume\n",
                     r.interrupted == SIGINT ? "Ctrl-C" : strsignal(r.interrupted),
                     static_cast<long long>(r.steps), r.last_checkpoint.c_str());
      // Under launch every rank exits 0 after the save (a rank exiting non-zero would have
      // mpirun abort the others) and rank 0 tells launch the signal, which launch exits with.
      if (const char* f = std::getenv("LMFORGE_INTERRUPTED_FILE"); f && *f) {
        if (dist::rank_info().rank == 0)
          if (std::FILE* out = std::fopen(f, "w")) {
            std::fprintf(out, "%d\n", r.interrupted);
            std::fclose(out);
          }
        return;
      }
      throw CLI::RuntimeError(128 + r.interrupted);
    }
  });
}

}  // namespace lmforge::app
