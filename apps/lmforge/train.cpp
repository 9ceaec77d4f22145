// lmforge train [CONFIG.yaml] [--set KEY=VALUE]... [--resume[=auto|PATH]]
#include "commands.h"
#include "lmforge/io/config.h"
#include "lmforge/train/trainer.h"

namespace lmforge::app {

void add_train(CLI::App& app) {
  struct Opts {
    std::string config;
    std::vector<std::string> sets;
    std::string resume;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "train",
      "Train a model. Without CONFIG, trains the embedded default (a small GPT on the "
      "demo corpus; see configs/default.yaml).");
  cmd->add_option("config", o->config, "YAML config (docs/config.md)");
  cmd->add_option("--set", o->sets, "Override a config key, e.g. --set train.lr=3e-4")
      ->type_name("KEY=VALUE");
  cmd->add_option("--resume", o->resume,
                  "Continue from a checkpoint: bare or =auto for the newest in run.dir, or a "
                  "checkpoint directory")
      ->expected(0, 1)
      ->default_str("auto");
  cmd->callback([o, cmd] {
    Config cfg;
    ConfigLoader loader(cfg);
    if (o->config.empty())
      loader.load_yaml_text(kDefaultConfigYaml, "<embedded default config>", /*base=*/true);
    else
      loader.load_yaml_file(o->config);
    for (const std::string& s : o->sets) loader.set(s);
    loader.finish();
    std::string resume = o->resume;
    if (cmd->count("--resume") && resume.empty()) resume = "auto";
    train(cfg, resume);
  });
}

}  // namespace lmforge::app
